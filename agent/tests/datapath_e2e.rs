//! The datapath on real packets: two network namespaces joined to the host by veth pairs, the
//! endpoint programs attached with pinned TCX links, policy resolved from YAML and written into
//! the pinned maps. Needs root; fails loudly without it.
//!
//! Network rule: every address is in 10.250.0.0/16, covered by an `unreachable` route in the
//! host namespace; the namespaces only route that prefix; everything created is removed on drop,
//! also when an assertion fails.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use membrane_agent::datapath::{Datapath, LocalDelivery, sync};
use membrane_agent::netns;
use membrane_bpf::abi::{CtKey, CtValue, EndpointInfo};
use membrane_policy::PolicySet;
use membrane_policy::identity::{IdentityAllocator, LocalAllocator};
use membrane_policy::labels::LabelSet;
use membrane_policy::resolve::Resolver;
use membrane_policy::rule::EnforcementMode;

const PREFIX: &str = "10.250.0.0/16";

fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces, links, routes, servers, the bpffs mount and pins of one test; removed on drop.
struct Lab {
    tag: u32,
    namespaces: Vec<String>,
    routes: Vec<String>,
    servers: Vec<Child>,
    bpffs: PathBuf,
    forwarding_before: String,
}

impl Lab {
    fn new() -> Lab {
        let tag = std::process::id() % 10000;
        let bpffs = std::env::temp_dir().join(format!("membrane-e2e-{tag}"));
        let forwarding_before = fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap_or_default()
            .trim()
            .to_string();
        let lab = Lab {
            tag,
            namespaces: Vec::new(),
            routes: Vec::new(),
            servers: Vec::new(),
            bpffs,
            forwarding_before,
        };
        must(&["ip", "route", "add", "unreachable", PREFIX]);
        must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lab
    }

    fn ns(&self, pod: char) -> String {
        format!("mbrt{}{pod}", self.tag)
    }

    fn host_if(&self, pod: char) -> String {
        format!("mbh{}{pod}", self.tag)
    }

    fn pod_if(&self, pod: char) -> String {
        format!("mbp{}{pod}", self.tag)
    }

    /// A "pod": namespace, veth pair, address, routes. Returns (host veth name, address).
    fn pod(&mut self, name: char, octet: u8) -> (String, String) {
        let (ns, host, pod) = (self.ns(name), self.host_if(name), self.pod_if(name));
        let addr = format!("10.250.0.{octet}");
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", &pod, "netns", &ns,
        ]);
        must(&["ip", "link", "set", &host, "up"]);
        must(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{host}.proxy_arp=1"),
        ]);
        must(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.neigh.{host}.proxy_delay=0"),
        ]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        must(&["ip", "-n", &ns, "link", "set", &pod, "up"]);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            &pod,
        ]);
        // Only the test prefix is routed out of the pod; nothing else can leave it.
        must(&["ip", "-n", &ns, "route", "add", PREFIX, "dev", &pod]);
        must(&["ip", "route", "add", &format!("{addr}/32"), "dev", &host]);
        self.routes.push(format!("{addr}/32"));
        (host, addr)
    }

    /// A TCP server in the pod's namespace that answers "ok" on each port.
    fn serve(&mut self, name: char, addr: &str, ports: &[u16]) {
        let ns = self.ns(name);
        let code = common::server_code(addr, ports, &[]);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", &code])
            .spawn()
            .expect("python3 runs");
        self.servers.push(child);
        sleep(Duration::from_millis(500));
    }

    /// Whether a TCP connection from the pod gets the server's answer within a second.
    fn connects(&self, from: char, addr: &str, port: u16) -> bool {
        let ns = self.ns(from);
        let code = common::client_code(addr, port);
        common::sh(&["ip", "netns", "exec", &ns, "python3", "-c", &code])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        common::remove_bpffs(&self.bpffs);
        let _ = fs::remove_dir(&self.bpffs);
        for ns in &self.namespaces {
            common::sh(&["ip", "netns", "del", ns]);
        }
        for r in &self.routes {
            common::sh(&["ip", "route", "del", r]);
        }
        common::sh(&["ip", "route", "del", "unreachable", PREFIX]);
        common::sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_forward={}", self.forwarding_before),
        ]);
    }
}

/// `membrane ARGS --bpf-root <the lab's bpffs> -o json`.
fn membrane(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_membrane"));
    c.args(args)
        .arg("--bpf-root")
        .arg(&lab.bpffs)
        .args(["-o", "json"]);
    c
}

