//! membrane's Istio integration (pure: text in, text out).
//!
//! In Istio mode the sidecar Envoy enforces membrane's L7 policy, because Istio's mutual TLS
//! hides requests from the node's proxy. Three pieces wire it up:
//! - two `WasmPlugin`s (phase AUTHZ, `FAIL_RELOAD`) that make istiod deliver membrane's filter
//!   to every sidecar over ECDS, with a small configuration (the agent's cluster; no node id, so
//!   each filter subscribes as its own Envoy's node): an HTTP filter, and a network filter in
//!   Kafka mode on every port, which parses only ports whose policy has Kafka rules and lets
//!   the others through unread;
//! - an `EnvoyFilter` that adds the HTTP/2 cluster reaching the agent's xDS unix socket;
//! - the init policy (a `CiliumNetworkPolicy` selecting `reserved:init`, as Cilium's Istio guide
//!   shipped it), for the agent's policy: a pod whose labels are not known yet may reach Istio's
//!   control plane and DNS, in the datapath and, until the pod's own policy arrives, in its
//!   sidecar;
//! - per workload, the annotations that mount the agent's socket directory into the sidecar
//!   (`sidecar.istio.io/userVolume[Mount]`) and pin Envoy's concurrency (one policy stream per
//!   worker); [`inject`] adds them to a Pod or a workload's pod template, and the mutating
//!   admission webhook ([`admission`]) to every Pod the API server creates.
//!
//! The agent recognises sidecar endpoints by Istio's own pod label [`SIDECAR_LABEL`] and leaves
//! their L7 ports (HTTP and Kafka) to the sidecar instead of redirecting them to its proxy.

use serde_json::{Map, Value, json};

pub mod admission;

/// The label Istio's injector puts on pods with a sidecar (`security.istio.io/tlsMode: istio`).
pub const SIDECAR_LABEL: (&str, &str) = ("security.istio.io/tlsMode", "istio");

/// The Envoy cluster name the filter's configuration points at.
pub const XDS_CLUSTER: &str = "membrane_xds";

const VOLUME: &str = "membrane-xds";

/// What the manifests and the injection depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where istiod's agent fetches the module from (`oci://`, `https://` or `file://`).
    pub wasm_url: String,
    /// The module's SHA-256 (hex), checked by the sidecar before loading it.
    pub sha256: Option<String>,
    /// Namespace of the WasmPlugin and EnvoyFilter (Istio's root namespace applies them
    /// mesh-wide).
    pub namespace: String,
    /// The agent's xDS socket on the node.
    pub xds_socket: String,
    /// Envoy worker threads per sidecar (each holds one policy stream).
    pub concurrency: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            wasm_url: "file:///var/lib/membrane/membrane_wasm_filter.wasm".into(),
            sha256: None,
            namespace: "istio-system".into(),
            xds_socket: "/var/run/membrane/xds.sock".into(),
            concurrency: 2,
        }
    }
}

impl Settings {
    /// The directory holding the socket (what is mounted into the sidecar).
    pub fn socket_dir(&self) -> &str {
        match self.xds_socket.rsplit_once('/') {
            Some(("", _)) => "/",
            Some((dir, _)) => dir,
            None => ".",
        }
    }

    /// The flags of `membrane istio` that give these settings (what the webhook's Deployment
    /// passes to `membrane istio webhook`).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--wasm-url".to_string(),
            self.wasm_url.clone(),
            "--namespace".into(),
            self.namespace.clone(),
            "--xds-socket".into(),
            self.xds_socket.clone(),
            "--concurrency".into(),
            self.concurrency.to_string(),
        ];
        if let Some(h) = &self.sha256 {
            args.extend(["--sha256".to_string(), h.clone()]);
        }
        args
    }

    /// Checks what would otherwise produce a manifest that Istio or Envoy rejects later.
    pub fn validate(&self) -> Result<(), String> {
        if !["oci://", "https://", "http://", "file://"]
            .iter()
            .any(|s| self.wasm_url.starts_with(s))
        {
            return Err(format!(
                "wasm URL {:?}: use oci://, https://, http:// or file://",
                self.wasm_url
            ));
        }
        if let Some(h) = &self.sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("sha256 {h:?}: 64 hex digits expected"));
        }
        if !self.xds_socket.starts_with('/') || self.xds_socket.ends_with('/') {
            return Err(format!(
                "xDS socket {:?}: an absolute file path expected",
                self.xds_socket
            ));
        }
        if self.concurrency == 0 {
            return Err("concurrency: at least 1 (0 means one worker per host CPU, each with its own policy stream)".into());
        }
        Ok(())
    }
}

