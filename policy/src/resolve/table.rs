//! The per-endpoint policy table, keyed like the datapath's policy map.
//!
//! A key is `(remote identity | 0 = any, port | 0 = any, protocol | 0 = any)`, per direction. Each
//! key holds the *contributions* of the rules that allow it. The verdict of a key is the union of
//! the contributions of every key that covers it, which is what makes a first-hit lookup in
//! [`PROBE_ORDER`] give Cilium's union semantics:
//!
//! - any contribution without L7 rules (an L3 or L4 allow) → `Allow`, and L7 rules are moot;
//! - otherwise → `Redirect` to the proxy with the L7 rules of every contribution;
//! - no key → deny (when the direction is enforced).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::identity::NumericIdentity;
use crate::l7::http::HttpRequest;
use crate::l7::kafka::{self, KafkaRequest, KafkaVerdict};
use crate::rule::{Direction, L7Kind, L7Rules, PortRule, Proto, Rule};

/// A table key. Zero in any position is a wildcard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyKey {
    /// Remote identity, 0 for any.
    pub identity: u32,
    /// Destination port, 0 for any.
    pub port: u16,
    /// IP protocol number, 0 for any.
    pub proto: u8,
}

impl PolicyKey {
    /// A key from its parts.
    pub fn new(identity: NumericIdentity, port: u16, proto: Option<Proto>) -> PolicyKey {
        PolicyKey {
            identity: identity.0,
            port,
            proto: proto.map_or(0, Proto::number),
        }
    }

    /// Whether this key covers the (possibly also wildcarded) key `other`.
    pub fn covers(&self, other: &PolicyKey) -> bool {
        (self.identity == 0 || self.identity == other.identity)
            && (self.port == 0 || self.port == other.port)
            && (self.proto == 0 || self.proto == other.proto)
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let star = |v: u64| {
            if v == 0 {
                "*".to_string()
            } else {
                v.to_string()
            }
        };
        write!(
            f,
            "{}/{}/{}",
            star(self.identity.into()),
            star(self.port.into()),
            star(self.proto.into())
        )
    }
}

/// The order in which the datapath probes keys for a flow `(id, port, proto)`; the first key that
/// exists decides. Wildcard-port keys never carry L7 rules, so probing them before the
/// wildcard-identity port keys loses nothing.
pub const PROBE_ORDER: [(bool, bool, bool); 6] = [
    // (keep identity, keep port, keep proto)
    (true, true, true),
    (true, false, true),
    (true, false, false),
    (false, true, true),
    (false, false, true),
    (false, false, false),
];

/// The first key of a flow, in [`PROBE_ORDER`], for which `get` finds something. This is the one
/// lookup order: the tables, the xDS resources' consumers and (in C) the datapath use it.
pub fn probe<T>(
    identity: NumericIdentity,
    port: u16,
    proto: u8,
    mut get: impl FnMut(&PolicyKey) -> Option<T>,
) -> Option<(PolicyKey, T)> {
    PROBE_ORDER.iter().find_map(|(id, p, pr)| {
        let key = PolicyKey {
            identity: if *id { identity.0 } else { 0 },
            port: if *p { port } else { 0 },
            proto: if *pr { proto } else { 0 },
        };
        get(&key).map(|t| (key, t))
    })
}

/// Why a key is allowed: one rule item (and port rule) that allows it.
#[derive(Clone, Debug)]
pub struct Contribution {
    /// The rule.
    pub rule: Arc<Rule>,
    /// Direction of the item.
    pub direction: Direction,
    /// Index of the item in the rule's `ingress`/`egress`.
    pub item: usize,
    /// The port rule, for L4 and L7 allows; `None` for an L3-only allow.
    pub port_rule: Option<Arc<PortRule>>,
}

impl Contribution {
    /// The L7 rules this contribution requires, if any.
    pub fn l7(&self) -> Option<&L7Rules> {
        self.port_rule.as_ref().and_then(|p| p.l7.as_ref())
    }

    fn same_as(&self, other: &Contribution) -> bool {
        Arc::ptr_eq(&self.rule, &other.rule)
            && self.item == other.item
            && match (&self.port_rule, &other.port_rule) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }

    /// `Kind ns/name spec[i] ingress[j] toPorts[k]`, for explanations.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}[{}]", self.rule.origin, self.direction, self.item);
        if let Some(p) = &self.port_rule {
            s.push_str(&format!(" toPorts[{}]", p.index));
        }
        s
    }
}

