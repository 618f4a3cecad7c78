//! The filter's policy state and its judgment of a request. Pure (no proxy-wasm calls), so it is
//! tested natively; the VM glue in `glue.rs` only feeds it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use ipnet::IpNet;
use membrane_api::discovery::Any;
use membrane_api::{DirectionRules, EntryVerdict, INIT_POLICY, v1};
use membrane_codec::kafka::session::{Judged, KafkaJudge};
use membrane_codec::path::{PathError, lenient_reading, normalize_target};
use membrane_policy::identity::NumericIdentity;
use membrane_policy::l7::http::{HeaderLookup, HttpRequest};
use membrane_policy::l7::kafka::{KafkaRequest, KafkaVerdict};
use membrane_policy::prefixes::PrefixMap;
use membrane_policy::resolve::{first_allowing_http, judge_kafka_sets_credited};
use membrane_policy::rule::{L7Kind, L7Rules};
use prost::Message;

/// One local endpoint's compiled policy.
#[derive(Debug)]
pub struct EndpointPolicy {
    /// Its name.
    pub name: String,
    /// Its identity.
    pub identity: u32,
    /// Traffic arriving at it.
    pub ingress: DirectionRules,
    /// Traffic leaving it.
    pub egress: DirectionRules,
}

/// The NetworkPolicy resources, compiled.
#[derive(Debug, Default)]
pub struct Policies {
    /// Endpoint policies by address.
    pub by_address: HashMap<IpAddr, Rc<EndpointPolicy>>,
    /// The init identity's policy ([`INIT_POLICY`]): what a pod whose own policy has not
    /// arrived may do. Only what it explicitly allows; nothing when it is absent.
    pub init: Option<Rc<EndpointPolicy>>,
}

/// Everything the filter enforces, swapped whole when a resource type changes.
#[derive(Debug, Default)]
pub struct PolicyState {
    /// Endpoint policies and the init policy.
    pub endpoints: Policies,
    /// Where addresses come from.
    pub hosts: Hosts,
    /// SPIFFE ID -> identity.
    pub spiffe: BTreeMap<String, u32>,
    /// Versions in force, by type URL.
    pub versions: BTreeMap<String, String>,
    /// Moves on every accepted update of any type, so long-lived decisions can tell they are
    /// stale.
    pub generation: u64,
}

/// The identity -> addresses map, indexed for the request path (one hash probe per prefix
/// length present).
#[derive(Debug, Default)]
pub struct Hosts(PrefixMap<u32>);

impl Hosts {
    /// The identity of an address: longest listed prefix, else world.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        self.0.lookup(ip).unwrap_or(NumericIdentity::WORLD.0)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Compiles NetworkPolicy resources (errors name the resource; the caller NACKs and keeps its
/// last good state).
pub fn compile_policies(resources: &[Any]) -> Result<Policies, String> {
    let mut out = Policies::default();
    for (i, any) in resources.iter().enumerate() {
        let np = v1::NetworkPolicy::decode(any.value.as_slice())
            .map_err(|e| format!("resource {i}: {e}"))?;
        let at = |what: &str, e: String| format!("{} {what}: {e}", np.endpoint);
        let policy = Rc::new(EndpointPolicy {
            name: np.endpoint.clone(),
            identity: np.identity,
            ingress: DirectionRules::from_wire(&np.ingress.clone().unwrap_or_default())
                .map_err(|e| at("ingress", e))?,
            egress: DirectionRules::from_wire(&np.egress.clone().unwrap_or_default())
                .map_err(|e| at("egress", e))?,
        });
        if np.endpoint == INIT_POLICY {
            if !np.addresses.is_empty() {
                return Err(at(
                    "addresses",
                    "the init policy belongs to no address".into(),
                ));
            }
            out.init = Some(policy);
            continue;
        }
        for addr in &np.addresses {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| at("addresses", format!("{addr:?} is not an address")))?;
            out.by_address.insert(ip, policy.clone());
        }
    }
    Ok(out)
}

/// Compiles NetworkPolicyHosts resources.
pub fn compile_hosts(resources: &[Any]) -> Result<Hosts, String> {
    let mut out = Hosts::default();
    for (i, any) in resources.iter().enumerate() {
        let h = v1::NetworkPolicyHosts::decode(any.value.as_slice())
            .map_err(|e| format!("resource {i}: {e}"))?;
        for prefix in &h.host_addresses {
            let net: IpNet = prefix
                .parse()
                .map_err(|_| format!("identity {}: {prefix:?} is not a prefix", h.identity))?;
            out.0.insert(net, h.identity);
        }
    }
    Ok(out)
}

