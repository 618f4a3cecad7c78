//! The mutating admission webhook: what `membrane istio inject` does to a Pod, done by the API
//! server to every Pod it creates in an injected namespace. Pure: an `AdmissionReview` in, an
//! `AdmissionReview` out; `membrane istio webhook` serves it over HTTPS.
//!
//! The webhook never refuses a Pod: one it cannot prepare is admitted unchanged with a warning
//! (kubectl prints it), and its sidecar's filter, which then cannot reach the agent, denies what
//! it would judge (it fails closed).

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{Settings, inject};

/// The name of the webhook configuration. The API server calls mutating webhook configurations
/// in name order, and Istio's injector (`istio-sidecar-injector`, `istio-revision-tag-*`) reads
/// the annotations this webhook writes, so this one must come first: a digit sorts before every
/// letter.
pub const CONFIGURATION_NAME: &str = "0-membrane-istio";

/// The path the webhook serves.
pub const PATH: &str = "/inject";

const API_VERSION: &str = "admission.k8s.io/v1";

/// Answers an `admission.k8s.io/v1` `AdmissionReview`. A Pod being created gets the sidecar
/// settings of [`inject`] as a JSON Patch; anything else is admitted unchanged. Errors (the body
/// is not an AdmissionReview with a request uid) name the field; the server answers them with
/// 400.
pub fn review(body: &Value, s: &Settings) -> Result<Value, String> {
    if body.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
        || body.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return Err(format!(
            "apiVersion/kind: an {API_VERSION} AdmissionReview expected"
        ));
    }
    let request = body.get("request").ok_or("request: missing")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("request.uid: missing")?;
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = request.pointer("/kind/group").and_then(Value::as_str) == Some("")
        && request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod");
    let creates = request.get("operation").and_then(Value::as_str) == Some("CREATE");
    if let (true, true, Some(pod)) = (is_pod, creates, request.get("object")) {
        let mut warnings = Vec::new();
        if !opted_out(pod) {
            if sidecar_present(pod) {
                warnings.push(format!(
                    "membrane: the Istio sidecar was injected before membrane's settings; the \
                     webhook configuration {CONFIGURATION_NAME:?} must sort before Istio's"
                ));
            }
            let mut prepared = pod.clone();
            match inject(&mut prepared, s) {
                Ok(changed) if !changed.is_empty() => {
                    let patch = json_patch::diff(pod, &prepared);
                    let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
                    response["patchType"] = json!("JSONPatch");
                    response["patch"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes));
                }
                Ok(_) => {}
                Err(e) => warnings.push(format!(
                    "membrane: the pod is not prepared for membrane's sidecar filter: {e}"
                )),
            }
        }
        if !warnings.is_empty() {
            response["warnings"] = json!(warnings);
        }
    }
    Ok(json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}))
}

/// The pod opted out of Istio's sidecar (label, or the older annotation).
fn opted_out(pod: &Value) -> bool {
    ["labels", "annotations"].iter().any(|m| {
        pod.pointer(&format!("/metadata/{m}/sidecar.istio.io~1inject"))
            .and_then(Value::as_str)
            == Some("false")
    })
}

/// Istio's injector already ran (its status annotation, or the sidecar container).
fn sidecar_present(pod: &Value) -> bool {
    pod.pointer("/metadata/annotations/sidecar.istio.io~1status")
        .is_some()
        || ["containers", "initContainers"].iter().any(|list| {
            pod.pointer(&format!("/spec/{list}"))
                .and_then(Value::as_array)
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == "istio-proxy"))
        })
}

/// How the API server comes to trust the webhook's certificate.
#[derive(Clone, Copy, Debug)]
pub enum Trust<'a> {
    /// This CA (PEM) as the configuration's `caBundle`.
    CaBundle(&'a str),
    /// cert-manager's CA injector fills the `caBundle` from the webhook's Certificate (named
    /// as its Service, in its namespace: [`workload`] with an issuer makes it) and keeps it
    /// current when the CA changes.
    CertManager,
}

