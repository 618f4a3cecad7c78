//! Policy trace: the verdict for one flow (and optionally one request), with the rules that
//! decided it.
//!
//! The trace evaluates the rules directly, rule by rule, rather than reading the resolved tables:
//! that is what lets it name every rule involved. Property tests check that it agrees with the
//! tables (`resolve`), so what the trace says is what the datapath and the proxy do.

use serde::Serialize;

use crate::identity::Identity;
use crate::l7::http::HttpRequest;
use crate::l7::kafka::{self, KafkaRequest, KafkaRule, KafkaVerdict};
use crate::rule::{Direction, EnforcementMode, L7Kind, L7Rules, Peers, PolicyKind, Proto, Rule};
use crate::selector::Selector;
use std::sync::Arc;

/// The request facts a trace may be given.
#[derive(Clone, Debug, Default)]
pub enum L7Facts {
    /// No request: judge the connection only.
    #[default]
    None,
    /// An HTTP request.
    Http {
        /// Method.
        method: String,
        /// Path and query.
        path: String,
        /// Authority.
        host: String,
        /// Headers.
        headers: Vec<(String, String)>,
    },
    /// A Kafka request.
    Kafka {
        /// API key.
        api_key: i16,
        /// API version.
        api_version: i16,
        /// Client id.
        client_id: Option<String>,
        /// Topics.
        topics: Vec<String>,
    },
}

/// A flow to trace.
#[derive(Clone, Debug)]
pub struct Flow<'a> {
    /// The source.
    pub src: &'a Identity,
    /// The destination.
    pub dst: &'a Identity,
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
    /// The request, if any.
    pub l7: L7Facts,
}

/// `allowed` or `denied`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceVerdict {
    /// Allowed.
    Allowed,
    /// Denied.
    Denied,
}

/// Which stage decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Stage {
    /// The direction is not enforced for this endpoint.
    #[serde(rename = "not-enforced")]
    NotEnforced,
    /// The peer is not an endpoint membrane manages (no policy of its own in this direction).
    #[serde(rename = "not-applicable")]
    NotApplicable,
    /// Decided at L3/L4.
    #[serde(rename = "L3/L4")]
    L3L4,
    /// Decided by L7 rules.
    #[serde(rename = "L7")]
    L7,
}

/// A rule, named as users know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// Kind of the policy object.
    pub kind: PolicyKind,
    /// Its name.
    pub name: String,
    /// Its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Index in `specs` (0 for `spec`).
    pub rule_index: usize,
    /// File it was read from.
    pub file: String,
}

impl RuleRef {
    fn of(rule: &Rule) -> RuleRef {
        RuleRef {
            kind: rule.origin.kind,
            name: rule.origin.name.clone(),
            namespace: rule.origin.namespace.clone(),
            rule_index: rule.origin.spec_index,
            file: rule.origin.file.clone(),
        }
    }
}

/// One rule item that allows the flow at L3/L4.
#[derive(Clone, Debug, Serialize)]
pub struct Match {
    /// The rule.
    pub rule: RuleRef,
    /// `ingress[i]` / `egress[i]`.
    pub item: String,
    /// The peer selector that matched (`any` for rules without one).
    pub peer: String,
    /// `toPorts[j]`, when the item has ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<usize>,
    /// The L7 protocol the item requires, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Kind>,
}

/// One L7 rule that allowed the request.
#[derive(Clone, Debug, Serialize)]
pub struct L7Match {
    /// The rule item.
    pub rule: RuleRef,
    /// `ingress[i]` / `egress[i]`.
    pub item: String,
    /// `toPorts[j]`.
    pub to_ports: usize,
    /// `rules.http[k]` / `rules.kafka[k]`.
    pub l7_rule: String,
}

/// The L7 stage of one direction.
#[derive(Clone, Debug, Serialize)]
pub struct L7Trace {
    /// The protocol (absent when the allowing rules disagree).
    pub kind: Option<L7Kind>,
    /// Whether a request was judged.
    pub evaluated: bool,
    /// Rules that allowed the request.
    pub allowed_by: Vec<L7Match>,
    /// Kafka topics no rule allowed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub denied_topics: Vec<String>,
}

