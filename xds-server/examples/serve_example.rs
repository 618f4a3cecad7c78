//! Serves an example directory's policy as xDS on a loopback TCP address, for a standalone Envoy
//! without the agent (benchmarks, filter development): `policy/*.yaml` and `endpoints.yaml`
//! resolved as the agent resolves them (the `membrane-tests` fixture loader), translated by the
//! same functions the agent publishes with.
//!
//! `cargo run -p membrane-xds-server --example serve_example -- DIR ADDR [TRUST_DOMAIN]`
//! Prints `serving N endpoint policies on ADDR` once listening; runs until killed.

use std::collections::BTreeMap;

use ipnet::IpNet;
use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, SPIFFE_IDENTITIES_TYPE};
use membrane_xds_server::ads::{XdsCache, serve_tcp};
use membrane_xds_server::translate;
use prost::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, addr, rest @ ..] = args.as_slice() else {
        eprintln!("usage: serve_example DIR ADDR [TRUST_DOMAIN]");
        std::process::exit(2);
    };
    let trust_domain = rest.first().map_or("cluster.local", String::as_str);
    let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|e| {
        eprintln!("serve_example: {addr:?}: {e}");
        std::process::exit(2)
    });
    assert!(
        addr.ip().is_loopback(),
        "serve_example serves loopback only"
    );
    let example = membrane_tests::example(dir);
    let mut policies = BTreeMap::new();
    let mut prefixes = Vec::new();
    for (name, identity, addresses) in &example.endpoints {
        prefixes.extend(addresses.iter().map(|a| (IpNet::from(*a), *identity)));
        if let Some(table) = example.resolver.table(*identity) {
            let np = translate::network_policy(name, *identity, addresses, table);
            policies.insert(name.clone(), translate::aliased(&np));
        }
    }
    let hosts = translate::network_policy_hosts(prefixes)
        .into_iter()
        .map(|h| (h.identity.to_string(), h.encode_to_vec()))
        .collect();
    let spiffe =
        translate::spiffe_identities(trust_domain, example.resolver.identities().map(|i| &**i));
    let cache = XdsCache::new();
    let count = policies.len();
    cache.set_aliased_resources(NETWORK_POLICY_TYPE, policies);
    cache.set_resources(NETWORK_POLICY_HOSTS_TYPE, hosts);
    cache.set_resources(
        SPIFFE_IDENTITIES_TYPE,
        BTreeMap::from([("spiffe".to_string(), spiffe.encode_to_vec())]),
    );
    let listener = tokio::net::TcpListener::bind(addr).await;
    drop(listener.unwrap_or_else(|e| {
        eprintln!("serve_example: {addr}: {e}");
        std::process::exit(1)
    }));
    println!("serving {count} endpoint policies on {addr}");
    serve_tcp(addr, cache, std::future::pending())
        .await
        .unwrap_or_else(|e| panic!("serve_example: {addr}: {e}"));
}
