//! `networking.k8s.io/v1` NetworkPolicy, translated into the same rules as Cilium's.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::peers::{cidr_block, port_number, selector};
use super::{Meta, ParsedFile};
use crate::decode::{Ctx, Fields, index, seq, string, strings};
use crate::labels::Source;
use crate::rule::{
    Direction, PeerRule, PeerSelector, Peers, PolicyKind, PortProtocol, PortRule, Protocol, Rule,
    RuleOrigin,
};
use crate::selector::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, Operator, Requirement, Selector};
use crate::yaml::Node;

const SPEC_FIELDS: &[&str] = &["podSelector", "ingress", "egress", "policyTypes"];
const INGRESS_FIELDS: &[&str] = &["from", "ports"];
const EGRESS_FIELDS: &[&str] = &["to", "ports"];
const PEER_FIELDS: &[&str] = &["podSelector", "namespaceSelector", "ipBlock"];
const PORT_FIELDS: &[&str] = &["port", "protocol", "endPort"];

pub(super) fn policy(ctx: &mut Ctx<'_>, f: &mut Fields<'_>, meta: &Meta, out: &mut ParsedFile) {
    let path = f.child("spec");
    let Some(spec) = f.get("spec") else {
        ctx.error(f.pos, &path, "missing field `spec`");
        return;
    };
    let errors_before = ctx.diags.len();
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let Some(mut s) = Fields::new(ctx, spec, &path, SPEC_FIELDS) else {
        return;
    };
    let pod_selector = match s.get("podSelector") {
        Some(n) => selector(ctx, n, &s.child("podSelector"), Source::K8s, ""),
        // Kubernetes requires the field; an empty mapping selects every pod of the namespace.
        None => Some(Selector::wildcard()),
    };
    let mut rule = Rule {
        origin: RuleOrigin {
            kind: PolicyKind::NetworkPolicy,
            name: meta.name.clone(),
            namespace: Some(ns.clone()),
            spec_index: 0,
            file: ctx.file.to_string(),
            pos: spec.pos,
        },
        endpoint_selector: Selector::wildcard(),
        ingress: Vec::new(),
        egress: Vec::new(),
        enforce_ingress: true,
        enforce_egress: false,
        ingress_requires: Vec::new(),
        egress_requires: Vec::new(),
        labels: BTreeMap::from([
            ("io.cilium.k8s.policy.name".to_string(), meta.name.clone()),
            ("io.cilium.k8s.policy.namespace".to_string(), ns.clone()),
            (
                "io.cilium.k8s.policy.derived-from".to_string(),
                "NetworkPolicy".to_string(),
            ),
        ]),
        description: None,
    };
    let has_egress = s.has("egress");
    for dir in [Direction::Ingress, Direction::Egress] {
        let key = dir.as_str();
        if let Some(n) = s.get(key) {
            let dpath = s.child(key);
            if let Some(items) = seq(ctx, n, &dpath) {
                for (i, item) in items.iter().enumerate() {
                    if let Some(r) = item_rule(ctx, item, &index(&dpath, i), i, dir, &ns) {
                        match dir {
                            Direction::Ingress => rule.ingress.push(r),
                            Direction::Egress => rule.egress.push(r),
                        }
                    }
                }
            }
        }
    }
    match s.get("policyTypes") {
        Some(n) => {
            let tpath = s.child("policyTypes");
            if let Some(types) = strings(ctx, n, &tpath) {
                rule.enforce_ingress = false;
                for (i, (pos, t)) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => rule.enforce_ingress = true,
                        "Egress" => rule.enforce_egress = true,
                        other => ctx.error(
                            *pos,
                            &index(&tpath, i),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        ),
                    }
                }
            }
        }
        // Kubernetes: without policyTypes, Ingress always applies and Egress when rules exist.
        None => rule.enforce_egress = has_egress,
    }
    s.finish(ctx, &[]);
    if let Some(sel) = pod_selector {
        rule.endpoint_selector = sel.in_namespace(&ns);
    }
    if ctx.diags.len() == errors_before {
        out.rules.push(Arc::new(rule));
    }
}

