use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::identity::{Identity, NumericIdentity};
use crate::l7::http::{HttpRequest, HttpRule, HttpRules, Pattern};
use crate::labels::LabelSet;
use crate::labels::Source;
use crate::parse::PolicySet;
use crate::rule::{
    L7Rules, PeerRule, PeerSelector, Peers, PolicyKind, PortProtocol, PortRule, Proto, Protocol,
    RuleOrigin,
};
use crate::selector::{Requirement, Selector};
use crate::trace::{self, Flow, L7Facts, TraceVerdict};

fn id(n: u32, labels: &str) -> Identity {
    Identity {
        id: NumericIdentity(n),
        labels: Arc::new(labels.parse().unwrap()),
    }
}

fn resolver_for(
    yaml: &str,
    mode: EnforcementMode,
    identities: &[Identity],
    endpoints: &[u32],
) -> Resolver {
    let set = PolicySet::from_sources([("t.yaml", yaml)]).unwrap();
    let mut r = Resolver::new(mode);
    r.set_rules(&set.rules);
    for i in identities {
        r.add_identity(i.clone());
    }
    for e in endpoints {
        r.add_endpoint(NumericIdentity(*e));
    }
    r
}

const WEB: &str = "app=web,io.kubernetes.pod.namespace=default";
const DB: &str = "app=db,io.kubernetes.pod.namespace=default";
const CLI: &str = "app=cli,io.kubernetes.pod.namespace=default";

fn universe() -> Vec<Identity> {
    vec![
        id(2, "reserved:world"),
        id(256, WEB),
        id(257, DB),
        id(258, CLI),
    ]
}

fn verdict(r: &Resolver, ep: u32, dir: Direction, remote: u32, port: u16) -> &'static str {
    let t = r.table(NumericIdentity(ep)).unwrap().direction(dir);
    if !t.enforced {
        return "unenforced";
    }
    match t.lookup(NumericIdentity(remote), port, Proto::Tcp) {
        None => "deny",
        Some((_, e)) => match e.verdict {
            Verdict::Allow => "allow",
            Verdict::Redirect(_) => "redirect",
        },
    }
}

const DB_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: db}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{method: GET}]}\n";

#[test]
fn l7_redirect_for_selected_peer_only() {
    let r = resolver_for(
        DB_POLICY,
        EnforcementMode::Default,
        &universe(),
        &[257, 256],
    );
    assert_eq!(verdict(&r, 257, Direction::Ingress, 256, 80), "redirect");
    assert_eq!(verdict(&r, 257, Direction::Ingress, 258, 80), "deny");
    assert_eq!(verdict(&r, 257, Direction::Ingress, 256, 81), "deny");
    assert_eq!(verdict(&r, 257, Direction::Egress, 256, 80), "unenforced");
    assert_eq!(verdict(&r, 256, Direction::Ingress, 258, 80), "unenforced");
}

#[test]
fn l4_only_allow_makes_l7_moot() {
    let extra = "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: l4}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n";
    let r = resolver_for(
        &format!("{DB_POLICY}{extra}"),
        EnforcementMode::Default,
        &universe(),
        &[257],
    );
    assert_eq!(
        verdict(&r, 257, Direction::Ingress, 256, 80),
        "allow",
        "L4 wildcard allow wins over L7"
    );
    assert_eq!(
        verdict(&r, 257, Direction::Ingress, 2, 80),
        "allow",
        "toPorts without L3 includes world"
    );
}

#[test]
fn l3_only_allow_makes_l7_moot() {
    let extra = "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: l3}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n";
    let r = resolver_for(
        &format!("{DB_POLICY}{extra}"),
        EnforcementMode::Default,
        &universe(),
        &[257],
    );
    assert_eq!(verdict(&r, 257, Direction::Ingress, 256, 80), "allow");
    assert_eq!(verdict(&r, 257, Direction::Ingress, 256, 443), "allow");
}

