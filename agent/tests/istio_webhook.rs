//! `membrane istio webhook`: the mutating admission webhook served over HTTPS on loopback,
//! called as the API server calls it (an `admission.k8s.io/v1` AdmissionReview, POSTed with
//! the CA of the webhook configuration), its JSON Patch applied by json-patch; certificate
//! rotation in place; bad requests and bad certificates; `membrane istio webhook-config`; and
//! the Deployment of `membrane istio webhook-manifests`, run as the kubelet would run it.
//! Needs `openssl` and `curl` (scripts/test.sh installs both).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use membrane_tests::{OPENSSL_EC_KEY, openssl};
use serde_json::{Value, json};

fn membrane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_membrane"))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA `{ca}.crt` and a server certificate `{ca}-server.{crt,key}` for the webhook's Service
/// name and 127.0.0.1, signed by it.
fn issue(dir: &Path, ca: &str) {
    issue_for(dir, ca, "DNS:membrane-webhook.membrane.svc,IP:127.0.0.1");
}

/// [`issue`] for these subject alternative names (openssl's form).
fn issue_for(dir: &Path, ca: &str, names: &str) {
    let ec = OPENSSL_EC_KEY;
    let (ca_key, ca_crt) = (format!("{ca}.key"), format!("{ca}.crt"));
    let subject = format!("/CN={ca}");
    openssl(
        dir,
        &[
            &[
                "req", "-x509", "-days", "1", "-subj", &subject, "-keyout", &ca_key, "-out",
                &ca_crt,
            ][..],
            &ec,
        ]
        .concat(),
    );
    let (key, crt) = (format!("{ca}-server.key"), format!("{ca}-server.crt"));
    openssl(
        dir,
        &[
            &[
                "req",
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=membrane-webhook",
                "-addext",
                &format!("subjectAltName={names}"),
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-keyout",
                &key,
                "-out",
                &crt,
            ][..],
            &ec,
        ]
        .concat(),
    );
}

/// Starts the webhook on an ephemeral loopback port; returns it and its address.
fn start(cert: &Path, key: &Path) -> (Server, String) {
    let mut args: Vec<OsString> = ["istio", "webhook", "--listen", "127.0.0.1:0", "--tls-cert"]
        .map(OsString::from)
        .to_vec();
    args.extend([cert.into(), "--tls-key".into(), key.into()]);
    start_with(&args)
}

/// Starts `membrane ARGS`, which must serve the webhook; returns it and its address.
fn start_with(args: &[OsString]) -> (Server, String) {
    let mut child = membrane()
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a line").unwrap();
    let addr = first
        .strip_prefix("membrane istio webhook: serving https://")
        .and_then(|rest| rest.strip_suffix("/inject"))
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    // Keep draining its log so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (server, addr)
}

/// curl against the webhook, trusting `ca`: (status, body).
fn curl(addr: &str, ca: &Path, args: &[&str], path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .args(args)
        .arg(format!("https://{addr}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn post(addr: &str, ca: &Path, body: &str) -> (u16, String) {
    curl(
        addr,
        ca,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ],
        "/inject",
    )
}

/// What the API server sends when `kubectl apply` creates this Pod in an injected namespace.
fn review(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "2b752327-a529-4ffd-b2e2-478455e80a0d",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "kubernetes-admin", "groups": ["kubeadm:cluster-admins", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl-client-side-apply"},
        }
    })
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web", "namespace": "shop", "labels": {"app": "web"},
            "annotations": {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\n"},
        },
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]},
    })
}

/// The Pod of [`pod`] as the API server leaves it after applying the answer's JSON Patch.
fn patched_pod(answer: &Value) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = pod();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

/// The pod's `proxy.istio.io/config` annotation, parsed.
fn proxy_config(pod: &Value) -> Value {
    let text = pod["metadata"]["annotations"]["proxy.istio.io/config"]
        .as_str()
        .unwrap();
    serde_json::from_str(text).unwrap()
}

