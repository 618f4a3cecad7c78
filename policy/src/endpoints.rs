//! Endpoints as users describe them (name, namespace, labels, addresses), and the identity
//! labels they get: a pod's labels plus its namespace, its namespace's labels and its service
//! account, filtered to what counts towards identity.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::decode::{Ctx, Diagnostic, Fields, index, seq, string, strings};
use crate::identity::identity_labels;
use crate::labels::{Label, LabelSet, Source};
use crate::selector::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL};
use crate::yaml::{self, Value};

/// One endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Its name (unique in the file).
    pub name: String,
    /// Its namespace (`default` when not given).
    pub namespace: String,
    /// Its labels as given (no source means `k8s:`).
    pub labels: LabelSet,
    /// Its service account, if any.
    pub service_account: Option<String>,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Address ranges whose every address is this workload (a subnet behind a gateway, a VM's
    /// range); used where workloads are known by prefix rather than by address.
    pub cidrs: Vec<IpNet>,
}

/// The identity labels of an endpoint.
///
/// An endpoint without labels has none yet: it gets `reserved:init`. Labels of the `reserved`
/// source are taken as they are (a trace from `reserved:host`, say) without a namespace.
pub fn endpoint_labels(
    labels: &LabelSet,
    namespace: &str,
    service_account: Option<&str>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> LabelSet {
    if labels.is_empty() {
        return [Label::reserved("init")].into_iter().collect();
    }
    if labels
        .iter()
        .any(|l| l.source == Source::Reserved || l.source == Source::Cidr)
    {
        return labels.clone();
    }
    let mut out = labels.clone();
    if !out.has_key(Source::Any, NAMESPACE_LABEL) {
        out.insert(Label::new(Source::K8s, NAMESPACE_LABEL, namespace));
    }
    let ns = out
        .value(Source::Any, NAMESPACE_LABEL)
        .unwrap_or(namespace)
        .to_string();
    // Kubernetes sets this label on every namespace; NetworkPolicies select namespaces by it.
    out.insert(Label::new(
        Source::K8s,
        format!("{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name"),
        ns.clone(),
    ));
    if let Some(ns_labels) = namespaces.get(&ns) {
        for (k, v) in ns_labels {
            out.insert(Label::new(
                Source::K8s,
                format!("{NAMESPACE_LABELS_PREFIX}{k}"),
                v.clone(),
            ));
        }
    }
    if let Some(sa) = service_account {
        out.insert(Label::new(Source::K8s, SERVICE_ACCOUNT_LABEL, sa));
    }
    identity_labels(&out)
}

const FILE_FIELDS: &[&str] = &["endpoints"];
const ENDPOINT_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "serviceAccount",
    "ips",
    "cidrs",
];