#[test]
fn requires_constrain_every_peer() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\nspecs:\n- endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromRequires: [{matchLabels: {team: a}}]\n- endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n  - toPorts: [{ports: [{port: \"5432\"}]}]\n";
    let ids = vec![
        id(256, "app=web,io.kubernetes.pod.namespace=default"),
        id(259, "app=web,team=a,io.kubernetes.pod.namespace=default"),
        id(257, DB),
        id(2, "reserved:world"),
    ];
    let r = resolver_for(yaml, EnforcementMode::Default, &ids, &[257]);
    assert_eq!(
        verdict(&r, 257, Direction::Ingress, 256, 80),
        "deny",
        "web without team=a"
    );
    assert_eq!(verdict(&r, 257, Direction::Ingress, 259, 80), "allow");
    assert_eq!(
        verdict(&r, 257, Direction::Ingress, 2, 5432),
        "deny",
        "L4-only allows are constrained too"
    );
    assert_eq!(verdict(&r, 257, Direction::Ingress, 259, 5432), "allow");
}

#[test]
fn enforcement_modes() {
    let r = resolver_for(DB_POLICY, EnforcementMode::Always, &universe(), &[256]);
    assert_eq!(
        verdict(&r, 256, Direction::Ingress, 258, 80),
        "deny",
        "always: unselected endpoints deny"
    );
    let r = resolver_for(DB_POLICY, EnforcementMode::Never, &universe(), &[257]);
    assert_eq!(verdict(&r, 257, Direction::Ingress, 258, 80), "unenforced");
}

#[test]
fn empty_ingress_item_is_default_deny() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: d}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n";
    let r = resolver_for(yaml, EnforcementMode::Default, &universe(), &[256]);
    let t = &r.table(NumericIdentity(256)).unwrap().ingress;
    assert!(t.enforced && t.is_empty());
}

#[test]
fn incremental_identity_and_rule_changes() {
    let mut r = resolver_for(DB_POLICY, EnforcementMode::Default, &universe(), &[257]);
    let new_web = id(300, "app=web,version=2,io.kubernetes.pod.namespace=default");
    let changes = r.add_identity(new_web);
    assert_eq!(changes.endpoints, BTreeSet::from([NumericIdentity(257)]));
    assert_eq!(verdict(&r, 257, Direction::Ingress, 300, 80), "redirect");
    let changes = r.add_identity(id(301, "app=other,io.kubernetes.pod.namespace=default"));
    assert!(
        changes.endpoints.is_empty(),
        "an identity no selector matches touches nothing"
    );
    r.remove_identity(NumericIdentity(300));
    assert_eq!(verdict(&r, 257, Direction::Ingress, 300, 80), "deny");
    // Replacing the rules with an unrelated one recomputes the db endpoint (no longer selected).
    let other = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: o}\nspec:\n  endpointSelector: {matchLabels: {app: cli}}\n  ingress: [{}]\n";
    let set = PolicySet::from_sources([("t.yaml", other)]).unwrap();
    let changes = r.set_rules(&set.rules);
    assert_eq!(changes.endpoints, BTreeSet::from([NumericIdentity(257)]));
    assert_eq!(verdict(&r, 257, Direction::Ingress, 256, 80), "unenforced");
    let same = r.set_rules(&set.rules);
    assert!(
        same.endpoints.is_empty(),
        "unchanged rules recompute nothing"
    );
}

// ---- property tests ----

const KEYS: &[&str] = &["app", "tier"];
const VALUES: &[&str] = &["a", "b", "c"];

fn arb_labels() -> impl Strategy<Value = LabelSet> {
    (
        prop::collection::vec((0..KEYS.len(), 0..VALUES.len()), 1..3),
        0..2usize,
    )
        .prop_map(|(kv, ns)| {
            let mut s = String::new();
            for (k, v) in kv {
                s.push_str(&format!("{}={},", KEYS[k], VALUES[v]));
            }
            s.push_str(&format!("io.kubernetes.pod.namespace=ns{ns}"));
            s.parse().unwrap()
        })
}