/// Waits until the webhook's certificate is one `ca` vouches for.
fn wait_until_trusted(addr: &str, ca: &Path, args: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while curl(addr, ca, args, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "{what} was not taken");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_webhook_prepares_created_pods_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    issue(d, "ca1");
    issue(d, "ca2");
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    std::fs::copy(d.join("ca1-server.crt"), &cert).unwrap();
    std::fs::copy(d.join("ca1-server.key"), &key).unwrap();
    let (_server, addr) = start(&cert, &key);
    let ca1 = d.join("ca1.crt");

    assert_eq!(curl(&addr, &ca1, &[], "/healthz"), (200, "ok\n".into()));
    let (code, body) = post(&addr, &ca1, &review(&pod()).to_string());
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let response = &answer["response"];
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "2b752327-a529-4ffd-b2e2-478455e80a0d");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    // The API server applies the patch: the result is what `membrane istio inject` prints.
    let patched = patched_pod(&answer);
    let injected = membrane()
        .args(["istio", "inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(pod().to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(injected.status.success());
    let want: Value = serde_json::from_slice(&injected.stdout).unwrap();
    assert_eq!(patched, want);
    assert_eq!(
        proxy_config(&patched),
        json!({"holdApplicationUntilProxyStarts": true, "concurrency": 2})
    );

    // What is not an AdmissionReview is refused, naming why; other methods and paths too.
    assert_eq!(
        post(&addr, &ca1, "{\"kind\": \"Pod\"}"),
        (
            400,
            "apiVersion/kind: an admission.k8s.io/v1 AdmissionReview expected\n".into()
        )
    );
    let (code, body) = post(&addr, &ca1, "{not json");
    assert!(code == 400 && body.starts_with("body: "), "{code} {body}");
    assert_eq!(curl(&addr, &ca1, &[], "/inject").0, 405);
    assert_eq!(curl(&addr, &ca1, &[], "/other").0, 404);

    // Rotation in place: the next connection gets the new certificate; a half-written one is
    // not taken and the last good one stays.
    let ca2 = d.join("ca2.crt");
    assert_eq!(curl(&addr, &ca2, &[], "/healthz").0, 0, "not yet trusted");
    std::thread::sleep(Duration::from_millis(20)); // a distinct modification time
    std::fs::copy(d.join("ca2-server.key"), &key).unwrap();
    std::fs::copy(d.join("ca2-server.crt"), &cert).unwrap();
    wait_until_trusted(&addr, &ca2, &[], "the new certificate");
    assert_eq!(
        curl(&addr, &ca1, &[], "/healthz").0,
        0,
        "the old one is gone"
    );
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    assert_eq!(curl(&addr, &ca2, &[], "/healthz").0, 200, "last good kept");
}

/// Writes `{ca}-server.{crt,key}` as a Secret's `tls.crt` and `tls.key` into the volume at
/// `volume` the way the kubelet's atomic writer does: into a new directory `version`, then
/// `..data` replaced by a link to it in one rename.
fn kubelet_secret_update(volume: &Path, certs: &Path, ca: &str, version: &str) {
    std::fs::create_dir(volume.join(version)).unwrap();
    for (from, to) in [("crt", "tls.crt"), ("key", "tls.key")] {
        std::fs::copy(
            certs.join(format!("{ca}-server.{from}")),
            volume.join(version).join(to),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(version, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
}

/// The workload `membrane istio webhook-manifests --cert-manager-issuer` prints, run as the
/// kubelet would run it: its command and arguments, the TLS Secret's files (issued as its
/// Certificate asks) where the volume is mounted (a directory here), the container port on
/// loopback; then reached as the API server reaches it (by the Service's DNS name, checking the
/// certificate against it), its readiness probe, and a Pod prepared with the settings it was
/// given.
#[test]
fn the_webhook_runs_as_its_deployment_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = membrane()
        .args([
            "istio",
            "webhook-manifests",
            "--service",
            "membrane/membrane-webhook",
        ])
        .args(["--image", "ghcr.io/example/membrane:0.1.0"])
        .args(["--tls-secret", "membrane-webhook-tls", "--concurrency", "3"])
        .args(["--cert-manager-issuer", "ClusterIssuer/membrane-ca"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    let item = |kind: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind}"))
            .clone()
    };
    let deployment = item("Deployment");
    let certificate = &item("Certificate")["spec"];
    assert_eq!(certificate["privateKey"]["algorithm"], "ECDSA");
    let dns_names: Vec<&str> = certificate["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    // What cert-manager would issue for it (an ECDSA P-256 key, PKCS #8), by two CAs in turn.
    let names = dns_names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    issue_for(d, "ca", &names);
    issue_for(d, "ca2", &names);
    // The volume as the kubelet writes a Secret: the files in a timestamped directory, `..data`
    // a symbolic link to it, each key a link through `..data`.
    let secret = d.join("secret");
    std::fs::create_dir(&secret).unwrap();
    kubelet_secret_update(&secret, d, "ca", "..2026_11_29_16_00_00.1");
    for file in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), secret.join(file)).unwrap();
    }

    let pod_spec = &deployment["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];
    assert_eq!(container["command"], json!(["membrane"]));
    let mount = &container["volumeMounts"][0];
    let volume = pod_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["secret"]["secretName"], "membrane-webhook-tls");
    assert_eq!(certificate["secretName"], "membrane-webhook-tls");
    let mount_path = mount["mountPath"].as_str().unwrap();
    let port = &container["ports"][0];
    let container_listen = format!("0.0.0.0:{}", port["containerPort"]);

    let mut args: Vec<OsString> = Vec::new();
    let mut listen_seen = false;
    for arg in container["args"].as_array().unwrap() {
        let arg = arg.as_str().unwrap();
        if arg == container_listen {
            listen_seen = true;
            args.push("127.0.0.1:0".into());
        } else if let Some(file) = arg.strip_prefix(mount_path) {
            args.push(secret.join(file.trim_start_matches('/')).into());
        } else {
            args.push(arg.into());
        }
    }
    assert!(listen_seen, "the container listens on {container_listen}");
    let (_server, local) = start_with(&args);

    // The API server dials https://NAME.NAMESPACE.svc and checks the certificate against that
    // name: here the name resolves to the loopback address the webhook listens on.
    let port_number = local.rsplit(':').next().unwrap();
    let addr = format!("membrane-webhook.membrane.svc:{port_number}");
    let resolve = format!("{addr}:127.0.0.1");
    let via_dns = ["--resolve", resolve.as_str()];
    let probe = &container["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"], port["name"]);
    assert_eq!(probe["scheme"], "HTTPS");
    let ca = d.join("ca.crt");
    let (code, _) = curl(&addr, &ca, &via_dns, probe["path"].as_str().unwrap());
    assert_eq!(code, 200, "the readiness probe fails");

    let body = review(&pod()).to_string();
    let (code, body) = curl(
        &addr,
        &ca,
        &[
            &via_dns[..],
            &[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ],
        ]
        .concat(),
        "/inject",
    );
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        proxy_config(&patched_pod(&answer)),
        json!({"holdApplicationUntilProxyStarts": true, "concurrency": 3}),
        "the Deployment's --concurrency"
    );

    // A renewed Secret: the kubelet swaps `..data` to a new directory; the next connection
    // gets the new certificate, with no restart.
    assert_eq!(curl(&addr, &d.join("ca2.crt"), &via_dns, "/healthz").0, 0);
    std::thread::sleep(Duration::from_millis(20)); // a distinct modification time
    kubelet_secret_update(&secret, d, "ca2", "..2026_11_29_17_00_00.2");
    wait_until_trusted(&addr, &d.join("ca2.crt"), &via_dns, "the renewed Secret");

    let out = membrane()
        .args([
            "istio",
            "webhook-manifests",
            "--service",
            "membrane/Webhook",
        ])
        .args(["--image", "x", "--tls-secret", "tls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--service's name \"Webhook\""),
        "{out:?}"
    );
}

