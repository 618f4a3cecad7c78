use super::*;
use crate::labels::LabelSet;
use crate::rule::{L7Rules, Peers, Protocol};

fn ok(text: &str) -> PolicySet {
    match PolicySet::from_sources([("p.yaml", text)]) {
        Ok(s) => s,
        Err(d) => panic!("unexpected errors: {d:#?}"),
    }
}

/// The problems as `line:col: field: message`, for compact assertions.
fn errs(text: &str) -> Vec<String> {
    match PolicySet::from_sources([("p.yaml", text)]) {
        Ok(_) => panic!("expected errors"),
        Err(d) => d
            .iter()
            .map(|d| format!("{}:{}: {}: {}", d.line, d.column, d.field, d.message))
            .collect(),
    }
}

fn cnp(spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: prod\nspec:\n{spec}"
    )
}

fn labels(s: &str) -> LabelSet {
    s.parse().unwrap()
}

#[test]
fn namespaced_selectors_are_confined() {
    let set = ok(&cnp(
        "  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints:\n    - {}\n    - matchLabels: {k8s:io.kubernetes.pod.namespace: other, app: x}\n    - matchLabels: {reserved:host: \"\"}\n",
    ));
    let r = &set.rules[0];
    assert!(
        r.endpoint_selector
            .matches(&labels("app=web,io.kubernetes.pod.namespace=prod"))
    );
    assert!(
        !r.endpoint_selector
            .matches(&labels("app=web,io.kubernetes.pod.namespace=dev"))
    );
    let Peers::Selected(peers) = &r.ingress[0].peers else {
        panic!()
    };
    assert!(
        peers[0]
            .selector
            .matches(&labels("io.kubernetes.pod.namespace=prod")),
        "{{}} is the namespace"
    );
    assert!(
        !peers[0]
            .selector
            .matches(&labels("io.kubernetes.pod.namespace=dev"))
    );
    assert!(
        peers[1]
            .selector
            .matches(&labels("app=x,io.kubernetes.pod.namespace=other")),
        "names a namespace"
    );
    assert!(
        peers[2].selector.matches(&labels("reserved:host")),
        "reserved labels are not confined"
    );
    assert!(r.enforce_ingress && !r.enforce_egress);
}

#[test]
fn init_selector_is_not_confined() {
    let set = ok(&cnp(
        "  endpointSelector: {matchLabels: {reserved:init: \"\"}}\n  egress:\n  - toEntities: [host]\n",
    ));
    assert!(
        set.rules[0]
            .endpoint_selector
            .matches(&labels("reserved:init"))
    );
}

#[test]
fn clusterwide_empty_peer_means_every_pod_not_world() {
    let set = ok(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n",
    );
    let r = &set.rules[0];
    assert_eq!(r.origin.namespace, None);
    let Peers::Selected(peers) = &r.ingress[0].peers else {
        panic!()
    };
    assert!(
        peers[0]
            .selector
            .matches(&labels("io.kubernetes.pod.namespace=any"))
    );
    assert!(!peers[0].selector.matches(&labels("reserved:world")));
}

#[test]
fn specs_list_and_rule_fields() {
    let set = ok(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspecs:\n{}",
        "- endpointSelector: {}\n  description: first\n  labels: [{key: team, value: a, source: k8s}]\n  egress:\n  - toPorts:\n    - ports: [{port: 53, protocol: UDP}, {port: \"5353\"}]\n\
         - endpointSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}\n  ingress: [{}]\n"
    ));
    assert_eq!(set.rules.len(), 2);
    let r0 = &set.rules[0];
    assert_eq!(r0.origin.namespace.as_deref(), Some("default"));
    assert_eq!(r0.labels.get("team").map(String::as_str), Some("a"));
    assert_eq!(
        r0.labels
            .get("io.cilium.k8s.policy.name")
            .map(String::as_str),
        Some("p")
    );
    assert!(
        matches!(r0.egress[0].peers, Peers::Any),
        "toPorts without L3 means any peer"
    );
    assert_eq!(r0.egress[0].ports[0].ports[1].protocol, Protocol::ANY);
    let r1 = &set.rules[1];
    assert_eq!(r1.origin.spec_index, 1);
    assert!(r1.enforce_ingress);
    assert!(
        matches!(&r1.ingress[0].peers, Peers::Selected(v) if v.is_empty()),
        "{{}} allows nothing"
    );
}