/// The `MutatingWebhookConfiguration` that sends Pods to the webhook: the Service
/// `namespace/name` on port 443 at [`PATH`], trusted as `trust` says. It selects the pods
/// Istio's own injector selects: in namespaces labelled `istio-injection=enabled` unless the
/// pod opts out, and pods labelled `sidecar.istio.io/inject=true` in other namespaces. It never
/// blocks a Pod (`failurePolicy: Ignore`): a pod created while the webhook is down starts
/// without the settings and its filter fails closed.
pub fn configuration(service_namespace: &str, service_name: &str, trust: Trust<'_>) -> Value {
    let webhook = |name: &str, namespace_selector: Value, object_selector: Value| {
        let mut client = json!({
            "service": {
                "namespace": service_namespace,
                "name": service_name,
                "path": PATH,
                "port": 443,
            },
        });
        if let Trust::CaBundle(pem) = trust {
            client["caBundle"] =
                json!(base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()));
        }
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
            "clientConfig": client,
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
        })
    };
    let mut metadata = json!({"name": CONFIGURATION_NAME});
    if let Trust::CertManager = trust {
        // cert-manager's CA injector keeps the caBundle equal to the Certificate's CA.
        metadata["annotations"] = json!({
            "cert-manager.io/inject-ca-from": format!("{service_namespace}/{service_name}"),
        });
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": [
            webhook(
                "namespace.membrane.istio.io",
                json!({"matchLabels": {"istio-injection": "enabled"}}),
                json!({"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}),
            ),
            webhook(
                "object.membrane.istio.io",
                json!({"matchExpressions": [{"key": "istio-injection", "operator": "DoesNotExist"}]}),
                json!({"matchLabels": {"sidecar.istio.io/inject": "true"}}),
            ),
        ],
    })
}

/// Where the webhook's Deployment mounts its TLS Secret (`tls.crt`, `tls.key`: a
/// `kubernetes.io/tls` Secret, as cert-manager or `kubectl create secret tls` writes it).
pub const TLS_MOUNT: &str = "/etc/membrane/webhook-tls";

/// The port the webhook's container listens on: unprivileged, so the container runs as a
/// non-root user; its Service maps 443 to it.
pub const CONTAINER_PORT: u16 = 8443;

/// What the webhook's workload is made of (`membrane istio webhook-manifests`).
#[derive(Clone, Debug)]
pub struct WebhookWorkload {
    /// The namespace of the Service, Deployment and TLS Secret.
    pub namespace: String,
    /// The Service's name (also the Deployment's): what the webhook configuration names.
    pub name: String,
    /// A container image whose `membrane` binary is on its PATH.
    pub image: String,
    /// The `kubernetes.io/tls` Secret holding the serving certificate for
    /// `NAME.NAMESPACE.svc`.
    pub tls_secret: String,
    /// Webhook pods; more than one adds the PodDisruptionBudget.
    pub replicas: u32,
    /// The cert-manager issuer that keeps `tls_secret` filled: with one, the workload includes
    /// the Certificate.
    pub issuer: Option<Issuer>,
}

/// A cert-manager issuer: an `Issuer` in the webhook's namespace or a `ClusterIssuer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    pub kind: String,
    pub name: String,
}

impl Issuer {
    /// `Issuer/NAME` or `ClusterIssuer/NAME`.
    pub fn parse(text: &str) -> Result<Issuer, String> {
        match text.split_once('/') {
            Some((kind @ ("Issuer" | "ClusterIssuer"), name)) if dns_subdomain(name) => {
                Ok(Issuer {
                    kind: kind.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!(
                "--cert-manager-issuer {text:?}: Issuer/NAME or ClusterIssuer/NAME expected"
            )),
        }
    }
}

impl WebhookWorkload {
    /// Checks the names the API server would refuse, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !dns_label(&self.namespace) {
            return Err(format!(
                "--service's namespace {:?}: a namespace name: at most 63 of a-z, 0-9 and '-', \
                 beginning and ending with a letter or digit",
                self.namespace
            ));
        }
        // Service names are DNS-1035 labels: they also begin with a letter.
        if !dns_label(&self.name) || !self.name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(format!(
                "--service's name {:?}: a Service name: at most 63 of a-z, 0-9 and '-', \
                 beginning with a letter and ending with a letter or digit",
                self.name
            ));
        }
        if !dns_subdomain(&self.tls_secret) {
            return Err(format!(
                "--tls-secret {:?}: a Secret name: at most 253 characters, dot-separated parts \
                 of a-z, 0-9 and '-' that begin and end with a letter or digit",
                self.tls_secret
            ));
        }
        if self.image.is_empty() || self.image.contains(char::is_whitespace) {
            return Err(format!(
                "--image {:?}: an image reference expected",
                self.image
            ));
        }
        if self.replicas == 0 {
            return Err("--replicas: at least 1 (no replica admits every Pod unprepared)".into());
        }
        Ok(())
    }
}

