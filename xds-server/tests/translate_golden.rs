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

/// The init policy `membrane istio manifests` ships, resolved as the agent resolves it and served
/// as `reserved:init`: what a sidecar reads back lets a pod still in `reserved:init` reach istiod
/// and DNS, be reached from the node, and nothing else.
#[test]
fn the_shipped_init_policy_is_served_as_reserved_init() {
    use membrane_api::{DirectionRules, EntryVerdict, INIT_POLICY};
    use membrane_policy::identity::NumericIdentity;
    use membrane_xds_server::translate::init_policy;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policy")).unwrap();
    let settings = membrane_istio::Settings::default();
    std::fs::write(
        dir.path().join("policy/init.yaml"),
        membrane_istio::init_policy_document(&settings).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("endpoints.yaml"),
        "endpoints:\n\
         - {name: istiod, namespace: istio-system, labels: {app: istiod}, ips: [10.0.0.2]}\n\
         - {name: web, namespace: default, labels: {app: web}, ips: [10.0.0.3]}\n",
    )
    .unwrap();
    let mut example = membrane_tests::example(dir.path());
    example.resolver.add_endpoint(NumericIdentity::INIT);
    let np = init_policy(example.resolver.table(NumericIdentity::INIT).unwrap());
    assert_eq!(
        (np.endpoint.as_str(), np.identity),
        (INIT_POLICY, NumericIdentity::INIT.0)
    );
    assert!(np.addresses.is_empty(), "{np:?}");

    let id = |name: &str| {
        example
            .endpoints
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, id, _)| *id)
            .unwrap()
    };
    let egress = DirectionRules::from_wire(np.egress.as_ref().unwrap()).unwrap();
    let ingress = DirectionRules::from_wire(np.ingress.as_ref().unwrap()).unwrap();
    assert!(egress.enforced && ingress.enforced);
    let allows = |d: &DirectionRules, peer: NumericIdentity, port: u16, proto: u8| {
        matches!(d.lookup(peer, port, proto), Some((_, EntryVerdict::Allow)))
    };
    assert!(allows(&egress, id("istiod"), 15012, 6), "istiod's xDS");
    assert!(
        allows(&egress, id("istiod"), 443, 6),
        "any port in Istio's namespace"
    );
    assert!(
        allows(&egress, NumericIdentity::WORLD, 53, 17),
        "DNS anywhere"
    );
    assert!(allows(&egress, id("web"), 53, 17), "DNS anywhere");
    assert!(!allows(&egress, id("web"), 80, 6), "other pods");
    assert!(
        !allows(&egress, NumericIdentity::WORLD, 53, 6),
        "DNS is UDP"
    );
    assert!(
        allows(&ingress, NumericIdentity::HOST, 15021, 6),
        "the node"
    );
    assert!(!allows(&ingress, id("istiod"), 80, 6), "no one else");
}