#[test]
fn a_bad_certificate_or_service_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    issue(d, "ca");
    // The key of another certificate.
    issue(d, "other");
    let out = membrane()
        .args(["istio", "webhook", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(d.join("ca-server.crt"))
        .arg("--tls-key")
        .arg(d.join("other-server.key"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ca-server.crt and ") && err.contains("other-server.key"),
        "{err}"
    );
    let out = membrane()
        .args(["istio", "webhook", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(d.join("missing.crt"))
        .arg("--tls-key")
        .arg(d.join("ca-server.key"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.crt"));

    // webhook-config: the Service and the CA bundle as the API server wants them.
    let out = membrane()
        .args([
            "istio",
            "webhook-config",
            "--service",
            "membrane/membrane-webhook",
            "--ca-file",
        ])
        .arg(d.join("ca.crt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["kind"], "MutatingWebhookConfiguration");
    let hook = &config["webhooks"][0];
    assert_eq!(
        hook["clientConfig"]["service"],
        json!({"namespace": "membrane", "name": "membrane-webhook", "path": "/inject", "port": 443})
    );
    let ca = base64::engine::general_purpose::STANDARD
        .decode(hook["clientConfig"]["caBundle"].as_str().unwrap())
        .unwrap();
    assert_eq!(ca, std::fs::read(d.join("ca.crt")).unwrap());
    let out = membrane()
        .args([
            "istio",
            "webhook-config",
            "--service",
            "membrane-webhook",
            "--ca-file",
        ])
        .arg(d.join("ca.crt"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NAMESPACE/NAME expected"),
        "{out:?}"
    );

    // With cert-manager: no bundle, the CA injector's annotation naming the Certificate that
    // webhook-manifests --cert-manager-issuer makes; one of the two ways is required.
    let config_with = |args: &[&str]| {
        membrane()
            .args([
                "istio",
                "webhook-config",
                "--service",
                "membrane/membrane-webhook",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = config_with(&["--cert-manager"]);
    assert!(out.status.success(), "{out:?}");
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "membrane/membrane-webhook"
    );
    assert!(
        config["webhooks"][0]["clientConfig"]
            .get("caBundle")
            .is_none()
    );
    let out = config_with(&[]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--ca-file"),
        "{out:?}"
    );
}
