//! The internal rule model every policy source is translated into.
//!
//! A CiliumNetworkPolicy spec, a clusterwide one and a Kubernetes NetworkPolicy all become
//! [`Rule`]s. Peers of every L3 kind (endpoints, entities, CIDRs) are label selectors by the time
//! they are here: entities select reserved labels, CIDRs select `cidr:` labels of CIDR identities.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::l7::http::HttpRules;
use crate::l7::kafka::KafkaRule;
use crate::selector::Selector;
use crate::yaml::Pos;

/// Which kind of object a rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    /// `cilium.io/v2` CiliumNetworkPolicy (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` CiliumClusterwideNetworkPolicy.
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` NetworkPolicy (namespaced).
    NetworkPolicy,
}

impl PolicyKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// Traffic direction, from the point of view of the selected endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic arriving at the endpoint.
    Ingress,
    /// Traffic leaving the endpoint.
    Egress,
}

impl Direction {
    /// `ingress` / `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// L4 protocol of a port rule. `ANY` is expanded to TCP and UDP when policy is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    /// TCP (6).
    TCP,
    /// UDP (17).
    UDP,
    /// Both TCP and UDP.
    ANY,
}

impl Protocol {
    /// The concrete IP protocols this stands for.
    pub fn expand(self) -> &'static [Proto] {
        match self {
            Protocol::TCP => &[Proto::Tcp],
            Protocol::UDP => &[Proto::Udp],
            Protocol::ANY => &[Proto::Tcp, Proto::Udp],
        }
    }
}

/// A concrete IP protocol number as the datapath sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    /// TCP, IP protocol 6.
    Tcp,
    /// UDP, IP protocol 17.
    Udp,
    /// ICMP, 1.
    Icmp,
    /// ICMPv6, 58.
    Icmpv6,
    /// SCTP, 132.
    Sctp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
            Proto::Sctp => 132,
        }
    }

    /// From a protocol name (case-insensitive) or number.
    pub fn parse(s: &str) -> Option<Proto> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Proto::Tcp,
            "udp" | "17" => Proto::Udp,
            "icmp" | "1" => Proto::Icmp,
            "icmpv6" | "58" => Proto::Icmpv6,
            "sctp" | "132" => Proto::Sctp,
            _ => return None,
        })
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Icmp => "ICMP",
            Proto::Icmpv6 => "ICMPv6",
            Proto::Sctp => "SCTP",
        })
    }
}

/// Where a rule came from: enough to name it in a trace and in errors.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleOrigin {
    /// The object's kind.
    pub kind: PolicyKind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (None for clusterwide policies).
    pub namespace: Option<String>,
    /// Index in `specs` (0 for `spec`).
    pub spec_index: usize,
    /// File the object was read from.
    pub file: String,
    /// Position of the spec in the file.
    #[serde(skip)]
    pub pos: Pos,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind.as_str(), ns, self.name)?,
            None => write!(f, "{} {}", self.kind.as_str(), self.name)?,
        }
        write!(f, " spec[{}]", self.spec_index)
    }
}

/// One rule: which endpoints it selects, and what it allows them.
#[derive(Clone, Debug, Serialize)]
pub struct Rule {
    /// Where it came from.
    pub origin: RuleOrigin,
    /// The endpoints the rule applies to (namespace-scoped already for namespaced kinds).
    pub endpoint_selector: Selector,
    /// Ingress allow items.
    pub ingress: Vec<PeerRule>,
    /// Egress allow items.
    pub egress: Vec<PeerRule>,
    /// Whether this rule puts the selected endpoints' ingress into default-deny.
    pub enforce_ingress: bool,
    /// Whether this rule puts the selected endpoints' egress into default-deny.
    pub enforce_egress: bool,
    /// `fromRequires` selectors: every ingress peer of a selected endpoint must match all of them.
    pub ingress_requires: Vec<Selector>,
    /// `toRequires` selectors, the egress counterpart.
    pub egress_requires: Vec<Selector>,
    /// The rule's `labels` (plus the policy name and namespace labels Cilium adds).
    pub labels: BTreeMap<String, String>,
    /// `description`.
    pub description: Option<String>,
}

impl Rule {
    /// The allow items of one direction.
    pub fn items(&self, dir: Direction) -> &[PeerRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Whether the rule enforces default-deny in `dir`.
    pub fn enforces(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.enforce_ingress,
            Direction::Egress => self.enforce_egress,
        }
    }

    /// The requires selectors of one direction.
    pub fn requires(&self, dir: Direction) -> &[Selector] {
        match dir {
            Direction::Ingress => &self.ingress_requires,
            Direction::Egress => &self.egress_requires,
        }
    }
}

/// One item of `ingress` or `egress`: peers and, optionally, ports.
#[derive(Clone, Debug, Serialize)]
pub struct PeerRule {
    /// Index in the `ingress`/`egress` list.
    pub index: usize,
    /// Which peers are allowed.
    pub peers: Peers,
    /// Which ports; empty means every port and protocol (an L3-only rule).
    pub ports: Vec<Arc<PortRule>>,
}

/// The peers of an allow item.
#[derive(Clone, Debug, Serialize)]
pub enum Peers {
    /// No L3 selector was given: any peer, including world (only meaningful with ports).
    Any,
    /// A union of selectors. An empty list selects nothing.
    Selected(Vec<PeerSelector>),
}

/// One peer selector and the field it came from.
#[derive(Clone, Debug, Serialize)]
pub struct PeerSelector {
    /// The selector (namespace scoping applied).
    pub selector: Selector,
    /// The field, e.g. `fromEndpoints[0]`, `toEntities[1] (world)`, `fromCIDRSet[0]`.
    pub field: String,
}

/// One `toPorts` item.
#[derive(Clone, Debug, Serialize)]
pub struct PortRule {
    /// Index in `toPorts`.
    pub index: usize,
    /// The ports.
    pub ports: Vec<PortProtocol>,
    /// L7 rules, if any.
    pub l7: Option<L7Rules>,
}

/// A port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortProtocol {
    /// 1..=65535; 0 means every port of the protocol (NetworkPolicy ports without a number).
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

/// The L7 part of a port rule.
#[derive(Clone, Debug, Serialize)]
pub enum L7Rules {
    /// `rules.http`: the request must match one of them.
    Http(HttpRules),
    /// `rules.kafka`: the request must be allowed by them (see `crate::l7::kafka`).
    Kafka(Vec<KafkaRule>),
}

impl L7Rules {
    /// `http` or `kafka`.
    pub fn kind(&self) -> L7Kind {
        match self {
            L7Rules::Http(_) => L7Kind::Http,
            L7Rules::Kafka(_) => L7Kind::Kafka,
        }
    }
}

/// Which L7 protocol a port's rules are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L7Kind {
    /// HTTP.
    Http,
    /// Kafka.
    Kafka,
}

/// How endpoints without selecting rules are treated (`--enable-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// A direction is default-deny once any rule selecting the endpoint has that direction.
    #[default]
    Default,
    /// Every direction of every endpoint is default-deny.
    Always,
    /// Nothing is enforced.
    Never,
}

impl std::str::FromStr for EnforcementMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(EnforcementMode::Default),
            "always" => Ok(EnforcementMode::Always),
            "never" => Ok(EnforcementMode::Never),
            other => Err(format!(
                "unknown enforcement mode {other:?} (expected default, always or never)"
            )),
        }
    }
}
