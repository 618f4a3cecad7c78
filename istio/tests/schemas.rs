//! membrane's Istio manifests and the workloads `membrane istio inject` rewrites, checked against
//! the schemas an API server checks them with: Istio 1.29.2's CRDs, cert-manager's CRDs and
//! Kubernetes' OpenAPI, as
//! validators from the npm registry (istio/schema-check, run by Node.js). There is no API server
//! or istiod here; this is what `kubectl apply` would refuse. Needs `node` and
//! MEMBRANE_ISTIO_SCHEMAS (scripts/test.sh installs both and sets it); fails without them.

use std::io::Write;
use std::process::{Command, Stdio};

use membrane_istio::{Settings, admission, inject, manifests};
use serde_json::{Value, json};

/// Each item's schema error, `None` when valid; `model` names the schema as API version and
/// kind (`v1/Pod`, `extensions.istio.io/v1alpha1/WasmPlugin`, or a part such as `v1/Volume`).
fn schema_errors(items: &[(String, Value)]) -> Vec<Option<String>> {
    let modules = std::env::var("MEMBRANE_ISTIO_SCHEMAS").unwrap_or_else(|_| {
        panic!("MEMBRANE_ISTIO_SCHEMAS is not set: run scripts/test.sh (it installs istio/schema-check)")
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/schema-check/validate.mjs");
    let input: Vec<Value> = items
        .iter()
        .map(|(model, object)| json!({"model": model, "object": object}))
        .collect();
    let mut child = Command::new("node")
        .arg(script)
        .arg(&modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (Node.js) runs the validators: run scripts/test.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&input).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "validate.mjs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), items.len(), "{results:?}");
    results
        .iter()
        .zip(items)
        .map(|(r, (model, _))| {
            assert_eq!(r["model"], model.as_str());
            r["error"].as_str().map(str::to_string)
        })
        .collect()
}

fn model_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["apiVersion"].as_str().unwrap(),
        object["kind"].as_str().unwrap()
    )
}

fn assert_valid(items: &[(String, Value)]) {
    let errors = schema_errors(items);
    for ((model, object), error) in items.iter().zip(&errors) {
        assert!(error.is_none(), "{model} refused: {error:?}\n{object:#}");
    }
}

fn settings_variants() -> [Settings; 2] {
    [
        Settings::default(),
        Settings {
            wasm_url: "oci://ghcr.io/example/membrane-filter:0.1.0".into(),
            sha256: Some("0123456789abcdef".repeat(4)),
            namespace: "mesh-root".into(),
            xds_socket: "/run/membrane/xds.sock".into(),
            concurrency: 4,
        },
    ]
}

#[test]
fn the_manifests_are_valid_istio_resources() {
    let mut items = Vec::new();
    for s in settings_variants() {
        let text = manifests(&s).unwrap();
        for doc in text.split("\n---\n") {
            let object: Value = serde_saphyr::from_str(doc).unwrap();
            items.push((model_of(&object), object));
        }
    }
    let models: Vec<&str> = items.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        models[..3],
        [
            "extensions.istio.io/v1alpha1/WasmPlugin",
            "extensions.istio.io/v1alpha1/WasmPlugin",
            "networking.istio.io/v1alpha3/EnvoyFilter",
        ]
    );
    assert_valid(&items);
}

/// The webhook's configuration is what the API server accepts, and so is every Pod the webhook
/// patches (the patch applied by json-patch, as the API server applies it).
#[test]
fn the_webhook_configuration_and_patched_pods_are_valid_kubernetes_objects() {
    use base64::Engine as _;
    let config = admission::configuration(
        "membrane",
        "membrane-webhook",
        admission::Trust::CaBundle("-----BEGIN CERTIFICATE-----\n"),
    );
    let mut items = vec![(model_of(&config), config)];
    for s in settings_variants() {
        let pod: Value = serde_saphyr::from_str(POD).unwrap();
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE", "object": pod},
        });
        let answer = admission::review(&review, &s).unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        items.extend(sidecar_volumes(&patched["metadata"]));
        items.push((model_of(&patched), patched));
    }
    assert_eq!(
        items[0].0,
        "admissionregistration.k8s.io/v1/MutatingWebhookConfiguration"
    );
    assert_valid(&items);
}

/// The webhook's own workload (Service, Deployment, PodDisruptionBudget, cert-manager
/// Certificate) and its configuration trusting cert-manager are what the API server accepts.
#[test]
fn the_webhook_workload_is_valid_kubernetes_objects() {
    let mut items = Vec::new();
    let issuers = [Some("ClusterIssuer/membrane-ca"), None];
    for ((replicas, issuer), s) in [2, 1].into_iter().zip(issuers).zip(settings_variants()) {
        let w = admission::WebhookWorkload {
            namespace: "membrane".into(),
            name: "membrane-webhook".into(),
            image: "ghcr.io/example/membrane:0.1.0".into(),
            tls_secret: "membrane-webhook-tls".into(),
            replicas,
            issuer: issuer.map(|i| admission::Issuer::parse(i).unwrap()),
        };
        let list = admission::workload(&w, &s).unwrap();
        for object in list["items"].as_array().unwrap() {
            items.push((model_of(object), object.clone()));
        }
    }
    let config = admission::configuration(
        "membrane",
        "membrane-webhook",
        admission::Trust::CertManager,
    );
    items.push((model_of(&config), config));
    let models: Vec<&str> = items.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        models,
        [
            "v1/Service",
            "apps/v1/Deployment",
            "cert-manager.io/v1/Certificate",
            "policy/v1/PodDisruptionBudget",
            "v1/Service",
            "apps/v1/Deployment",
            "admissionregistration.k8s.io/v1/MutatingWebhookConfiguration",
        ]
    );
    assert_valid(&items);
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  annotations:
    sidecar.istio.io/userVolume: '{\"certs\":{\"secret\":{\"secretName\":\"web-certs\"}}}'
    sidecar.istio.io/userVolumeMount: '{\"certs\":{\"mountPath\":\"/etc/certs\"}}'