#[test]
fn l7_rules_parse() {
    let set = ok(&cnp(
        "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http:\n        - {method: GET, path: \"/v1/.*\", headers: [\"X-A\", \"X-B: c\"]}\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules:\n        kafka:\n        - {role: produce, topic: t1}\n        - {apiKey: Fetch, apiVersion: \"3\", clientID: c-1}\n",
    ));
    let ports = &set.rules[0].ingress[0].ports;
    let Some(L7Rules::Http(h)) = &ports[0].l7 else {
        panic!()
    };
    assert_eq!(h.rules()[0].headers.len(), 2);
    let Some(L7Rules::Kafka(k)) = &ports[1].l7 else {
        panic!()
    };
    assert_eq!(k[0].api_keys, crate::l7::kafka::PRODUCE_KEYS);
    assert_eq!(k[1].api_keys, vec![1]);
    assert_eq!(k[1].api_version, Some(3));
}

#[test]
fn cidr_rules() {
    let set = ok(&cnp(
        "  endpointSelector: {}\n  egress:\n  - toCIDR: [192.0.2.1, 10.0.0.0/8]\n  - toCIDRSet:\n    - cidr: 0.0.0.0/0\n      except: [10.96.0.0/12]\n",
    ));
    let Peers::Selected(p) = &set.rules[0].egress[1].peers else {
        panic!()
    };
    assert_eq!(p.len(), 2, "a /0 prefix also selects the world identity");
    let inside = crate::identity::cidr_labels(&"10.96.1.0/24".parse().unwrap());
    let outside = crate::identity::cidr_labels(&"8.8.8.0/24".parse().unwrap());
    assert!(!p[0].selector.matches(&inside));
    assert!(p[0].selector.matches(&outside));
    assert!(p[1].selector.matches(&labels("reserved:world")));
    let prefixes: Vec<String> = set.cidr_prefixes().iter().map(|n| n.to_string()).collect();
    assert_eq!(
        prefixes,
        ["0.0.0.0/0", "10.0.0.0/8", "10.96.0.0/12", "192.0.2.1/32"]
    );
}

#[test]
fn network_policy_translation() {
    let set = ok(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: web}}\n      namespaceSelector: {matchLabels: {team: a}}\n    - podSelector: {matchLabels: {app: cron}}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}\n    ports:\n    - port: 5432\n    - protocol: UDP\n  egress: []\n",
    );
    let r = &set.rules[0];
    assert!(r.enforce_ingress);
    assert!(
        r.enforce_egress,
        "an egress section (even empty) without policyTypes enforces egress"
    );
    assert!(
        r.endpoint_selector
            .matches(&labels("app=db,io.kubernetes.pod.namespace=prod"))
    );
    let Peers::Selected(p) = &r.ingress[0].peers else {
        panic!()
    };
    // podSelector AND namespaceSelector in one peer.
    assert!(p[0].selector.matches(&labels(
        "app=web,io.kubernetes.pod.namespace=other,io.cilium.k8s.namespace.labels.team=a"
    )));
    assert!(
        !p[0]
            .selector
            .matches(&labels("app=web,io.kubernetes.pod.namespace=other"))
    );
    assert!(!p[0].selector.matches(&labels(
        "app=x,io.kubernetes.pod.namespace=o,io.cilium.k8s.namespace.labels.team=a"
    )));
    // podSelector alone: same namespace.
    assert!(
        p[1].selector
            .matches(&labels("app=cron,io.kubernetes.pod.namespace=prod"))
    );
    assert!(
        !p[1]
            .selector
            .matches(&labels("app=cron,io.kubernetes.pod.namespace=dev"))
    );
    let ports = &r.ingress[0].ports[0].ports;
    assert_eq!((ports[0].port, ports[0].protocol), (5432, Protocol::TCP));
    assert_eq!(
        (ports[1].port, ports[1].protocol),
        (0, Protocol::UDP),
        "no port: every UDP port"
    );
}

