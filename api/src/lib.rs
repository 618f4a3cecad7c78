//! membrane's xDS resources (`proto/membrane/v1/policy.proto`, generated with prost) and their
//! conversion to and from the policy engine: [`direction_policy`] writes a table as the agent's
//! xds-server serves it; [`DirectionRules`] reads it back for a consumer (the wasm filter) and
//! looks flows up with the engine's own probe order and judges requests with its own matchers.
//! Pure: no I/O, also built for wasm32.

use std::collections::BTreeMap;
use std::sync::Arc;

use membrane_policy::identity::NumericIdentity;
use membrane_policy::l7::http::{HeaderMatch, HttpRule, HttpRules, Pattern};
use membrane_policy::l7::kafka::KafkaRule;
use membrane_policy::resolve::{DirectionTable, PolicyKey, Verdict, probe};
use membrane_policy::rule::L7Rules;

/// The generated resource types.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/membrane.v1.rs"));
}

/// Type URL of [`v1::NetworkPolicy`].
pub const NETWORK_POLICY_TYPE: &str = "type.googleapis.com/membrane.v1.NetworkPolicy";
/// Type URL of [`v1::NetworkPolicyHosts`].
pub const NETWORK_POLICY_HOSTS_TYPE: &str = "type.googleapis.com/membrane.v1.NetworkPolicyHosts";
/// Type URL of [`v1::SpiffeIdentities`].
pub const SPIFFE_IDENTITIES_TYPE: &str = "type.googleapis.com/membrane.v1.SpiffeIdentities";

/// The name of the [`v1::NetworkPolicy`] that holds the `reserved:init` identity's table: the
/// init policy, which a sidecar enforces for its pod until the pod's own policy arrives (only
/// what it explicitly allows; nothing else). Endpoint names cannot contain `:`, so it never
/// collides with an endpoint's resource.
pub const INIT_POLICY: &str = "reserved:init";

/// One direction of an endpoint's table as a resource: every key with its effective verdict.
pub fn direction_policy(table: &DirectionTable) -> v1::DirectionPolicy {
    let entries = table
        .raw()
        .filter_map(|(key, _)| {
            let eff = table.effective(key)?;
            let l7 = match eff.verdict {
                Verdict::Allow => Vec::new(),
                Verdict::Redirect(_) => eff
                    .derived_from
                    .iter()
                    .filter_map(|c| Some((c.rule.origin.to_string(), c.l7()?)))
                    .map(|(policy, rules)| l7_rule_set(policy, rules))
                    .collect(),
            };
            Some(v1::PolicyEntry {
                remote_identity: key.identity,
                port: u32::from(key.port),
                protocol: u32::from(key.proto),
                l7,
            })
        })
        .collect();
    v1::DirectionPolicy {
        enforced: table.enforced,
        entries,
    }
}

