//! L7 matcher benchmarks: judging one request against a port's compiled rules, the per-request
//! work the proxy and the wasm filter do.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use membrane_policy::l7::http::{HeaderMatch, HttpRequest, HttpRule, HttpRules, Pattern};
use membrane_policy::l7::kafka::{self, KafkaRequest, KafkaRule, PRODUCE_KEYS};

fn http_rules() -> HttpRules {
    // Ten rules with path regexes, as in the proxy benchmark's rule set.
    let rules = (0..10)
        .map(|i| HttpRule {
            index: i,
            method: Some(Pattern::new(if i % 2 == 0 { "GET" } else { "GET|POST" }).unwrap()),
            path: Some(Pattern::new(&format!("/api/v{i}/(users|orders)/[0-9]+(\\?.*)?")).unwrap()),
            host: None,
            headers: if i == 9 {
                vec![HeaderMatch::parse("X-Tenant: blue").unwrap()]
            } else {
                vec![]
            },
        })
        .collect();
    HttpRules::new(rules).unwrap()
}

fn benches(c: &mut Criterion) {
    let rules = http_rules();
    let headers = [("x-tenant", "blue"), ("user-agent", "wrk")];
    let allowed_last = HttpRequest {
        method: "POST",
        path: "/api/v9/orders/12345?x=1",
        host: "shop",
        headers: &headers,
    };
    let denied = HttpRequest {
        method: "DELETE",
        path: "/api/v3/users/1",
        host: "shop",
        headers: &headers,
    };
    c.bench_function("http_10_rules_allowed_by_last", |b| {
        b.iter(|| rules.first_match(black_box(&allowed_last)))
    });
    c.bench_function("http_10_rules_denied", |b| {
        b.iter(|| rules.first_match(black_box(&denied)))
    });

    let kafka_rules: Vec<KafkaRule> = ["a", "b", "c", "empire-announce"]
        .iter()
        .enumerate()
        .map(|(i, t)| KafkaRule {
            index: i,
            role: None,
            api_key: None,
            api_keys: PRODUCE_KEYS.to_vec(),
            api_version: None,
            client_id: None,
            topic: Some(t.to_string()),
        })
        .collect();
    let topics = ["empire-announce"];
    let produce = KafkaRequest {
        api_key: 0,
        api_version: 9,
        client_id: Some("producer-1"),
        topics: Some(&topics),
    };
    c.bench_function("kafka_4_rules_produce", |b| {
        b.iter(|| kafka::judge(&kafka_rules, black_box(&produce)))
    });
}

criterion_group!(l7, benches);
criterion_main!(l7);