/// Parses an endpoints file:
///
/// ```yaml
/// endpoints:
///   - name: deathstar
///     namespace: default          # optional
///     labels: {org: empire, class: deathstar}
///     serviceAccount: deathstar   # optional
///     ips: [10.200.0.10]          # optional
///     cidrs: [10.200.8.0/24]      # optional
/// ```
pub fn parse_endpoints(file: &str, text: &str) -> Result<Vec<EndpointSpec>, Vec<Diagnostic>> {
    let docs = yaml::parse_documents(text).map_err(|e| {
        vec![Diagnostic {
            file: file.to_string(),
            line: e.pos.line,
            column: e.pos.col,
            field: String::new(),
            message: format!("invalid YAML: {}", e.message),
        }]
    })?;
    let mut ctx = Ctx::new(file);
    let mut out: Vec<EndpointSpec> = Vec::new();
    for doc in &docs {
        let Some(mut f) = Fields::new(&mut ctx, doc, "", FILE_FIELDS) else {
            continue;
        };
        let list = f.get("endpoints");
        f.finish(&mut ctx, &[]);
        let Some(list) = list else { continue };
        let Some(items) = seq(&mut ctx, list, "endpoints") else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let path = index("endpoints", i);
            let Some(mut e) = Fields::new(&mut ctx, item, &path, ENDPOINT_FIELDS) else {
                continue;
            };
            let name = e
                .get("name")
                .and_then(|n| string(&mut ctx, n, &format!("{path}.name")));
            let namespace = e
                .get("namespace")
                .and_then(|n| string(&mut ctx, n, &format!("{path}.namespace")))
                .unwrap_or_else(|| "default".into());
            let mut labels = LabelSet::new();
            if let Some(l) = e.get("labels") {
                let lpath = format!("{path}.labels");
                match &l.value {
                    Value::Map(entries) => {
                        for (k, v) in entries {
                            let (Some(k), Some(v)) =
                                (string(&mut ctx, k, &lpath), string(&mut ctx, v, &lpath))
                            else {
                                continue;
                            };
                            match Label::parse_with_default(&format!("{k}={v}"), Source::K8s) {
                                Ok(label) => labels.insert(label),
                                Err(err) => {
                                    ctx.error(l.pos, &format!("{lpath}.{k}"), err.to_string())
                                }
                            }
                        }
                    }
                    _ => ctx.expected(l, &lpath, "a mapping of labels"),
                }
            }
            let service_account = e
                .get("serviceAccount")
                .and_then(|n| string(&mut ctx, n, &format!("{path}.serviceAccount")));
            let mut ips = Vec::new();
            if let Some(n) = e.get("ips") {
                let ipath = format!("{path}.ips");
                for (j, (pos, text)) in strings(&mut ctx, n, &ipath)
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                {
                    match text.parse::<IpAddr>() {
                        Ok(ip) => ips.push(ip),
                        Err(_) => ctx.error(
                            pos,
                            &index(&ipath, j),
                            format!("invalid IP address {text:?}"),
                        ),
                    }
                }
            }
            let mut cidrs = Vec::new();
            if let Some(n) = e.get("cidrs") {
                let cpath = format!("{path}.cidrs");
                for (j, (pos, text)) in strings(&mut ctx, n, &cpath)
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                {
                    match text.parse::<IpNet>() {
                        // A host prefix with bits below the length set is a typo worth refusing.
                        Ok(net) if net.trunc() == net => cidrs.push(net),
                        Ok(net) => ctx.error(
                            pos,
                            &index(&cpath, j),
                            format!("{text:?} has host bits set (did you mean {}?)", net.trunc()),
                        ),
                        Err(_) => ctx.error(
                            pos,
                            &index(&cpath, j),
                            format!("invalid CIDR {text:?} (expected ADDRESS/LENGTH)"),
                        ),
                    }
                }
            }
            e.finish(&mut ctx, &[]);
            let Some(name) = name else {
                ctx.error(item.pos, &format!("{path}.name"), "missing field `name`");
                continue;
            };
            if out.iter().any(|o| o.name == name) {
                ctx.error(
                    item.pos,
                    &format!("{path}.name"),
                    format!("endpoint {name:?} is listed twice"),
                );
                continue;
            }
            out.push(EndpointSpec {
                name,
                namespace,
                labels,
                service_account,
                ips,
                cidrs,
            });
        }
    }
    if ctx.diags.is_empty() {
        Ok(out)
    } else {
        Err(ctx.diags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_add_namespace_and_filter() {
        let ns = BTreeMap::from([(
            "prod".to_string(),
            BTreeMap::from([("team".to_string(), "a".to_string())]),
        )]);
        let labels: LabelSet = "app=web,pod-template-hash=123".parse().unwrap();
        let l = endpoint_labels(&labels, "prod", Some("web-sa"), &ns);
        assert_eq!(
            l.to_string(),
            "k8s:app=web,k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod,\
             k8s:io.cilium.k8s.namespace.labels.team=a,k8s:io.cilium.k8s.policy.serviceaccount=web-sa,\
             k8s:io.kubernetes.pod.namespace=prod"
        );
        assert_eq!(
            endpoint_labels(&LabelSet::new(), "prod", None, &ns).to_string(),
            "reserved:init"
        );
        let host: LabelSet = "reserved:host".parse().unwrap();
        assert_eq!(endpoint_labels(&host, "prod", None, &ns), host);
    }

    #[test]
    fn parses_endpoint_files() {
        let eps = parse_endpoints(
            "eps.yaml",
            "endpoints:\n  - name: a\n    labels: {app: web}\n    ips: [10.0.0.1]\n  - name: b\n    namespace: prod\n",
        )
        .unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].namespace, "prod");
        let err = parse_endpoints(
            "eps.yaml",
            "endpoints:\n  - name: a\n    ips: [nope]\n    colour: red\n",
        )
        .unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert_eq!(err[0].line, 3);
    }

    #[test]
    fn parses_cidrs_and_refuses_host_bits() {
        let eps = parse_endpoints(
            "ids.yaml",
            "endpoints:\n  - name: lan\n    labels: {zone: lan}\n    cidrs: [10.9.0.0/16, \"fd00:9::/64\"]\n",
        )
        .unwrap();
        assert_eq!(eps[0].cidrs.len(), 2);
        let err = parse_endpoints(
            "ids.yaml",
            "endpoints:\n  - name: lan\n    cidrs: [10.9.0.1/16, 10.9.0.0]\n",
        )
        .unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(
            err[0].message.contains("did you mean 10.9.0.0/16"),
            "{err:?}"
        );
        assert_eq!(err[1].field, "endpoints[0].cidrs[1]");
    }
}
