//! The proxy's view of policy: who a peer is (identity by address) and what a connection from
//! one identity to another may do, rebuilt whole on every policy change and swapped in
//! atomically, so that a request is judged by exactly one policy version.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use membrane_api::{DirectionRules, EntryVerdict, v1};
use membrane_policy::PolicySet;
use membrane_policy::endpoints::{EndpointSpec, endpoint_labels};
use membrane_policy::identity::{
    IdentityAllocator, LocalAllocator, NumericIdentity, RESERVED, cidr_labels,
};
use membrane_policy::l7::http::HttpRequest;
use membrane_policy::l7::kafka::{KafkaRequest, KafkaVerdict};
use membrane_policy::labels::{Label, LabelSet};
use membrane_policy::prefixes::PrefixMap;
use membrane_policy::resolve::{
    DirectionTable, PolicyTable, Resolver, Verdict, first_allowing_http, judge_kafka_sets_credited,
};
use membrane_policy::rule::{Direction, EnforcementMode, L7Kind, L7Rules, PortRule, Proto};

/// The ORed L7 rule sets of one direction's policy key, each with the policy it comes from.
#[derive(Clone, Debug)]
pub enum RuleSets {
    /// Resolved in this process: the port rules that derived the key.
    Resolved(Vec<(Arc<PortRule>, Arc<str>)>),
    /// Resolved by the agent and received over xDS (`membrane.v1.NetworkPolicy`).
    Received(Arc<[(Arc<str>, L7Rules)]>),
}

impl RuleSets {
    /// The sets that carry L7 rules, with their policies.
    pub fn iter(&self) -> RuleSetsIter<'_> {
        match self {
            RuleSets::Resolved(v) => RuleSetsIter::Resolved(v.iter()),
            RuleSets::Received(v) => RuleSetsIter::Received(v.iter()),
        }
    }
}

/// [`RuleSets::iter`].
#[derive(Clone, Debug)]
pub enum RuleSetsIter<'a> {
    /// Over port rules (those without L7 rules are skipped).
    Resolved(std::slice::Iter<'a, (Arc<PortRule>, Arc<str>)>),
    /// Over received sets.
    Received(std::slice::Iter<'a, (Arc<str>, L7Rules)>),
}

impl<'a> Iterator for RuleSetsIter<'a> {
    type Item = (&'a Arc<str>, &'a L7Rules);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            RuleSetsIter::Resolved(it) => {
                it.find_map(|(port_rule, policy)| Some((policy, port_rule.l7.as_ref()?)))
            }
            RuleSetsIter::Received(it) => it.next().map(|(policy, rules)| (policy, rules)),
        }
    }
}

/// One direction's L7 requirement on a connection: a request must match one of `sets`.
#[derive(Clone, Debug)]
pub struct L7Requirement {
    /// Which endpoint's policy this is: the destination's ingress or the source's egress.
    pub direction: Direction,
    /// The ORed rule sets and the policy each came from.
    pub sets: RuleSets,
}

impl L7Requirement {
    /// The policy whose rules allow `req`, or `None` when none does.
    pub fn allowing_policy(&self, req: &HttpRequest<'_>) -> Option<&Arc<str>> {
        let i = first_allowing_http(self.sets.iter().map(|(_, rules)| rules), req)?;
        self.sets.iter().nth(i).map(|(policy, _)| policy)
    }

    /// The Kafka verdict of these ORed rule sets, with the policy credited for an allow: the first
    /// set that allows the request on its own, else (the union was needed) the first set.
    pub fn judge_kafka(&self, req: &KafkaRequest<'_>) -> (KafkaVerdict, Option<&Arc<str>>) {
        let (verdict, credited) =
            judge_kafka_sets_credited(self.sets.iter().map(|(_, rules)| rules), req);
        let credited = credited.and_then(|i| {
            let mut sets = self.sets.iter();
            sets.clone().nth(i).or_else(|| sets.next())
        });
        (verdict, credited.map(|(policy, _)| policy))
    }

