//! `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::peers::{
    ENTITIES, cidr, cidr_block, cidr_peers, entity, port_rule, scope_peer, selector,
};
use super::{Meta, ParsedFile};
use crate::decode::{Ctx, Fields, index, seq, string, strings};
use crate::labels::Source;
use crate::rule::{Direction, PeerRule, PeerSelector, Peers, PolicyKind, Rule, RuleOrigin};
use crate::selector::Selector;
use crate::yaml::{Node, Value};

const RULE_FIELDS: &[&str] = &[
    "endpointSelector",
    "ingress",
    "egress",
    "labels",
    "description",
];
const INGRESS_FIELDS: &[&str] = &[
    "fromEndpoints",
    "fromRequires",
    "toPorts",
    "fromCIDR",
    "fromCIDRSet",
    "fromEntities",
];
const EGRESS_FIELDS: &[&str] = &[
    "toEndpoints",
    "toRequires",
    "toPorts",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
];
const LABEL_FIELDS: &[&str] = &["key", "value", "source"];

/// A CNP or CCNP: `spec` and/or `specs`.
pub(super) fn policy(
    ctx: &mut Ctx<'_>,
    f: &mut Fields<'_>,
    meta: &Meta,
    kind: PolicyKind,
    out: &mut ParsedFile,
) {
    let spec = f.get("spec");
    let specs = f.get("specs");
    if spec.is_none() && specs.is_none() {
        ctx.error(f.pos, &f.child("spec"), "a policy needs `spec` or `specs`");
        return;
    }
    let mut n = 0;
    if let Some(s) = spec {
        if let Some(r) = rule(ctx, s, &f.child("spec"), meta, kind, n) {
            out.rules.push(Arc::new(r));
        }
        n += 1;
    }
    if let Some(s) = specs {
        let path = f.child("specs");
        if let Some(items) = seq(ctx, s, &path) {
            if items.is_empty() {
                ctx.error(s.pos, &path, "`specs` is empty");
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(r) = rule(ctx, item, &index(&path, i), meta, kind, n) {
                    out.rules.push(Arc::new(r));
                }
                n += 1;
            }
        }
    }
}

fn rule(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    meta: &Meta,
    kind: PolicyKind,
    spec_index: usize,
) -> Option<Rule> {
    let errors_before = ctx.diags.len();
    let mut f = Fields::new(ctx, node, path, RULE_FIELDS)?;
    let ns = meta.namespace.as_deref();

    let endpoint_selector = match f.get("endpointSelector") {
        Some(n) => {
            let epath = f.child("endpointSelector");
            selector(ctx, n, &epath, Source::Any, "")
                .and_then(|sel| scope_subject(ctx, sel, n, &epath, ns))
        }
        None => {
            ctx.error(
                node.pos,
                &f.child("endpointSelector"),
                "missing field `endpointSelector` (use {} to select every endpoint)",
            );
            None
        }
    };

    let mut rule = Rule {
        origin: RuleOrigin {
            kind,
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            spec_index,
            file: ctx.file.to_string(),
            pos: node.pos,
        },
        endpoint_selector: Selector::wildcard(),
        ingress: Vec::new(),
        egress: Vec::new(),
        enforce_ingress: false,
        enforce_egress: false,
        ingress_requires: Vec::new(),
        egress_requires: Vec::new(),
        labels: BTreeMap::new(),
        description: None,
    };
    for dir in [Direction::Ingress, Direction::Egress] {
        let key = dir.as_str();
        if let Some(n) = f.get(key) {
            let dpath = f.child(key);
            if let Some(items) = seq(ctx, n, &dpath) {
                for (i, item) in items.iter().enumerate() {
                    if let Some((peer_rule, requires)) =
                        direction_item(ctx, item, &index(&dpath, i), i, dir, ns)
                    {
                        match dir {
                            Direction::Ingress => {
                                rule.ingress.push(peer_rule);
                                rule.ingress_requires.extend(requires);
                            }
                            Direction::Egress => {
                                rule.egress.push(peer_rule);
                                rule.egress_requires.extend(requires);
                            }
                        }
                    }
                }
                // Cilium: a direction is enforced by a rule once it has at least one item
                // (`ingress: [{}]` is the idiom for default-deny).
                match dir {
                    Direction::Ingress => rule.enforce_ingress = !items.is_empty(),
                    Direction::Egress => rule.enforce_egress = !items.is_empty(),
                }
            }
        }
    }
    if let Some(n) = f.get("labels") {
        rule.labels = rule_labels(ctx, n, &f.child("labels"));
    }
    if let Some(n) = f.get("description") {
        rule.description = string(ctx, n, &f.child("description"));
    }
    f.finish(ctx, &[]);
    rule.labels
        .insert("io.cilium.k8s.policy.name".into(), meta.name.clone());
    if let Some(ns) = ns {
        rule.labels
            .insert("io.cilium.k8s.policy.namespace".into(), ns.to_string());
    }
    rule.labels.insert(
        "io.cilium.k8s.policy.derived-from".into(),
        kind.as_str().to_string(),
    );
    rule.endpoint_selector = endpoint_selector?;
    (ctx.diags.len() == errors_before).then_some(rule)
}