/// A DNS-1123 subdomain (most object names): dot-separated labels, at most 253 characters.
fn dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(dns_label)
}

/// A DNS-1123 label.
fn dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// The webhook's workload, as a `v1` `List` for `kubectl apply`: the Service the webhook
/// configuration names (port 443), the Deployment that runs `membrane istio webhook` with `s`
/// (the settings `membrane istio manifests` was given, so that pods are prepared for those
/// manifests), with an issuer the cert-manager Certificate that fills its TLS Secret, and,
/// with more than one replica, a PodDisruptionBudget keeping one up through
/// node drains: the configuration's `failurePolicy: Ignore` would admit pods unprepared while
/// none is ready. The pods opt out of Istio's sidecar (the webhook needs none, and it must not
/// wait for itself), need no API access (no service account token) and run as non-root with a
/// read-only root filesystem.
pub fn workload(w: &WebhookWorkload, s: &Settings) -> Result<Value, String> {
    w.validate()?;
    s.validate()?;
    let selector = json!({
        "app.kubernetes.io/name": w.name,
        "app.kubernetes.io/component": "istio-webhook",
    });
    let mut labels = selector.clone();
    labels["app.kubernetes.io/part-of"] = json!("membrane");
    let mut pod_labels = labels.clone();
    pod_labels["sidecar.istio.io/inject"] = json!("false");
    let metadata = json!({"name": w.name, "namespace": w.namespace, "labels": labels});
    let mut args: Vec<String> = [
        "istio",
        "webhook",
        "--listen",
        &format!("0.0.0.0:{CONTAINER_PORT}"),
        "--tls-cert",
        &format!("{TLS_MOUNT}/tls.crt"),
        "--tls-key",
        &format!("{TLS_MOUNT}/tls.key"),
    ]
    .map(str::to_string)
    .to_vec();
    args.extend(s.args());
    let probe = |period: u32| {
        json!({
            "httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
        })
    };
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": selector,
            "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}],
        },
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": w.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    // Replicas on different nodes, so that one node going down leaves one.
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": selector},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }]}},
                    "containers": [{
                        "name": "webhook",
                        "image": w.image,
                        "command": ["membrane"],
                        "args": args,
                        "ports": [{"name": "https", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
                        "readinessProbe": probe(5),
                        "livenessProbe": probe(10),
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "32Mi"},
                            "limits": {"memory": "128Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "tls", "mountPath": TLS_MOUNT, "readOnly": true}],
                    }],
                    "volumes": [{"name": "tls", "secret": {"secretName": w.tls_secret}}],
                },
            },
        },
    });
    let mut items = vec![service, deployment];
    if let Some(issuer) = &w.issuer {
        let host = format!("{}.{}.svc", w.name, w.namespace);
        items.push(json!({
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": metadata,
            "spec": {
                "secretName": w.tls_secret,
                // The name the API server dials (and checks the certificate against).
                "dnsNames": [host, format!("{host}.cluster.local")],
                "issuerRef": {"group": "cert-manager.io", "kind": issuer.kind, "name": issuer.name},
                "privateKey": {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"},
                "usages": ["digital signature", "server auth"],
            },
        }));
    }
    if w.replicas > 1 {
        items.push(json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata,
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}},
        }));
    }
    Ok(json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AdmissionReview as the API server sends it for `kubectl run` of a pod (the shape of
    /// Kubernetes' documentation of `admission.k8s.io/v1`).
    fn create_pod(pod: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "web",
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "admin", "groups": ["system:authenticated"]},
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            }
        })
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"sidecar.istio.io/userVolume": "{\"certs\":{\"emptyDir\":{}}}"}},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        })
    }

    /// The patch of an answer, applied by json-patch to the object it was computed for.
    fn patched(answer: &Value, object: &Value) -> Value {
        let r = &answer["response"];
        assert_eq!(r["patchType"], "JSONPatch", "{answer}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut out = object.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    #[test]
    fn a_created_pod_gets_what_inject_gives_it() {
        let s = Settings::default();
        let answer = review(&create_pod(pod()), &s).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(
            answer["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("warnings").is_none(), "{answer}");
        let mut want = pod();
        inject(&mut want, &s).unwrap();
        assert_eq!(patched(&answer, &pod()), want);
        // Also on a pod with no annotations at all.
        let mut bare = pod();
        bare["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        let answer = review(&create_pod(bare.clone()), &s).unwrap();
        let mut want = bare.clone();
        inject(&mut want, &s).unwrap();
        assert_eq!(patched(&answer, &bare), want);
    }

    #[test]
    fn other_requests_and_prepared_or_opted_out_pods_pass_unchanged() {
        let s = Settings::default();
        let unchanged = |body: &Value| {
            let answer = review(body, &s).unwrap();
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none(), "{answer}");
            answer
        };
        let mut update = create_pod(pod());
        update["request"]["operation"] = json!("UPDATE");
        unchanged(&update);
        let mut deployment = create_pod(pod());
        deployment["request"]["kind"] =
            json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        unchanged(&deployment);
        let mut opted_out = pod();
        opted_out["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
        let answer = unchanged(&create_pod(opted_out));
        assert!(answer["response"].get("warnings").is_none());
        let mut prepared = pod();
        inject(&mut prepared, &s).unwrap();
        unchanged(&create_pod(prepared));
    }

    #[test]
    fn problems_are_warned_about_and_bad_reviews_refused() {
        let s = Settings::default();
        let mut bad = pod();
        bad["metadata"]["annotations"]["proxy.istio.io/config"] = json!("[1]");
        let answer = review(&create_pod(bad), &s).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        assert_eq!(
            answer["response"]["warnings"][0],
            "membrane: the pod is not prepared for membrane's sidecar filter: metadata.annotations.proxy.istio.io/config: not a YAML or JSON map"
        );
        // Istio's injector came first: the settings are still written, and the order named.
        let mut late = pod();
        late["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "istio-proxy", "image": "istio/proxyv2"}));
        let answer = review(&create_pod(late.clone()), &s).unwrap();
        assert!(
            answer["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("must sort before Istio's"),
            "{answer}"
        );
        assert!(
            patched(&answer, &late)["metadata"]["annotations"]["sidecar.istio.io/userVolumeMount"]
                .is_string()
        );

        assert_eq!(
            review(&json!({"kind": "AdmissionReview"}), &s).unwrap_err(),
            "apiVersion/kind: an admission.k8s.io/v1 AdmissionReview expected"
        );
        let mut no_uid = create_pod(pod());
        no_uid["request"].as_object_mut().unwrap().remove("uid");
        assert_eq!(review(&no_uid, &s).unwrap_err(), "request.uid: missing");
    }

    #[test]
    fn the_configuration_calls_the_service_before_istio_s_injector() {
        let c = configuration(
            "membrane",
            "membrane-webhook",
            Trust::CaBundle("-----BEGIN CERTIFICATE-----\n"),
        );
        assert!(CONFIGURATION_NAME < "istio-revision-tag-default");
        assert!(CONFIGURATION_NAME < "istio-sidecar-injector");
        let hooks = c["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        for h in hooks {
            assert_eq!(h["clientConfig"]["service"]["path"], PATH);
            assert_eq!(h["failurePolicy"], "Ignore");
            let ca = base64::engine::general_purpose::STANDARD
                .decode(h["clientConfig"]["caBundle"].as_str().unwrap())
                .unwrap();
            assert_eq!(ca, b"-----BEGIN CERTIFICATE-----\n");
        }
    }

    fn webhook_workload(replicas: u32) -> WebhookWorkload {
        WebhookWorkload {
            namespace: "membrane".into(),
            name: "membrane-webhook".into(),
            image: "ghcr.io/example/membrane:0.1.0".into(),
            tls_secret: "membrane-webhook-tls".into(),
            replicas,
            issuer: None,
        }
    }

    /// The parts of the workload that must agree with each other and with the configuration:
    /// a mismatch shows up only in a cluster, as a webhook nobody reaches.
    #[test]
    fn the_webhook_workload_hangs_together() {
        let s = Settings {
            concurrency: 3,
            ..Settings::default()
        };
        let list = workload(&webhook_workload(2), &s).unwrap();
        let items = list["items"].as_array().unwrap();
        let (service, deployment, budget) = (&items[0], &items[1], &items[2]);
        let template = &deployment["spec"]["template"];
        let container = &template["spec"]["containers"][0];

        // The configuration's Service, port 443, reaches the container's port by name.
        let config = configuration("membrane", "membrane-webhook", Trust::CaBundle("ca"));
        let target = &config["webhooks"][0]["clientConfig"]["service"];
        assert_eq!(service["metadata"]["namespace"], target["namespace"]);
        assert_eq!(service["metadata"]["name"], target["name"]);
        assert_eq!(service["spec"]["ports"][0]["port"], target["port"]);
        let port = &container["ports"][0];
        assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
        assert_eq!(port["containerPort"], CONTAINER_PORT);
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let listen = format!("0.0.0.0:{CONTAINER_PORT}");
        assert!(args.windows(2).any(|w| w == ["--listen", listen.as_str()]));
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["httpGet"],
                json!({"path": "/healthz", "port": port["name"], "scheme": "HTTPS"})
            );
        }

        // The Service, the Deployment and the budget select the pods, and only them.
        let pod_labels = template["metadata"]["labels"].as_object().unwrap();
        for selector in [
            &service["spec"]["selector"],
            &deployment["spec"]["selector"]["matchLabels"],
            &budget["spec"]["selector"]["matchLabels"],
        ] {
            for (k, v) in selector.as_object().unwrap() {
                assert_eq!(pod_labels.get(k), Some(v), "{k}");
            }
        }
        // Neither Istio's injector nor this webhook's own selectors take the webhook's pods.
        assert_eq!(pod_labels["sidecar.istio.io/inject"], "false");
        assert_eq!(
            config["webhooks"][0]["objectSelector"]["matchExpressions"][0]["values"],
            json!(["false"])
        );
        assert_eq!(
            config["webhooks"][1]["objectSelector"]["matchLabels"]["sidecar.istio.io/inject"],
            "true"
        );

        // The Secret is mounted where the arguments read the certificate; the settings follow.
        assert_eq!(
            template["spec"]["volumes"][0],
            json!({"name": "tls", "secret": {"secretName": "membrane-webhook-tls"}})
        );
        assert_eq!(container["volumeMounts"][0]["mountPath"], TLS_MOUNT);
        let cert = format!("{TLS_MOUNT}/tls.crt");
        let key = format!("{TLS_MOUNT}/tls.key");
        assert!(args.windows(2).any(|w| w == ["--tls-cert", cert.as_str()]));
        assert!(args.windows(2).any(|w| w == ["--tls-key", key.as_str()]));
        assert!(args.windows(2).any(|w| w == ["--concurrency", "3"]));
        assert_eq!(budget["spec"]["minAvailable"], 1);

        // One replica: no budget, which would block every drain of its node.
        let single = workload(&webhook_workload(1), &s).unwrap();
        let kinds: Vec<&Value> = single["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["kind"])
            .collect();
        assert_eq!(kinds, ["Service", "Deployment"]);
    }

    /// With cert-manager: the Certificate fills the Secret the Deployment mounts, names the host
    /// the API server dials, and is the one the configuration's CA injection reads.
    #[test]
    fn cert_manager_fills_the_secret_and_the_ca_bundle() {
        let mut w = webhook_workload(2);
        w.issuer = Some(Issuer::parse("ClusterIssuer/membrane-ca").unwrap());
        let list = workload(&w, &Settings::default()).unwrap();
        let items = list["items"].as_array().unwrap();
        let find = |kind: &str| items.iter().find(|i| i["kind"] == kind).unwrap();
        let certificate = find("Certificate");
        let volume = &find("Deployment")["spec"]["template"]["spec"]["volumes"][0];
        assert_eq!(
            certificate["spec"]["secretName"],
            volume["secret"]["secretName"]
        );
        assert_eq!(
            certificate["spec"]["issuerRef"],
            json!({"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "membrane-ca"})
        );

        let config = configuration("membrane", "membrane-webhook", Trust::CertManager);
        let service = &config["webhooks"][0]["clientConfig"]["service"];
        let dialled = format!(
            "{}.{}.svc",
            service["name"].as_str().unwrap(),
            service["namespace"].as_str().unwrap()
        );
        assert_eq!(certificate["spec"]["dnsNames"][0], dialled.as_str());
        let injected_from = format!(
            "{}/{}",
            certificate["metadata"]["namespace"].as_str().unwrap(),
            certificate["metadata"]["name"].as_str().unwrap()
        );
        assert_eq!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            injected_from.as_str()
        );
        for hook in config["webhooks"].as_array().unwrap() {
            assert!(hook["clientConfig"].get("caBundle").is_none(), "{hook}");
        }
        // Without an issuer: no Certificate, and the bundle is given.
        let plain = workload(&webhook_workload(2), &Settings::default()).unwrap();
        assert!(
            !plain["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["kind"] == "Certificate")
        );
        let given = configuration("membrane", "membrane-webhook", Trust::CaBundle("ca"));
        assert!(given["metadata"].get("annotations").is_none());

        for bad in [
            "membrane-ca",
            "Certificate/ca",
            "Issuer/",
            "ClusterIssuer/Ca",
        ] {
            assert!(
                Issuer::parse(bad)
                    .unwrap_err()
                    .starts_with("--cert-manager-issuer"),
                "{bad}"
            );
        }
        assert_eq!(
            Issuer::parse("Issuer/ca.membrane").unwrap(),
            Issuer {
                kind: "Issuer".into(),
                name: "ca.membrane".into()
            }
        );
    }

    #[test]
    fn a_webhook_workload_the_api_server_would_refuse_is_refused_naming_the_flag() {
        let s = Settings::default();
        let refused = |change: fn(&mut WebhookWorkload)| {
            let mut w = webhook_workload(2);
            change(&mut w);
            workload(&w, &s).unwrap_err()
        };
        assert!(
            refused(|w| w.namespace = "Shop".into()).starts_with("--service's namespace \"Shop\"")
        );
        assert!(refused(|w| w.name = "9hook".into()).starts_with("--service's name \"9hook\""));
        assert!(refused(|w| w.name = "hook-".into()).starts_with("--service's name"));
        assert!(refused(|w| w.name = "h".repeat(64)).starts_with("--service's name"));
        assert!(refused(|w| w.tls_secret = "a..b".into()).starts_with("--tls-secret \"a..b\""));
        assert!(refused(|w| w.tls_secret = "tls_cert".into()).starts_with("--tls-secret"));
        assert!(refused(|w| w.image = "a b".into()).starts_with("--image"));
        assert!(refused(|w| w.replicas = 0).starts_with("--replicas"));
        // Dotted Secret names are fine (cert-manager's are often so).
        let mut w = webhook_workload(2);
        w.tls_secret = "membrane.webhook-tls".into();
        assert!(workload(&w, &s).is_ok());
        let bad = Settings {
            concurrency: 0,
            ..Settings::default()
        };
        assert!(
            workload(&webhook_workload(2), &bad)
                .unwrap_err()
                .starts_with("concurrency")
        );
    }
}