#[test]
fn network_policy_types() {
    let set = ok(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n",
    );
    let r = &set.rules[0];
    assert!(!r.enforce_ingress && r.enforce_egress && r.egress.is_empty());
}

#[test]
fn namespaces_and_lists() {
    let set = ok(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: prod, labels: {team: a}, uid: x, resourceVersion: \"1\"}\n  status: {phase: Active}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicyList\nmetadata: {resourceVersion: \"9\"}\nitems:\n- metadata: {name: p, namespace: prod}\n  spec: {endpointSelector: {}}\n",
    );
    assert_eq!(set.namespaces["prod"]["team"], "a");
    assert_eq!(set.rules.len(), 1, "typed list items need no kind");
}

#[test]
fn errors_name_line_column_and_field() {
    let e = errs(&cnp(
        "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    toPorts:\n    - ports: [{port: \"0\"}]\n",
    ));
    assert_eq!(
        e,
        [
            "11:22: spec.ingress[0].toPorts[0].ports[0].port: port 0 is out of range (expected 1-65535)"
        ]
    );

    let e = errs(&cnp("  endpointSelector: {}\n  ingres: []\n"));
    assert_eq!(
        e,
        [
            "8:3: spec.ingres: unknown field `ingres` (expected one of: endpointSelector, ingress, egress, labels, description)"
        ]
    );

    let e = errs(&cnp("  endpointselector: {}\n"));
    assert!(
        e.iter()
            .any(|l| l.contains("did you mean `endpointSelector`")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|l| l.contains("missing field `endpointSelector`")),
        "{e:?}"
    );
}