fn json(mut c: Command) -> serde_json::Value {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tx_packets(ifname: &str) -> u64 {
    fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/tx_packets"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn ifindex(name: &str) -> u32 {
    fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b-ingress}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: a}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n";
const DENY_ALL: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b-ingress}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress: [{}]\n";

#[test]
fn enforces_resolved_policy_on_real_traffic_and_survives_the_loader() {
    common::require_root();
    let mut lab = Lab::new();
    let (a_if, a_ip) = lab.pod('a', 1);
    let (b_if, b_ip) = lab.pod('b', 2);
    lab.serve('b', &b_ip, &[8080, 8081]);
    lab.serve('a', &a_ip, &[7070]);
    assert!(
        lab.connects('a', &b_ip, 8080),
        "no policy yet: the pods talk"
    );

    // Identities and tables, as the agent computes them.
    let mut alloc = LocalAllocator::new();
    let id_a = alloc
        .allocate(
            &"app=a,io.kubernetes.pod.namespace=default"
                .parse::<LabelSet>()
                .unwrap(),
        )
        .unwrap()
        .0;
    let id_b = alloc
        .allocate(
            &"app=b,io.kubernetes.pod.namespace=default"
                .parse::<LabelSet>()
                .unwrap(),
        )
        .unwrap()
        .0;
    let mut resolver = Resolver::new(EnforcementMode::Default);
    resolver.set_rules(&PolicySet::from_sources([("p.yaml", POLICY)]).unwrap().rules);
    resolver.add_identity(id_a.clone());
    resolver.add_identity(id_b.clone());
    resolver.add_endpoint(id_a.id);
    resolver.add_endpoint(id_b.id);

    let mut dp = Datapath::load(&lab.bpffs).expect("datapath loads");
    for (ip, id, ep) in [(&a_ip, &id_a, 1), (&b_ip, &id_b, 2)] {
        dp.set_ipcache(format!("{ip}/32").parse().unwrap(), id.id.0, ep)
            .unwrap();
    }
    // The reconcile pass writes only what drifted.
    let desired: Vec<(ipnet::IpNet, u32, u32)> = vec![
        (format!("{a_ip}/32").parse().unwrap(), id_a.id.0, 1),
        (format!("{b_ip}/32").parse().unwrap(), id_b.id.0, 2),
        ("fd00:beef::/64".parse().unwrap(), 16_777_300, 0),
    ];
    assert_eq!(
        dp.ensure_ipcache(&desired).unwrap(),
        1,
        "only the new v6 prefix"
    );
    assert_eq!(dp.ensure_ipcache(&desired).unwrap(), 0, "nothing drifted");
    dp.remove_ipcache(desired[1].0).unwrap();
    dp.set_ipcache(desired[2].0, 2, 0).unwrap();
    assert_eq!(
        dp.ensure_ipcache(&desired).unwrap(),
        2,
        "a deleted entry and a changed one are repaired"
    );
    // A prefix nobody asked for (written by something else) is deleted.
    dp.set_ipcache("10.250.7.0/24".parse().unwrap(), 2, 0)
        .unwrap();
    assert_eq!(dp.ensure_ipcache(&desired).unwrap(), 1, "the stray prefix");
    assert_eq!(dp.ensure_ipcache(&desired).unwrap(), 0);
    dp.remove_ipcache(desired[2].0).unwrap();
    let delivery = |pod: char, ip: &str| LocalDelivery {
        addresses: vec![ip.parse().unwrap()],
        mac: netns::mac(Some(&lab.ns(pod)), &lab.pod_if(pod)).unwrap(),
        host_mac: netns::mac(None, &lab.host_if(pod)).unwrap(),
    };
    let deliveries = [delivery('a', &a_ip), delivery('b', &b_ip)];
    let write = |dp: &mut Datapath, resolver: &Resolver| {
        for ((ep, ifname, id), delivery) in [(1u32, &a_if, &id_a), (2, &b_if, &id_b)]
            .into_iter()
            .zip(&deliveries)
        {
            let table = resolver.table(id.id).unwrap();
            let info = EndpointInfo {
                endpoint_id: ep,
                identity: id.id.0,
                flags: sync::enforcement_flags(table),
                pad: 0,
            };
            dp.set_endpoint(ifindex(ifname), info, delivery).unwrap();
            assert_eq!(
                dp.set_endpoint(ifindex(ifname), info, delivery).unwrap(),
                0,
                "written once, then nothing drifted"
            );
            dp.sync_policy(
                ep,
                &sync::policy_entries(ep, table, sync::L7Enforcer::Proxy, |_| 0),
            )
            .unwrap();
        }
    };
    write(&mut dp, &resolver);
    dp.attach_endpoint(&a_if).unwrap();
    dp.attach_endpoint(&b_if).unwrap();

    assert!(lab.connects('a', &b_ip, 8080), "allowed by b-ingress");

    // Between endpoints, packets go straight into the receiver (bpf_redirect_peer): b's host
    // veth transmits none of them, and they arrive one hop older, with valid checksums (the
    // kernel drops a bad IPv4 header checksum; ping would time out).
    let b_host_tx = tx_packets(&b_if);
    assert!(lab.connects('a', &b_ip, 8080), "allowed, delivered locally");
    let echo = Command::new("ip")
        .args(["netns", "exec", &lab.ns('b'), "python3", "-c"])
        .arg(common::icmp_echo_ttls_code(&a_ip, 20))
        .output()
        .unwrap();
    let ttls = String::from_utf8_lossy(&echo.stdout);
    assert_eq!(
        ttls.lines().filter(|l| *l == "63").count(),
        20,
        "b reaches a (a's ingress is not enforced), one hop: {ttls} {}",
        String::from_utf8_lossy(&echo.stderr)
    );
    let sent_by_host = tx_packets(&b_if) - b_host_tx;
    assert!(
        sent_by_host < 5,
        "{sent_by_host} packets went through b's host veth: not delivered locally"
    );
    // A packet denied by the receiver's ingress policy, judged in the sender's program: the
    // drop is the receiver's, as if its own program had judged it.
    let monitor = membrane(&lab, &["monitor", "--timeout", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(300));
    assert!(!lab.connects('a', &b_ip, 8081), "8081 is not allowed");

    // What the CLI shows of the maps and events.
    let events = String::from_utf8(monitor.wait_with_output().unwrap().stdout).unwrap();
    let dropped = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["dport"] == 8081 && e["verdict"] == "dropped")
        .unwrap_or_else(|| panic!("no event for the denied connection in {events}"));
    assert_eq!(
        (dropped["verdict"].as_str(), dropped["drop_code"].as_i64()),
        (Some("dropped"), Some(-133))
    );
    assert_eq!(
        (
            dropped["src_identity"].as_u64(),
            dropped["dst_identity"].as_u64()
        ),
        (Some(id_a.id.0.into()), Some(id_b.id.0.into()))
    );
    assert_eq!(dropped["direction"], "ingress");

    let ipcache = json(membrane(&lab, &["bpf", "ipcache", "list"]));
    assert!(
        ipcache
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["prefix"] == format!("{b_ip}/32") && e["identity"] == id_b.id.0)
    );
    let local = json(membrane(&lab, &["bpf", "endpoint", "list"]));
    assert_eq!(
        local,
        serde_json::json!([
            {"address": a_ip, "endpoint_id": 1, "identity": id_a.id.0, "ifindex": ifindex(&a_if),
             "mac": deliveries[0].mac.to_string(), "host_mac": deliveries[0].host_mac.to_string(),
             "enforced": []},
            {"address": b_ip, "endpoint_id": 2, "identity": id_b.id.0, "ifindex": ifindex(&b_if),
             "mac": deliveries[1].mac.to_string(), "host_mac": deliveries[1].host_mac.to_string(),
             "enforced": ["ingress"]},
        ])
    );
    // An entry for an address no endpoint has (left by an interrupted removal) is pruned.
    {
        let stray = membrane_bpf::abi::LocalEndpoint {
            ifindex: 999_999,
            ..Default::default()
        };
        let data = aya::maps::MapData::from_pin(lab.bpffs.join(membrane_bpf::maps::LOCAL)).unwrap();
        let mut m = aya::maps::HashMap::<_, membrane_bpf::abi::LocalKey, _>::try_from(
            aya::maps::Map::HashMap(data),
        )
        .unwrap();
        let key = membrane_bpf::abi::LocalKey::of("10.250.0.99".parse().unwrap());
        m.insert(key, stray, 0).unwrap();
    }
    let addresses: Vec<std::net::IpAddr> = deliveries
        .iter()
        .flat_map(|d| d.addresses.clone())
        .collect();
    assert_eq!(dp.prune_local(&addresses).unwrap(), 1, "the stray entry");
    assert_eq!(
        dp.prune_local(&addresses).unwrap(),
        0,
        "the endpoints' own stay"
    );
    let policy = json(membrane(&lab, &["bpf", "policy", "get", "2"]));
    assert_eq!(
        policy,
        serde_json::json!([{"direction": "ingress", "identity": id_a.id.0, "port": 8080, "protocol": 6, "action": "allow", "proxy_port": 0}])
    );
    let ct = json(membrane(&lab, &["bpf", "ct", "list"]));
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|e| e["dport"] == 8080 && e["src"] == a_ip.as_str() && e["replied"] == true),
        "{ct}"
    );

    // The loader goes away: pinned links and maps keep enforcing.
    drop(dp);
    assert!(
        lab.connects('a', &b_ip, 8080),
        "still allowed without the loader"
    );
    assert!(
        !lab.connects('a', &b_ip, 8081),
        "still denied without the loader (no fail-open)"
    );

    // Pins as an agent of an older datapath ABI would have left them: a map, and a link.
    let abi = membrane_bpf::abi::ABI_VERSION;
    let old_map = lab.bpffs.join("mbr_ct_v1");
    aya::maps::MapData::from_pin(lab.bpffs.join(membrane_bpf::maps::CT))
        .unwrap()
        .pin(&old_map)
        .unwrap();
    let link_pin = |v: u32| lab.bpffs.join(format!("links/{a_if}_ingress_v{v}"));
    let old_link = link_pin(1);
    aya::programs::links::FdLink::from(
        aya::programs::links::PinnedLink::from_pin(link_pin(abi)).unwrap(),
    )
    .pin(&old_link)
    .unwrap();

    // A new loader reuses the pinned maps and swaps the programs in place.
    let mut dp = Datapath::load(&lab.bpffs).expect("datapath reloads");
    dp.attach_endpoint(&a_if).unwrap();
    dp.attach_endpoint(&b_if).unwrap();
    assert!(lab.connects('a', &b_ip, 8080), "allowed after the reload");
    // Then the other ABI's pins go, and only those.
    let mut removed = dp.remove_other_abi_pins().unwrap();
    removed.sort();
    let mut expected = vec![old_map.clone(), old_link.clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(!old_map.exists() && !old_link.exists());
    assert!(link_pin(abi).exists());
    assert!(lab.bpffs.join(membrane_bpf::maps::CT).exists());
    assert!(lab.connects('a', &b_ip, 8080), "still allowed");
    assert!(!lab.connects('a', &b_ip, 8081), "still denied");

    // A policy change reaches the maps: b now accepts nothing.
    resolver.set_rules(
        &PolicySet::from_sources([("p.yaml", DENY_ALL)])
            .unwrap()
            .rules,
    );
    write(&mut dp, &resolver);
    assert!(
        !lab.connects('a', &b_ip, 8080),
        "denied after the policy change"
    );
    assert!(
        lab.connects('b', &a_ip, 7070),
        "b's egress and a's ingress are not enforced"
    );

    // Connection-tracking GC: an expired entry goes, a live one stays.
    let ct_map = || {
        let data = aya::maps::MapData::from_pin(lab.bpffs.join(membrane_bpf::maps::CT))
            .expect("the pinned CT map");
        aya::maps::HashMap::<_, CtKey, CtValue>::try_from(aya::maps::Map::LruHashMap(data))
            .expect("an LRU hash")
    };
    let key = |port: u16| CtKey {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: port,
        dport: port,
        proto: 17,
        family: 4,
        pad: 0,
        endpoint_id: 0,
    };
    let now = membrane_agent::datapath::monotonic_ns();
    let mut ct = ct_map();
    for (port, expires_ns) in [(1, now - 1), (2, now + 3_600_000_000_000)] {
        let value = CtValue {
            expires_ns,
            ..CtValue::default()
        };
        ct.insert(key(port), value, 0).unwrap();
    }
    let deleted = dp.gc_ct(now).unwrap();
    assert!(deleted >= 1, "the expired entry was deleted");
    let ct = ct_map();
    assert!(ct.get(&key(1), 0).is_err(), "expired: gone");
    assert!(ct.get(&key(2), 0).is_ok(), "live: kept");

    dp.detach_endpoint(&a_if).unwrap();
    dp.detach_endpoint(&b_if).unwrap();
    assert!(lab.connects('a', &b_ip, 8081), "detached: no enforcement");
}
