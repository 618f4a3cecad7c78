//! Traces for people: the text rendering shared by `membrane policy trace` (offline) and the
//! agent's live trace, and the live trace's request body.

use std::fmt::Write as _;

use anyhow::{Result, anyhow, bail};
use membrane_codec::path::{lenient_reading, normalize_target};
use membrane_policy::l7::kafka::api_key_from_name;
use membrane_policy::rule::Proto;
use membrane_policy::trace::{Flow, L7Facts, Trace, TraceVerdict};
use serde::{Deserialize, Serialize};

/// Traces a flow as the L7 proxy judges it (path normalization on, its default): an HTTP path
/// is normalized first (`membrane_codec::path`), and a request the rules allow must also be
/// allowed as a lenient upstream reads its path, or the trace of that reading is the answer.
/// Returns the trace and the request as judged.
pub fn trace_as_proxy(
    rules: &[std::sync::Arc<membrane_policy::rule::Rule>],
    mode: membrane_policy::rule::EnforcementMode,
    flow: &Flow<'_>,
) -> Result<(Trace, L7Facts)> {
    let mut l7 = flow.l7.clone();
    if let L7Facts::Http { path, .. } = &mut l7 {
        *path = normalize_target(path)
            .map_err(|e| anyhow!("HTTP path {path:?}: {e} (the proxy answers 400)"))?
            .into_owned();
    }
    let judged = Flow { l7, ..*flow };
    let t = membrane_policy::trace::trace(rules, mode, &judged);
    let read = match &judged.l7 {
        L7Facts::Http { path, .. } if t.verdict == TraceVerdict::Allowed => lenient_reading(path),
        _ => None,
    };
    let Some(read) = read else {
        return Ok((t, judged.l7));
    };
    let mut lenient_l7 = judged.l7.clone();
    if let L7Facts::Http { path, .. } = &mut lenient_l7 {
        *path = read.clone();
    }
    let lenient = Flow {
        l7: lenient_l7,
        ..*flow
    };
    let mut t2 = membrane_policy::trace::trace(rules, mode, &lenient);
    if t2.verdict == TraceVerdict::Allowed {
        return Ok((t, judged.l7));
    }
    let note = format!(
        " ({read} is how a lenient upstream reads the path: %2F, %5C and \\ as slashes, \
         ;parameters cut; it is allowed only if the rules allow that reading too)"
    );
    for d in &mut t2.directions {
        if d.verdict == TraceVerdict::Denied {
            d.reason.push_str(&note);
        }
    }
    t2.reason.push_str(&note);
    Ok((t2, judged.l7))
}

/// `POST /v1/trace`: endpoints by name (or labels, or addresses), and the flow.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Source: an endpoint name, `[source:]k=v,...` labels, or an address.
    pub src: String,
    /// Destination, likewise.
    pub dst: String,
    /// Namespace for label sources without one.
    pub src_namespace: Option<String>,
    /// Namespace for label destinations without one.
    pub dst_namespace: Option<String>,
    /// Destination port.
    pub dport: u16,
    /// Protocol name.
    pub proto: String,
    /// An HTTP request to judge.
    pub http: Option<HttpFacts>,
    /// A Kafka request to judge.
    pub kafka: Option<KafkaFacts>,
}

/// An HTTP request's facts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpFacts {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Authority.
    pub host: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

/// A Kafka request's facts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KafkaFacts {
    /// API key, by name or number.
    pub api_key: String,
    /// API version.
    pub api_version: i16,
    /// Client id.
    pub client_id: Option<String>,
    /// Topics.
    pub topics: Vec<String>,
}

impl TraceRequest {
    /// The protocol.
    pub fn proto(&self) -> Result<Proto> {
        Proto::parse(&self.proto).ok_or_else(|| anyhow!("unknown protocol {:?}", self.proto))
    }