/// A namespaced policy's endpointSelector is confined to its namespace, except when it selects
/// `reserved:init` (init endpoints have no namespace yet).
fn scope_subject(
    ctx: &mut Ctx<'_>,
    sel: Selector,
    node: &Node,
    path: &str,
    ns: Option<&str>,
) -> Option<Selector> {
    let Some(ns) = ns else { return Some(sel) };
    if sel.selects_init() {
        return Some(sel);
    }
    let other_ns = sel.requirements().iter().find(|r| {
        r.key == crate::selector::NAMESPACE_LABEL
            && r.op != crate::selector::Operator::In(vec![ns.to_string()])
    });
    if other_ns.is_some() {
        ctx.error(
            node.pos,
            path,
            format!("a namespaced policy selects endpoints of its own namespace ({ns}) only; use a CiliumClusterwideNetworkPolicy to select other namespaces"),
        );
        return None;
    }
    Some(sel.in_namespace(ns))
}

fn direction_item(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    idx: usize,
    dir: Direction,
    ns: Option<&str>,
) -> Option<(PeerRule, Vec<Selector>)> {
    let (fields, prefix) = match dir {
        Direction::Ingress => (INGRESS_FIELDS, "from"),
        Direction::Egress => (EGRESS_FIELDS, "to"),
    };
    let errors_before = ctx.diags.len();
    let mut f = Fields::new(ctx, node, path, fields)?;
    let endpoints_key = if prefix == "from" {
        "fromEndpoints"
    } else {
        "toEndpoints"
    };
    let requires_key = if prefix == "from" {
        "fromRequires"
    } else {
        "toRequires"
    };
    let cidr_key = if prefix == "from" {
        "fromCIDR"
    } else {
        "toCIDR"
    };
    let cidr_set_key = if prefix == "from" {
        "fromCIDRSet"
    } else {
        "toCIDRSet"
    };
    let entities_key = if prefix == "from" {
        "fromEntities"
    } else {
        "toEntities"
    };

    let l3_kinds: Vec<&str> = [endpoints_key, cidr_key, cidr_set_key, entities_key]
        .into_iter()
        .filter(|k| f.has(k))
        .collect();
    if l3_kinds.len() > 1 {
        ctx.error(
            node.pos,
            path,
            format!(
                "one L3 kind per rule: found {}; split them into separate rules",
                l3_kinds.join(" and ")
            ),
        );
    }

    let mut selected: Option<Vec<PeerSelector>> = None;
    if let Some(n) = f.get(endpoints_key) {
        let p = f.child(endpoints_key);
        if let Some(items) = seq(ctx, n, &p) {
            let mut v = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ipath = index(&p, i);
                if let Some(sel) = selector(ctx, item, &ipath, Source::Any, "") {
                    v.push(PeerSelector {
                        selector: scope_peer(sel, ns),
                        field: index(endpoints_key, i),
                    });
                }
            }
            selected = Some(v);
        }
    }
    if let Some(n) = f.get(entities_key) {
        let p = f.child(entities_key);
        if let Some(items) = strings(ctx, n, &p) {
            let mut v = Vec::new();
            for (i, (pos, name)) in items.iter().enumerate() {
                match entity(name) {
                    Some(sels) => v.extend(sels.into_iter().map(|selector| PeerSelector {
                        selector,
                        field: format!("{}[{i}] ({name})", entities_key),
                    })),
                    None => ctx.error(
                        *pos,
                        &index(&p, i),
                        format!("unknown entity {name:?} (expected one of: {ENTITIES})"),
                    ),
                }
            }
            selected = Some(v);
        }
    }
    if let Some(n) = f.get(cidr_key) {
        let p = f.child(cidr_key);
        if let Some(items) = seq(ctx, n, &p) {
            let mut v = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(net) = cidr(ctx, item, &index(&p, i))
                    && let Some(sels) =
                        cidr_peers(ctx, net, &[], &format!("{cidr_key}[{i}] ({net})"), "")
                {
                    v.extend(sels);
                }
            }
            selected = Some(v);
        }
    }
    if let Some(n) = f.get(cidr_set_key) {
        let p = f.child(cidr_set_key);
        if let Some(items) = seq(ctx, n, &p) {
            let mut v = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let field = |net| format!("{cidr_set_key}[{i}] ({net})");
                if let Some(sels) = cidr_block(ctx, item, &index(&p, i), field) {
                    v.extend(sels);
                }
            }
            selected = Some(v);
        }
    }
    let mut requires = Vec::new();
    if let Some(n) = f.get(requires_key) {
        let p = f.child(requires_key);
        if let Some(items) = seq(ctx, n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(sel) = selector(ctx, item, &index(&p, i), Source::Any, "") {
                    requires.push(scope_requires(sel, ns));
                }
            }
        }
    }
    let mut ports = Vec::new();
    if let Some(n) = f.get("toPorts") {
        let p = f.child("toPorts");
        if let Some(items) = seq(ctx, n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(pr) = port_rule(ctx, item, &index(&p, i), i) {
                    ports.push(pr);
                }
            }
        }
    }
    f.finish(ctx, &[]);
    if ctx.diags.len() != errors_before {
        return None;
    }
    let peers = match selected {
        Some(v) => Peers::Selected(v),
        // No L3 selector: with ports, any peer; without ports either, nothing (`{}`).
        None if !ports.is_empty() => Peers::Any,
        None => Peers::Selected(Vec::new()),
    };
    Some((
        PeerRule {
            index: idx,
            peers,
            ports,
        },
        requires,
    ))
}