    /// The protocol of these rule sets; `None` when they mix protocols.
    pub fn protocol(&self) -> Option<L7Kind> {
        let mut kinds = self.sets.iter().map(|(_, rules)| rules.kind());
        let first = kinds.next()?;
        kinds.all(|k| k == first).then_some(first)
    }
}

/// The protocol a connection is parsed as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionProtocol {
    /// HTTP rules apply (or none do: a reverse proxy then forwards HTTP).
    Http,
    /// Kafka rules apply.
    Kafka,
    /// The requirements name different protocols: nothing can satisfy both.
    Conflict,
}

/// What policy says about a connection.
#[derive(Clone, Debug)]
pub enum Decision {
    /// L3/L4 denies it.
    Deny {
        /// The direction whose policy denies.
        direction: Direction,
    },
    /// Allowed; every request must satisfy every requirement (none: forward everything).
    Allow(Vec<L7Requirement>),
}

impl Decision {
    /// The protocol the connection must be parsed as; `unruled` when no L7 rule applies (an
    /// L3/L4 allow reaching a reverse proxy, which parses what its operator says is behind it).
    pub fn protocol_or(&self, unruled: ConnectionProtocol) -> ConnectionProtocol {
        match self {
            Decision::Allow(reqs) if reqs.is_empty() => unruled,
            _ => self.protocol(),
        }
    }

    /// The protocol the connection must be parsed as.
    pub fn protocol(&self) -> ConnectionProtocol {
        let Decision::Allow(reqs) = self else {
            return ConnectionProtocol::Http;
        };
        let mut found = None;
        for r in reqs {
            match (r.protocol(), found) {
                (None, _) => return ConnectionProtocol::Conflict,
                (Some(k), None) => found = Some(k),
                (Some(k), Some(f)) if k != f => return ConnectionProtocol::Conflict,
                _ => {}
            }
        }
        match found {
            Some(L7Kind::Kafka) => ConnectionProtocol::Kafka,
            _ => ConnectionProtocol::Http,
        }
    }
}

/// The policy a connection was last judged by.
#[derive(Debug)]
pub struct ConnPolicy {
    /// The snapshot generation it was computed from.
    pub generation: u64,
    /// Identities of the two ends.
    pub peers: Peers,
    /// The decision.
    pub decision: Decision,
}

/// A connection's decision, recomputed only when the policy in force changed.
#[derive(Debug)]
pub struct ConnDecision {
    src: SocketAddr,
    dst: SocketAddr,
    cached: std::sync::Mutex<Arc<ConnPolicy>>,
}

impl ConnDecision {
    /// The decision for `src` -> `dst`, first made under `snapshot`.
    pub fn new(
        src: SocketAddr,
        dst: SocketAddr,
        snapshot: &Snapshot,
        peers: Peers,
        decision: Decision,
    ) -> ConnDecision {
        ConnDecision {
            src,
            dst,
            cached: std::sync::Mutex::new(Arc::new(ConnPolicy {
                generation: snapshot.generation,
                peers,
                decision,
            })),
        }
    }

    /// The decision under `snap`.
    pub fn under(&self, snap: &Snapshot) -> Arc<ConnPolicy> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.generation != snap.generation {
            let peers = snap.peers(self.src, self.dst);
            *cached = Arc::new(ConnPolicy {
                generation: snap.generation,
                peers,
                decision: snap.decide(peers, self.dst.port()),
            });
        }
        cached.clone()
    }

    /// The decision last made, whatever the policy in force.
    pub fn last(&self) -> Arc<ConnPolicy> {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Identities of the two ends of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peers {
    /// Source identity.
    pub src: NumericIdentity,
    /// Destination identity.
    pub dst: NumericIdentity,
}

/// One policy version with everything needed to judge connections and requests.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every swap; connections cache their decision per generation.
    pub generation: u64,
    /// The policy tables of the endpoints this proxy serves, by identity: all a decision needs
    /// (the identities' labels stay with whoever resolved them).
    tables: HashMap<NumericIdentity, EndpointTables>,
    /// Prefix -> identity (workloads win over policy CIDRs on equal prefixes).
    prefixes: PrefixMap<NumericIdentity>,
    names: HashMap<NumericIdentity, String>,
}