/// One port rule's L7 rules as a resource.
pub fn l7_rule_set(policy: String, rules: &L7Rules) -> v1::L7RuleSet {
    let rules = match rules {
        L7Rules::Http(http) => v1::l7_rule_set::Rules::Http(v1::HttpRules {
            rules: http
                .rules()
                .iter()
                .map(|r| v1::HttpRule {
                    method: r
                        .method
                        .as_ref()
                        .map_or_else(String::new, |p| p.as_str().into()),
                    path: r
                        .path
                        .as_ref()
                        .map_or_else(String::new, |p| p.as_str().into()),
                    host: r
                        .host
                        .as_ref()
                        .map_or_else(String::new, |p| p.as_str().into()),
                    headers: r
                        .headers
                        .iter()
                        .map(|h| v1::HeaderMatch {
                            name: h.name.clone(),
                            value: h.value.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }),
        L7Rules::Kafka(kafka) => v1::l7_rule_set::Rules::Kafka(v1::KafkaRules {
            rules: kafka
                .iter()
                .map(|r| v1::KafkaRule {
                    role: r.role.map_or_else(String::new, |r| r.name().into()),
                    api_key: r.api_key.clone().unwrap_or_default(),
                    api_version: r.api_version.map(i32::from),
                    client_id: r.client_id.clone(),
                    topic: r.topic.clone(),
                })
                .collect(),
        }),
    };
    v1::L7RuleSet {
        policy,
        rules: Some(rules),
    }
}

/// What a key says about a flow, read back from a resource.
#[derive(Clone, Debug)]
pub enum EntryVerdict {
    /// Allowed at L3/L4.
    Allow,
    /// Allowed at L3/L4; every request must be allowed by one of these ORed rule sets (each with
    /// the policy it comes from); shared, so a consumer keeps them per connection for a pointer
    /// copy.
    Redirect(Arc<[(Arc<str>, L7Rules)]>),
}

/// One direction of a [`v1::NetworkPolicy`], compiled for enforcement: regexes are compiled once
/// here, never per request.
#[derive(Clone, Debug, Default)]
pub struct DirectionRules {
    /// Whether the direction is default-deny.
    pub enforced: bool,
    entries: BTreeMap<PolicyKey, EntryVerdict>,
}

impl DirectionRules {
    /// Compiles a resource's direction. Errors name the entry and rule (a consumer NACKs them and
    /// keeps its last good policy).
    pub fn from_wire(d: &v1::DirectionPolicy) -> Result<DirectionRules, String> {
        let mut entries = BTreeMap::new();
        for (i, e) in d.entries.iter().enumerate() {
            let at = format!("entries[{i}]");
            let key = PolicyKey {
                identity: e.remote_identity,
                port: u16::try_from(e.port).map_err(|_| format!("{at}.port: {}", e.port))?,
                proto: u8::try_from(e.protocol)
                    .map_err(|_| format!("{at}.protocol: {}", e.protocol))?,
            };
            let verdict = if e.l7.is_empty() {
                EntryVerdict::Allow
            } else {
                let sets =
                    e.l7.iter()
                        .enumerate()
                        .map(|(j, set)| {
                            rules_from_wire(set)
                                .map(|r| (Arc::from(set.policy.as_str()), r))
                                .map_err(|err| format!("{at}.l7[{j}]: {err}"))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                EntryVerdict::Redirect(sets.into())
            };
            if entries.insert(key, verdict).is_some() {
                return Err(format!("{at}: duplicate key {key:?}"));
            }
        }
        Ok(DirectionRules {
            enforced: d.enforced,
            entries,
        })
    }

    /// The verdict for a flow: the first key in the engine's probe order; `None` is a deny when
    /// the direction is enforced (and an allow otherwise).
    pub fn lookup(
        &self,
        remote: NumericIdentity,
        port: u16,
        proto: u8,
    ) -> Option<(PolicyKey, &EntryVerdict)> {
        probe(remote, port, proto, |key| self.entries.get(key))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn pattern(field: &str, source: &str) -> Result<Option<Pattern>, String> {
    if source.is_empty() {
        return Ok(None);
    }
    Pattern::new(source)
        .map(Some)
        .map_err(|e| format!("{field}: {e}"))
}

fn rules_from_wire(set: &v1::L7RuleSet) -> Result<L7Rules, String> {
    match &set.rules {
        None => Err("neither http nor kafka rules".into()),
        Some(v1::l7_rule_set::Rules::Http(http)) => {
            let rules = http
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Ok(HttpRule {
                        index: i,
                        method: pattern(&format!("http[{i}].method"), &r.method)?,
                        path: pattern(&format!("http[{i}].path"), &r.path)?,
                        host: pattern(&format!("http[{i}].host"), &r.host)?,
                        headers: r
                            .headers
                            .iter()
                            .map(|h| HeaderMatch {
                                name: h.name.clone(),
                                value: h.value.clone(),
                            })
                            .collect(),
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            HttpRules::new(rules)
                .map(L7Rules::Http)
                .map_err(|e| format!("http: {e}"))
        }
        Some(v1::l7_rule_set::Rules::Kafka(kafka)) => kafka
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let version = r
                    .api_version
                    .map(|v| i16::try_from(v).map_err(|_| format!("kafka[{i}].apiVersion: {v}")))
                    .transpose()?;
                KafkaRule::new(
                    i,
                    (!r.role.is_empty()).then_some(r.role.as_str()),
                    (!r.api_key.is_empty()).then_some(r.api_key.as_str()),
                    version,
                    r.client_id.clone(),
                    r.topic.clone(),
                )
                .map_err(|e| format!("kafka[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()
            .map(L7Rules::Kafka),
    }
}

#[cfg(test)]
mod tests;

/// The subset of Envoy's discovery messages a proxy-wasm filter speaks on its own ADS stream,
/// with Envoy's field numbers (a wasm module cannot link Envoy's generated gRPC code). The agent's
/// server uses the full `envoy-types` messages; a test checks the two agree on the wire.
pub mod discovery {
    /// `envoy.service.discovery.v3.DiscoveryRequest` (the fields a client sets).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiscoveryRequest {
        /// The version being acknowledged (or, with `error_detail`, the last good one).
        #[prost(string, tag = "1")]
        pub version_info: String,
        /// Who asks.
        #[prost(message, optional, tag = "2")]
        pub node: Option<Node>,
        /// Resources wanted; empty means all.
        #[prost(string, repeated, tag = "3")]
        pub resource_names: Vec<String>,
        /// The resource type.
        #[prost(string, tag = "4")]
        pub type_url: String,
        /// The nonce of the response this acknowledges or rejects.
        #[prost(string, tag = "5")]
        pub response_nonce: String,
        /// Set when rejecting (a NACK).
        #[prost(message, optional, tag = "6")]
        pub error_detail: Option<Status>,
    }

    /// `envoy.config.core.v3.Node` (its id).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Node {
        /// The node id.
        #[prost(string, tag = "1")]
        pub id: String,
    }

    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        /// gRPC status code.
        #[prost(int32, tag = "1")]
        pub code: i32,
        /// What went wrong.
        #[prost(string, tag = "2")]
        pub message: String,
    }

    /// `envoy.service.discovery.v3.DiscoveryResponse` (the fields a client reads).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiscoveryResponse {
        /// The version of these resources.
        #[prost(string, tag = "1")]
        pub version_info: String,
        /// The resources.
        #[prost(message, repeated, tag = "2")]
        pub resources: Vec<Any>,
        /// Their type.
        #[prost(string, tag = "4")]
        pub type_url: String,
        /// To be echoed by the ACK or NACK.
        #[prost(string, tag = "5")]
        pub nonce: String,
        /// Which control plane instance answered (versions compare only within one).
        #[prost(message, optional, tag = "6")]
        pub control_plane: Option<ControlPlane>,
    }

    /// `envoy.config.core.v3.ControlPlane`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ControlPlane {
        /// The instance's identifier.
        #[prost(string, tag = "1")]
        pub identifier: String,
    }

    /// `google.protobuf.Any`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        /// Type URL.
        #[prost(string, tag = "1")]
        pub type_url: String,
        /// Encoded message.
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
}
