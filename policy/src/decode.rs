//! Diagnostics and the small toolkit that turns [`Node`]s into typed values while recording every
//! problem with its file, position and field path.

use std::fmt;

use serde::Serialize;

use crate::yaml::{Node, Pos, Value};

/// One problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    /// The file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: u32,
    /// 1-based column (0 when unknown).
    pub column: u32,
    /// The field path, e.g. `specs[1].ingress[0].toPorts[0].ports[0].port` (may be empty).
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Collects diagnostics for one file.
#[derive(Debug)]
pub(crate) struct Ctx<'f> {
    pub file: &'f str,
    pub diags: Vec<Diagnostic>,
}

impl<'f> Ctx<'f> {
    pub fn new(file: &'f str) -> Self {
        Ctx {
            file,
            diags: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            line: pos.line,
            column: pos.col,
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Records "expected X, found Y" for `node`.
    pub fn expected(&mut self, node: &Node, field: &str, what: &str) {
        self.error(
            node.pos,
            field,
            format!("expected {what}, found {}", node.type_name()),
        );
    }
}

/// `parent.child` or `child` when there is no parent.
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// `parent[i]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// Fields that Cilium or Kubernetes define but membrane does not implement; naming them gives a
/// better error than "unknown field".
const UNSUPPORTED: &[(&str, &str)] = &[
    ("ingressDeny", "deny rules (Cilium 1.9+) are not supported"),
    ("egressDeny", "deny rules (Cilium 1.9+) are not supported"),
    (
        "nodeSelector",
        "host policies (nodeSelector) are not supported",
    ),
    (
        "enableDefaultDeny",
        "enableDefaultDeny is not supported; use --enable-policy",
    ),
    (
        "toServices",
        "toServices is not supported; select the service's endpoints with toEndpoints",
    ),
    ("toFQDNs", "toFQDNs is not supported; use toCIDR/toCIDRSet"),
    ("toGroups", "toGroups is not supported"),
    ("fromGroups", "fromGroups is not supported"),
    (
        "fromNodes",
        "fromNodes is not supported; use the remote-node entity",
    ),
    (
        "toNodes",
        "toNodes is not supported; use the remote-node entity",
    ),
    ("icmps", "ICMP rules are not supported"),
    ("endPort", "port ranges (endPort) are not supported"),
    ("terminatingTLS", "TLS interception is not supported"),
    ("originatingTLS", "TLS interception is not supported"),
    ("serverNames", "SNI rules are not supported"),
    ("listener", "listener references are not supported"),
    (
        "headerMatches",
        "headerMatches is not supported; use headers",
    ),
    ("dns", "DNS rules are not supported"),
    ("l7proto", "generic L7 parsers are not supported"),
    ("l7", "generic L7 rules are not supported"),
    (
        "authentication",
        "mutual authentication rules are not supported",
    ),
    ("log", "per-rule logging is not supported"),
];

/// A mapping whose fields are taken one by one; whatever is left at the end is reported.
pub(crate) struct Fields<'n> {
    pub path: String,
    pub pos: Pos,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
    taken: Vec<bool>,
    known: &'static [&'static str],
}

impl<'n> Fields<'n> {
    /// Views `node` as a mapping with the given known fields. `null` counts as an empty mapping.
    pub fn new(
        ctx: &mut Ctx<'_>,
        node: &'n Node,
        path: &str,
        known: &'static [&'static str],
    ) -> Option<Self> {
        let entries = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => {
                return Some(Fields {
                    path: path.to_string(),
                    pos: node.pos,
                    entries: Vec::new(),
                    taken: Vec::new(),
                    known,
                });
            }
            _ => {
                ctx.expected(node, path, "a mapping");
                return None;
            }
        };
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match &k.value {
                Value::Str(s) => out.push((s.as_str(), k, v)),
                _ => ctx.error(
                    k.pos,
                    path,
                    format!("field names must be strings, found {}", k.type_name()),
                ),
            }
        }
        let taken = vec![false; out.len()];
        Some(Fields {
            path: path.to_string(),
            pos: node.pos,
            entries: out,
            taken,
            known,
        })
    }

    /// The value of `key`, unless it is absent or `null` (Kubernetes treats both alike).
    pub fn get(&mut self, key: &str) -> Option<&'n Node> {
        debug_assert!(
            self.known.contains(&key),
            "{key} missing from the known list"
        );
        let i = self.entries.iter().position(|(k, _, _)| *k == key)?;
        self.taken[i] = true;
        let node = self.entries[i].2;
        (!matches!(node.value, Value::Null)).then_some(node)
    }

    /// Whether `key` is present with a non-null value (does not take it).
    pub fn has(&self, key: &str) -> bool {
        self.entries
            .iter()
            .any(|(k, _, v)| *k == key && !matches!(v.value, Value::Null))
    }

    /// The path of a child field.
    pub fn child(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Reports fields that were not taken, unless `ignore` lists them.
    pub fn finish(self, ctx: &mut Ctx<'_>, ignore: &[&str]) {
        for (i, (k, key_node, _)) in self.entries.iter().enumerate() {
            if self.taken[i] || ignore.contains(k) {
                continue;
            }
            let field = join(&self.path, k);
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(name, _)| name == k) {
                ctx.error(key_node.pos, &field, *why);
                continue;
            }
            let suggestion = self.known.iter().find(|known| {
                known.eq_ignore_ascii_case(k)
                    || known.eq_ignore_ascii_case(&k.replace(['_', '-'], ""))
            });
            let message = match suggestion {
                Some(s) => format!("unknown field `{k}`, did you mean `{s}`?"),
                None if self.known.is_empty() => format!("unknown field `{k}`"),
                None => format!(
                    "unknown field `{k}` (expected one of: {})",
                    self.known.join(", ")
                ),
            };
            ctx.error(key_node.pos, &field, message);
        }
    }
}

/// `node` as a list; `None` (with a diagnostic) otherwise.
pub(crate) fn seq<'n>(ctx: &mut Ctx<'_>, node: &'n Node, path: &str) -> Option<&'n [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        _ => {
            ctx.expected(node, path, "a list");
            None
        }
    }
}

/// `node` as a string. Numbers and booleans are refused, as Kubernetes would.
pub(crate) fn string(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<String> {
    match &node.value {
        Value::Str(s) => Some(s.clone()),
        Value::Int(_) | Value::Float(_) | Value::Bool(_) => {
            ctx.error(
                node.pos,
                path,
                format!(
                    "expected a string, found {} (quote it: \"{}\")",
                    node.type_name(),
                    node.scalar_text().unwrap_or_default()
                ),
            );
            None
        }
        _ => {
            ctx.expected(node, path, "a string");
            None
        }
    }
}

/// A list of strings.
pub(crate) fn strings(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Vec<(Pos, String)>> {
    let items = seq(ctx, node, path)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match string(ctx, item, &index(path, i)) {
            Some(s) => out.push((item.pos, s)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// An integer written as a number or as a decimal string (Cilium writes ports and versions as
/// strings; people write them as numbers).
pub(crate) fn int_or_string(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    what: &str,
) -> Option<i128> {
    let parsed = match &node.value {
        Value::Int(i) => Some(*i),
        Value::Str(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    if parsed.is_none() {
        let shown = node
            .scalar_text()
            .map(|t| format!(" {t:?}"))
            .unwrap_or_default();
        ctx.error(
            node.pos,
            path,
            format!("expected {what}, found {}{shown}", node.type_name()),
        );
    }
    parsed
}
