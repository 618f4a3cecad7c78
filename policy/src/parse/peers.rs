//! Pieces shared by the policy kinds: label selectors, CIDRs, entities, ports and L7 rules.

use std::sync::Arc;

use ipnet::IpNet;

use crate::decode::{Ctx, Fields, index, int_or_string, seq, string, strings};
use crate::identity::cidr_label_key;
use crate::l7::http::{HeaderMatch, HttpRule, HttpRules, Pattern};
use crate::l7::kafka::{self, KafkaRule, Role};
use crate::labels::{Source, split_source};
use crate::rule::{L7Rules, PeerSelector, PortProtocol, PortRule, Protocol};
use crate::selector::{NAMESPACE_LABEL, Operator, Requirement, Selector};
use crate::yaml::{Node, Value};

/// Cilium 1.1's limit on ports per `toPorts` item.
pub const MAX_PORTS_PER_RULE: usize = 40;

const SELECTOR_FIELDS: &[&str] = &["matchLabels", "matchExpressions"];
const EXPRESSION_FIELDS: &[&str] = &["key", "operator", "values"];

/// A label selector. Keys without a source get `default_source` (`Any` for Cilium selectors,
/// `K8s` for Kubernetes ones); `key_prefix` is prepended to every key (namespace selectors).
pub fn selector(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    default_source: Source,
    key_prefix: &str,
) -> Option<Selector> {
    let mut f = Fields::new(ctx, node, path, SELECTOR_FIELDS)?;
    let mut reqs = Vec::new();
    let mut ok = true;
    if let Some(ml) = f.get("matchLabels") {
        let mpath = f.child("matchLabels");
        match &ml.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    let Some(raw_key) = string(ctx, k, &mpath) else {
                        ok = false;
                        continue;
                    };
                    let kpath = format!("{mpath}.{raw_key}");
                    let value = match &v.value {
                        Value::Null => Some(String::new()),
                        _ => string(ctx, v, &kpath),
                    };
                    match (
                        label_key(ctx, k, &kpath, &raw_key, default_source, key_prefix),
                        value,
                    ) {
                        (Some((source, key)), Some(value)) => {
                            reqs.push(Requirement::equals(source, key, value))
                        }
                        _ => ok = false,
                    }
                }
            }
            _ => {
                ctx.expected(ml, &mpath, "a mapping of label keys to values");
                ok = false;
            }
        }
    }
    if let Some(me) = f.get("matchExpressions") {
        let mpath = f.child("matchExpressions");
        if let Some(items) = seq(ctx, me, &mpath) {
            for (i, item) in items.iter().enumerate() {
                match expression(ctx, item, &index(&mpath, i), default_source, key_prefix) {
                    Some(r) => reqs.push(r),
                    None => ok = false,
                }
            }
        } else {
            ok = false;
        }
    }
    f.finish(ctx, &[]);
    ok.then(|| Selector::new(reqs))
}

fn label_key(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    raw: &str,
    default_source: Source,
    key_prefix: &str,
) -> Option<(Source, String)> {
    match split_source(raw, default_source) {
        Ok((source, key)) if !key.is_empty() => Some((source, format!("{key_prefix}{key}"))),
        Ok(_) => {
            ctx.error(node.pos, path, "empty label key");
            None
        }
        Err(e) => {
            ctx.error(node.pos, path, e.to_string());
            None
        }
    }
}

