//! Golden tests: Cilium's documented policy examples (written as our own YAML in
//! `golden/l3-l4-l7.yaml`) and the verdicts Cilium documents for them. Each case is checked
//! twice: through the trace, and through the resolved tables the datapath and proxy use.

use std::sync::Arc;

use membrane_policy::PolicySet;
use membrane_policy::endpoints::endpoint_labels;
use membrane_policy::identity::{Identity, IdentityAllocator, LocalAllocator, cidr_labels};
use membrane_policy::l7::http::HttpRequest;
use membrane_policy::l7::kafka::{KafkaRequest, api_key_from_name};
use membrane_policy::labels::{LabelSet, Source};
use membrane_policy::resolve::{Resolver, Verdict};
use membrane_policy::rule::{Direction, EnforcementMode, Proto, Rule};
use membrane_policy::trace::{self, Flow, L7Facts, TraceVerdict};

struct World {
    set: PolicySet,
    alloc: LocalAllocator,
    resolver: Resolver,
}

impl World {
    fn new() -> World {
        let text = include_str!("../golden/l3-l4-l7.yaml");
        let set =
            PolicySet::from_sources([("l3-l4-l7.yaml", text)]).expect("golden policy is valid");
        let mut resolver = Resolver::new(EnforcementMode::Default);
        resolver.set_rules(&set.rules);
        let mut alloc = LocalAllocator::new();
        for net in set.cidr_prefixes() {
            let (i, _) = alloc.allocate(&cidr_labels(&net)).unwrap();
            resolver.add_identity(i);
        }
        for i in alloc.identities().cloned().collect::<Vec<_>>() {
            resolver.add_identity(i);
        }
        World {
            set,
            alloc,
            resolver,
        }
    }

    /// `ns/k=v,...`, `ip:A.B.C.D`, or `reserved:...`.
    fn party(&mut self, spec: &str) -> Identity {
        let labels = if let Some(ip) = spec.strip_prefix("ip:") {
            cidr_labels(&ip.parse::<std::net::IpAddr>().unwrap().into())
        } else {
            let (ns, labels) = spec.split_once('/').unwrap_or(("default", spec));
            let l = LabelSet::parse_list(labels, Source::K8s).unwrap();
            endpoint_labels(&l, ns, None, &self.set.namespaces)
        };
        let (identity, new) = self.alloc.allocate(&labels).unwrap();
        if new {
            self.resolver.add_identity(identity.clone());
        }
        if identity.is_endpoint() {
            self.resolver.add_endpoint(identity.id);
        }
        identity
    }
}

fn rules(w: &World) -> Vec<Arc<Rule>> {
    w.set.rules.clone()
}

fn check(
    w: &mut World,
    src: &str,
    dst: &str,
    port: u16,
    proto: Proto,
    l7: L7Facts,
    expected: bool,
) {
    let s = w.party(src);
    let d = w.party(dst);
    let flow = Flow {
        src: &s,
        dst: &d,
        port,
        proto,
        l7: l7.clone(),
    };
    let t = trace::trace(&rules(w), EnforcementMode::Default, &flow);
    assert_eq!(
        t.verdict == TraceVerdict::Allowed,
        expected,
        "trace {src} -> {dst}:{port}/{proto} {l7:?}: {}",
        t.reason
    );
    // The tables must say the same.
    let mut allowed = true;
    for (ep, peer, dir) in [(&s, &d, Direction::Egress), (&d, &s, Direction::Ingress)] {
        let Some(table) = w.resolver.table(ep.id) else {
            continue;
        };
        let table = table.direction(dir);
        if !table.enforced {
            continue;
        }
        allowed &= match table.lookup(peer.id, port, proto) {
            None => false,
            Some((_, e)) => match (&e.verdict, &l7) {
                (Verdict::Allow, _) | (Verdict::Redirect(_), L7Facts::None) => true,
                (
                    Verdict::Redirect(p),
                    L7Facts::Http {
                        method,
                        path,
                        host,
                        headers,
                    },
                ) => p.judge_http(&HttpRequest {
                    method,
                    path,
                    host,
                    headers,
                }),
                (
                    Verdict::Redirect(p),
                    L7Facts::Kafka {
                        api_key,
                        api_version,
                        client_id,
                        topics,
                    },
                ) => {
                    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                    p.judge_kafka(&KafkaRequest {
                        api_key: *api_key,
                        api_version: *api_version,
                        client_id: client_id.as_deref(),
                        topics: Some(&topics),
                    })
                    .is_allowed()
                }
            },
        };
    }
    assert_eq!(
        allowed, expected,
        "tables {src} -> {dst}:{port}/{proto} {l7:?}"
    );
}