/// The verdict of a key.
#[derive(Clone, Debug)]
pub enum Verdict<'t> {
    /// Allowed without L7 inspection.
    Allow,
    /// Allowed at L3/L4; every request must pass one of these L7 rule sets.
    Redirect(L7Policy<'t>),
}

/// The L7 rules that apply to a redirected key: the union of its contributions' rules.
#[derive(Clone, Debug)]
pub struct L7Policy<'t> {
    /// The protocol. `None` when contributions disagree (HTTP on one, Kafka on another): such a
    /// key denies every request, and `resolve` reports the conflict.
    pub kind: Option<L7Kind>,
    /// The rule sets, ORed.
    pub rules: Vec<&'t L7Rules>,
}

impl L7Policy<'_> {
    /// Judges an HTTP request: allowed when any HTTP rule of any rule set matches. A key whose
    /// rule sets disagree on the protocol denies everything.
    pub fn judge_http(&self, req: &HttpRequest<'_>) -> bool {
        self.kind == Some(L7Kind::Http)
            && first_allowing_http(self.rules.iter().copied(), req).is_some()
    }

    /// Judges a Kafka request against the union of every Kafka rule of every rule set.
    pub fn judge_kafka(&self, req: &KafkaRequest<'_>) -> KafkaVerdict {
        if self.kind != Some(L7Kind::Kafka) {
            return KafkaVerdict::Deny {
                denied_topics: Vec::new(),
            };
        }
        judge_kafka_sets(self.rules.iter().copied(), req)
    }
}

/// Judges a Kafka request against the union of the Kafka rules of the ORed rule sets of one key;
/// a key that mixes protocols denies everything. This is the one Kafka judge: [`L7Policy::
/// judge_kafka`], the proxy and the wasm filter all call it.
pub fn judge_kafka_sets<'r, I>(sets: I, req: &KafkaRequest<'_>) -> KafkaVerdict
where
    I: IntoIterator<Item = &'r L7Rules>,
    I::IntoIter: Clone,
{
    let sets = sets.into_iter();
    if sets.clone().any(|r| r.kind() != L7Kind::Kafka) {
        return KafkaVerdict::Deny {
            denied_topics: Vec::new(),
        };
    }
    let rules = sets.flat_map(|r| match r {
        L7Rules::Kafka(rules) => rules.as_slice(),
        L7Rules::Http(_) => &[],
    });
    kafka::judge(rules, req)
}

/// [`judge_kafka_sets`], and which set is credited for an allow: the first that allows the
/// request on its own, else (their union was needed) the first.
pub fn judge_kafka_sets_credited<'r, I>(
    sets: I,
    req: &KafkaRequest<'_>,
) -> (KafkaVerdict, Option<usize>)
where
    I: IntoIterator<Item = &'r L7Rules>,
    I::IntoIter: Clone,
{
    let sets = sets.into_iter();
    let verdict = judge_kafka_sets(sets.clone(), req);
    if !verdict.is_allowed() {
        return (verdict, None);
    }
    let credited = sets
        .clone()
        .position(|r| judge_kafka_sets([r], req).is_allowed())
        .or_else(|| sets.clone().next().map(|_| 0));
    (verdict, credited)
}

/// The index of the first rule set that allows an HTTP request, among the ORed rule sets of one
/// key; `None` denies. A key that mixes protocols denies everything. This is the one HTTP judge:
/// [`L7Policy::judge_http`], the proxy (which keeps owned rule sets per connection) and the wasm
/// filter all call it.
pub fn first_allowing_http<'r, I>(sets: I, req: &HttpRequest<'_>) -> Option<usize>
where
    I: IntoIterator<Item = &'r L7Rules>,
    I::IntoIter: Clone,
{
    let sets = sets.into_iter();
    if sets.clone().any(|r| r.kind() != L7Kind::Http) {
        return None;
    }
    sets.enumerate().find_map(|(i, r)| match r {
        L7Rules::Http(rules) => rules.first_match(req).map(|_| i),
        L7Rules::Kafka(_) => None,
    })
}

/// A verdict with the contributions that produced it.
#[derive(Clone, Debug)]
pub struct Effective<'t> {
    /// Allow or redirect.
    pub verdict: Verdict<'t>,
    /// Every contribution that was combined.
    pub derived_from: Vec<&'t Contribution>,
}