fn expression(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    default_source: Source,
    key_prefix: &str,
) -> Option<Requirement> {
    let mut f = Fields::new(ctx, node, path, EXPRESSION_FIELDS)?;
    let key_node = f.get("key");
    let op_node = f.get("operator");
    let values_node = f.get("values");
    f.finish(ctx, &[]);
    let Some(key_node) = key_node else {
        ctx.error(node.pos, &format!("{path}.key"), "missing field `key`");
        return None;
    };
    let raw = string(ctx, key_node, &format!("{path}.key"))?;
    let (source, key) = label_key(
        ctx,
        key_node,
        &format!("{path}.key"),
        &raw,
        default_source,
        key_prefix,
    )?;
    let Some(op_node) = op_node else {
        ctx.error(
            node.pos,
            &format!("{path}.operator"),
            "missing field `operator` (In, NotIn, Exists or DoesNotExist)",
        );
        return None;
    };
    let op_name = string(ctx, op_node, &format!("{path}.operator"))?;
    let vpath = format!("{path}.values");
    let values = match values_node {
        Some(v) => strings(ctx, v, &vpath)?
            .into_iter()
            .map(|(_, s)| s)
            .collect(),
        None => Vec::new(),
    };
    let op = match op_name.as_str() {
        "In" | "NotIn" if values.is_empty() => {
            ctx.error(
                node.pos,
                &vpath,
                format!("operator {op_name} needs at least one value"),
            );
            return None;
        }
        "In" => Operator::In(values),
        "NotIn" => Operator::NotIn(values),
        "Exists" | "DoesNotExist" if !values.is_empty() => {
            ctx.error(
                node.pos,
                &vpath,
                format!("operator {op_name} takes no values"),
            );
            return None;
        }
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => {
            ctx.error(
                op_node.pos,
                &format!("{path}.operator"),
                format!("unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"),
            );
            return None;
        }
    };
    Some(Requirement { source, key, op })
}

/// How a namespaced policy confines a peer selector (Cilium's rules).
pub fn scope_peer(sel: Selector, namespace: Option<&str>) -> Selector {
    match namespace {
        Some(ns) if !sel.names_namespace() && !sel.names_reserved() => sel.in_namespace(ns),
        Some(_) => sel,
        // Clusterwide: an empty selector means every pod, not every identity (world included).
        None if sel.is_wildcard() => Selector::new(vec![Requirement {
            source: Source::K8s,
            key: NAMESPACE_LABEL.to_string(),
            op: Operator::Exists,
        }]),
        None => sel,
    }
}

/// The selectors an entity stands for.
pub fn entity(name: &str) -> Option<Vec<Selector>> {
    Some(match name {
        "all" => vec![Selector::wildcard()],
        "world" | "host" | "init" | "health" | "unmanaged" | "remote-node" => {
            vec![Selector::reserved(name)]
        }
        // Everything in the cluster: managed endpoints (which all carry a namespace), the nodes,
        // and the reserved in-cluster identities.
        "cluster" => {
            let mut v: Vec<Selector> = ["host", "remote-node", "init", "health", "unmanaged"]
                .iter()
                .map(|n| Selector::reserved(n))
                .collect();
            v.push(Selector::new(vec![Requirement {
                source: Source::K8s,
                key: NAMESPACE_LABEL.to_string(),
                op: Operator::Exists,
            }]));
            v
        }
        _ => return None,
    })
}

/// Known entity names, for error messages.
pub const ENTITIES: &str = "all, world, host, init, cluster, health, unmanaged, remote-node";

/// Parses a CIDR (or a bare address, meaning a host prefix).
pub fn cidr(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<IpNet> {
    let text = string(ctx, node, path)?;
    let parsed = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
    match parsed {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            ctx.error(
                node.pos,
                path,
                format!("invalid CIDR {text:?} (expected e.g. 10.0.0.0/8 or 2001:db8::/32)"),
            );
            None
        }
    }
}

const CIDR_BLOCK_FIELDS: &[&str] = &["cidr", "except"];

/// A `{cidr, except}` mapping: a CiliumNetworkPolicy CIDRSet entry or a NetworkPolicy ipBlock.
/// `field` names the peer for explanations, given the parsed prefix.
pub fn cidr_block(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    field: impl Fn(IpNet) -> String,
) -> Option<Vec<PeerSelector>> {
    let mut f = Fields::new(ctx, node, path, CIDR_BLOCK_FIELDS)?;
    let net = match f.get("cidr") {
        Some(c) => cidr(ctx, c, &f.child("cidr")),
        None => {
            ctx.error(node.pos, &f.child("cidr"), "missing field `cidr`");
            None
        }
    };
    let except_path = f.child("except");
    let mut excepts = Vec::new();
    if let Some(e) = f.get("except")
        && let Some(list) = seq(ctx, e, &except_path)
    {
        for (j, en) in list.iter().enumerate() {
            if let Some(ex) = cidr(ctx, en, &index(&except_path, j)) {
                excepts.push((en.clone(), ex));
            }
        }
    }
    f.finish(ctx, &[]);
    let net = net?;
    cidr_peers(ctx, net, &excepts, &field(net), &except_path)
}