fn arb_selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        Just(Selector::wildcard()),
        Just(Selector::reserved("world")),
        (0..KEYS.len(), 0..VALUES.len()).prop_map(|(k, v)| Selector::new(vec![
            Requirement::equals(Source::Any, KEYS[k], VALUES[v])
        ])),
        (0..KEYS.len(), 0..VALUES.len(), 0..2usize).prop_map(|(k, v, ns)| Selector::new(vec![
            Requirement::equals(Source::Any, KEYS[k], VALUES[v]),
            Requirement::equals(
                Source::K8s,
                "io.kubernetes.pod.namespace",
                format!("ns{ns}")
            ),
        ])),
    ]
}

fn arb_port_rule() -> impl Strategy<Value = Arc<PortRule>> {
    let ports = prop_oneof![
        Just(PortProtocol {
            port: 80,
            protocol: Protocol::TCP
        }),
        Just(PortProtocol {
            port: 53,
            protocol: Protocol::UDP
        }),
        Just(PortProtocol {
            port: 80,
            protocol: Protocol::ANY
        }),
        Just(PortProtocol {
            port: 0,
            protocol: Protocol::TCP
        }),
    ];
    (
        ports,
        prop::option::of(prop::sample::select(vec!["GET", "POST", "GET|POST"])),
    )
        .prop_map(|(pp, method)| {
            let l7 = method
                .filter(|_| pp.protocol == Protocol::TCP && pp.port != 0)
                .map(|m| {
                    L7Rules::Http(
                        HttpRules::new(vec![HttpRule {
                            index: 0,
                            method: Some(Pattern::new(m).unwrap()),
                            path: None,
                            host: None,
                            headers: vec![],
                        }])
                        .unwrap(),
                    )
                });
            Arc::new(PortRule {
                index: 0,
                ports: vec![pp],
                l7,
            })
        })
}

fn arb_item() -> impl Strategy<Value = PeerRule> {
    let peers = prop_oneof![
        1 => Just(Peers::Any),
        3 => prop::collection::vec(arb_selector(), 0..3).prop_map(|v| Peers::Selected(
            v.into_iter().enumerate().map(|(i, selector)| PeerSelector { selector, field: format!("p[{i}]") }).collect()
        )),
    ];
    (peers, prop::collection::vec(arb_port_rule(), 0..2)).prop_map(|(peers, ports)| PeerRule {
        index: 0,
        peers,
        ports,
    })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        arb_selector(),
        prop::collection::vec(arb_item(), 0..3),
        prop::collection::vec(arb_item(), 0..3),
        prop::option::of(arb_selector()),
    )
        .prop_map(|(subject, ingress, egress, requires)| Rule {
            origin: RuleOrigin {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                name: "r".into(),
                namespace: None,
                spec_index: 0,
                file: "gen".into(),
                pos: Default::default(),
            },
            endpoint_selector: subject,
            enforce_ingress: !ingress.is_empty(),
            enforce_egress: !egress.is_empty(),
            ingress: ingress
                .into_iter()
                .enumerate()
                .map(|(i, mut it)| {
                    it.index = i;
                    it
                })
                .collect(),
            egress: egress
                .into_iter()
                .enumerate()
                .map(|(i, mut it)| {
                    it.index = i;
                    it
                })
                .collect(),
            ingress_requires: requires.into_iter().filter(|s| !s.is_wildcard()).collect(),
            egress_requires: Vec::new(),
            labels: BTreeMap::new(),
            description: None,
        })
}

fn identities(labels: Vec<LabelSet>) -> Vec<Identity> {
    let mut out = vec![id(2, "reserved:world"), id(1, "reserved:host")];
    for (i, l) in labels.into_iter().enumerate() {
        if out.iter().all(|o| *o.labels != l) {
            out.push(Identity {
                id: NumericIdentity(256 + i as u32),
                labels: Arc::new(l),
            });
        }
    }
    out
}