fn http(method: &str, path: &str, headers: &[(&str, &str)]) -> L7Facts {
    L7Facts::Http {
        method: method.into(),
        path: path.into(),
        host: "service.default".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn kafka(key: &str, topic: &str) -> L7Facts {
    L7Facts::Kafka {
        api_key: api_key_from_name(key).unwrap(),
        api_version: 5,
        client_id: Some("c".into()),
        topics: vec![topic.into()],
    }
}

#[test]
fn l3_frontend_to_backend() {
    let w = &mut World::new();
    check(
        w,
        "role=frontend",
        "role=backend",
        8080,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "role=frontend",
        "role=backend",
        53,
        Proto::Udp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "role=other",
        "role=backend",
        8080,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
    check(
        w,
        "other-ns/role=frontend",
        "role=backend",
        8080,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
}

#[test]
fn l4_port_for_everyone() {
    let w = &mut World::new();
    check(
        w,
        "ip:203.0.113.7",
        "app=myService",
        80,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "role=x",
        "app=myService",
        80,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "role=x",
        "app=myService",
        80,
        Proto::Udp,
        L7Facts::None,
        false,
    );
    check(
        w,
        "role=x",
        "app=myService",
        8080,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
}

#[test]
fn l7_http_rules() {
    let w = &mut World::new();
    check(
        w,
        "env=prod",
        "app=service",
        80,
        Proto::Tcp,
        http("GET", "/public", &[]),
        true,
    );
    check(
        w,
        "env=prod",
        "app=service",
        80,
        Proto::Tcp,
        http("GET", "/private", &[]),
        false,
    );
    check(
        w,
        "env=prod",
        "app=service",
        80,
        Proto::Tcp,
        http("GET", "/public?x=1", &[]),
        false,
    );
    check(
        w,
        "env=prod",
        "app=service",
        80,
        Proto::Tcp,
        http("POST", "/public", &[]),
        false,
    );
    check(
        w,
        "env=prod",
        "app=service",
        80,
        Proto::Tcp,
        http("PUT", "/avatar/me", &[("X-My-Header", "true")]),
        true,
    );
    check(
        w,
        "env=prod",
        "app=service",
        80,
        Proto::Tcp,
        http("PUT", "/avatar/me", &[("X-My-Header", "false")]),
        false,
    );
    check(
        w,
        "env=dev",
        "app=service",
        80,
        Proto::Tcp,
        http("GET", "/public", &[]),
        false,
    );
}

#[test]
fn requires_only_prod() {
    let w = &mut World::new();
    check(
        w,
        "app=api,env=prod",
        "app=db,env=prod",
        5432,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "app=api,env=dev",
        "app=db,env=prod",
        5432,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
    check(
        w,
        "app=api,env=dev",
        "app=db,env=dev",
        5432,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
}

#[test]
fn egress_world_cidr_and_dns() {
    let w = &mut World::new();
    check(
        w,
        "app=crawler",
        "ip:203.0.113.7",
        443,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "app=crawler",
        "ip:203.0.113.7",
        80,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
    check(
        w,
        "app=crawler",
        "ip:10.1.2.3",
        5000,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "app=crawler",
        "ip:10.96.0.10",
        5000,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
    check(
        w,
        "app=crawler",
        "ip:10.96.0.10",
        53,
        Proto::Udp,
        L7Facts::None,
        true,
    );
    check(
        w,
        "app=crawler",
        "role=backend",
        443,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
}

#[test]
fn kafka_produce_only() {
    let w = &mut World::new();
    check(
        w,
        "app=empire-hq",
        "app=kafka",
        9092,
        Proto::Tcp,
        kafka("produce", "empire-announce"),
        true,
    );
    check(
        w,
        "app=empire-hq",
        "app=kafka",
        9092,
        Proto::Tcp,
        kafka("produce", "deathstar-plans"),
        false,
    );
    check(
        w,
        "app=empire-hq",
        "app=kafka",
        9092,
        Proto::Tcp,
        kafka("fetch", "empire-announce"),
        false,
    );
    check(
        w,
        "app=empire-hq",
        "app=kafka",
        9092,
        Proto::Tcp,
        kafka("apiversions", "empire-announce"),
        true,
    );
}

#[test]
fn network_policy_default_deny() {
    let w = &mut World::new();
    check(
        w,
        "locked/app=a",
        "locked/app=b",
        80,
        Proto::Tcp,
        L7Facts::None,
        false,
    );
    check(
        w,
        "locked/app=a",
        "app=b",
        80,
        Proto::Tcp,
        L7Facts::None,
        true,
    );
}