impl Snapshot {
    /// The identity of an address: the most specific listed workload or policy CIDR holding it,
    /// else world.
    pub fn identity_of(&self, ip: IpAddr) -> NumericIdentity {
        self.prefixes
            .lookup(canonical(ip))
            .unwrap_or(NumericIdentity::WORLD)
    }

    /// A workload name for an identity, for flow records.
    pub fn name_of(&self, id: NumericIdentity) -> Option<&str> {
        self.names.get(&id).map(String::as_str)
    }

    /// Identities of a connection's ends.
    pub fn peers(&self, src: SocketAddr, dst: SocketAddr) -> Peers {
        Peers {
            src: self.identity_of(src.ip()),
            dst: self.identity_of(dst.ip()),
        }
    }

    /// The decision for a TCP connection to `port`: the destination's ingress policy and the
    /// source's egress policy, both of which must allow it (each L7 part applies on its own).
    pub fn decide(&self, peers: Peers, port: u16) -> Decision {
        let mut reqs = Vec::new();
        let sides = [
            (Direction::Ingress, peers.dst, peers.src),
            (Direction::Egress, peers.src, peers.dst),
        ];
        for (direction, endpoint, remote) in sides {
            let Some(tables) = self.tables.get(&endpoint) else {
                continue;
            };
            match tables.judge_l4(direction, remote, port) {
                L4::Deny => return Decision::Deny { direction },
                L4::Allow => {}
                L4::Redirect(sets) => reqs.push(L7Requirement { direction, sets }),
            }
        }
        Decision::Allow(reqs)
    }

    /// Whether any endpoint is selected by policy at all (a reverse proxy in front of nothing
    /// selected forwards everything, which its operator should hear about).
    pub fn enforces(&self, endpoint: NumericIdentity) -> bool {
        self.tables
            .get(&endpoint)
            .is_some_and(EndpointTables::enforces)
    }
}

enum L4 {
    Deny,
    Allow,
    Redirect(RuleSets),
}

/// An endpoint's policy as this proxy holds it.
#[derive(Debug)]
enum EndpointTables {
    /// Resolved in this process (or by the agent in process).
    Resolved(PolicyTable),
    /// Received from the agent over xDS.
    Received {
        ingress: DirectionRules,
        egress: DirectionRules,
    },
}

impl EndpointTables {
    fn enforces(&self) -> bool {
        match self {
            EndpointTables::Resolved(t) => t.ingress.enforced || t.egress.enforced,
            EndpointTables::Received { ingress, egress } => ingress.enforced || egress.enforced,
        }
    }

    fn judge_l4(&self, direction: Direction, remote: NumericIdentity, port: u16) -> L4 {
        match self {
            EndpointTables::Resolved(t) => judge_l4(t.direction(direction), remote, port),
            EndpointTables::Received { ingress, egress } => {
                let rules = if direction == Direction::Ingress {
                    ingress
                } else {
                    egress
                };
                if !rules.enforced {
                    return L4::Allow;
                }
                match rules.lookup(remote, port, Proto::Tcp.number()) {
                    None => L4::Deny,
                    Some((_, EntryVerdict::Allow)) => L4::Allow,
                    Some((_, EntryVerdict::Redirect(sets))) => {
                        L4::Redirect(RuleSets::Received(sets.clone()))
                    }
                }
            }
        }
    }
}