/// The peer selectors for a CIDR with exceptions. Exceptions must lie inside the CIDR and be of
/// its address family.
pub fn cidr_peers(
    ctx: &mut Ctx<'_>,
    net: IpNet,
    excepts: &[(Node, IpNet)],
    field: &str,
    except_path: &str,
) -> Option<Vec<PeerSelector>> {
    let mut ok = true;
    let mut reqs = vec![Requirement {
        source: Source::Cidr,
        key: cidr_label_key(&net),
        op: Operator::Exists,
    }];
    for (i, (node, ex)) in excepts.iter().enumerate() {
        let same_family = matches!(
            (net, ex),
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
        );
        if !same_family {
            ctx.error(
                node.pos,
                &index(except_path, i),
                format!("except {ex} is not of the same address family as {net}"),
            );
            ok = false;
        } else if !net.contains(ex) {
            ctx.error(
                node.pos,
                &index(except_path, i),
                format!("except {ex} is not inside {net}"),
            );
            ok = false;
        }
        reqs.push(Requirement {
            source: Source::Cidr,
            key: cidr_label_key(ex),
            op: Operator::DoesNotExist,
        });
    }
    if !ok {
        return None;
    }
    let mut out = vec![PeerSelector {
        selector: Selector::new(reqs.clone()),
        field: field.to_string(),
    }];
    if net.prefix_len() == 0 {
        // Addresses outside every known prefix have the plain world identity.
        reqs[0] = Requirement {
            source: Source::Reserved,
            key: "world".into(),
            op: Operator::Exists,
        };
        out.push(PeerSelector {
            selector: Selector::new(reqs),
            field: format!("{field} (world)"),
        });
    }
    Some(out)
}

const PORT_RULE_FIELDS: &[&str] = &["ports", "rules"];
const PORT_FIELDS: &[&str] = &["port", "protocol"];
const L7_FIELDS: &[&str] = &["http", "kafka"];
const HTTP_FIELDS: &[&str] = &["method", "path", "host", "headers"];
const KAFKA_FIELDS: &[&str] = &["role", "apiKey", "apiVersion", "clientID", "topic"];

/// One Cilium `toPorts` item.
pub fn port_rule(ctx: &mut Ctx<'_>, node: &Node, path: &str, idx: usize) -> Option<Arc<PortRule>> {
    let mut f = Fields::new(ctx, node, path, PORT_RULE_FIELDS)?;
    let mut ok = true;
    let mut ports = Vec::new();
    match f.get("ports") {
        Some(p) => {
            let ppath = f.child("ports");
            if let Some(items) = seq(ctx, p, &ppath) {
                if items.len() > MAX_PORTS_PER_RULE {
                    ctx.error(
                        p.pos,
                        &ppath,
                        format!(
                            "at most {MAX_PORTS_PER_RULE} ports per toPorts item, found {}",
                            items.len()
                        ),
                    );
                    ok = false;
                }
                for (i, item) in items.iter().enumerate() {
                    match port_protocol(ctx, item, &index(&ppath, i)) {
                        Some(pp) => ports.push(pp),
                        None => ok = false,
                    }
                }
            } else {
                ok = false;
            }
        }
        None => {
            ctx.error(node.pos, &f.child("ports"), "missing field `ports`");
            ok = false;
        }
    }
    let l7 = match f.get("rules") {
        Some(r) => l7_rules(ctx, r, &f.child("rules"), &ports),
        None => Some(None),
    };
    f.finish(ctx, &[]);
    let l7 = l7?;
    ok.then(|| {
        Arc::new(PortRule {
            index: idx,
            ports,
            l7,
        })
    })
}