fn item_rule(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    idx: usize,
    dir: Direction,
    ns: &str,
) -> Option<PeerRule> {
    let (fields, peers_key) = match dir {
        Direction::Ingress => (INGRESS_FIELDS, "from"),
        Direction::Egress => (EGRESS_FIELDS, "to"),
    };
    let mut f = Fields::new(ctx, node, path, fields)?;
    let errors_before = ctx.diags.len();
    let mut selected = Vec::new();
    if let Some(n) = f.get(peers_key) {
        let ppath = f.child(peers_key);
        if let Some(items) = seq(ctx, n, &ppath) {
            for (i, item) in items.iter().enumerate() {
                peer(
                    ctx,
                    item,
                    &index(&ppath, i),
                    &index(peers_key, i),
                    ns,
                    &mut selected,
                );
            }
        }
    }
    let mut ports = Vec::new();
    if let Some(n) = f.get("ports") {
        let ppath = f.child("ports");
        if let Some(items) = seq(ctx, n, &ppath) {
            for (i, item) in items.iter().enumerate() {
                if let Some(p) = port(ctx, item, &index(&ppath, i)) {
                    ports.push(p);
                }
            }
        }
    }
    f.finish(ctx, &[]);
    if ctx.diags.len() != errors_before {
        return None;
    }
    // Kubernetes: an empty or missing `from`/`to` means every peer; empty `ports`, every port.
    let peers = if selected.is_empty() {
        Peers::Any
    } else {
        Peers::Selected(selected)
    };
    let ports = if ports.is_empty() {
        Vec::new()
    } else {
        vec![Arc::new(PortRule {
            index: 0,
            ports,
            l7: None,
        })]
    };
    Some(PeerRule {
        index: idx,
        peers,
        ports,
    })
}

fn peer(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    field: &str,
    ns: &str,
    out: &mut Vec<PeerSelector>,
) {
    let Some(mut f) = Fields::new(ctx, node, path, PEER_FIELDS) else {
        return;
    };
    let pod = f.get("podSelector");
    let nsel = f.get("namespaceSelector");
    let ip = f.get("ipBlock");
    if ip.is_some() && (pod.is_some() || nsel.is_some()) {
        ctx.error(
            node.pos,
            path,
            "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
        );
    }
    if let Some(ip) = ip {
        let peer_field = |net| format!("{field}.ipBlock ({net})");
        if let Some(sels) = cidr_block(ctx, ip, &f.child("ipBlock"), peer_field) {
            out.extend(sels);
        }
    } else if pod.is_some() || nsel.is_some() {
        let pod_sel =
            pod.and_then(|n| selector(ctx, n, &format!("{path}.podSelector"), Source::K8s, ""));
        let ns_sel = nsel.and_then(|n| {
            selector(
                ctx,
                n,
                &format!("{path}.namespaceSelector"),
                Source::K8s,
                NAMESPACE_LABELS_PREFIX,
            )
        });
        let sel = match (pod.is_some(), pod_sel, nsel.is_some(), ns_sel) {
            // podSelector alone: pods of the policy's own namespace.
            (true, Some(p), false, _) => Some(p.in_namespace(ns)),
            // namespaceSelector (with or without podSelector, ANDed): pods of matching namespaces;
            // an empty one matches every namespace.
            (_, p, true, Some(n)) => {
                let mut s = n.and(&p.unwrap_or_default());
                s.push(Requirement {
                    source: Source::K8s,
                    key: NAMESPACE_LABEL.to_string(),
                    op: Operator::Exists,
                });
                Some(s)
            }
            _ => None,
        };
        if let Some(selector) = sel {
            out.push(PeerSelector {
                selector,
                field: field.to_string(),
            });
        }
    } else {
        ctx.error(
            node.pos,
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        );
    }
    f.finish(ctx, &[]);
}

fn port(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<PortProtocol> {
    let mut f = Fields::new(ctx, node, path, PORT_FIELDS)?;
    let port_node = f.get("port");
    let proto_node = f.get("protocol");
    if let Some(e) = f.get("endPort") {
        ctx.error(
            e.pos,
            &f.child("endPort"),
            "port ranges (endPort) are not supported",
        );
    }
    f.finish(ctx, &[]);
    let protocol = match proto_node {
        None => Protocol::TCP,
        Some(p) => match string(ctx, p, &format!("{path}.protocol"))?.as_str() {
            "TCP" => Protocol::TCP,
            "UDP" => Protocol::UDP,
            "SCTP" => {
                ctx.error(p.pos, &format!("{path}.protocol"), "SCTP is not supported");
                return None;
            }
            other => {
                ctx.error(
                    p.pos,
                    &format!("{path}.protocol"),
                    format!("unknown protocol {other:?} (expected TCP or UDP)"),
                );
                return None;
            }
        },
    };
    let Some(port_node) = port_node else {
        // A protocol without a port means every port of that protocol (port 0 in the table).
        return Some(PortProtocol { port: 0, protocol });
    };
    let port = port_number(ctx, port_node, &format!("{path}.port"))?;
    Some(PortProtocol { port, protocol })
}
