//! From YAML text to rules: object dispatch, metadata, and the policy set.
//!
//! Every file is parsed completely and all of its problems are reported. A [`PolicySet`] is only
//! built when every file is valid, so a caller either gets the whole new policy or keeps the old.

mod cilium;
mod k8s;
mod peers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::decode::{Ctx, Diagnostic, Fields, index, join, seq, string};
use crate::rule::{PolicyKind, Rule};
use crate::yaml::{self, Node, Pos, Value};

/// A namespace and its labels (from `v1` `Namespace` objects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// Everything read from one file.
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    /// The rules, in file order (shared: an unchanged file's rules are the same `Arc`s next time).
    pub rules: Vec<Arc<Rule>>,
    /// The namespaces.
    pub namespaces: Vec<Namespace>,
    /// Objects read, as (kind, namespace, name, position), for duplicate checks.
    objects: Vec<(String, Option<String>, String, Pos)>,
}

/// A validated set of policies: what the resolver consumes.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// Every rule of every file.
    pub rules: Vec<Arc<Rule>>,
    /// Namespace labels by namespace name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl PolicySet {
    /// Parses and validates `(file name, contents)` pairs. Either every file is valid and the
    /// whole set is returned, or every problem of every file is.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<PolicySet, Vec<Diagnostic>> {
        let parsed: Vec<(String, Result<ParsedFile, Vec<Diagnostic>>)> = sources
            .into_iter()
            .map(|(file, text)| (file.to_string(), parse_file(file, text)))
            .collect();
        PolicySet::from_parsed(parsed.iter().map(|(f, p)| (f.as_str(), p)))
    }

    /// Assembles files parsed earlier (a caller that re-parses only the files that changed keeps
    /// the others' results). Objects defined twice across files are reported here.
    pub fn from_parsed<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a Result<ParsedFile, Vec<Diagnostic>>)>,
    ) -> Result<PolicySet, Vec<Diagnostic>> {
        let mut diags = Vec::new();
        let mut set = PolicySet::default();
        let mut seen: BTreeMap<(String, Option<String>, String), String> = BTreeMap::new();
        for (file, parsed) in files {
            let parsed = match parsed {
                Ok(p) => p,
                Err(d) => {
                    diags.extend(d.iter().cloned());
                    continue;
                }
            };
            for (kind, ns, name, pos) in &parsed.objects {
                let key = (kind.clone(), ns.clone(), name.clone());
                if let Some(first) = seen.get(&key) {
                    diags.push(Diagnostic {
                        file: file.to_string(),
                        line: pos.line,
                        column: pos.col,
                        field: "metadata.name".into(),
                        message: format!(
                            "{kind} {} is defined twice (first in {first})",
                            ns.as_ref()
                                .map(|n| format!("{n}/{name}"))
                                .unwrap_or_else(|| name.clone())
                        ),
                    });
                } else {
                    seen.insert(key, format!("{file}:{}", pos.line));
                }
            }
            set.rules.extend(parsed.rules.iter().cloned());
            for ns in &parsed.namespaces {
                set.namespaces.insert(ns.name.clone(), ns.labels.clone());
            }
        }
        if diags.is_empty() {
            Ok(set)
        } else {
            diags.sort();
            Err(diags)
        }
    }

    /// Every CIDR prefix the rules name (including `except` prefixes). Each needs a CIDR identity
    /// so that addresses inside it can be told apart.
    pub fn cidr_prefixes(&self) -> BTreeSet<ipnet::IpNet> {
        let mut out = BTreeSet::new();
        for rule in &self.rules {
            for item in rule.ingress.iter().chain(&rule.egress) {
                let crate::rule::Peers::Selected(sels) = &item.peers else {
                    continue;
                };
                for s in sels {
                    for r in s.selector.requirements() {
                        if r.source == crate::labels::Source::Cidr
                            && let Ok(net) = r.key.replace('-', ":").parse()
                        {
                            out.insert(net);
                        }
                    }
                }
            }
        }
        out
    }

    /// The distinct names of the policies in the set, as `Kind namespace/name`.
    pub fn policy_names(&self) -> BTreeSet<String> {
        self.rules
            .iter()
            .map(|r| {
                let o = &r.origin;
                match &o.namespace {
                    Some(ns) => format!("{} {ns}/{}", o.kind.as_str(), o.name),
                    None => format!("{} {}", o.kind.as_str(), o.name),
                }
            })
            .collect()
    }
}

/// Parses one file (a multi-document YAML stream).
pub fn parse_file(file: &str, text: &str) -> Result<ParsedFile, Vec<Diagnostic>> {
    let docs = match yaml::parse_documents(text) {
        Ok(d) => d,
        Err(e) => {
            return Err(vec![Diagnostic {
                file: file.to_string(),
                line: e.pos.line,
                column: e.pos.col,
                field: String::new(),
                message: format!("invalid YAML: {}", e.message),
            }]);
        }
    };
    let mut ctx = Ctx::new(file);
    let mut out = ParsedFile::default();
    for doc in &docs {
        object(&mut ctx, doc, "", None, &mut out);
    }
    if ctx.diags.is_empty() {
        Ok(out)
    } else {
        Err(ctx.diags)
    }
}

const OBJECT_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "specs",
    "status",
    "items",
];

