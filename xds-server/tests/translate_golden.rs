//! The resources for the Star Wars example, compared with `tests/golden/starwars.txt`
//! (`BLESS=1 cargo test -p membrane-xds-server` rewrites it; review the diff).

use std::fmt::Write as _;

use ipnet::IpNet;
use membrane_api::v1;
use membrane_xds_server::translate::{network_policy, network_policy_hosts, spiffe_identities};

fn render_direction(out: &mut String, name: &str, d: &v1::DirectionPolicy) {
    let _ = writeln!(out, "  {name} enforced={}", d.enforced);
    for e in &d.entries {
        let _ = write!(
            out,
            "    id={} port={} proto={}",
            e.remote_identity, e.port, e.protocol
        );
        if e.l7.is_empty() {
            out.push_str(" allow\n");
            continue;
        }
        out.push_str(" redirect\n");
        for set in &e.l7 {
            let _ = writeln!(out, "      [{}] {:?}", set.policy, set.rules);
        }
    }
}

#[test]
fn starwars_resources_are_as_recorded() {
    let example = membrane_tests::starwars();
    let mut got = String::new();
    for (name, id, ips) in &example.endpoints {
        let table = example.resolver.table(*id).expect("a table per endpoint");
        let np = network_policy(name, *id, ips, table);
        let _ = writeln!(
            got,
            "NetworkPolicy {} identity={} addresses={:?}",
            np.endpoint, np.identity, np.addresses
        );
        render_direction(&mut got, "ingress", np.ingress.as_ref().unwrap());
        render_direction(&mut got, "egress", np.egress.as_ref().unwrap());
    }
    let prefixes = example
        .endpoints
        .iter()
        .flat_map(|(_, id, ips)| ips.iter().map(move |ip| (IpNet::from(*ip), *id)));
    for h in network_policy_hosts(prefixes) {
        let _ = writeln!(
            got,
            "NetworkPolicyHosts {} {:?}",
            h.identity, h.host_addresses
        );
    }
    let spiffe = spiffe_identities("cluster.local", example.resolver.identities().map(|i| &**i));
    for (k, v) in &spiffe.identities {
        let _ = writeln!(got, "SpiffeIdentities {k} -> {v}");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/starwars.txt");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).expect("golden file (BLESS=1 writes it)");
    for (g, w) in got.lines().zip(want.lines()) {
        assert_eq!(g, w);
    }
    assert_eq!(got.lines().count(), want.lines().count());
}