/// The verdict of one direction.
#[derive(Clone, Debug, Serialize)]
pub struct DirectionTrace {
    /// Ingress or egress.
    pub direction: Direction,
    /// Whose policy this is (`src` for egress, `dst` for ingress).
    pub endpoint: &'static str,
    /// Allowed or denied.
    pub verdict: TraceVerdict,
    /// What decided.
    pub stage: Stage,
    /// Whether the direction is enforced.
    pub enforced: bool,
    /// The rules that select the endpoint (and so apply to this direction).
    pub selecting_rules: Vec<RuleRef>,
    /// `fromRequires`/`toRequires` the peer must satisfy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Rule items that allow the flow at L3/L4.
    pub matches: Vec<Match>,
    /// The L7 stage, when the flow is redirected to the proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Trace>,
    /// One sentence.
    pub reason: String,
}

/// A party of the flow.
#[derive(Clone, Debug, Serialize)]
pub struct Party {
    /// Numeric identity.
    pub identity: u32,
    /// Identity labels.
    pub labels: crate::labels::LabelSet,
}

/// The result of a trace.
#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    /// The overall verdict.
    pub verdict: TraceVerdict,
    /// The source.
    pub src: Party,
    /// The destination.
    pub dst: Party,
    /// Destination port.
    pub dport: u16,
    /// Protocol.
    pub protocol: Proto,
    /// Egress of the source, then ingress of the destination.
    pub directions: Vec<DirectionTrace>,
    /// One sentence: what decided the verdict.
    pub reason: String,
}

/// An item that allows the flow at L3/L4: (rule, item index, toPorts index, its L7 rules).
type Allowing<'r> = (&'r Arc<Rule>, usize, Option<usize>, Option<&'r L7Rules>);

/// Traces a flow through the rules.
pub fn trace(rules: &[Arc<Rule>], mode: EnforcementMode, flow: &Flow<'_>) -> Trace {
    let egress = direction(rules, mode, Direction::Egress, flow.src, flow.dst, flow);
    let ingress = direction(rules, mode, Direction::Ingress, flow.dst, flow.src, flow);
    let denied = [&egress, &ingress]
        .into_iter()
        .find(|d| d.verdict == TraceVerdict::Denied);
    let (verdict, reason) = match denied {
        Some(d) => (
            TraceVerdict::Denied,
            format!(
                "denied by {} policy of {}: {}",
                d.direction, d.endpoint, d.reason
            ),
        ),
        None => {
            let deciding: Vec<String> = [&egress, &ingress]
                .into_iter()
                .filter(|d| matches!(d.stage, Stage::L3L4 | Stage::L7))
                .map(|d| format!("{} of {}: {}", d.direction, d.endpoint, d.reason))
                .collect();
            let reason = if deciding.is_empty() {
                "no policy applies in either direction".to_string()
            } else {
                deciding.join("; ")
            };
            (TraceVerdict::Allowed, reason)
        }
    };
    Trace {
        verdict,
        src: Party {
            identity: flow.src.id.0,
            labels: (*flow.src.labels).clone(),
        },
        dst: Party {
            identity: flow.dst.id.0,
            labels: (*flow.dst.labels).clone(),
        },
        dport: flow.port,
        protocol: flow.proto,
        directions: vec![egress, ingress],
        reason,
    }
}