/// Compiles the SPIFFE ID table.
pub fn compile_spiffe(resources: &[Any]) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for any in resources {
        let t = v1::SpiffeIdentities::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
        out.extend(t.identities);
    }
    Ok(out)
}

/// Whether Envoy's node id names an Istio gateway (`router~IP~POD.NAMESPACE~DOMAIN`; sidecars
/// are `sidecar~...`). A WasmPlugin without a selector reaches gateways too, but a gateway is no
/// workload's sidecar: it has no local endpoint to judge for (an ingress gateway's "outbound"
/// source is an outside client), and the sidecars it forwards to judge the requests by the
/// gateway's identity. Judging there would hold its traffic to the wrong endpoint's policy.
pub fn is_istio_gateway(node_id: &str) -> bool {
    node_id.starts_with("router~")
}

/// Which way the traffic goes through this sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Into the local workload (`xds.listener_direction` 1).
    Inbound,
    /// Out of it (2).
    Outbound,
}

impl Direction {
    /// `inbound` or `outbound`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What the filter knows about a connection (the same for every request on it, so the glue reads
/// it once per connection).
#[derive(Clone, Debug)]
pub struct ConnFacts {
    /// Direction of the listener.
    pub direction: Direction,
    /// Downstream peer address.
    pub source: IpAddr,
    /// Address the connection was made to.
    pub destination: IpAddr,
    /// Its port.
    pub port: u16,
    /// The mTLS peer's SPIFFE ID (from the verified certificate, never a header). Shared: the
    /// upstream mode copies a connection's facts per request.
    pub peer_spiffe: Option<Rc<str>>,
}

impl ConnFacts {
    /// The address of this sidecar's own workload.
    pub fn local(&self) -> IpAddr {
        match self.direction {
            Direction::Inbound => self.destination,
            Direction::Outbound => self.source,
        }
    }
}

/// The endpoints and identities a connection is between.
#[derive(Clone, Debug)]
pub struct Parties<'s> {
    /// The local endpoint's policy: its own, else the init policy, else none.
    pub local: Option<&'s EndpointPolicy>,
    /// `local` is the init policy standing in for a policy that has not arrived.
    pub init: bool,
    /// The remote identity.
    pub remote: u32,
    /// The remote address.
    pub remote_addr: IpAddr,
}