/// The WasmPlugin that delivers membrane's HTTP filter to every sidecar.
pub fn wasm_plugin(s: &Settings) -> Value {
    plugin(s, "membrane", "HTTP", json!({"xds_cluster": XDS_CLUSTER}))
}

/// The WasmPlugin that delivers the same module as a network filter in Kafka mode.
pub fn kafka_plugin(s: &Settings) -> Value {
    plugin(
        s,
        "membrane-kafka",
        "NETWORK",
        json!({"mode": "kafka", "xds_cluster": XDS_CLUSTER}),
    )
}

fn plugin(s: &Settings, name: &str, kind: &str, config: Value) -> Value {
    let mut spec = json!({
        "url": s.wasm_url,
        "phase": "AUTHZ",
        "failStrategy": "FAIL_RELOAD",
        "type": kind,
        "pluginName": "membrane",
        "pluginConfig": config,
        "match": [{"mode": "CLIENT_AND_SERVER"}],
    });
    if let Some(h) = &s.sha256 {
        spec["sha256"] = json!(h);
    }
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": s.namespace},
        "spec": spec,
    })
}

/// The EnvoyFilter that adds the cluster reaching the agent's xDS socket (HTTP/2, as gRPC needs).
pub fn envoy_filter(s: &Settings) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "membrane-xds", "namespace": s.namespace},
        "spec": {
            "configPatches": [{
                "applyTo": "CLUSTER",
                "match": {"context": "SIDECAR_OUTBOUND"},
                "patch": {
                    "operation": "ADD",
                    "value": {
                        "name": XDS_CLUSTER,
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "typed_extension_protocol_options": {
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                "explicit_http_config": {"http2_protocol_options": {}},
                            },
                        },
                        "load_assignment": {
                            "cluster_name": XDS_CLUSTER,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                                "pipe": {"path": s.xds_socket},
                            }}}]}],
                        },
                    },
                },
            }],
        },
    })
}

/// The init policy: endpoints whose labels are not known yet (`reserved:init`) may be reached
/// from the node, send DNS (UDP 53) anywhere, and reach anything in Istio's namespace (istiod),
/// and nothing else. Cilium's Istio guide shipped the same rule (`istio-sidecar`). The agent
/// enforces it in the datapath for init endpoints and serves it over xDS, where a sidecar applies
/// it to its pod until the pod's own policy arrives (only what it allows: the filter fails
/// closed). It lives in Istio's namespace; a rule selecting `reserved:init` is not confined to
/// its namespace.
pub fn init_policy(s: &Settings) -> Value {
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "membrane-istio-sidecar-init", "namespace": s.namespace},
        "spec": {
            "endpointSelector": {"matchLabels": {"reserved:init": ""}},
            "ingress": [{"fromEntities": ["host"]}],
            "egress": [
                {"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]},
                {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": s.namespace}}]},
            ],
        },
    })
}