/// Requires selectors are confined like peer selectors, but an empty one stays empty.
fn scope_requires(sel: Selector, ns: Option<&str>) -> Selector {
    if sel.is_wildcard() {
        return sel;
    }
    scope_peer(sel, ns)
}

fn rule_labels(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(items) = seq(ctx, node, path) else {
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let ipath = index(path, i);
        // Cilium writes rule labels as {key, value, source}; a plain "key=value" string is accepted too.
        if let Value::Str(s) = &item.value {
            let (k, v) = s.split_once('=').unwrap_or((s.as_str(), ""));
            out.insert(k.to_string(), v.to_string());
            continue;
        }
        let Some(mut f) = Fields::new(ctx, item, &ipath, LABEL_FIELDS) else {
            continue;
        };
        let key = f
            .get("key")
            .and_then(|n| string(ctx, n, &format!("{ipath}.key")));
        let value = f
            .get("value")
            .and_then(|n| string(ctx, n, &format!("{ipath}.value")))
            .unwrap_or_default();
        if let Some(src) = f.get("source")
            && let Some(s) = string(ctx, src, &format!("{ipath}.source"))
            && s == "cilium-generated"
        {
            ctx.error(
                src.pos,
                &format!("{ipath}.source"),
                "labels of source cilium-generated are reserved",
            );
        }
        f.finish(ctx, &[]);
        match key {
            Some(k) => {
                out.insert(k, value);
            }
            None => ctx.error(item.pos, &format!("{ipath}.key"), "missing field `key`"),
        }
    }
    out
}
