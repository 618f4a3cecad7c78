//! Resolution benchmarks: full resolution of 1,000 rules against 10,000 identities (every one of
//! them an endpoint with its own table), the incremental add of one identity, and one trace.
//!
//! The shape: 500 apps in 10 namespaces, 20 identities per app (versions); rule r selects app
//! r%500 and allows ingress from another app on 80/TCP (every fourth with HTTP rules) and egress
//! to a third app on 5432/TCP.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use membrane_policy::PolicySet;
use membrane_policy::identity::{Identity, NumericIdentity};
use membrane_policy::resolve::Resolver;
use membrane_policy::rule::{EnforcementMode, Proto};
use membrane_policy::trace::{self, Flow, L7Facts};

const APPS: usize = 500;
const IDENTITIES: usize = 10_000;
const RULES: usize = 1_000;

fn ns_of(app: usize) -> usize {
    app % 10
}

fn identity(i: usize) -> Identity {
    let app = i % APPS;
    Identity {
        id: NumericIdentity(256 + i as u32),
        labels: format!(
            "app=app{app},version=v{},io.kubernetes.pod.namespace=ns{}",
            i / APPS,
            ns_of(app)
        )
        .parse::<membrane_policy::labels::LabelSet>()
        .expect("valid labels")
        .into(),
    }
}

fn policy_yaml() -> String {
    let mut s = String::new();
    for r in 0..RULES {
        let app = r % APPS;
        let from = (r * 7 + 1) % APPS;
        let to = (r * 13 + 2) % APPS;
        let http = if r % 4 == 0 {
            format!(
                "\n      rules:\n        http:\n        - {{method: GET, path: \"/api/v{r}/.*\"}}\n        - {{method: POST, path: /login}}"
            )
        } else {
            String::new()
        };
        s.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: rule{r}, namespace: ns{}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: app{app}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: app{from}, k8s:io.kubernetes.pod.namespace: ns{}}}}}]\n    toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]{http}\n  egress:\n  - toEndpoints: [{{matchLabels: {{app: app{to}, k8s:io.kubernetes.pod.namespace: ns{}}}}}]\n    toPorts:\n    - ports: [{{port: \"5432\", protocol: TCP}}]\n",
            ns_of(app),
            ns_of(from),
            ns_of(to),
        ));
    }
    s
}

fn full(set: &PolicySet, ids: &[Identity]) -> Resolver {
    // Identities first: rules added afterwards find their matches through the label index instead
    // of every identity being checked against every selector.
    let mut r = Resolver::new(EnforcementMode::Default);
    for i in ids {
        r.add_identity(i.clone());
    }
    r.set_rules(&set.rules);
    for i in ids {
        r.add_endpoint(i.id);
    }
    r
}

fn benches(c: &mut Criterion) {
    let yaml = policy_yaml();
    let set = PolicySet::from_sources([("bench.yaml", yaml.as_str())]).expect("valid policy");
    let ids: Vec<Identity> = (0..IDENTITIES).map(identity).collect();

    let mut g = c.benchmark_group("resolve");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("parse_1000_rules", |b| {
        b.iter(|| {
            PolicySet::from_sources([("bench.yaml", black_box(yaml.as_str()))]).expect("valid")
        })
    });
    g.bench_function("full_1000_rules_10000_identities", |b| {
        b.iter(|| full(black_box(&set), &ids))
    });
    g.finish();

    let mut r = full(&set, &ids);
    let entries: usize = r
        .endpoint_ids()
        .map(|e| {
            let t = r.table(e).expect("table");
            t.ingress.len() + t.egress.len()
        })
        .sum();
    eprintln!(
        "tables: {} endpoints, {entries} keys, {} selectors",
        IDENTITIES,
        r.selector_count()
    );

    let mut g = c.benchmark_group("incremental");
    g.bench_function("add_one_identity_with_its_endpoint", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for n in 0..iters {
                let new = Identity {
                    id: NumericIdentity(900_000),
                    labels: format!("app=app7,version=new{n},io.kubernetes.pod.namespace=ns7")
                        .parse::<membrane_policy::labels::LabelSet>()
                        .expect("labels")
                        .into(),
                };
                let start = Instant::now();
                r.add_identity(new);
                r.add_endpoint(NumericIdentity(900_000));
                total += start.elapsed();
                r.remove_identity(NumericIdentity(900_000));
            }
            total
        })
    });
    g.finish();

    let src = identity(1); // app1
    let dst = identity(0); // app0: rule0 allows ingress from app1 on 80 with HTTP rules
    c.bench_function("trace_one_flow_1000_rules", |b| {
        b.iter(|| {
            trace::trace(
                &set.rules,
                EnforcementMode::Default,
                &Flow {
                    src: &src,
                    dst: &dst,
                    port: 80,
                    proto: Proto::Tcp,
                    l7: L7Facts::Http {
                        method: "GET".into(),
                        path: "/api/v0/x".into(),
                        host: String::new(),
                        headers: vec![],
                    },
                },
            )
        })
    });
}

criterion_group!(resolve, benches);
criterion_main!(resolve);