fn port_protocol(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<PortProtocol> {
    let mut f = Fields::new(ctx, node, path, PORT_FIELDS)?;
    let port_node = f.get("port");
    let proto_node = f.get("protocol");
    f.finish(ctx, &[]);
    let Some(port_node) = port_node else {
        ctx.error(node.pos, &format!("{path}.port"), "missing field `port`");
        return None;
    };
    let port = port_number(ctx, port_node, &format!("{path}.port"))?;
    let protocol = match proto_node {
        None => Protocol::ANY,
        Some(p) => match string(ctx, p, &format!("{path}.protocol"))?.as_str() {
            "TCP" => Protocol::TCP,
            "UDP" => Protocol::UDP,
            "ANY" | "" => Protocol::ANY,
            other => {
                ctx.error(
                    p.pos,
                    &format!("{path}.protocol"),
                    format!("unknown protocol {other:?} (expected TCP, UDP or ANY)"),
                );
                return None;
            }
        },
    };
    Some(PortProtocol { port, protocol })
}

/// A port number 1..=65535 written as a number or a string. Named ports are refused.
pub fn port_number(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<u16> {
    if let Value::Str(s) = &node.value
        && !s.is_empty()
        && !s.trim().bytes().all(|b| b.is_ascii_digit())
    {
        ctx.error(
            node.pos,
            path,
            format!("named port {s:?} is not supported; use the port number"),
        );
        return None;
    }
    let n = int_or_string(ctx, node, path, "a port number (1-65535)")?;
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            ctx.error(
                node.pos,
                path,
                format!("port {n} is out of range (expected 1-65535)"),
            );
            None
        }
    }
}

/// `rules`; `Some(None)` when there are none. L7 rules need every port to be TCP.
fn l7_rules(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    ports: &[PortProtocol],
) -> Option<Option<L7Rules>> {
    let mut f = Fields::new(ctx, node, path, L7_FIELDS)?;
    let http = f.get("http");
    let kafka = f.get("kafka");
    f.finish(ctx, &[]);
    if http.is_some() && kafka.is_some() {
        ctx.error(
            node.pos,
            path,
            "a toPorts item may carry http or kafka rules, not both",
        );
        return None;
    }
    let rules = match (http, kafka) {
        (Some(h), _) => {
            let hpath = format!("{path}.http");
            let items = seq(ctx, h, &hpath)?;
            let mut rules = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match http_rule(ctx, item, &index(&hpath, i), i) {
                    Some(r) => rules.push(r),
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
            // An empty list means "no L7 rules", as in Cilium: the port is an L4 allow.
            if rules.is_empty() {
                None
            } else {
                match HttpRules::new(rules) {
                    Ok(set) => Some(L7Rules::Http(set)),
                    Err(e) => {
                        ctx.error(
                            h.pos,
                            &hpath,
                            format!("these HTTP rules do not compile together: {e}"),
                        );
                        return None;
                    }
                }
            }
        }
        (None, Some(k)) => {
            let kpath = format!("{path}.kafka");
            let items = seq(ctx, k, &kpath)?;
            let mut rules = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match kafka_rule(ctx, item, &index(&kpath, i), i) {
                    Some(r) => rules.push(r),
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
            (!rules.is_empty()).then_some(L7Rules::Kafka(rules))
        }
        (None, None) => None,
    };
    if let Some(r) = &rules {
        let non_tcp: Vec<String> = ports
            .iter()
            .filter(|p| p.protocol != Protocol::TCP)
            .map(|p| format!("{}/{:?}", p.port, p.protocol))
            .collect();
        if !non_tcp.is_empty() {
            let kind = match r {
                L7Rules::Http(_) => "HTTP",
                L7Rules::Kafka(_) => "Kafka",
            };
            ctx.error(
                node.pos,
                path,
                format!(
                    "{kind} rules apply only to TCP ports; set protocol: TCP on {} (ANY also covers UDP)",
                    non_tcp.join(", ")
                ),
            );
            return None;
        }
    }
    Some(rules)
}

fn pattern(ctx: &mut Ctx<'_>, node: Option<&Node>, path: &str) -> Result<Option<Pattern>, ()> {
    let Some(node) = node else { return Ok(None) };
    let text = string(ctx, node, path).ok_or(())?;
    match Pattern::new(&text) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            let msg = e.to_string();
            let msg = msg
                .lines()
                .last()
                .unwrap_or("invalid regex")
                .trim()
                .to_string();
            ctx.error(
                node.pos,
                path,
                format!("invalid regular expression {text:?}: {msg}"),
            );
            Err(())
        }
    }
}