#[test]
fn validation_rules() {
    let cases: &[(&str, &str)] = &[
        (
            "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    fromCIDR: [10.0.0.0/8]\n",
            "one L3 kind per rule",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: UDP}]\n      rules: {http: [{}]}\n",
            "apply only to TCP",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules: {http: [{}]}\n",
            "apply only to TCP",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{}], kafka: [{}]}\n",
            "not both",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"70000\"}]\n",
            "out of range",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: http}]\n",
            "named port",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: tcp}]\n",
            "unknown protocol",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]\n",
            "is not inside",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [\"fd00::/8\"]}]\n",
            "same address family",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.0/33]\n",
            "invalid CIDR",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toEntities: [galaxy]\n",
            "unknown entity",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: x}]\n",
            "toFQDNs is not supported",
        ),
        ("  endpointSelector: {}\n  ingressDeny: []\n", "deny rules"),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules: {kafka: [{topic: \"bad topic\"}]}\n",
            "invalid topic",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules: {kafka: [{apiKey: nosuch}]}\n",
            "unknown Kafka API key",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules: {kafka: [{role: produce, apiKey: fetch}]}\n",
            "mutually exclusive",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules: {kafka: [{role: admin}]}\n",
            "unknown role",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules: {kafka: [{apiVersion: \"-1\"}]}\n",
            "out of range",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{path: \"(\"}]}\n",
            "invalid regular expression",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{headers: [\": x\"]}]}\n",
            "invalid header name",
        ),
        (
            "  endpointSelector: {matchExpressions: [{key: a, operator: In}]}\n",
            "needs at least one value",
        ),
        (
            "  endpointSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n",
            "takes no values",
        ),
        (
            "  endpointSelector: {matchExpressions: [{key: a, operator: Has}]}\n",
            "unknown operator",
        ),
        ("  endpointSelector: {matchLabels: {app: 1}}\n", "quote it"),
        (
            "  endpointSelector: {matchLabels: {bogus:app: x}}\n",
            "unknown label source",
        ),
        (
            "  endpointSelector: {matchLabels: {io.kubernetes.pod.namespace: other}}\n",
            "own namespace",
        ),
    ];
    for (spec, want) in cases {
        let e = errs(&cnp(spec));
        assert!(
            e.iter().any(|l| l.contains(want)),
            "for\n{spec}\nexpected {want:?} in {e:#?}"
        );
        assert!(
            e.iter().all(|l| !l.starts_with("0:")),
            "every error has a position: {e:?}"
        );
    }
    let too_many = (1..=41)
        .map(|p| format!("{{port: \"{p}\"}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let e = errs(&cnp(&format!(
        "  endpointSelector: {{}}\n  ingress:\n  - toPorts:\n    - ports: [{too_many}]\n"
    )));
    assert!(e[0].contains("at most 40 ports"), "{e:?}");
}

#[test]
fn object_level_errors() {
    assert!(
        errs("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")[0]
            .contains("unsupported kind \"Pod\"")
    );
    assert!(
        errs(
            "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {}\n"
        )[0]
        .contains("apiVersion \"cilium.io/v2\"")
    );
    assert!(
        errs("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n")[0]
            .contains("`spec` or `specs`")
    );
    assert!(errs("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {endpointSelector: {}}\n")[0].contains("invalid name"));
    let e = errs("a: [1\n");
    assert!(e[0].starts_with("1:") || e[0].starts_with("2:"), "{e:?}");
    assert!(e[0].contains("invalid YAML"), "{e:?}");
}

#[test]
fn every_problem_of_every_file_is_reported_and_nothing_is_half_applied() {
    let good = cnp("  endpointSelector: {}\n");
    let bad = cnp(
        "  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"0\"}]}]\n  - toEntities: [x]\n",
    );
    let err =
        PolicySet::from_sources([("a.yaml", good.as_str()), ("b.yaml", bad.as_str())]).unwrap_err();
    assert_eq!(err.len(), 2, "{err:#?}");
    assert!(err.iter().all(|d| d.file == "b.yaml"));
    let dup = PolicySet::from_sources([("a.yaml", good.as_str()), ("c.yaml", good.as_str())])
        .unwrap_err();
    assert!(
        dup[0].message.contains("defined twice (first in a.yaml:4)"),
        "{dup:?}"
    );
}

#[test]
fn hostile_yaml_is_refused_within_a_budget() {
    // Billion laughs: aliases that expand exponentially.
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
            p = if i == 1 {
                String::new()
            } else {
                (i - 1).to_string()
            }
        ));
    }
    // Bounded by the parser's node budget, not by luck with the clock: the refusal says so.
    let e = PolicySet::from_sources([("bomb.yaml", bomb.as_str())]).unwrap_err();
    let text = e[0].to_string();
    assert!(
        text.starts_with("bomb.yaml:") && text.contains("budget breached"),
        "alias expansion is bounded: {text}"
    );

    let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
    let e = errs(&deep);
    assert!(e[0].contains("invalid YAML"), "{e:?}");

    let e = errs(&cnp(
        "  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: 99999999999999999999999999}]}]\n",
    ));
    assert!(e[0].contains("port"), "{e:?}");

    let e = errs("apiVersion: v1\nkind: Namespace\nmetadata:\n\tname: x\n");
    assert!(
        e[0].contains("invalid YAML") && !e[0].starts_with("0:"),
        "{e:?}"
    );
}

#[test]
fn many_documents_in_one_file() {
    let doc = "apiVersion: v1\nkind: Namespace\nmetadata: {name: n%}\n---\n";
    let text: String = (0..3000)
        .map(|i| doc.replace('%', &i.to_string()))
        .collect();
    assert_eq!(ok(&text).namespaces.len(), 3000);
}