fn build(rules: &[Arc<Rule>], ids: &[Identity], mode: EnforcementMode) -> Resolver {
    let mut r = Resolver::new(mode);
    r.set_rules(rules);
    for i in ids {
        r.add_identity(i.clone());
    }
    for i in ids.iter().filter(|i| i.is_endpoint()) {
        r.add_endpoint(i.id);
    }
    r
}

const FLOWS: &[(u16, Proto)] = &[
    (80, Proto::Tcp),
    (53, Proto::Udp),
    (80, Proto::Udp),
    (443, Proto::Tcp),
    (0, Proto::Icmp),
];

/// The datapath's and proxy's answer, from the tables: allowed at L3/L4 in both directions, and
/// the request passes the L7 rules of every redirecting direction.
fn table_allows(
    r: &Resolver,
    src: &Identity,
    dst: &Identity,
    port: u16,
    proto: Proto,
    method: Option<&str>,
) -> bool {
    let headers: [(&str, &str); 0] = [];
    let req = method.map(|m| HttpRequest {
        method: m,
        path: "/",
        host: "",
        headers: &headers,
    });
    [
        (src, dst, Direction::Egress),
        (dst, src, Direction::Ingress),
    ]
    .iter()
    .all(|(ep, peer, dir)| {
        let Some(table) = r.table(ep.id) else {
            return true;
        };
        let t = table.direction(*dir);
        if !t.enforced {
            return true;
        }
        match t.lookup(peer.id, port, proto) {
            None => false,
            Some((_, e)) => match (&e.verdict, &req) {
                (Verdict::Allow, _) => true,
                (Verdict::Redirect(_), None) => true,
                (Verdict::Redirect(p), Some(req)) => p.judge_http(req),
            },
        }
    })
}

fn trace_allows(
    rules: &[Arc<Rule>],
    mode: EnforcementMode,
    src: &Identity,
    dst: &Identity,
    port: u16,
    proto: Proto,
    method: Option<&str>,
) -> bool {
    let l7 = match method {
        Some(m) => L7Facts::Http {
            method: m.into(),
            path: "/".into(),
            host: String::new(),
            headers: vec![],
        },
        None => L7Facts::None,
    };
    trace::trace(
        rules,
        mode,
        &Flow {
            src,
            dst,
            port,
            proto,
            l7,
        },
    )
    .verdict
        == TraceVerdict::Allowed
}