/// The table of one direction of one endpoint.
#[derive(Clone, Debug, Default)]
pub struct DirectionTable {
    /// Whether the direction is default-deny.
    pub enforced: bool,
    entries: BTreeMap<PolicyKey, Vec<Contribution>>,
}

impl DirectionTable {
    /// Adds a contribution to a key (a duplicate is ignored).
    pub fn add(&mut self, key: PolicyKey, c: Contribution) {
        let list = self.entries.entry(key).or_default();
        if !list.iter().any(|e| e.same_as(&c)) {
            list.push(c);
        }
    }

    /// Removes every key of a remote identity. Returns the keys removed.
    pub fn remove_identity(&mut self, identity: NumericIdentity) -> Vec<PolicyKey> {
        let lo = PolicyKey {
            identity: identity.0,
            port: 0,
            proto: 0,
        };
        let hi = PolicyKey {
            identity: identity.0,
            port: u16::MAX,
            proto: u8::MAX,
        };
        let keys: Vec<PolicyKey> = self.entries.range(lo..=hi).map(|(k, _)| *k).collect();
        for k in &keys {
            self.entries.remove(k);
        }
        keys
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The raw keys and their contributions, in key order.
    pub fn raw(&self) -> impl Iterator<Item = (&PolicyKey, &[Contribution])> {
        self.entries.iter().map(|(k, v)| (k, v.as_slice()))
    }

    /// The verdict of an existing key: the union over every key that covers it.
    pub fn effective(&self, key: &PolicyKey) -> Option<Effective<'_>> {
        self.entries.get(key)?;
        let mut derived_from = Vec::new();
        for (_, contributions) in self.covering(*key) {
            derived_from.extend(contributions.iter());
        }
        Some(combine(derived_from))
    }

    /// The verdict for a flow, as the datapath computes it: the first existing key in
    /// [`PROBE_ORDER`]. `None` means no key matches (a deny when `enforced`).
    pub fn lookup(
        &self,
        identity: NumericIdentity,
        port: u16,
        proto: Proto,
    ) -> Option<(PolicyKey, Effective<'_>)> {
        probe(identity, port, proto.number(), |key| self.effective(key))
    }

    /// Whether a flow is allowed at L3/L4 (redirects count as allowed) with enforcement applied.
    pub fn allows(&self, identity: NumericIdentity, port: u16, proto: Proto) -> bool {
        !self.enforced || self.lookup(identity, port, proto).is_some()
    }

    fn covering(&self, key: PolicyKey) -> impl Iterator<Item = (&PolicyKey, &Vec<Contribution>)> {
        let ids = dedup2(key.identity, 0);
        let ports = dedup2(key.port, 0);
        let protos = dedup2(key.proto, 0);
        let mut out = Vec::new();
        for id in ids.into_iter().flatten() {
            for port in ports.into_iter().flatten() {
                for proto in protos.into_iter().flatten() {
                    let k = PolicyKey {
                        identity: id,
                        port,
                        proto,
                    };
                    if let Some((k, v)) = self.entries.get_key_value(&k) {
                        out.push((k, v));
                    }
                }
            }
        }
        out.into_iter()
    }
}

fn dedup2<T: PartialEq + Copy>(a: T, b: T) -> [Option<T>; 2] {
    if a == b {
        [Some(a), None]
    } else {
        [Some(a), Some(b)]
    }
}

/// Combines contributions with union semantics.
pub fn combine(derived_from: Vec<&Contribution>) -> Effective<'_> {
    if derived_from.iter().any(|c| c.l7().is_none()) {
        return Effective {
            verdict: Verdict::Allow,
            derived_from,
        };
    }
    let rules: Vec<&L7Rules> = derived_from.iter().filter_map(|c| c.l7()).collect();
    let first = rules.first().map(|r| r.kind());
    let kind = if rules.iter().all(|r| Some(r.kind()) == first) {
        first
    } else {
        None
    };
    Effective {
        verdict: Verdict::Redirect(L7Policy { kind, rules }),
        derived_from,
    }
}

/// The ingress and egress tables of one endpoint identity.
#[derive(Clone, Debug, Default)]
pub struct PolicyTable {
    /// Traffic arriving at the endpoint.
    pub ingress: DirectionTable,
    /// Traffic leaving the endpoint.
    pub egress: DirectionTable,
}

impl PolicyTable {
    /// One direction.
    pub fn direction(&self, dir: Direction) -> &DirectionTable {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// One direction, mutably.
    pub fn direction_mut(&mut self, dir: Direction) -> &mut DirectionTable {
        match dir {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}