spec:
  containers:
  - name: web
    image: nginx:1.27
    ports: [{containerPort: 80}]
";

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: orders}}
  template:
    metadata:
      labels: {app: orders}
      annotations: {proxy.istio.io/config: '{\"holdApplicationUntilProxyStarts\": true}'}
    spec:
      containers: [{name: orders, image: ghcr.io/example/orders:3}]
";

const CRONJOB: &str = "apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: '0 3 * * *'
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: report}}
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: ghcr.io/example/report:1}]
";

/// The volumes and mounts the sidecar gets from a pod template's annotations, as the Volume
/// and VolumeMount objects Istio's injector makes of them.
fn sidecar_volumes(template_meta: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (key, model) in [
        ("sidecar.istio.io/userVolume", "v1/Volume"),
        ("sidecar.istio.io/userVolumeMount", "v1/VolumeMount"),
    ] {
        let text = template_meta["annotations"][key].as_str().unwrap();
        let map: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
        for (name, spec) in map {
            let mut object = spec;
            object["name"] = json!(name);
            out.push((model.to_string(), object));
        }
    }
    out
}

#[test]
fn injected_workloads_and_their_sidecar_volumes_are_valid_kubernetes_objects() {
    let mut items = Vec::new();
    for s in settings_variants() {
        for (text, template) in [
            (POD, "/metadata"),
            (DEPLOYMENT, "/spec/template/metadata"),
            (CRONJOB, "/spec/jobTemplate/spec/template/metadata"),
        ] {
            let mut object: Value = serde_saphyr::from_str(text).unwrap();
            assert!(!inject(&mut object, &s).unwrap().is_empty());
            let volumes = sidecar_volumes(object.pointer(template).unwrap());
            assert!(
                volumes
                    .iter()
                    .any(|(_, v)| v["name"] == "membrane-xds" && v.get("hostPath").is_some()),
                "{volumes:?}"
            );
            items.extend(volumes);
            items.push((model_of(&object), object));
        }
    }
    assert_valid(&items);
}

/// The validators refuse what the API server would: without this the two tests above could
/// pass on validators that accept anything.
#[test]
fn the_schemas_refuse_invalid_objects() {
    let s = Settings::default();
    let text = manifests(&s).unwrap();
    let docs: Vec<Value> = text
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let mut plugin = docs[0].clone();
    plugin["spec"]["failStrategy"] = json!("FAIL_SOMETIMES");
    let mut mode = docs[1].clone();
    mode["spec"]["match"][0]["mode"] = json!("BOTH");
    let mut filter = docs[2].clone();
    filter["spec"]["configPatches"][0]["applyTo"] = json!("CLUSTERS");
    let mut pod: Value = serde_saphyr::from_str(POD).unwrap();
    pod["metadata"]["annotations"]["proxy.istio.io/concurrency"] = json!(2);
    let volume =
        json!({"name": "membrane-xds", "hostPath": {"path": "/run/membrane", "type": "Dir"}});
    let mut webhook = admission::configuration(
        "membrane",
        "membrane-webhook",
        admission::Trust::CaBundle("ca"),
    );
    webhook["webhooks"][0]["timeoutSeconds"] = json!("ten");
    let w = admission::WebhookWorkload {
        namespace: "membrane".into(),
        name: "membrane-webhook".into(),
        image: "membrane".into(),
        tls_secret: "tls".into(),
        replicas: 2,
        issuer: Some(admission::Issuer::parse("Issuer/ca").unwrap()),
    };
    let workload = admission::workload(&w, &s).unwrap();
    let mut deployment = workload["items"][1].clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["scheme"] =
        json!("TLS");
    let mut certificate = workload["items"][2].clone();
    certificate["spec"]["privateKey"]["algorithm"] = json!("DSA");
    let mut budget = workload["items"][3].clone();
    budget["spec"]["selector"] = json!("membrane-webhook");
    let items = vec![
        (model_of(&plugin), plugin),
        (model_of(&mode), mode),
        (model_of(&filter), filter),
        (model_of(&pod), pod),
        ("v1/Volume".to_string(), volume),
        (model_of(&webhook), webhook),
        (model_of(&deployment), deployment),
        (model_of(&certificate), certificate),
        (model_of(&budget), budget),
    ];
    let errors = schema_errors(&items);
    for (error, field) in errors.iter().zip([
        "spec/failStrategy",
        "spec/match/0/mode",
        "spec/configPatches/0/applyTo",
        "metadata/annotations/proxy.istio.io~1concurrency",
        "hostPath/type",
        "webhooks/0/timeoutSeconds",
        "spec/template/spec/containers/0/readinessProbe/httpGet/scheme",
        "spec/privateKey/algorithm",
        "spec/selector",
    ]) {
        let error = error
            .as_deref()
            .unwrap_or_else(|| panic!("{field}: accepted"));
        assert!(error.contains(field), "{field}: {error}");
    }
}