fn document(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The manifests as a multi-document YAML stream (JSON documents are YAML): what istiod reads,
/// the WasmPlugins and the EnvoyFilter. The init policy is membrane's own policy and goes where
/// the agent reads policy ([`init_policy_document`]): in a cluster without Cilium's CRDs, a
/// CiliumNetworkPolicy in these manifests would fail `kubectl apply`.
pub fn manifests(s: &Settings) -> Result<String, String> {
    s.validate()?;
    Ok(format!(
        "# membrane in Istio mode: apply in Istio's root namespace.\n{}\n---\n{}\n---\n{}\n",
        document(&wasm_plugin(s)),
        document(&kafka_plugin(s)),
        document(&envoy_filter(s))
    ))
}

/// The init policy as a policy file for the agent's policy directory.
pub fn init_policy_document(s: &Settings) -> Result<String, String> {
    s.validate()?;
    Ok(format!(
        "# membrane's init policy for Istio sidecars: reserved:init may reach istiod and DNS.\n{}\n",
        document(&init_policy(s))
    ))
}

/// Kinds whose pods come from `spec.template`.
const WORKLOADS: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "ReplicationController",
];

/// Prepares a Pod (or a workload's pod template) for membrane in Istio mode: mounts the agent's
/// socket directory into the sidecar and pins Envoy's concurrency unless the pod already sets
/// it. Annotations the pod already has are merged, not replaced. Returns what changed; errors
/// name the field.
pub fn inject(object: &mut Value, s: &Settings) -> Result<Vec<String>, String> {
    s.validate()?;
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("kind: missing")?
        .to_string();
    let (meta, at) = match kind.as_str() {
        "Pod" => (object.get_mut("metadata"), "metadata"),
        k if WORKLOADS.contains(&k) => (
            object.pointer_mut("/spec/template/metadata"),
            "spec.template.metadata",
        ),
        "CronJob" => (
            object.pointer_mut("/spec/jobTemplate/spec/template/metadata"),
            "spec.jobTemplate.spec.template.metadata",
        ),
        other => return Err(format!("kind: {other} has no pod template")),
    };
    let meta = meta
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("{at}: missing"))?;
    let inject_label = meta
        .get("labels")
        .and_then(|l| l.get("sidecar.istio.io/inject"))
        .and_then(Value::as_str);
    if inject_label == Some("false") {
        return Err(format!(
            "{at}.labels.sidecar.istio.io/inject is \"false\": membrane's Istio mode needs the sidecar"
        ));
    }
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| format!("{at}.annotations: not a map"))?;
    let mut changed = Vec::new();
    let dir = s.socket_dir().to_string();
    // Istio reads the volume annotations as JSON and the proxy configuration as YAML (so JSON
    // too); a rewritten annotation is written as JSON, which both accept.
    let mut merge = |key: &str, yaml: bool, add: &dyn Fn(&mut Map<String, Value>) -> bool| {
        let field = format!("{at}.annotations.{key}");
        let parsed = |text: &str| {
            if yaml {
                serde_saphyr::from_str::<Value>(text).ok()
            } else {
                serde_json::from_str::<Value>(text).ok()
            }
        };
        let mut map = match annotations.get(key) {
            None => Map::new(),
            Some(Value::String(text)) if yaml && text.trim().is_empty() => Map::new(),
            Some(Value::String(text)) => match parsed(text) {
                Some(Value::Object(m)) => m,
                _ if yaml => return Err(format!("{field}: not a YAML or JSON map")),
                _ => return Err(format!("{field}: not a JSON object")),
            },
            Some(_) => return Err(format!("{field}: not a string")),
        };
        if add(&mut map) {
            annotations.insert(
                key.to_string(),
                Value::String(Value::Object(map).to_string()),
            );
            changed.push(field);
        }
        Ok(())
    };
    merge("sidecar.istio.io/userVolume", false, &|m| {
        let want = json!({"hostPath": {"path": dir, "type": "Directory"}});
        m.insert(VOLUME.into(), want.clone()) != Some(want)
    })?;
    merge("sidecar.istio.io/userVolumeMount", false, &|m| {
        let want = json!({"mountPath": dir, "readOnly": true});
        m.insert(VOLUME.into(), want.clone()) != Some(want)
    })?;
    merge("proxy.istio.io/config", true, &|m| {
        if m.contains_key("concurrency") {
            return false;
        }
        m.insert("concurrency".into(), json!(s.concurrency));
        true
    })?;
    Ok(changed)
}

