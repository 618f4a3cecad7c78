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

/// The `MutatingWebhookConfiguration` that sends Pods to the webhook: the Service
/// `namespace/name` on port 443 at [`PATH`], trusted through `ca_bundle` (PEM). It selects the
/// pods Istio's own injector selects: in namespaces labelled `istio-injection=enabled` unless
/// the pod opts out, and pods labelled `sidecar.istio.io/inject=true` in other namespaces. It
/// never blocks a Pod (`failurePolicy: Ignore`): a pod created while the webhook is down starts
/// without the settings and its filter fails closed.
pub fn configuration(service_namespace: &str, service_name: &str, ca_bundle: &str) -> Value {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_bundle.as_bytes());
    let webhook = |name: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
            "clientConfig": {
                "service": {
                    "namespace": service_namespace,
                    "name": service_name,
                    "path": PATH,
                    "port": 443,
                },
                "caBundle": ca,
            },
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
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME},
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
            "-----BEGIN CERTIFICATE-----\n",
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
}