/// One Kubernetes object (or a `List` of them). `implied_kind` comes from a typed list whose
/// items carry no `kind`.
fn object(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    implied_kind: Option<(&str, &str)>,
    out: &mut ParsedFile,
) {
    let Some(mut f) = Fields::new(ctx, node, path, OBJECT_FIELDS) else {
        return;
    };
    let api_version = f
        .get("apiVersion")
        .and_then(|n| string(ctx, n, &f.child("apiVersion")));
    let kind_node = f.get("kind");
    let kind = kind_node.and_then(|n| string(ctx, n, &f.child("kind")));
    let (api_version, kind) = match (api_version, kind, implied_kind) {
        (Some(a), Some(k), _) => (a, k),
        (None, None, Some((a, k))) => (a.to_string(), k.to_string()),
        (a, k, _) => {
            if a.is_none() && !f.has("apiVersion") {
                ctx.error(
                    node.pos,
                    &f.child("apiVersion"),
                    "missing field `apiVersion`",
                );
            }
            if k.is_none() && !f.has("kind") {
                ctx.error(node.pos, &f.child("kind"), "missing field `kind`");
            }
            return;
        }
    };
    let kind_pos = kind_node.map(|n| n.pos).unwrap_or(node.pos);

    if kind == "List" || kind.ends_with("List") {
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        if let Some(items) = f.get("items") {
            let items_path = f.child("items");
            if let Some(items) = seq(ctx, items, &items_path) {
                for (i, item) in items.iter().enumerate() {
                    let implied = item_kind.map(|k| (api_version.as_str(), k));
                    object(ctx, item, &index(&items_path, i), implied, out);
                }
            }
        }
        f.finish(ctx, &["metadata"]);
        return;
    }

    let expected_api = match kind.as_str() {
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => "cilium.io/v2",
        "NetworkPolicy" => "networking.k8s.io/v1",
        "Namespace" => "v1",
        other => {
            ctx.error(
                kind_pos,
                &f.child("kind"),
                format!(
                    "unsupported kind {other:?} (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, \
                     NetworkPolicy, Namespace or a List of them)"
                ),
            );
            return;
        }
    };
    if api_version != expected_api {
        ctx.error(
            f.pos,
            &f.child("apiVersion"),
            format!("{kind} must have apiVersion {expected_api:?}, found {api_version:?}"),
        );
        return;
    }
    let namespaced = matches!(kind.as_str(), "CiliumNetworkPolicy" | "NetworkPolicy");
    let Some(meta) = metadata(ctx, &mut f, namespaced) else {
        f.finish(ctx, &["spec", "specs", "status"]);
        return;
    };
    out.objects.push((
        kind.clone(),
        meta.namespace.clone(),
        meta.name.clone(),
        meta.pos,
    ));
    match kind.as_str() {
        "CiliumNetworkPolicy" => {
            cilium::policy(ctx, &mut f, &meta, PolicyKind::CiliumNetworkPolicy, out)
        }
        "CiliumClusterwideNetworkPolicy" => cilium::policy(
            ctx,
            &mut f,
            &meta,
            PolicyKind::CiliumClusterwideNetworkPolicy,
            out,
        ),
        "NetworkPolicy" => k8s::policy(ctx, &mut f, &meta, out),
        _ => out.namespaces.push(Namespace {
            name: meta.name.clone(),
            labels: meta.labels.clone(),
        }),
    }
    // `status` is written by controllers in recorded objects; it never changes what is enforced.
    f.finish(ctx, &["status"]);
}

/// What membrane reads from `metadata`.
#[derive(Debug)]
pub(crate) struct Meta {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub pos: Pos,
}

/// Metadata fields are open-ended (uid, resourceVersion, managedFields, ...): only the ones
/// membrane uses are checked.
fn metadata(ctx: &mut Ctx<'_>, f: &mut Fields<'_>, namespaced: bool) -> Option<Meta> {
    let path = f.child("metadata");
    let Some(node) = f.get("metadata") else {
        ctx.error(
            f.pos,
            &path,
            "missing field `metadata` (with at least `name`)",
        );
        return None;
    };
    let Value::Map(entries) = &node.value else {
        ctx.expected(node, &path, "a mapping");
        return None;
    };
    let find = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k.value == Value::Str(key.into()))
            .map(|(_, v)| v)
    };
    let name = match find("name") {
        Some(n) => {
            let name = string(ctx, n, &join(&path, "name"))?;
            if !is_dns_subdomain(&name) {
                ctx.error(
                    n.pos,
                    &join(&path, "name"),
                    format!("invalid name {name:?}: lower-case letters, digits, '-' and '.', at most 253 characters"),
                );
                return None;
            }
            name
        }
        None => {
            ctx.error(node.pos, &join(&path, "name"), "missing field `name`");
            return None;
        }
    };
    let namespace = if namespaced {
        match find("namespace") {
            Some(n) if !matches!(n.value, Value::Null) => {
                let ns = string(ctx, n, &join(&path, "namespace"))?;
                if !is_dns_label(&ns) {
                    ctx.error(
                        n.pos,
                        &join(&path, "namespace"),
                        format!("invalid namespace {ns:?}"),
                    );
                    return None;
                }
                Some(ns)
            }
            _ => Some("default".to_string()),
        }
    } else {
        None
    };
    let mut labels = BTreeMap::new();
    if let Some(l) = find("labels").filter(|n| !matches!(n.value, Value::Null)) {
        let lpath = join(&path, "labels");
        let Value::Map(items) = &l.value else {
            ctx.expected(l, &lpath, "a mapping");
            return None;
        };
        for (k, v) in items {
            let key = string(ctx, k, &lpath)?;
            let value = string(ctx, v, &join(&lpath, &key))?;
            labels.insert(key, value);
        }
    }
    Some(Meta {
        name,
        namespace,
        labels,
        pos: node.pos,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests;