    /// The L7 facts.
    pub fn facts(&self) -> Result<L7Facts> {
        Ok(match (&self.http, &self.kafka) {
            (Some(_), Some(_)) => bail!("give either HTTP or Kafka facts, not both"),
            (Some(h), None) => L7Facts::Http {
                method: h.method.clone(),
                path: h.path.clone(),
                host: h.host.clone(),
                headers: h.headers.clone(),
            },
            (None, Some(k)) => L7Facts::Kafka {
                api_key: api_key_from_name(&k.api_key)
                    .ok_or_else(|| anyhow!("unknown Kafka API key {:?}", k.api_key))?,
                api_version: k.api_version,
                client_id: k.client_id.clone(),
                topics: k.topics.clone(),
            },
            (None, None) => L7Facts::None,
        })
    }
}

/// The human-readable form of a trace.
pub fn render(t: &Trace, l7: &L7Facts) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "From: identity {} [{}]", t.src.identity, t.src.labels);
    let _ = writeln!(s, "To:   identity {} [{}]", t.dst.identity, t.dst.labels);
    let _ = write!(s, "Flow: {}/{}", t.dport, t.protocol);
    match l7 {
        L7Facts::Http {
            method,
            path,
            host,
            headers,
        } => {
            let _ = write!(s, "  HTTP {method} {path}");
            if !host.is_empty() {
                let _ = write!(s, " host={host}");
            }
            for (k, v) in headers {
                let _ = write!(s, " [{k}: {v}]");
            }
        }
        L7Facts::Kafka {
            api_key,
            api_version,
            client_id,
            topics,
        } => {
            let name = membrane_policy::l7::kafka::api_key_name(*api_key).unwrap_or("?");
            let _ = write!(s, "  Kafka {name}({api_key}) v{api_version}");
            if let Some(c) = client_id {
                let _ = write!(s, " client={c}");
            }
            if !topics.is_empty() {
                let _ = write!(s, " topics={}", topics.join(","));
            }
        }
        L7Facts::None => {}
    }
    s.push_str("\n\n");
    for d in &t.directions {
        let verdict = match d.verdict {
            TraceVerdict::Allowed => "allowed",
            TraceVerdict::Denied => "DENIED",
        };
        let _ = writeln!(
            s,
            "{} of {} ({}): {verdict}",
            capitalize(d.direction.as_str()),
            d.endpoint,
            serde_json::to_value(d.stage)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        );
        if !d.selecting_rules.is_empty() {
            let _ = writeln!(s, "  rules selecting {}:", d.endpoint);
            for r in &d.selecting_rules {
                let ns = r
                    .namespace
                    .as_ref()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "    {} {ns}{} spec[{}]  ({})",
                    r.kind.as_str(),
                    r.name,
                    r.rule_index,
                    r.file
                );
            }
        }
        for q in &d.requires {
            let _ = writeln!(s, "  requires: {q}");
        }
        for m in &d.matches {
            let ns = m
                .rule
                .namespace
                .as_ref()
                .map(|n| format!("{n}/"))
                .unwrap_or_default();
            let ports = m
                .to_ports
                .map(|p| format!(" toPorts[{p}]"))
                .unwrap_or_default();
            let l7 =
                m.l7.map(|k| format!("  -> {k:?} rules"))
                    .unwrap_or_default();
            let _ = writeln!(
                s,
                "  L3/L4 match: {} {ns}{} spec[{}] {}{ports} via {}{l7}",
                m.rule.kind.as_str(),
                m.rule.name,
                m.rule.rule_index,
                m.item,
                m.peer
            );
        }
        if let Some(l7) = &d.l7 {
            for m in &l7.allowed_by {
                let ns = m
                    .rule
                    .namespace
                    .as_ref()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  L7 match:    {} {ns}{} spec[{}] {} toPorts[{}] {}",
                    m.rule.kind.as_str(),
                    m.rule.name,
                    m.rule.rule_index,
                    m.item,
                    m.to_ports,
                    m.l7_rule
                );
            }
        }
        let _ = writeln!(s, "  {}\n", d.reason);
    }
    let _ = writeln!(
        s,
        "Verdict: {}",
        match t.verdict {
            TraceVerdict::Allowed => "allowed",
            TraceVerdict::Denied => "denied",
        }
    );
    s
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
