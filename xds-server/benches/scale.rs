//! xDS at scale (issue 6's target): 10,000 identities and 1,000 endpoints served to 100 subscribed
//! ADS streams over the unix socket; each policy change must be acknowledged by every stream with
//! p99 under 500 ms. Each client decodes every response (as the wasm filter does) and ACKs it.
//! Two runs: streams subscribed to their own endpoint's policy by its address (what a sidecar
//! with Istio's INSTANCE_IPS does; the target) and streams subscribed to every endpoint's policy
//! (a filter that knows no address). Either way every stream gets and acknowledges every new
//! version, and the hosts map (10,000 identities) goes to all.
//!
//! `cargo bench -p membrane-xds-server --bench scale` (full size; prints `XDS-BENCH` and MET/MISS);
//! `MEMBRANE_BENCH_SMOKE=1` runs a small size once, as the test suite does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, v1};
use membrane_xds_server::ads::{XdsCache, serve_unix};
use membrane_xds_server::client::AdsClient;
use prost::Message;

struct Size {
    identities: u32,
    endpoints: u32,
    clients: usize,
    changes: usize,
}

/// An endpoint's policy: 20 remote identities allowed on port 80, one of them with HTTP rules;
/// `generation` changes one rule so that every change is a real one.
fn endpoint_policy(i: u32, identities: u32, generation: usize) -> Vec<u8> {
    let entries = (0..20)
        .map(|k| v1::PolicyEntry {
            remote_identity: 256 + (i * 7 + k) % identities,
            port: 80,
            protocol: 6,
            l7: if k == 0 {
                vec![v1::L7RuleSet {
                    policy: format!("CiliumNetworkPolicy default/p{i}"),
                    rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules {
                        rules: vec![v1::HttpRule {
                            method: "GET".into(),
                            path: format!("/v{generation}/.*"),
                            ..Default::default()
                        }],
                    })),
                }]
            } else {
                vec![]
            },
        })
        .collect();
    v1::NetworkPolicy {
        endpoint: format!("ep-{i}"),
        identity: 256 + i,
        addresses: vec![address(i)],
        ingress: Some(v1::DirectionPolicy {
            enforced: true,
            entries,
        }),
        egress: Some(v1::DirectionPolicy::default()),
    }
    .encode_to_vec()
}

fn hosts(identities: u32) -> BTreeMap<String, Vec<u8>> {
    (0..identities)
        .map(|i| {
            let h = v1::NetworkPolicyHosts {
                identity: 256 + i,
                host_addresses: vec![format!(
                    "10.{}.{}.{}/32",
                    100 + i / 65536,
                    (i / 256) % 256,
                    i % 256
                )],
            };
            (h.identity.to_string(), h.encode_to_vec())
        })
        .collect()
}

fn main() {
    // `cargo bench` passes --bench; anything else is ignored.
    let smoke = std::env::var_os("MEMBRANE_BENCH_SMOKE").is_some();
    let size = if smoke {
        Size {
            identities: 1_000,
            endpoints: 100,
            clients: 10,
            changes: 3,
        }
    } else {
        Size {
            identities: 10_000,
            endpoints: 1_000,
            clients: 100,
            changes: 50,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        run(&size, smoke, true).await;
        if !smoke {
            run(&size, smoke, false).await;
        }
    });
}

fn address(i: u32) -> String {
    format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
}

async fn run(size: &Size, smoke: bool, by_address: bool) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xds.sock");
    let cache = XdsCache::new();
    let served = |i: u32, generation| {
        (
            endpoint_policy(i, size.identities, generation),
            vec![address(i)],
        )
    };
    let mut policies: BTreeMap<String, (Vec<u8>, Vec<String>)> = (0..size.endpoints)
        .map(|i| (format!("ep-{i}"), served(i, 0)))
        .collect();
    cache.set_aliased_resources(NETWORK_POLICY_TYPE, policies.clone());
    cache.set_resources(NETWORK_POLICY_HOSTS_TYPE, hosts(size.identities));
    let server = cache.clone();
    let path = socket.clone();
    tokio::spawn(async move { serve_unix(&path, server, std::future::pending()).await });
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Clients: subscribe to both types, decode everything, ACK.
    let t0 = Instant::now();
    for c in 0..size.clients {
        let mut client = AdsClient::connect_unix(&socket, &format!("sidecar-{c}"))
            .await
            .unwrap();
        let own = if by_address {
            vec![address(c as u32 % size.endpoints)]
        } else {
            Vec::new()
        };
        tokio::spawn(async move {
            let own: Vec<&str> = own.iter().map(String::as_str).collect();
            client
                .send(NETWORK_POLICY_TYPE, &own, "", "", None)
                .await
                .unwrap();
            client
                .send(NETWORK_POLICY_HOSTS_TYPE, &[], "", "", None)
                .await
                .unwrap();
            while let Ok(Some(resp)) = client.next(Duration::from_secs(3600)).await {
                for r in &resp.resources {
                    if resp.type_url == NETWORK_POLICY_TYPE {
                        v1::NetworkPolicy::decode(r.value.as_slice()).unwrap();
                    } else {
                        v1::NetworkPolicyHosts::decode(r.value.as_slice()).unwrap();
                    }
                }
                let names = if resp.type_url == NETWORK_POLICY_TYPE {
                    &own[..]
                } else {
                    &[]
                };
                if client.ack(&resp, names).await.is_err() {
                    break;
                }
            }
        });
    }
    let version = cache.version(NETWORK_POLICY_TYPE);
    loop {
        cache
            .wait_all_acked(NETWORK_POLICY_TYPE, version, Duration::from_secs(120))
            .await
            .expect("every client acknowledges the first push");
        if cache.statuses(NETWORK_POLICY_TYPE).len() == size.clients {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let initial = t0.elapsed();
    let mut latencies = Vec::new();
    for g in 1..=size.changes {
        let ep = format!("ep-{}", g % size.endpoints as usize);
        let i = (g % size.endpoints as usize) as u32;
        policies.insert(ep.clone(), served(i, g));
        let t = Instant::now();
        let v = cache.set_aliased_resources(NETWORK_POLICY_TYPE, policies.clone());
        cache
            .wait_all_acked(NETWORK_POLICY_TYPE, v, Duration::from_secs(30))
            .await
            .expect("every client acknowledges the change");
        assert!(
            !cache.subscribers(NETWORK_POLICY_TYPE, &ep).is_empty(),
            "{ep} is subscribed to"
        );
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let q = |f: f64| latencies[((latencies.len() - 1) as f64 * f).round() as usize];
    let (p50, p99) = (q(0.5), q(0.99));
    let mode = if by_address {
        "own endpoint by address"
    } else {
        "every endpoint"
    };
    println!(
        "xds scale ({mode}): {} identities, {} endpoints, {} streams; all connected, served and \
         acknowledged in {:.0} ms; {} changes: p50 {:.1} ms, p99 {:.1} ms",
        size.identities,
        size.endpoints,
        size.clients,
        initial.as_secs_f64() * 1e3,
        size.changes,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    if !smoke {
        let met = p99 < Duration::from_millis(500);
        println!(
            "{} ({mode}) policy change acknowledged by every stream, p99 < 500 ms: {:.1} ms",
            if met { "MET " } else { "MISS" },
            p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "XDS-BENCH subscription={} identities={} endpoints={} streams={} p50_ms={:.1} p99_ms={:.1} load={}",
        if by_address { "own" } else { "all" },
        size.identities,
        size.endpoints,
        size.clients,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