/// [`inject`] on a YAML or JSON document (`name` for errors); the result is JSON, which kubectl
/// accepts as it does YAML.
pub fn inject_document(name: &str, text: &str, s: &Settings) -> Result<String, String> {
    let mut object: Value = serde_saphyr::from_str(text).map_err(|e| format!("{name}: {e}"))?;
    inject(&mut object, s).map_err(|e| format!("{name}: {e}"))?;
    Ok(serde_json::to_string_pretty(&object).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
  labels: {app: web}
  annotations:
    sidecar.istio.io/userVolume: '{\"certs\":{\"secret\":{\"secretName\":\"web-certs\"}}}'
    proxy.istio.io/config: '{\"holdApplicationUntilProxyStarts\": true}'
spec:
  containers: [{name: web, image: nginx}]
";

    fn annotations(v: &Value, at: &str) -> Map<String, Value> {
        v.pointer(at).and_then(Value::as_object).cloned().unwrap()
    }

    fn json_annotation(a: &Map<String, Value>, key: &str) -> Value {
        serde_json::from_str(a[key].as_str().unwrap()).unwrap()
    }

    #[test]
    fn a_pod_gets_the_socket_mount_and_a_pinned_concurrency() {
        let s = Settings::default();
        let out: Value =
            serde_json::from_str(&inject_document("web.yaml", POD, &s).unwrap()).unwrap();
        let a = annotations(&out, "/metadata/annotations");
        let volumes = json_annotation(&a, "sidecar.istio.io/userVolume");
        assert_eq!(
            volumes["membrane-xds"],
            json!({"hostPath": {"path": "/var/run/membrane", "type": "Directory"}})
        );
        assert_eq!(
            volumes["certs"]["secret"]["secretName"], "web-certs",
            "merged, not replaced"
        );
        assert_eq!(
            json_annotation(&a, "sidecar.istio.io/userVolumeMount")["membrane-xds"],
            json!({"mountPath": "/var/run/membrane", "readOnly": true})
        );
        let config = json_annotation(&a, "proxy.istio.io/config");
        assert_eq!(config["concurrency"], 2);
        assert_eq!(config["holdApplicationUntilProxyStarts"], true);
        assert_eq!(out["spec"]["containers"][0]["image"], "nginx");
    }

    #[test]
    fn injection_is_idempotent_and_respects_a_set_concurrency() {
        let s = Settings::default();
        let mut pod: Value = serde_saphyr::from_str(POD).unwrap();
        pod["metadata"]["annotations"]["proxy.istio.io/config"] = json!("{\"concurrency\": 4}");
        assert_eq!(inject(&mut pod, &s).unwrap().len(), 2);
        assert!(inject(&mut pod, &s).unwrap().is_empty(), "second run");
        let a = annotations(&pod, "/metadata/annotations");
        assert_eq!(
            json_annotation(&a, "proxy.istio.io/config")["concurrency"],
            4
        );
    }

    /// Istio's documentation writes the proxy configuration as YAML; it is read as such and
    /// its settings kept.
    #[test]
    fn a_yaml_proxy_configuration_is_merged() {
        let pod = "kind: Pod\nmetadata:\n  annotations:\n    proxy.istio.io/config: |\n      holdApplicationUntilProxyStarts: true\n      proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}\n";
        let out: Value =
            serde_json::from_str(&inject_document("p.yaml", pod, &Settings::default()).unwrap())
                .unwrap();
        let config = json_annotation(
            &annotations(&out, "/metadata/annotations"),
            "proxy.istio.io/config",
        );
        assert_eq!(
            config,
            json!({"holdApplicationUntilProxyStarts": true, "proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}, "concurrency": 2})
        );
        // A set concurrency, in YAML, is left alone (and the annotation as written).
        let pinned =
            "kind: Pod\nmetadata:\n  annotations:\n    proxy.istio.io/config: 'concurrency: 1'\n";
        let out: Value =
            serde_json::from_str(&inject_document("p.yaml", pinned, &Settings::default()).unwrap())
                .unwrap();
        assert_eq!(
            out["metadata"]["annotations"]["proxy.istio.io/config"],
            "concurrency: 1"
        );
    }

    #[test]
    fn workloads_are_injected_in_their_pod_template() {
        let deployment = "kind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: []}\n";
        let out: Value = serde_json::from_str(
            &inject_document("d.yaml", deployment, &Settings::default()).unwrap(),
        )
        .unwrap();
        let a = annotations(&out, "/spec/template/metadata/annotations");
        assert!(a.contains_key("sidecar.istio.io/userVolumeMount"));
        assert!(out["metadata"].get("annotations").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let s = Settings::default();
        let err = |text: &str| inject_document("x.yaml", text, &s).unwrap_err();
        assert_eq!(
            err("kind: Service\nmetadata: {}\n"),
            "x.yaml: kind: Service has no pod template"
        );
        assert_eq!(
            err("kind: Deployment\nspec: {}\n"),
            "x.yaml: spec.template.metadata: missing"
        );
        assert!(
            err("kind: Pod\nmetadata: {labels: {sidecar.istio.io/inject: \"false\"}}\n")
                .contains("metadata.labels.sidecar.istio.io/inject is \"false\"")
        );
        assert_eq!(
            err("kind: Pod\nmetadata: {annotations: {proxy.istio.io/config: '[1]'}}\n"),
            "x.yaml: metadata.annotations.proxy.istio.io/config: not a YAML or JSON map"
        );
        assert_eq!(
            err("kind: Pod\nmetadata: {annotations: {sidecar.istio.io/userVolume: 'a: b'}}\n"),
            "x.yaml: metadata.annotations.sidecar.istio.io/userVolume: not a JSON object"
        );
        assert!(err("kind: Pod\nmetadata: [\n").starts_with("x.yaml: "));
        let bad = Settings {
            wasm_url: "ftp://x".into(),
            ..Settings::default()
        };
        assert!(manifests(&bad).unwrap_err().contains("ftp://x"));
    }

    #[test]
    fn the_manifests_wire_the_filter_to_the_agent() {
        let s = Settings {
            sha256: Some("ab".repeat(32)),
            ..Settings::default()
        };
        let text = manifests(&s).unwrap();
        let docs: Vec<Value> = text
            .split("\n---\n")
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        let [plugin, kafka, filter] = docs.as_slice() else {
            panic!("three documents: {text}")
        };
        assert_eq!(plugin["spec"]["type"], "HTTP");
        // Kafka: the same module as a network filter, on every port.
        assert_eq!(kafka["spec"]["type"], "NETWORK");
        assert_eq!(kafka["spec"]["pluginConfig"]["mode"], "kafka");
        assert_eq!(kafka["spec"]["url"], plugin["spec"]["url"]);
        assert_eq!(
            kafka["spec"]["pluginConfig"]["xds_cluster"],
            plugin["spec"]["pluginConfig"]["xds_cluster"]
        );
        assert_eq!(plugin["spec"]["phase"], "AUTHZ");
        assert_eq!(plugin["spec"]["failStrategy"], "FAIL_RELOAD");
        assert_eq!(plugin["spec"]["sha256"], "ab".repeat(32));
        // The filter's cluster is the one the EnvoyFilter adds.
        let cluster = &filter["spec"]["configPatches"][0]["patch"]["value"];
        assert_eq!(
            plugin["spec"]["pluginConfig"]["xds_cluster"],
            cluster["name"]
        );
        assert_eq!(
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"],
            "/var/run/membrane/xds.sock"
        );
        // The checked-in manifests are these, rendered with the defaults.
        let shipped = include_str!("../manifests/membrane.yaml");
        assert_eq!(shipped, manifests(&Settings::default()).unwrap());
        let shipped = include_str!("../manifests/init-policy.yaml");
        assert_eq!(shipped, init_policy_document(&Settings::default()).unwrap());
    }
}
