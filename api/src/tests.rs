use membrane_policy::l7::http::{HttpRequest, NoHeaders};
use membrane_policy::l7::kafka::KafkaRequest;
use membrane_policy::resolve::{first_allowing_http, judge_kafka_sets};
use membrane_policy::rule::Direction;
use prost::Message;

use super::*;

#[test]
fn a_table_read_back_from_its_resource_decides_every_flow_as_the_engine_does() {
    let example = membrane_tests::starwars();
    let resolver = &example.resolver;
    let ids: Vec<NumericIdentity> = example.endpoints.iter().map(|(_, id, _)| *id).collect();
    let requests = [
        ("POST", "/v1/request-landing"),
        ("GET", "/v1/status"),
        ("PUT", "/v1/exhaust-port"),
    ];
    let kafka = [
        (0, Some("empire-announce")),
        (1, Some("empire-announce")),
        (0, Some("deathstar-plans")),
        (3, None),
    ];
    let mut redirects = 0;
    let mut judged = 0;
    for &endpoint in &ids {
        let table = resolver.table(endpoint).unwrap();
        for dir in [Direction::Ingress, Direction::Egress] {
            let engine = table.direction(dir);
            // Through the wire: encode, decode, compile.
            let bytes = direction_policy(engine).encode_to_vec();
            let wire = v1::DirectionPolicy::decode(bytes.as_slice()).unwrap();
            let read = DirectionRules::from_wire(&wire).unwrap();
            assert_eq!(read.enforced, engine.enforced);
            let remotes = ids.iter().copied().chain([
                NumericIdentity::WORLD,
                NumericIdentity(1),
                NumericIdentity(9999),
            ]);
            for remote in remotes {
                for port in [0, 53, 80, 443, 8080, 9092] {
                    for proto in [6u8, 17] {
                        let proto_kind = if proto == 6 {
                            membrane_policy::rule::Proto::Tcp
                        } else {
                            membrane_policy::rule::Proto::Udp
                        };
                        let want = engine.lookup(remote, port, proto_kind);
                        let got = read.lookup(remote, port, proto);
                        assert_eq!(
                            want.as_ref().map(|(k, _)| *k),
                            got.map(|(k, _)| k),
                            "{endpoint:?} {dir:?} from {remote:?} to {port}/{proto}"
                        );
                        let (Some((_, eff)), Some((_, verdict))) = (want, got) else {
                            continue;
                        };
                        match (&eff.verdict, verdict) {
                            (Verdict::Allow, EntryVerdict::Allow) => {}
                            (Verdict::Redirect(l7), EntryVerdict::Redirect(sets)) => {
                                redirects += 1;
                                for (method, path) in requests {
                                    let req = HttpRequest {
                                        method,
                                        path,
                                        host: "deathstar",
                                        headers: &NoHeaders,
                                    };
                                    let read_allows =
                                        first_allowing_http(sets.iter().map(|(_, r)| r), &req)
                                            .is_some();
                                    assert_eq!(l7.judge_http(&req), read_allows, "{method} {path}");
                                    judged += 1;
                                }
                                for (key, topic) in kafka {
                                    let topics = topic.map(|t| vec![t]);
                                    let req = KafkaRequest {
                                        api_key: key,
                                        api_version: 3,
                                        client_id: None,
                                        topics: topics.as_deref(),
                                    };
                                    let read_verdict =
                                        judge_kafka_sets(sets.iter().map(|(_, r)| r), &req);
                                    assert_eq!(l7.judge_kafka(&req), read_verdict);
                                    judged += 1;
                                }
                            }
                            (a, _) => panic!("verdicts differ: engine {a:?}"),
                        }
                    }
                }
            }
        }
    }
    assert!(
        redirects > 0 && judged > 20,
        "{redirects} redirects, {judged} judgments"
    );
}

#[test]
fn bad_resources_are_refused_with_where() {
    let entry = |l7: Vec<v1::L7RuleSet>| v1::DirectionPolicy {
        enforced: true,
        entries: vec![v1::PolicyEntry {
            remote_identity: 0,
            port: 80,
            protocol: 6,
            l7,
        }],
    };
    let http = |path: &str| v1::L7RuleSet {
        policy: "p".into(),
        rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules {
            rules: vec![v1::HttpRule {
                path: path.into(),
                ..Default::default()
            }],
        })),
    };
    let err = DirectionRules::from_wire(&entry(vec![http("/ok"), http("(")])).unwrap_err();
    assert!(err.starts_with("entries[0].l7[1]: http[0].path"), "{err}");
    let empty = v1::L7RuleSet {
        policy: "p".into(),
        rules: None,
    };
    let err = DirectionRules::from_wire(&entry(vec![empty])).unwrap_err();
    assert!(err.contains("neither http nor kafka"), "{err}");
    let kafka = v1::L7RuleSet {
        policy: "p".into(),
        rules: Some(v1::l7_rule_set::Rules::Kafka(v1::KafkaRules {
            rules: vec![v1::KafkaRule {
                role: "produce".into(),
                api_key: "fetch".into(),
                ..Default::default()
            }],
        })),
    };
    let err = DirectionRules::from_wire(&entry(vec![kafka])).unwrap_err();
    assert!(err.contains("mutually exclusive"), "{err}");
    let mut bad_port = entry(vec![]);
    bad_port.entries[0].port = 70000;
    assert!(
        DirectionRules::from_wire(&bad_port)
            .unwrap_err()
            .contains("port")
    );
    let mut dup = entry(vec![]);
    dup.entries.push(dup.entries[0].clone());
    assert!(
        DirectionRules::from_wire(&dup)
            .unwrap_err()
            .contains("duplicate")
    );
}