fn http_rule(ctx: &mut Ctx<'_>, node: &Node, path: &str, idx: usize) -> Option<HttpRule> {
    let mut f = Fields::new(ctx, node, path, HTTP_FIELDS)?;
    let method = pattern(ctx, f.get("method"), &f.child("method"));
    let p = pattern(ctx, f.get("path"), &f.child("path"));
    let host = pattern(ctx, f.get("host"), &f.child("host"));
    let mut headers = Vec::new();
    let mut ok = true;
    if let Some(h) = f.get("headers") {
        let hpath = f.child("headers");
        match strings(ctx, h, &hpath) {
            Some(list) => {
                for (i, (pos, text)) in list.iter().enumerate() {
                    match HeaderMatch::parse(text) {
                        Ok(m) => headers.push(m),
                        Err(e) => {
                            ctx.error(
                                *pos,
                                &index(&hpath, i),
                                format!("{e} (expected \"Name\" or \"Name: value\")"),
                            );
                            ok = false;
                        }
                    }
                }
            }
            None => ok = false,
        }
    }
    f.finish(ctx, &[]);
    let (Ok(method), Ok(path_re), Ok(host)) = (method, p, host) else {
        return None;
    };
    ok.then_some(HttpRule {
        index: idx,
        method,
        path: path_re,
        host,
        headers,
    })
}

fn kafka_rule(ctx: &mut Ctx<'_>, node: &Node, path: &str, idx: usize) -> Option<KafkaRule> {
    let mut f = Fields::new(ctx, node, path, KAFKA_FIELDS)?;
    let role_node = f.get("role");
    let key_node = f.get("apiKey");
    let version_node = f.get("apiVersion");
    let client_node = f.get("clientID");
    let topic_node = f.get("topic");
    f.finish(ctx, &[]);
    let mut ok = true;
    if role_node.is_some() && key_node.is_some() {
        ctx.error(node.pos, path, "role and apiKey are mutually exclusive");
        return None;
    }
    let mut rule = KafkaRule {
        index: idx,
        role: None,
        api_key: None,
        api_keys: Vec::new(),
        api_version: None,
        client_id: None,
        topic: None,
    };
    if let Some(n) = role_node {
        match string(ctx, n, &format!("{path}.role"))
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            Some("produce") => {
                rule.role = Some(Role::Produce);
                rule.api_keys = Role::Produce.api_keys().to_vec();
            }
            Some("consume") => {
                rule.role = Some(Role::Consume);
                rule.api_keys = Role::Consume.api_keys().to_vec();
            }
            Some(other) => {
                ctx.error(
                    n.pos,
                    &format!("{path}.role"),
                    format!("unknown role {other:?} (expected produce or consume)"),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(n) = key_node {
        match string(ctx, n, &format!("{path}.apiKey")) {
            Some(name) => match kafka::API_KEYS
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&name))
            {
                Some((_, key)) => {
                    rule.api_key = Some(name);
                    rule.api_keys = vec![*key];
                }
                None => {
                    ctx.error(n.pos, &format!("{path}.apiKey"), format!("unknown Kafka API key {name:?} (expected a name such as produce, fetch, metadata, apiversions)"));
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    if let Some(n) = version_node {
        match int_or_string(
            ctx,
            n,
            &format!("{path}.apiVersion"),
            "an API version (0-32767)",
        ) {
            Some(v) => match i16::try_from(v) {
                Ok(v) if v >= 0 => rule.api_version = Some(v),
                _ => {
                    ctx.error(
                        n.pos,
                        &format!("{path}.apiVersion"),
                        format!("API version {v} is out of range (0-32767)"),
                    );
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    if let Some(n) = client_node {
        match string(ctx, n, &format!("{path}.clientID")) {
            Some(c)
                if c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
            {
                rule.client_id = Some(c)
            }
            Some(c) => {
                ctx.error(
                    n.pos,
                    &format!("{path}.clientID"),
                    format!("invalid clientID {c:?} (allowed: a-z A-Z 0-9 . _ -)"),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(n) = topic_node {
        match string(ctx, n, &format!("{path}.topic")) {
            Some(t) if kafka::valid_topic(&t) => rule.topic = Some(t),
            Some(t) => {
                ctx.error(
                    n.pos,
                    &format!("{path}.topic"),
                    format!(
                        "invalid topic {t:?} (1-{} characters of a-z A-Z 0-9 . _ -)",
                        kafka::MAX_TOPIC_LEN
                    ),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    ok.then_some(rule)
}