/// The L3/L4 stage of a judgement.
#[derive(Debug)]
pub enum L4Verdict<'s> {
    /// Allowed without L7 rules (the reason).
    Allow(&'static str),
    /// Denied (why).
    Deny(String),
    /// Allowed at L3/L4; each request must satisfy one of these ORed rule sets.
    L7(&'s [(Arc<str>, L7Rules)]),
}

/// The filter's verdict on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'s> {
    /// Let it through; the policy (or reason) that allowed it.
    Allow(&'s str),
    /// Answer 403; why.
    Deny(String),
}

impl PolicyState {
    /// The identity of an address.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        self.hosts.identity_of(ip)
    }

    /// Who a connection is between: the local endpoint by its address, the remote identity from
    /// the verified SPIFFE ID when it is known, otherwise from the remote address.
    pub fn parties(&self, c: &ConnFacts) -> Parties<'_> {
        let remote_addr = match c.direction {
            Direction::Inbound => c.source,
            Direction::Outbound => c.destination,
        };
        let by_spiffe = match (c.direction, &c.peer_spiffe) {
            (Direction::Inbound, Some(id)) => self.spiffe.get(&**id).copied(),
            _ => None,
        };
        let own = self.endpoints.by_address.get(&c.local());
        Parties {
            local: own.or(self.endpoints.init.as_ref()).map(|p| &**p),
            init: own.is_none(),
            remote: by_spiffe.unwrap_or_else(|| self.identity_of(remote_addr)),
            remote_addr,
        }
    }

    /// Judges a connection at L3/L4 (`proto` 6 for TCP). The filter fails closed: with no
    /// policy for the local endpoint (none received yet, or not ours) only what the init policy
    /// explicitly allows passes, and a direction it does not enforce allows nothing.
    pub fn judge_l4<'s>(
        &'s self,
        c: &ConnFacts,
        parties: &Parties<'s>,
        proto: u8,
    ) -> L4Verdict<'s> {
        let Some(ep) = parties.local else {
            return L4Verdict::Deny(format!(
                "no policy for local address {} (and no init policy)",
                c.local()
            ));
        };
        let table = match c.direction {
            Direction::Inbound => &ep.ingress,
            Direction::Outbound => &ep.egress,
        };
        let under_init = || {
            if parties.init {
                format!(
                    " (init policy: no policy for local address {} yet)",
                    c.local()
                )
            } else {
                String::new()
            }
        };
        if !table.enforced {
            if parties.init {
                return L4Verdict::Deny(format!(
                    "the init policy allows no {} traffic{}",
                    c.direction.name(),
                    under_init()
                ));
            }
            return L4Verdict::Allow("direction not enforced");
        }
        match table.lookup(NumericIdentity(parties.remote), c.port, proto) {
            None => L4Verdict::Deny(format!(
                "L3/L4: identity {} may not reach port {}{}",
                parties.remote,
                c.port,
                under_init()
            )),
            Some((_, EntryVerdict::Allow)) => L4Verdict::Allow("L3/L4 allow"),
            Some((_, EntryVerdict::Redirect(sets))) => L4Verdict::L7(sets),
        }
    }

    /// Judges an HTTP request: [`judge_l4`](Self::judge_l4), then the HTTP rules if there are any.
    pub fn judge<'s>(&'s self, c: &ConnFacts, http: &HttpRequest<'_>) -> Verdict<'s> {
        let parties = self.parties(c);
        match self.judge_l4(c, &parties, 6) {
            L4Verdict::Allow(why) => Verdict::Allow(why),
            L4Verdict::Deny(why) => Verdict::Deny(why),
            L4Verdict::L7(sets) => judge_http(sets, http),
        }
    }
}

/// What the Kafka network filter does with a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamMode {
    /// Pass its bytes unread: its port has no L7 rules, or HTTP rules (the HTTP filter's job).
    Pass,
    /// Parse it as Kafka and judge every request.
    Kafka,
    /// Close it (why).
    Refuse(String),
}

impl StreamMode {
    /// The mode for a connection with this L3/L4 verdict. Rule sets that mix protocols parse as
    /// Kafka, where the shared session refuses them: they allow nothing.
    pub fn of(l4: L4Verdict<'_>) -> StreamMode {
        match l4 {
            L4Verdict::Deny(why) => StreamMode::Refuse(why),
            L4Verdict::Allow(_) => StreamMode::Pass,
            L4Verdict::L7(sets) if sets.iter().all(|(_, r)| r.kind() == L7Kind::Http) => {
                StreamMode::Pass
            }
            L4Verdict::L7(_) => StreamMode::Kafka,
        }
    }
}

/// The policy side of a Kafka connection through this sidecar, as the shared Kafka session
/// asks for it: the connection's L3/L4 verdict (taken again for every request, so a policy
/// change applies to open connections) and its port's Kafka rules.
#[derive(Debug)]
pub struct KafkaPolicy<'s> {
    /// The L3/L4 stage.
    pub l4: L4Verdict<'s>,
    /// `ingress` (inbound listener) or `egress` (outbound).
    pub direction: &'static str,
}

impl<'s> KafkaPolicy<'s> {
    /// Judges the connection `c` by `state` now.
    pub fn of(state: &'s PolicyState, c: &ConnFacts, parties: &Parties<'s>) -> KafkaPolicy<'s> {
        KafkaPolicy {
            l4: state.judge_l4(c, parties, 6),
            direction: match c.direction {
                Direction::Inbound => "ingress",
                Direction::Outbound => "egress",
            },
        }
    }
}