fn judge_l4(table: &DirectionTable, remote: NumericIdentity, port: u16) -> L4 {
    if !table.enforced {
        return L4::Allow;
    }
    match table.lookup(remote, port, Proto::Tcp) {
        None => L4::Deny,
        Some((_, eff)) => match eff.verdict {
            Verdict::Allow => L4::Allow,
            Verdict::Redirect(_) => L4::Redirect(RuleSets::Resolved(
                eff.derived_from
                    .iter()
                    .filter_map(|c| {
                        let port_rule = c.port_rule.clone()?;
                        Some((port_rule, Arc::from(c.rule.origin.to_string())))
                    })
                    .collect(),
            )),
        },
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address it carries (a dual-stack listener reports those).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Builds snapshots, keeping identity numbers stable across policy versions.
#[derive(Debug)]
pub struct SnapshotBuilder {
    allocator: LocalAllocator,
    generation: u64,
    mode: EnforcementMode,
}

impl SnapshotBuilder {
    /// A builder for an enforcement mode.
    pub fn new(mode: EnforcementMode) -> SnapshotBuilder {
        SnapshotBuilder {
            allocator: LocalAllocator::new(),
            generation: 0,
            mode,
        }
    }

    /// A snapshot of `set` with the workloads of `workloads` (each an endpoint with a table).
    pub fn build(&mut self, set: &PolicySet, workloads: &[EndpointSpec]) -> Result<Snapshot> {
        self.build_with(set, workloads, &[])
    }

    /// [`build`](Self::build), with extra prefixes of reserved identities (the node's own
    /// addresses are `host`).
    pub fn build_with(
        &mut self,
        set: &PolicySet,
        workloads: &[EndpointSpec],
        reserved: &[(IpNet, NumericIdentity)],
    ) -> Result<Snapshot> {
        let mut resolver = Resolver::new(self.mode);
        resolver.set_rules(&set.rules);
        for (_, name) in RESERVED {
            let labels: LabelSet = [Label::reserved(name)].into_iter().collect();
            let (identity, _) = self.allocator.allocate(&labels)?;
            resolver.add_identity(identity);
        }
        let mut workload_prefixes = Vec::new();
        let mut names = HashMap::new();
        for w in workloads {
            let labels = endpoint_labels(
                &w.labels,
                &w.namespace,
                w.service_account.as_deref(),
                &set.namespaces,
            );
            let (identity, _) = self
                .allocator
                .allocate(&labels)
                .with_context(|| format!("identity of workload {}", w.name))?;
            let id = identity.id;
            resolver.add_identity(identity);
            resolver.add_endpoint(id);
            names.entry(id).or_insert_with(|| w.name.clone());
            workload_prefixes.extend(w.ips.iter().map(|ip| (IpNet::from(canonical(*ip)), id)));
            workload_prefixes.extend(w.cidrs.iter().map(|net| (*net, id)));
        }
        let mut cidr_prefixes = Vec::new();
        for net in set.cidr_prefixes() {
            let (identity, _) = self.allocator.allocate(&cidr_labels(&net))?;
            cidr_prefixes.push((net, identity.id));
            resolver.add_identity(identity);
        }
        // On equal prefixes a workload (inserted first) wins over a policy CIDR.
        let prefixes = workload_prefixes
            .into_iter()
            .chain(reserved.iter().copied())
            .chain(cidr_prefixes)
            .collect();
        Ok(self.snapshot_of(&resolver, prefixes, names))
    }

    /// A snapshot of policy resolved elsewhere (the agent's resolver): the tables of its
    /// endpoints, `prefixes` (the first of equal prefixes wins) and workload names. Nothing is
    /// resolved again and no identity is copied.
    pub fn snapshot_of(
        &mut self,
        resolver: &Resolver,
        prefixes: PrefixMap<NumericIdentity>,
        names: HashMap<NumericIdentity, String>,
    ) -> Snapshot {
        let tables = resolver
            .endpoint_ids()
            .filter_map(|id| {
                let table = resolver.table(id)?.clone();
                Some((id, EndpointTables::Resolved(table)))
            })
            .collect();
        self.generation += 1;
        Snapshot {
            generation: self.generation,
            tables,
            prefixes,
            names,
        }
    }
}

impl SnapshotBuilder {
    /// A snapshot of policy the agent resolved and serves over xDS: its endpoints'
    /// `NetworkPolicy` resources and its identity-to-addresses map (`NetworkPolicyHosts`).
    /// Identity numbers are the agent's, as in its datapath. An error names the resource and
    /// field at fault; the caller rejects the update and keeps its last good snapshot.
    pub fn snapshot_received(
        &mut self,
        policies: &[v1::NetworkPolicy],
        hosts: &[v1::NetworkPolicyHosts],
    ) -> Result<Snapshot, String> {
        let mut tables = HashMap::new();
        let mut names = HashMap::new();
        let mut endpoint_prefixes = Vec::new();
        for np in policies {
            // The init policy is for sidecars whose pod has no policy yet; the node's proxy
            // only judges endpoints it knows by address (an init endpoint has its own resource).
            if np.endpoint == membrane_api::INIT_POLICY {
                continue;
            }
            let at = |what: &str, e: String| format!("NetworkPolicy {} {what}: {e}", np.endpoint);
            let id = NumericIdentity(np.identity);
            let ingress = DirectionRules::from_wire(&np.ingress.clone().unwrap_or_default())
                .map_err(|e| at("ingress", e))?;
            let egress = DirectionRules::from_wire(&np.egress.clone().unwrap_or_default())
                .map_err(|e| at("egress", e))?;
            tables.insert(id, EndpointTables::Received { ingress, egress });
            names.entry(id).or_insert_with(|| np.endpoint.clone());
            for addr in &np.addresses {
                let ip: IpAddr = addr
                    .parse()
                    .map_err(|_| at("addresses", format!("{addr:?} is not an address")))?;
                endpoint_prefixes.push((IpNet::from(canonical(ip)), id));
            }
        }
        let mut host_prefixes = Vec::new();
        for h in hosts {
            for prefix in &h.host_addresses {
                let net: IpNet = prefix.parse().map_err(|_| {
                    format!(
                        "NetworkPolicyHosts {}: {prefix:?} is not a prefix",
                        h.identity
                    )
                })?;
                host_prefixes.push((net, NumericIdentity(h.identity)));
            }
        }
        self.generation += 1;
        Ok(Snapshot {
            generation: self.generation,
            tables,
            // An endpoint's own addresses first: the first of equal prefixes wins.
            prefixes: endpoint_prefixes.into_iter().chain(host_prefixes).collect(),
            names,
        })
    }
}

/// The current snapshot, swapped atomically.
#[derive(Debug)]
pub struct PolicyHandle {
    current: ArcSwap<Snapshot>,
}

impl PolicyHandle {
    /// A handle holding `snapshot`.
    pub fn new(snapshot: Snapshot) -> PolicyHandle {
        PolicyHandle {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// A handle whose snapshot knows no policy and no workloads (everything is world, nothing is
    /// selected) until the first [`store`](Self::store).
    pub fn new_empty() -> PolicyHandle {
        let snapshot = Snapshot {
            generation: 0,
            tables: HashMap::new(),
            prefixes: PrefixMap::new(),
            names: HashMap::new(),
        };
        PolicyHandle::new(snapshot)
    }

    /// The snapshot in force now.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Puts a new snapshot in force; requests whose headers arrive from now on see it.
    pub fn store(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_policy::endpoints::parse_endpoints;
    use membrane_policy::l7::http::NoHeaders;

    fn req<'a>(method: &'a str, path: &'a str) -> HttpRequest<'a> {
        HttpRequest {
            method,
            path,
            host: "svc",
            headers: &NoHeaders,
        }
    }

    const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public.*"}]
  - fromCIDR: [192.0.2.0/24]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

    const WORKLOADS: &str = "endpoints:
  - name: web
    labels: {app: web}
    ips: [10.0.0.1]
  - name: client
    labels: {app: client}
    cidrs: [10.1.0.0/16]
";

    fn snapshot() -> Snapshot {
        let set = PolicySet::from_sources([("p.yaml", POLICY)]).unwrap();
        let workloads = parse_endpoints("w.yaml", WORKLOADS).unwrap();
        SnapshotBuilder::new(EnforcementMode::Default)
            .build(&set, &workloads)
            .unwrap()
    }

    #[test]
    fn identities_by_longest_prefix_default_world() {
        let s = snapshot();
        let web = s.identity_of("10.0.0.1".parse().unwrap());
        let client = s.identity_of("::ffff:10.1.2.3".parse().unwrap());
        assert_eq!(s.name_of(web), Some("web"));
        assert_eq!(s.name_of(client), Some("client"));
        assert_eq!(
            s.identity_of("203.0.113.9".parse().unwrap()),
            NumericIdentity::WORLD
        );
        let cidr = s.identity_of("192.0.2.7".parse().unwrap());
        assert!(cidr != NumericIdentity::WORLD && cidr != web && cidr != client);
    }

    #[test]
    fn decisions_follow_the_tables() {
        let s = snapshot();
        let web: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let from = |a: &str| s.peers(format!("{a}:5555").parse().unwrap(), web);
        // L7-governed: GET /public allowed, anything else not.
        let Decision::Allow(reqs) = s.decide(from("10.1.0.9"), 80) else {
            panic!("client denied")
        };
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].direction, Direction::Ingress);
        assert!(reqs[0].allowing_policy(&req("GET", "/public/x")).is_some());
        assert!(reqs[0].allowing_policy(&req("GET", "/private")).is_none());
        assert!(reqs[0].allowing_policy(&req("POST", "/public")).is_none());
        assert_eq!(
            s.decide(from("10.1.0.9"), 80).protocol(),
            ConnectionProtocol::Http
        );
        assert_eq!(
            s.decide(from("10.1.0.9"), 80)
                .protocol_or(ConnectionProtocol::Kafka),
            ConnectionProtocol::Http,
            "rules decide the protocol"
        );
        // CIDR peer: L4 only.
        assert!(matches!(s.decide(from("192.0.2.1"), 80), Decision::Allow(r) if r.is_empty()));
        assert_eq!(
            s.decide(from("192.0.2.1"), 80)
                .protocol_or(ConnectionProtocol::Kafka),
            ConnectionProtocol::Kafka,
            "without rules, the operator's choice"
        );
        // World and other ports: denied at L3/L4.
        assert!(matches!(
            s.decide(from("203.0.113.1"), 80),
            Decision::Deny {
                direction: Direction::Ingress
            }
        ));
        assert!(matches!(
            s.decide(from("10.1.0.9"), 81),
            Decision::Deny { .. }
        ));
        assert!(s.enforces(s.identity_of(web.ip())));
    }

    #[test]
    fn the_init_policy_is_left_to_sidecars() {
        let enforced = || {
            Some(v1::DirectionPolicy {
                enforced: true,
                entries: vec![],
            })
        };
        let web = v1::NetworkPolicy {
            endpoint: "web".into(),
            identity: 300,
            addresses: vec!["10.0.0.1".into()],
            ingress: enforced(),
            egress: None,
        };
        let init = v1::NetworkPolicy {
            endpoint: membrane_api::INIT_POLICY.into(),
            identity: NumericIdentity::INIT.0,
            addresses: vec![],
            ingress: enforced(),
            egress: enforced(),
        };
        let s = SnapshotBuilder::new(EnforcementMode::Default)
            .snapshot_received(&[init, web], &[])
            .unwrap();
        assert_eq!(s.name_of(NumericIdentity(300)), Some("web"));
        assert!(s.enforces(NumericIdentity(300)));
        assert_eq!(s.name_of(NumericIdentity::INIT), None);
        assert!(!s.enforces(NumericIdentity::INIT));
    }

    #[test]
    fn identity_numbers_survive_rebuilds() {
        let set = PolicySet::from_sources([("p.yaml", POLICY)]).unwrap();
        let workloads = parse_endpoints("w.yaml", WORKLOADS).unwrap();
        let mut b = SnapshotBuilder::new(EnforcementMode::Default);
        let a = b.build(&set, &workloads).unwrap();
        let c = b.build(&set, &workloads).unwrap();
        assert!(c.generation > a.generation);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(a.identity_of(ip), c.identity_of(ip));
    }
}
