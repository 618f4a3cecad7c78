//! The filter's policy state and its judgment of a request. Pure (no proxy-wasm calls), so it is
//! tested natively; the VM glue in `glue.rs` only feeds it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use membrane_api::discovery::Any;
use membrane_api::{DirectionRules, EntryVerdict, v1};
use membrane_policy::identity::NumericIdentity;
use membrane_policy::l7::http::HttpRequest;
use membrane_policy::resolve::first_allowing_http;
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

/// Everything the filter enforces, swapped whole when a resource type changes.
#[derive(Debug, Default)]
pub struct PolicyState {
    /// Endpoint policies by address.
    pub endpoints: HashMap<IpAddr, std::rc::Rc<EndpointPolicy>>,
    /// Prefix -> identity, most specific first.
    pub hosts: Vec<(IpNet, u32)>,
    /// SPIFFE ID -> identity.
    pub spiffe: BTreeMap<String, u32>,
    /// Versions in force, by type URL.
    pub versions: BTreeMap<String, String>,
}

/// Compiles NetworkPolicy resources (errors name the resource; the caller NACKs and keeps its
/// last good state).
pub fn compile_policies(
    resources: &[Any],
) -> Result<HashMap<IpAddr, std::rc::Rc<EndpointPolicy>>, String> {
    let mut out = HashMap::new();
    for (i, any) in resources.iter().enumerate() {
        let np = v1::NetworkPolicy::decode(any.value.as_slice())
            .map_err(|e| format!("resource {i}: {e}"))?;
        let at = |what: &str, e: String| format!("{} {what}: {e}", np.endpoint);
        let policy = std::rc::Rc::new(EndpointPolicy {
            name: np.endpoint.clone(),
            identity: np.identity,
            ingress: DirectionRules::from_wire(&np.ingress.clone().unwrap_or_default())
                .map_err(|e| at("ingress", e))?,
            egress: DirectionRules::from_wire(&np.egress.clone().unwrap_or_default())
                .map_err(|e| at("egress", e))?,
        });
        for addr in &np.addresses {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| at("addresses", format!("{addr:?} is not an address")))?;
            out.insert(ip, policy.clone());
        }
    }
    Ok(out)
}

/// Compiles NetworkPolicyHosts resources into a longest-prefix-first list.
pub fn compile_hosts(resources: &[Any]) -> Result<Vec<(IpNet, u32)>, String> {
    let mut out = Vec::new();
    for (i, any) in resources.iter().enumerate() {
        let h = v1::NetworkPolicyHosts::decode(any.value.as_slice())
            .map_err(|e| format!("resource {i}: {e}"))?;
        for prefix in &h.host_addresses {
            let net: IpNet = prefix
                .parse()
                .map_err(|_| format!("identity {}: {prefix:?} is not a prefix", h.identity))?;
            out.push((net, h.identity));
        }
    }
    out.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
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

/// Which way the request goes through this sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Into the local workload (`xds.listener_direction` 1).
    Inbound,
    /// Out of it (2).
    Outbound,
}

/// What the filter knows about a request.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// Direction of the listener.
    pub direction: Direction,
    /// Downstream peer address.
    pub source: IpAddr,
    /// Address the connection was made to.
    pub destination: IpAddr,
    /// Its port.
    pub port: u16,
    /// The mTLS peer's SPIFFE ID (from the verified certificate, never a header).
    pub peer_spiffe: Option<&'a str>,
    /// The HTTP request.
    pub http: HttpRequest<'a>,
}

/// The filter's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through; the policy (or reason) that allowed it.
    Allow(String),
    /// Answer 403; why.
    Deny(String),
}

impl PolicyState {
    /// The identity of an address: longest listed prefix, else world.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        self.hosts
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map_or(NumericIdentity::WORLD.0, |(_, id)| *id)
    }

    /// Judges a request. No policy for the local endpoint (none received yet, or not ours) denies:
    /// the filter fails closed.
    pub fn judge(&self, f: &RequestFacts<'_>) -> Verdict {
        let (local, remote_ip) = match f.direction {
            Direction::Inbound => (f.destination, f.source),
            Direction::Outbound => (f.source, f.destination),
        };
        let Some(ep) = self.endpoints.get(&local) else {
            return Verdict::Deny(format!("no policy for local address {local}"));
        };
        let remote = match (f.direction, f.peer_spiffe) {
            (Direction::Inbound, Some(id)) => match self.spiffe.get(id) {
                Some(identity) => *identity,
                None => self.identity_of(remote_ip),
            },
            _ => self.identity_of(remote_ip),
        };
        let table = match f.direction {
            Direction::Inbound => &ep.ingress,
            Direction::Outbound => &ep.egress,
        };
        if !table.enforced {
            return Verdict::Allow("direction not enforced".into());
        }
        match table.lookup(NumericIdentity(remote), f.port, 6) {
            None => Verdict::Deny(format!(
                "L3/L4: identity {remote} may not reach {} port {}",
                ep.name, f.port
            )),
            Some((_, EntryVerdict::Allow)) => Verdict::Allow("L3/L4 allow".into()),
            Some((_, EntryVerdict::Redirect(sets))) => {
                match first_allowing_http(sets.iter().map(|(_, r)| r), &f.http) {
                    Some(i) => Verdict::Allow(sets[i].0.to_string()),
                    None => Verdict::Deny(format!(
                        "identity {remote}: no HTTP rule of {} allows {} {}",
                        ep.name, f.http.method, f.http.path
                    )),
                }
            }
        }
    }
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

    fn state(path: &str) -> Result<PolicyState, String> {
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
        let np = v1::NetworkPolicy {
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
        };
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
        })
    }

    fn facts<'a>(
        direction: Direction,
        source: &str,
        destination: &str,
        spiffe: Option<&'a str>,
        path: &'a str,
    ) -> RequestFacts<'a> {
        RequestFacts {
            direction,
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            port: 80,
            peer_spiffe: spiffe,
            http: HttpRequest {
                method: "GET",
                path,
                host: "web",
                headers: &NoHeaders,
            },
        }
    }

    #[test]
    fn requests_are_judged_by_identity_and_rules() {
        let st = state("/public.*").unwrap();
        let allowed = |f: RequestFacts<'_>| matches!(st.judge(&f), Verdict::Allow(_));
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
}