impl KafkaJudge for KafkaPolicy<'_> {
    fn refuses_connection(&self) -> Option<(&'static str, String)> {
        match &self.l4 {
            L4Verdict::Deny(why) => Some((self.direction, why.clone())),
            L4Verdict::L7(sets) if sets.iter().any(|(_, r)| r.kind() != L7Kind::Kafka) => Some((
                self.direction,
                "the rules of this port are not Kafka rules".into(),
            )),
            _ => None,
        }
    }

    fn judge(&self, facts: &KafkaRequest<'_>) -> Judged {
        let sets = match &self.l4 {
            L4Verdict::Allow(_) => {
                return Judged::Allow {
                    direction: self.direction,
                    policy: Arc::from(""),
                };
            }
            L4Verdict::Deny(_) => {
                return Judged::Deny {
                    direction: self.direction,
                    denied_topics: Vec::new(),
                };
            }
            L4Verdict::L7(sets) => sets,
        };
        match judge_kafka_sets_credited(sets.iter().map(|(_, r)| r), facts) {
            (KafkaVerdict::Deny { denied_topics }, _) => Judged::Deny {
                direction: self.direction,
                denied_topics,
            },
            (KafkaVerdict::Allow(_), credited) => Judged::Allow {
                direction: self.direction,
                policy: credited.map_or_else(|| Arc::from(""), |i| sets[i].0.clone()),
            },
        }
    }
}

/// Judges a request against the ORed HTTP rule sets of its port. A deny names the policies
/// whose rules were consulted, so that the log line says where to look.
pub fn judge_http<'s>(sets: &'s [(Arc<str>, L7Rules)], http: &HttpRequest<'_>) -> Verdict<'s> {
    match first_allowing_http(sets.iter().map(|(_, r)| r), http) {
        Some(i) => Verdict::Allow(&sets[i].0),
        None => {
            let mut policies: Vec<&str> = Vec::with_capacity(sets.len());
            for (policy, _) in sets {
                if !policies.contains(&&**policy) {
                    policies.push(policy);
                }
            }
            Verdict::Deny(format!("no HTTP rule of {} allows it", policies.join(", ")))
        }
    }
}

/// Judges a request, fetching the authority only when it can change the verdict: a rule without
/// a host pattern that allows the request decides without it.
pub fn judge_http_fetching_host<'s>(
    sets: &'s [(Arc<str>, L7Rules)],
    method: &str,
    path: &str,
    headers: &dyn HeaderLookup,
    host: impl FnOnce() -> String,
) -> Verdict<'s> {
    let without_host = HttpRequest {
        method,
        path,
        host: "",
        headers,
    };
    if !rules_use_host(sets) {
        return judge_http(sets, &without_host);
    }
    if sets.iter().all(|(_, r)| r.kind() == L7Kind::Http) {
        for (policy, rules) in sets {
            if let L7Rules::Http(h) = rules
                && h.verdicts(&without_host)
                    .any(|(i, miss)| miss.is_none() && h.rules()[i].host.is_none())
            {
                return Verdict::Allow(policy);
            }
        }
    }
    let host = host();
    judge_http(
        sets,
        &HttpRequest {
            host: &host,
            ..without_host
        },
    )
}

/// Judges a request the way the proxy does with path normalization on: by its normalized target
/// (`membrane_codec::path`), which must also be allowed as a lenient upstream reads it (escaped
/// slashes and backslashes as separators, segment parameters cut). Returns the verdict and the
/// normalized target when it differs from `raw` (the filter forwards that, so the upstream gets
/// the path that was judged); a malformed path is an error. The authority is fetched at most once.
pub fn judge_http_path<'s>(
    sets: &'s [(Arc<str>, L7Rules)],
    method: &str,
    raw: &str,
    headers: &dyn HeaderLookup,
    host: impl FnOnce() -> String,
) -> Result<(Verdict<'s>, Option<String>), PathError> {
    let target = normalize_target(raw)?;
    let fetched = std::cell::OnceCell::new();
    let mut host = Some(host);
    let mut host_once = || {
        fetched
            .get_or_init(|| host.take().map(|f| f()).unwrap_or_default())
            .clone()
    };
    let mut verdict = judge_http_fetching_host(sets, method, &target, headers, &mut host_once);
    if let (Verdict::Allow(_), Some(read)) = (&verdict, lenient_reading(&target))
        && let Verdict::Deny(_) =
            judge_http_fetching_host(sets, method, &read, headers, &mut host_once)
    {
        verdict = Verdict::Deny(format!(
            "no HTTP rule allows the path as a lenient upstream reads it: {read}"
        ));
    }
    let rewritten = match target {
        Cow::Owned(t) => Some(t),
        Cow::Borrowed(_) => None,
    };
    Ok((verdict, rewritten))
}