fn direction(
    rules: &[Arc<Rule>],
    mode: EnforcementMode,
    dir: Direction,
    subject: &Identity,
    peer: &Identity,
    flow: &Flow<'_>,
) -> DirectionTrace {
    let endpoint = match dir {
        Direction::Egress => "src",
        Direction::Ingress => "dst",
    };
    let mut out = DirectionTrace {
        direction: dir,
        endpoint,
        verdict: TraceVerdict::Allowed,
        stage: Stage::NotApplicable,
        enforced: false,
        selecting_rules: Vec::new(),
        requires: Vec::new(),
        matches: Vec::new(),
        l7: None,
        reason: String::new(),
    };
    if !subject.is_endpoint() {
        out.reason = format!(
            "{endpoint} (identity {}) is not a managed endpoint; it has no {dir} policy",
            subject.id
        );
        return out;
    }
    let selecting: Vec<&Arc<Rule>> = rules
        .iter()
        .filter(|r| r.endpoint_selector.matches(&subject.labels))
        .collect();
    out.selecting_rules = selecting.iter().map(|r| RuleRef::of(r)).collect();
    out.enforced = match mode {
        EnforcementMode::Always => true,
        EnforcementMode::Never => false,
        EnforcementMode::Default => selecting.iter().any(|r| r.enforces(dir)),
    };
    if !out.enforced {
        out.stage = Stage::NotEnforced;
        out.reason = match mode {
            EnforcementMode::Never => {
                "policy enforcement is disabled (--enable-policy never)".to_string()
            }
            _ => format!(
                "no rule selecting {endpoint} has {dir} rules, so its {dir} is not enforced"
            ),
        };
        return out;
    }
    let requires: Vec<&Selector> = selecting.iter().flat_map(|r| r.requires(dir)).collect();
    out.requires = requires.iter().map(|s| s.to_string()).collect();
    let requires_ok = requires.iter().all(|s| s.matches(&peer.labels));

    // (rule, item, toPorts index, l7) for every item that allows the flow at L3/L4.
    let mut allowing: Vec<Allowing<'_>> = Vec::new();
    for rule in &selecting {
        for item in rule.items(dir) {
            let peer_field = match &item.peers {
                Peers::Any => Some("any".to_string()),
                Peers::Selected(sels) => sels
                    .iter()
                    .find(|s| s.selector.matches(&peer.labels))
                    .map(|s| s.field.clone()),
            };
            let Some(peer_field) = peer_field.filter(|_| requires_ok) else {
                continue;
            };
            let item_name = format!("{dir}[{}]", item.index);
            if item.ports.is_empty() {
                out.matches.push(Match {
                    rule: RuleRef::of(rule),
                    item: item_name,
                    peer: peer_field,
                    to_ports: None,
                    l7: None,
                });
                allowing.push((rule, item.index, None, None));
                continue;
            }
            for pr in &item.ports {
                let port_ok = pr.ports.iter().any(|pp| {
                    (pp.port == 0 || pp.port == flow.port)
                        && pp.protocol.expand().contains(&flow.proto)
                });
                if port_ok {
                    out.matches.push(Match {
                        rule: RuleRef::of(rule),
                        item: item_name.clone(),
                        peer: peer_field.clone(),
                        to_ports: Some(pr.index),
                        l7: pr.l7.as_ref().map(L7Rules::kind),
                    });
                    allowing.push((rule, item.index, Some(pr.index), pr.l7.as_ref()));
                }
            }
        }
    }
    if allowing.is_empty() {
        out.verdict = TraceVerdict::Denied;
        out.stage = Stage::L3L4;
        out.reason = if !requires_ok {
            format!(
                "the peer does not satisfy the {dir} requirements {}",
                out.requires.join(" AND ")
            )
        } else if selecting.is_empty() {
            format!(
                "{dir} is enforced for every endpoint (--enable-policy always) and no rule selects {endpoint}"
            )
        } else {
            format!(
                "none of the {} rule(s) selecting {endpoint} allows this peer on {}/{}",
                selecting.len(),
                flow.port,
                flow.proto
            )
        };
        return out;
    }
    out.stage = Stage::L3L4;
    if let Some(m) = out.matches.iter().find(|m| m.l7.is_none()) {
        out.reason = format!(
            "allowed at L3/L4 by {} {}{}",
            describe(&m.rule),
            m.item,
            m.to_ports
                .map(|p| format!(" toPorts[{p}]"))
                .unwrap_or_default()
        );
        return out;
    }
    // Every allowing item carries L7 rules: the flow goes to the proxy, each request is judged.
    out.stage = Stage::L7;
    let first = allowing[0].3.map(L7Rules::kind);
    let kind = allowing
        .iter()
        .all(|a| a.3.map(L7Rules::kind) == first)
        .then_some(first)
        .flatten();
    let mut l7 = L7Trace {
        kind,
        evaluated: false,
        allowed_by: Vec::new(),
        denied_topics: Vec::new(),
    };
    let Some(kind) = kind else {
        out.verdict = TraceVerdict::Denied;
        out.reason = "rules on this port disagree on the L7 protocol (HTTP and Kafka); every request is denied".into();
        out.l7 = Some(l7);
        return out;
    };
    match (&flow.l7, kind) {
        (
            L7Facts::Http {
                method,
                path,
                host,
                headers,
            },
            L7Kind::Http,
        ) => {
            l7.evaluated = true;
            let req = HttpRequest {
                method,
                path,
                host,
                headers,
            };
            for (rule, item, port, rules) in &allowing {
                if let Some(L7Rules::Http(list)) = rules {
                    for i in list.matching(&req) {
                        l7.allowed_by.push(L7Match {
                            rule: RuleRef::of(rule),
                            item: format!("{dir}[{item}]"),
                            to_ports: port.unwrap_or_default(),
                            l7_rule: format!("rules.http[{}]", list.rules()[i].index),
                        });
                    }
                }
            }
            if l7.allowed_by.is_empty() {
                out.verdict = TraceVerdict::Denied;
                out.reason = format!(
                    "allowed at L3/L4 but no HTTP rule matches {method} {path} (host {host:?}); the proxy answers 403"
                );
            } else {
                let m = &l7.allowed_by[0];
                out.reason = format!(
                    "allowed by {} {} toPorts[{}] {}",
                    describe(&m.rule),
                    m.item,
                    m.to_ports,
                    m.l7_rule
                );
            }
        }
        (
            L7Facts::Kafka {
                api_key,
                api_version,
                client_id,
                topics,
            },
            L7Kind::Kafka,
        ) => {
            l7.evaluated = true;
            let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            let req = KafkaRequest {
                api_key: *api_key,
                api_version: *api_version,
                client_id: client_id.as_deref(),
                topics: Some(&topic_refs),
            };
            // Rules of every allowing item are ORed as one list (topics may be allowed by
            // different rules), as the proxy does.
            let tagged: Vec<(&Arc<Rule>, usize, usize, &KafkaRule)> = allowing
                .iter()
                .flat_map(|(rule, item, port, rules)| match rules {
                    Some(L7Rules::Kafka(list)) => list
                        .iter()
                        .map(|k| (*rule, *item, port.unwrap_or_default(), k))
                        .collect(),
                    _ => Vec::new(),
                })
                .collect();
            match kafka::judge(tagged.iter().map(|t| t.3), &req) {
                KafkaVerdict::Allow(_) => {
                    // Name the rules that apply and cover the request.
                    for (rule, item, port, k) in &tagged {
                        let covers = k.applies_to(&req)
                            && (k.topic.is_none()
                                || !kafka::carries_topics(*api_key)
                                || topic_refs.contains(&k.topic.as_deref().unwrap_or_default()));
                        if covers {
                            l7.allowed_by.push(L7Match {
                                rule: RuleRef::of(rule),
                                item: format!("{dir}[{item}]"),
                                to_ports: *port,
                                l7_rule: format!("rules.kafka[{}]", k.index),
                            });
                        }
                    }
                    let m = &l7.allowed_by[0];
                    out.reason = format!(
                        "allowed by {} {} toPorts[{}] {}",
                        describe(&m.rule),
                        m.item,
                        m.to_ports,
                        m.l7_rule
                    );
                }
                KafkaVerdict::Deny { denied_topics } => {
                    out.verdict = TraceVerdict::Denied;
                    let name = kafka::api_key_name(*api_key)
                        .map(str::to_string)
                        .unwrap_or_else(|| api_key.to_string());
                    out.reason = if denied_topics.is_empty() {
                        format!("allowed at L3/L4 but no Kafka rule allows {name} v{api_version}")
                    } else {
                        format!(
                            "allowed at L3/L4 but no Kafka rule allows {name} on topic(s) {}",
                            denied_topics.join(", ")
                        )
                    };
                    l7.denied_topics = denied_topics;
                }
            }
        }
        _ => {
            out.reason = format!(
                "allowed at L3/L4; every request is judged by {} rules (give a request to trace one)",
                match kind {
                    L7Kind::Http => "HTTP",
                    L7Kind::Kafka => "Kafka",
                }
            );
        }
    }
    out.l7 = Some(l7);
    out
}

fn describe(r: &RuleRef) -> String {
    match &r.namespace {
        Some(ns) => format!("{} {ns}/{} spec[{}]", r.kind.as_str(), r.name, r.rule_index),
        None => format!("{} {} spec[{}]", r.kind.as_str(), r.name, r.rule_index),
    }
}