fn snapshot(r: &Resolver) -> Vec<String> {
    let mut out = Vec::new();
    for e in r.endpoint_ids() {
        let t = r.table(e).unwrap();
        for dir in [Direction::Ingress, Direction::Egress] {
            let d = t.direction(dir);
            out.push(format!("{e} {dir} enforced={}", d.enforced));
            for (k, c) in d.raw() {
                let mut descr: Vec<String> = c.iter().map(|c| c.describe()).collect();
                descr.sort();
                out.push(format!("{e} {dir} {k} {descr:?}"));
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn trace_and_resolve_agree(
        rules in prop::collection::vec(arb_rule(), 0..5),
        labels in prop::collection::vec(arb_labels(), 1..6),
        mode in prop::sample::select(vec![EnforcementMode::Default, EnforcementMode::Always]),
    ) {
        let rules: Vec<Arc<Rule>> = rules.into_iter().map(Arc::new).collect();
        let ids = identities(labels);
        let r = build(&rules, &ids, mode);
        for src in &ids {
            for dst in &ids {
                for (port, proto) in FLOWS {
                    for method in [None, Some("GET"), Some("PUT")] {
                        let t = table_allows(&r, src, dst, *port, *proto, method);
                        let tr = trace_allows(&rules, mode, src, dst, *port, *proto, method);
                        prop_assert_eq!(t, tr, "src {} dst {} {}/{} {:?}", src.labels, dst.labels, port, proto, method);
                    }
                }
            }
        }
    }

    #[test]
    fn adding_an_allow_never_removes_a_flow(
        rules in prop::collection::vec(arb_rule(), 0..4),
        extra in arb_rule().prop_map(|mut r| { r.ingress_requires.clear(); r }),
        labels in prop::collection::vec(arb_labels(), 1..6),
    ) {
        // `Always` so that the extra rule cannot switch a direction to default-deny, and no
        // requires on it: those are constraints, not allows.
        let rules: Vec<Arc<Rule>> = rules.into_iter().map(Arc::new).collect();
        let ids = identities(labels);
        let before = build(&rules, &ids, EnforcementMode::Always);
        let mut more = rules.clone();
        more.push(Arc::new(extra));
        let after = build(&more, &ids, EnforcementMode::Always);
        for src in &ids {
            for dst in &ids {
                for (port, proto) in FLOWS {
                    for method in [None, Some("GET"), Some("PUT")] {
                        if table_allows(&before, src, dst, *port, *proto, method) {
                            prop_assert!(table_allows(&after, src, dst, *port, *proto, method));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn selected_direction_without_matching_rule_denies(
        subject in arb_selector(),
        labels in prop::collection::vec(arb_labels(), 1..6),
    ) {
        let yaml_rule = Rule {
            origin: RuleOrigin { kind: PolicyKind::CiliumClusterwideNetworkPolicy, name: "d".into(), namespace: None, spec_index: 0, file: "gen".into(), pos: Default::default() },
            endpoint_selector: subject,
            ingress: vec![PeerRule { index: 0, peers: Peers::Selected(vec![]), ports: vec![] }],
            egress: vec![],
            enforce_ingress: true,
            enforce_egress: false,
            ingress_requires: vec![],
            egress_requires: vec![],
            labels: BTreeMap::new(),
            description: None,
        };
        let rules = vec![Arc::new(yaml_rule)];
        let ids = identities(labels);
        let r = build(&rules, &ids, EnforcementMode::Default);
        for dst in ids.iter().filter(|i| i.is_endpoint()) {
            let selected = rules[0].endpoint_selector.matches(&dst.labels);
            for src in &ids {
                for (port, proto) in FLOWS {
                    prop_assert_eq!(table_allows(&r, src, dst, *port, *proto, None), !selected);
                }
            }
        }
    }

    #[test]
    fn incremental_equals_full(
        rules in prop::collection::vec(arb_rule(), 0..5),
        later in prop::collection::vec(arb_rule(), 0..3),
        labels in prop::collection::vec(arb_labels(), 1..6),
        split in 0usize..6,
    ) {
        let rules: Vec<Arc<Rule>> = rules.into_iter().map(Arc::new).collect();
        let ids = identities(labels);
        let (first, second) = ids.split_at(split.min(ids.len()));
        // Incremental: some identities, first rules, endpoints, more identities, rule change.
        let mut inc = Resolver::new(EnforcementMode::Default);
        for i in first { inc.add_identity(i.clone()); }
        let initial: Vec<Arc<Rule>> = later.into_iter().map(Arc::new).collect();
        inc.set_rules(&initial);
        for i in first.iter().filter(|i| i.is_endpoint()) { inc.add_endpoint(i.id); }
        for i in second {
            inc.add_identity(i.clone());
            if i.is_endpoint() { inc.add_endpoint(i.id); }
        }
        inc.set_rules(&rules);
        let full = build(&rules, &ids, EnforcementMode::Default);
        prop_assert_eq!(snapshot(&inc), snapshot(&full));
    }
}

proptest! {
    /// The selector cache finds candidates through the label index; it must find exactly what a
    /// scan of every identity finds.
    #[test]
    fn indexed_matching_equals_a_full_scan(
        labels in prop::collection::vec(arb_labels(), 1..12),
        selectors in prop::collection::vec(arb_selector(), 1..6),
    ) {
        let ids = identities(labels);
        let mut r = Resolver::new(EnforcementMode::Default);
        for i in &ids {
            r.add_identity(i.clone());
        }
        for s in &selectors {
            let indexed = r.match_all(s);
            let scanned: BTreeSet<NumericIdentity> = ids.iter().filter(|i| s.matches(&i.labels)).map(|i| i.id).collect();
            prop_assert_eq!(indexed, scanned);
        }
    }
}