/// Whether any rule of these sets looks at the authority (so it must be fetched).
pub fn rules_use_host(sets: &[(Arc<str>, L7Rules)]) -> bool {
    sets.iter().any(|(_, r)| match r {
        L7Rules::Http(h) => h.rules().iter().any(|r| r.host.is_some()),
        L7Rules::Kafka(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_api::discovery::Any;
    use membrane_policy::l7::http::NoHeaders;

    fn any(msg: &impl Message) -> Any {
        Any {
            type_url: String::new(),
            value: msg.encode_to_vec(),
        }
    }

    /// web (10.0.0.1, identity 300): from 301 GET `path` on port 80, from 302 anything on it;
    /// egress to 302 on port 80.
    fn web(path: &str) -> v1::NetworkPolicy {
        let rules = v1::L7RuleSet {
            policy: "p".into(),
            rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules {
                rules: vec![v1::HttpRule {
                    method: "GET".into(),
                    path: path.into(),
                    ..Default::default()
                }],
            })),
        };
        let entry = |remote, l7| v1::PolicyEntry {
            remote_identity: remote,
            port: 80,
            protocol: 6,
            l7,
        };
        v1::NetworkPolicy {
            endpoint: "web".into(),
            identity: 300,
            addresses: vec!["10.0.0.1".into()],
            ingress: Some(v1::DirectionPolicy {
                enforced: true,
                entries: vec![entry(301, vec![rules]), entry(302, vec![])],
            }),
            egress: Some(v1::DirectionPolicy {
                enforced: true,
                entries: vec![entry(302, vec![])],
            }),
        }
    }

    fn state(path: &str) -> Result<PolicyState, String> {
        let np = web(path);
        let hosts = v1::NetworkPolicyHosts {
            identity: 301,
            host_addresses: vec!["10.0.0.2/32".into()],
        };
        let hosts2 = v1::NetworkPolicyHosts {
            identity: 302,
            host_addresses: vec!["10.0.1.0/24".into()],
        };
        let spiffe = v1::SpiffeIdentities {
            identities: [("spiffe://cluster.local/ns/default/sa/api".to_string(), 302)]
                .into_iter()
                .collect(),
        };
        Ok(PolicyState {
            endpoints: compile_policies(&[any(&np)])?,
            hosts: compile_hosts(&[any(&hosts), any(&hosts2)])?,
            spiffe: compile_spiffe(&[any(&spiffe)])?,
            versions: BTreeMap::new(),
            generation: 0,
        })
    }

    #[test]
    fn single_addresses_and_prefixes_resolve_most_specific_first() {
        let st = state("/").unwrap();
        assert_eq!(st.identity_of("10.0.0.2".parse().unwrap()), 301);
        assert_eq!(st.identity_of("10.0.1.200".parse().unwrap()), 302);
        assert_eq!(st.identity_of("10.0.2.1".parse().unwrap()), 2, "world");
        assert_eq!(st.hosts.len(), 2);
    }

    /// One rule set, policy `p`, of GET-any rules: (path, host) patterns.
    fn http_sets(rules: &[(&str, Option<&str>)]) -> [(Arc<str>, L7Rules); 1] {
        use membrane_policy::l7::http::{HttpRule, HttpRules, Pattern};
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, (path, host))| HttpRule {
                index,
                method: None,
                path: Some(Pattern::new(path).unwrap()),
                host: host.map(|h| Pattern::new(h).unwrap()),
                headers: vec![],
            })
            .collect();
        [(
            Arc::from("p"),
            L7Rules::Http(HttpRules::new(rules).unwrap()),
        )]
    }

    #[test]
    fn the_authority_is_fetched_only_when_it_decides() {
        let sets = http_sets(&[
            ("/open", None),
            // Matches an empty authority: must not allow without the real one.
            ("/admin", Some("(admin[.]local)?")),
        ]);
        let fetched = std::cell::Cell::new(0);
        let judge = |path, host: &'static str| {
            judge_http_fetching_host(&sets, "GET", path, &NoHeaders, || {
                fetched.set(fetched.get() + 1);
                host.to_string()
            })
        };
        assert_eq!(judge("/open", "x"), Verdict::Allow("p"));
        assert_eq!(fetched.get(), 0, "decided without the authority");
        assert!(matches!(judge("/admin", "evil.local"), Verdict::Deny(_)));
        assert_eq!(judge("/admin", "admin.local"), Verdict::Allow("p"));
        assert!(matches!(judge("/other", "admin.local"), Verdict::Deny(_)));
        assert_eq!(fetched.get(), 3);
    }

    #[test]
    fn paths_are_judged_normalized_and_as_lenient_upstreams_read_them() {
        let sets = http_sets(&[("/public/.*", None), ("/api/.*", Some("api[.]local"))]);
        let fetched = std::cell::Cell::new(0);
        let judge = |path| {
            judge_http_path(&sets, "GET", path, &NoHeaders, || {
                fetched.set(fetched.get() + 1);
                "api.local".to_string()
            })
        };
        let allowed = |path| match judge(path) {
            Ok((Verdict::Allow(_), rewritten)) => Some(rewritten),
            Ok((Verdict::Deny(_), _)) => None,
            Err(e) => panic!("{path}: {e}"),
        };
        assert_eq!(allowed("/public/a"), Some(None), "normal: forwarded as is");
        assert_eq!(allowed("/public/./b//c"), Some(Some("/public/b/c".into())));
        assert_eq!(allowed("/public/a%2Fb"), Some(Some("/public/a%2Fb".into())));
        assert_eq!(allowed("/public/x;v=1"), Some(None));
        assert_eq!(
            fetched.get(),
            0,
            "no rule that allowed needed the authority"
        );
        for bypass in [
            "/public/../private",
            "/public/%2e%2e/private",
            "/public/..%2Fprivate",
            "/public%2F..%2Fprivate",
            "/public/..%5Cprivate",
            "/public\\..\\private",
            "/public/..;/private",
        ] {
            assert_eq!(allowed(bypass), None, "{bypass}");
        }
        let Ok((Verdict::Deny(why), _)) = judge("/public/..%2Fprivate") else {
            panic!("allowed");
        };
        assert_eq!(
            why,
            "no HTTP rule allows the path as a lenient upstream reads it: /private"
        );
        // Both readings need the authority: it is fetched once.
        fetched.set(0);
        assert_eq!(allowed("/api/a%2Fb"), Some(Some("/api/a%2Fb".into())));
        assert_eq!(fetched.get(), 1);
        assert_eq!(judge("/a%zz").unwrap_err(), PathError::BadPercentEncoding);
    }

    #[test]
    fn verdicts_name_the_policy_or_the_reason() {
        let st = state("/public.*").unwrap();
        let c = facts(Direction::Inbound, "10.0.0.2", "10.0.0.1", None);
        let req = |path| HttpRequest {
            method: "GET",
            path,
            host: "web",
            headers: &NoHeaders,
        };
        assert_eq!(st.judge(&c, &req("/public/x")), Verdict::Allow("p"));
        assert_eq!(
            st.judge(&c, &req("/private")),
            Verdict::Deny("no HTTP rule of p allows it".into())
        );
        // Each policy consulted is named once, in order.
        let [(_, rules)] = http_sets(&[("/a", None)]);
        let sets: Vec<(Arc<str>, L7Rules)> = ["np-b", "np-a", "np-b"]
            .into_iter()
            .map(|p| (Arc::from(p), rules.clone()))
            .collect();
        assert_eq!(
            judge_http(&sets, &req("/b")),
            Verdict::Deny("no HTTP rule of np-b, np-a allows it".into())
        );
        let parties = st.parties(&c);
        assert_eq!(
            (parties.local.unwrap().name.as_str(), parties.remote),
            ("web", 301)
        );
        let L4Verdict::L7(sets) = st.judge_l4(&c, &parties, 6) else {
            panic!("301 is L7-governed");
        };
        assert!(!rules_use_host(sets));
        let mut c = c;
        c.port = 81;
        assert_eq!(
            st.judge(&c, &req("/public/x")),
            Verdict::Deny("L3/L4: identity 301 may not reach port 81".into())
        );
    }

    fn facts(
        direction: Direction,
        source: &str,
        destination: &str,
        spiffe: Option<&str>,
    ) -> ConnFacts {
        ConnFacts {
            direction,
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            port: 80,
            peer_spiffe: spiffe.map(Rc::from),
        }
    }

    #[test]
    fn requests_are_judged_by_identity_and_rules() {
        let st = state("/public.*").unwrap();
        let judge = |(c, path): (ConnFacts, &str)| {
            let http = HttpRequest {
                method: "GET",
                path,
                host: "web",
                headers: &NoHeaders,
            };
            st.judge(&c, &http)
        };
        let allowed = |f| matches!(judge(f), Verdict::Allow(_));
        let facts = |d, s, t, spiffe, path| (facts(d, s, t, spiffe), path);
        use Direction::*;
        assert!(allowed(facts(
            Inbound,
            "10.0.0.2",
            "10.0.0.1",
            None,
            "/public/a"
        )));
        assert!(!allowed(facts(
            Inbound, "10.0.0.2", "10.0.0.1", None, "/private"
        )));
        assert!(
            allowed(facts(Inbound, "10.0.1.7", "10.0.0.1", None, "/private")),
            "L3/L4"
        );
        assert!(
            !allowed(facts(Inbound, "192.0.2.1", "10.0.0.1", None, "/public/a")),
            "world"
        );
        // The verified SPIFFE ID wins over the address.
        let spiffe = Some("spiffe://cluster.local/ns/default/sa/api");
        assert!(allowed(facts(
            Inbound,
            "192.0.2.1",
            "10.0.0.1",
            spiffe,
            "/private"
        )));
        // Outbound: the local endpoint is the source and its egress applies.
        assert!(allowed(facts(Outbound, "10.0.0.1", "10.0.1.9", None, "/x")));
        assert!(!allowed(facts(
            Outbound, "10.0.0.1", "10.0.0.2", None, "/x"
        )));
        // No policy for the local address (none yet, or not ours): fail closed.
        assert!(!allowed(facts(
            Inbound,
            "10.0.0.2",
            "10.0.0.9",
            None,
            "/public/a"
        )));
    }

    /// The init identity's policy as served: egress to 302 on port 80, ingress not enforced.
    fn init_policy() -> v1::NetworkPolicy {
        v1::NetworkPolicy {
            endpoint: INIT_POLICY.into(),
            identity: NumericIdentity::INIT.0,
            addresses: vec![],
            ingress: Some(v1::DirectionPolicy::default()),
            egress: Some(v1::DirectionPolicy {
                enforced: true,
                entries: vec![v1::PolicyEntry {
                    remote_identity: 302,
                    port: 80,
                    protocol: 6,
                    l7: vec![],
                }],
            }),
        }
    }

    #[test]
    fn a_pod_without_its_own_policy_gets_only_what_the_init_policy_allows() {
        let mut st = state("/public.*").unwrap();
        assert!(compile_policies(&[]).unwrap().init.is_none());
        fn judge<'s>(st: &'s PolicyState, c: &ConnFacts) -> Verdict<'s> {
            let http = HttpRequest {
                method: "GET",
                path: "/x",
                host: "h",
                headers: &NoHeaders,
            };
            st.judge(c, &http)
        }
        // 10.0.0.9 has no policy of its own yet; without an init policy nothing passes.
        let out = facts(Direction::Outbound, "10.0.0.9", "10.0.1.7", None);
        assert_eq!(
            judge(&st, &out),
            Verdict::Deny("no policy for local address 10.0.0.9 (and no init policy)".into())
        );
        st.endpoints = compile_policies(&[any(&web("/public.*")), any(&init_policy())]).unwrap();
        let parties = st.parties(&out);
        assert!(parties.init);
        assert_eq!(parties.local.unwrap().identity, 5);
        assert_eq!(judge(&st, &out), Verdict::Allow("L3/L4 allow"));
        // Only what it allows: another peer or port is denied, and naming why.
        let elsewhere = facts(Direction::Outbound, "10.0.0.9", "10.0.0.2", None);
        assert_eq!(
            judge(&st, &elsewhere),
            Verdict::Deny(
                "L3/L4: identity 301 may not reach port 80 (init policy: no policy for local \
                 address 10.0.0.9 yet)"
                    .into()
            )
        );
        // A direction the init policy does not enforce allows nothing (fail closed), unlike
        // an endpoint's own unenforced direction.
        let inbound = facts(Direction::Inbound, "10.0.1.7", "10.0.0.9", None);
        assert_eq!(
            judge(&st, &inbound),
            Verdict::Deny(
                "the init policy allows no inbound traffic (init policy: no policy for local \
                 address 10.0.0.9 yet)"
                    .into()
            )
        );
        // An endpoint with its own policy is judged by it, never by the init policy.
        let own = facts(Direction::Outbound, "10.0.0.1", "10.0.0.2", None);
        assert!(!st.parties(&own).init);
        assert!(matches!(judge(&st, &own), Verdict::Deny(_)));
        assert_eq!(
            judge(
                &st,
                &facts(Direction::Outbound, "10.0.0.1", "10.0.1.7", None)
            ),
            Verdict::Allow("L3/L4 allow")
        );
        // The init policy holds no addresses.
        let mut bad = init_policy();
        bad.addresses.push("10.0.0.9".into());
        assert_eq!(
            compile_policies(&[any(&bad)]).unwrap_err(),
            "reserved:init addresses: the init policy belongs to no address"
        );
    }

    #[test]
    fn istio_gateways_are_told_from_sidecars_by_their_node_id() {
        assert!(is_istio_gateway(
            "router~10.1.0.7~istio-ingressgateway-5d9f.istio-system~istio-system.svc.cluster.local"
        ));
        assert!(!is_istio_gateway(
            "sidecar~10.1.0.9~web-7c4f.default~default.svc.cluster.local"
        ));
        assert!(!is_istio_gateway("sidecar-web"));
        assert!(!is_istio_gateway(""));
    }

    #[test]
    fn a_bad_resource_names_what_is_wrong() {
        let err = state("(").unwrap_err();
        assert!(
            err.starts_with("web ingress: entries[0].l7[0]: http[0].path"),
            "{err}"
        );
        let bad = v1::NetworkPolicyHosts {
            identity: 5,
            host_addresses: vec!["nonsense".into()],
        };
        assert!(
            compile_hosts(&[any(&bad)])
                .unwrap_err()
                .contains("identity 5")
        );
    }

    #[test]
    fn kafka_ports_are_parsed_other_ports_pass_and_requests_meet_the_shared_judge() {
        let kafka = v1::L7RuleSet {
            policy: "kafka-policy".into(),
            rules: Some(v1::l7_rule_set::Rules::Kafka(v1::KafkaRules {
                rules: vec![v1::KafkaRule {
                    role: "produce".into(),
                    topic: Some("empire-announce".into()),
                    ..Default::default()
                }],
            })),
        };
        let mut st = state("/").unwrap();
        let np = v1::NetworkPolicy {
            endpoint: "kafka".into(),
            identity: 300,
            addresses: vec!["10.0.0.1".into()],
            ingress: Some(v1::DirectionPolicy {
                enforced: true,
                entries: vec![
                    v1::PolicyEntry {
                        remote_identity: 301,
                        port: 9092,
                        protocol: 6,
                        l7: vec![kafka],
                    },
                    v1::PolicyEntry {
                        remote_identity: 301,
                        port: 8080,
                        protocol: 6,
                        l7: vec![],
                    },
                ],
            }),
            egress: None,
        };
        st.endpoints = compile_policies(&[any(&np)]).unwrap();
        let conn = |port| ConnFacts {
            direction: Direction::Inbound,
            source: "10.0.0.2".parse().unwrap(),
            destination: "10.0.0.1".parse().unwrap(),
            port,
            peer_spiffe: None,
        };
        let mode = |port| {
            let c = conn(port);
            StreamMode::of(st.judge_l4(&c, &st.parties(&c), 6))
        };
        assert_eq!(mode(9092), StreamMode::Kafka);
        assert_eq!(
            mode(8080),
            StreamMode::Pass,
            "L3/L4 allow: bytes pass unread"
        );
        assert!(
            matches!(mode(80), StreamMode::Refuse(_)),
            "no entry: closed"
        );

        let c = conn(9092);
        let parties = st.parties(&c);
        let judge = KafkaPolicy::of(&st, &c, &parties);
        assert!(judge.refuses_connection().is_none());
        let produce = |topic: &'static [&'static str]| KafkaRequest {
            api_key: 0,
            api_version: 7,
            client_id: None,
            topics: Some(topic),
        };
        assert!(matches!(
            judge.judge(&produce(&["empire-announce"])),
            Judged::Allow { direction: "ingress", policy } if &*policy == "kafka-policy"
        ));
        assert!(matches!(
            judge.judge(&produce(&["deathstar-plans"])),
            Judged::Deny { direction: "ingress", denied_topics } if denied_topics == ["deathstar-plans"]
        ));
        // The same connection after the policy lost the port: every request closes it.
        st.endpoints = Policies::default();
        let parties = st.parties(&c);
        assert!(
            KafkaPolicy::of(&st, &c, &parties)
                .refuses_connection()
                .is_some()
        );
    }
}
