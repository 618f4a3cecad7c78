//! Packet-level tests of the datapath programs: crafted packets run through the real verifier-
//! loaded programs with BPF_PROG_TEST_RUN. They need root (CAP_BPF); without it they fail loudly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use membrane_bpf::abi::{
    self, CtKey, CtValue, EndpointInfo, Event, IpcacheValue, LocalEndpoint, LocalKey, MetricsKey,
    MetricsValue, PolicyKey, PolicyValue, RevisionValue,
};
use membrane_bpf::{OBJECT, maps, programs};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_TEST_RUN runs sched_cls programs on the loopback device.
const LO: u32 = 1;
const EP: u32 = 7;
const EP_IDENTITY: u32 = 300;

fn load() -> Ebpf {
    assert!(
        !OBJECT.is_empty(),
        "membrane-bpf was built without clang (stub object): install clang-19"
    );
    // Loading needs CAP_BPF: say so instead of failing with EPERM deep inside aya.
    assert_eq!(
        effective_uid(),
        0,
        "the datapath tests load BPF programs and must run as root"
    );
    let mut ebpf = Ebpf::load(OBJECT).expect("the datapath object loads");
    for name in [programs::FROM_ENDPOINT, programs::TO_ENDPOINT] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load()
            .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
    }
    ebpf
}

/// The effective uid, read from procfs (no libc call needed).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2).unwrap_or("1").to_string())
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(1)
}

/// Runs a program; returns its verdict and the packet as it left.
fn run_out(ebpf: &mut Ebpf, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut SchedClassifier = ebpf.program_mut(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    };
    let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(packet.len());
    (r.return_value, out)
}

fn run(ebpf: &mut Ebpf, prog: &str, packet: &[u8]) -> u32 {
    let p: &mut SchedClassifier = ebpf.program_mut(prog).unwrap().try_into().unwrap();
    let opts = TestRunOptions {
        data_in: Some(packet),
        ..TestRunOptions::new()
    };
    p.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

/// The test endpoint's own addresses (what it may send from).
const OWN_ADDRESSES: [&str; 3] = ["10.200.0.1", "fd00:200::1", "fd00::1"];

fn set_endpoint(ebpf: &mut Ebpf, flags: u32) {
    let mut m: HashMap<&mut MapData, u32, EndpointInfo> =
        HashMap::try_from(ebpf.map_mut(maps::ENDPOINTS).unwrap()).unwrap();
    m.insert(
        LO,
        EndpointInfo {
            endpoint_id: EP,
            identity: EP_IDENTITY,
            flags,
            pad: 0,
        },
        0,
    )
    .unwrap();
    let mut local: HashMap<&mut MapData, LocalKey, LocalEndpoint> =
        HashMap::try_from(ebpf.map_mut(maps::LOCAL).unwrap()).unwrap();
    for a in OWN_ADDRESSES {
        let own = LocalEndpoint {
            ifindex: LO,
            endpoint_id: EP,
            identity: EP_IDENTITY,
            flags,
            ..LocalEndpoint::default()
        };
        local
            .insert(LocalKey::of(a.parse().unwrap()), own, 0)
            .unwrap();
    }
}

fn set_identity(ebpf: &mut Ebpf, net: IpAddr, len: u32, identity: u32) {
    let v = IpcacheValue {
        identity,
        endpoint_id: 0,
    };
    match net {
        IpAddr::V4(a) => {
            let mut m: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
                LpmTrie::try_from(ebpf.map_mut(maps::IPCACHE4).unwrap()).unwrap();
            m.insert(&Key::new(len, a.octets()), v, 0).unwrap();
        }
        IpAddr::V6(a) => {
            let mut m: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                LpmTrie::try_from(ebpf.map_mut(maps::IPCACHE6).unwrap()).unwrap();
            m.insert(&Key::new(len, a.octets()), v, 0).unwrap();
        }
    }
}

fn policy(ebpf: &mut Ebpf, identity: u32, dport: u16, proto: u8, dir: u8, action: Option<u8>) {
    policy_of(ebpf, EP, identity, dport, proto, dir, action);
}

fn policy_of(
    ebpf: &mut Ebpf,
    endpoint_id: u32,
    identity: u32,
    dport: u16,
    proto: u8,
    dir: u8,
    action: Option<u8>,
) {
    let mut m: HashMap<&mut MapData, PolicyKey, PolicyValue> =
        HashMap::try_from(ebpf.map_mut(maps::POLICY).unwrap()).unwrap();
    let k = PolicyKey {
        endpoint_id,
        identity,
        dport,
        proto,
        dir,
    };
    match action {
        Some(action) => m
            .insert(
                k,
                PolicyValue {
                    action,
                    pad: 0,
                    proxy_port: 0,
                    pad2: 0,
                },
                0,
            )
            .unwrap(),
        None => m.remove(&k).unwrap(),
    }
}

/// An egress allow entry for the test endpoint.
fn allow_egress(ebpf: &mut Ebpf, identity: u32, dport: u16, proto: u8) {
    policy(
        ebpf,
        identity,
        dport,
        proto,
        abi::DIR_EGRESS,
        Some(abi::POLICY_ALLOW),
    );
}

fn set_revision(ebpf: &mut Ebpf, policy: u32) {
    let mut m: Array<&mut MapData, RevisionValue> =
        Array::try_from(ebpf.map_mut(maps::REVISION).unwrap()).unwrap();
    m.set(0, RevisionValue { policy, pad: 0 }, 0).unwrap();
}

fn ct_entries(ebpf: &mut Ebpf) -> Vec<(CtKey, CtValue)> {
    let m: HashMap<&mut MapData, CtKey, CtValue> =
        HashMap::try_from(ebpf.map_mut(maps::CT).unwrap()).unwrap();
    m.iter().map(|r| r.unwrap()).collect()
}

fn metric(ebpf: &mut Ebpf, reason: u8, dir: u8) -> u64 {
    let m: PerCpuArray<&mut MapData, MetricsValue> =
        PerCpuArray::try_from(ebpf.map_mut(maps::METRICS).unwrap()).unwrap();
    let slot = MetricsKey { reason, dir }.slot();
    m.get(&slot, 0)
        .map(|v| v.iter().map(|c| c.packets).sum())
        .unwrap()
}

fn events(ebpf: &mut Ebpf) -> Vec<Event> {
    let mut rb = RingBuf::try_from(ebpf.map_mut(maps::EVENTS).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        out.push(Event::from_bytes(&item).expect("a whole event"));
    }
    out
}

// ---- packet builders ----

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn l4(proto: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    match proto {
        6 => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h
        }
        17 => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        _ => vec![8, 0, 0, 0, 0, 1, 0, 1], // ICMP echo request
    }
}

fn v4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    frag: u16,
) -> Vec<u8> {
    let payload = l4(proto, sport, dport, tcp_flags);
    let mut p = eth(0x0800);
    let total = (20 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    p.extend(ip);
    p.extend(payload);
    p
}

fn v6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = eth(0x86dd);
    let len = (ext.len() + payload.len()) as u16;
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.push(next);
    ip.push(64);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    p.extend(ip);
    p.extend_from_slice(ext);
    p.extend_from_slice(payload);
    p
}

const A: [u8; 4] = [10, 200, 0, 1]; // the endpoint
const B: [u8; 4] = [10, 200, 0, 2]; // a peer
const B_ID: u32 = 301;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[test]
fn unmanaged_interfaces_pass() {
    let mut e = load();
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, B, 6, 40000, 80, SYN, 0)
        ),
        TC_ACT_OK
    );
}

#[test]
fn egress_default_deny_allow_reply_and_revocation() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 32, B_ID);
    let syn = v4(A, B, 6, 40000, 80, SYN, 0);
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &syn),
        TC_ACT_SHOT,
        "enforced egress without a rule drops"
    );
    assert_eq!(metric(&mut e, abi::drop::POLICY, abi::DIR_EGRESS), 1);
    let ev = events(&mut e);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (
            ev[0].kind,
            ev[0].reason,
            ev[0].src_identity,
            ev[0].dst_identity,
            ev[0].dport
        ),
        (abi::EVENT_DROP, abi::drop::POLICY, EP_IDENTITY, B_ID, 80)
    );

    allow_egress(&mut e, B_ID, 80, 6);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &syn), TC_ACT_OK);
    let ct = ct_entries(&mut e);
    assert_eq!(ct.len(), 1);
    assert_eq!(
        (ct[0].0.dport, ct[0].0.proto, ct[0].1.remote_identity),
        (80, 6, B_ID)
    );
    let mapped = |a: [u8; 4]| Ipv4Addr::from(a).to_ipv6_mapped().octets();
    assert_eq!(
        ct[0].0.initiated(&ct[0].1),
        (mapped(A), 40000, mapped(B), 80)
    );
    assert!(
        events(&mut e)
            .iter()
            .any(|ev| ev.kind == abi::EVENT_VERDICT)
    );

    // The reply enters the endpoint: ingress is enforced and has no rule, conntrack lets it in.
    let reply = v4(B, A, 6, 80, 40000, SYN | ACK, 0);
    assert_eq!(run(&mut e, programs::TO_ENDPOINT, &reply), TC_ACT_OK);
    // A new connection from B is not a reply.
    assert_eq!(
        run(
            &mut e,
            programs::TO_ENDPOINT,
            &v4(B, A, 6, 41000, 22, SYN, 0)
        ),
        TC_ACT_SHOT
    );

    // Revoking the rule drops the next packet of the established flow and forgets it.
    policy(&mut e, B_ID, 80, 6, abi::DIR_EGRESS, None);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, B, 6, 40000, 80, ACK, 0)
        ),
        TC_ACT_SHOT
    );
    assert!(
        ct_entries(&mut e).is_empty(),
        "the conntrack entry is deleted on deny"
    );
    assert_eq!(
        run(&mut e, programs::TO_ENDPOINT, &reply),
        TC_ACT_SHOT,
        "replies stop too"
    );
}

#[test]
fn one_conntrack_entry_serves_both_directions_whichever_end_started() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 32, B_ID);
    // B (the higher address) connects to the endpoint: the key puts A first and records that
    // the second end started the flow.
    policy(
        &mut e,
        B_ID,
        8080,
        6,
        abi::DIR_INGRESS,
        Some(abi::POLICY_ALLOW),
    );
    set_revision(&mut e, 3);
    let syn = v4(B, A, 6, 45000, 8080, SYN, 0);
    assert_eq!(run(&mut e, programs::TO_ENDPOINT, &syn), TC_ACT_OK);
    let mapped = |a: [u8; 4]| Ipv4Addr::from(a).to_ipv6_mapped().octets();
    let (key, flags) = CtKey::of_flow(EP, 4, 6, (mapped(B), 45000), (mapped(A), 8080));
    assert_eq!(flags, abi::CT_INITIATOR_SECOND);
    let ct = ct_entries(&mut e);
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].0, key, "the datapath and CtKey::of_flow agree");
    assert_eq!(ct[0].1.flags & abi::CT_INITIATOR_SECOND, flags);
    assert_eq!(ct[0].1.dir, abi::DIR_INGRESS);
    assert_eq!(
        ct[0].0.initiated(&ct[0].1),
        (mapped(B), 45000, mapped(A), 8080)
    );

    // A's answer leaves through its enforced egress with no rule: conntrack passes it as the
    // reply and marks the flow replied.
    let answer = v4(A, B, 6, 8080, 45000, SYN | ACK, 0);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &answer), TC_ACT_OK);
    let ct = ct_entries(&mut e);
    assert_eq!(ct.len(), 1, "the reply found the same entry");
    assert_ne!(ct[0].1.flags & abi::CT_SEEN_REPLY, 0);
    // B's next packet is the initiator's: on the fast path (revision 3 stands).
    let ack = v4(B, A, 6, 45000, 8080, ACK, 0);
    assert_eq!(run(&mut e, programs::TO_ENDPOINT, &ack), TC_ACT_OK);
    assert_eq!(ct_entries(&mut e)[0].1.packets, 3);
    // The endpoint starting a flow to B's port 45000 from 8080 is that same flow's reply, but
    // a flow to any other port of B is new and judged by A's egress: denied.
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, B, 6, 8080, 45001, SYN, 0)
        ),
        TC_ACT_SHOT
    );
    // Revoked: B's next packet is judged under the new revision, dropped, and the entry goes,
    // so A's replies stop too.
    policy(&mut e, B_ID, 8080, 6, abi::DIR_INGRESS, None);
    set_revision(&mut e, 4);
    assert_eq!(run(&mut e, programs::TO_ENDPOINT, &ack), TC_ACT_SHOT);
    assert!(ct_entries(&mut e).is_empty());
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &answer), TC_ACT_SHOT);
}

#[test]
fn probe_order_wildcards_and_world() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8, 400);
    // L4-only wildcard: any identity on 53/UDP.
    allow_egress(&mut e, 0, 53, 17);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [10, 1, 2, 3], 17, 5000, 53, 0, 0)
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [10, 1, 2, 3], 17, 5000, 54, 0, 0)
        ),
        TC_ACT_SHOT
    );
    // L3-only allow of the /8's identity (longest prefix match), any port and protocol, ICMP too.
    allow_egress(&mut e, 400, 0, 0);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [10, 9, 9, 9], 6, 5000, 443, SYN, 0)
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [10, 9, 9, 9], 1, 0, 0, 0, 0)
        ),
        TC_ACT_OK
    );
    // Outside every prefix: world.
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [192, 0, 2, 1], 6, 5000, 443, SYN, 0)
        ),
        TC_ACT_SHOT
    );
    allow_egress(&mut e, 2, 443, 6);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [192, 0, 2, 1], 6, 5000, 443, SYN, 0)
        ),
        TC_ACT_OK
    );
    // A redirect verdict cannot reach a proxy yet: it fails closed.
    policy(
        &mut e,
        2,
        80,
        6,
        abi::DIR_EGRESS,
        Some(abi::POLICY_REDIRECT),
    );
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, [192, 0, 2, 1], 6, 5000, 80, SYN, 0)
        ),
        TC_ACT_SHOT
    );
    assert_eq!(
        metric(&mut e, abi::drop::PROXY_LOOKUP_FAILED, abi::DIR_EGRESS),
        1
    );
}

#[test]
fn fragments_and_ipv6_extension_headers() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS);
    allow_egress(&mut e, 0, 0, 0);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, B, 17, 1, 2, 0, 0x2000)
        ),
        TC_ACT_SHOT,
        "more fragments"
    );
    assert_eq!(
        metric(&mut e, abi::drop::FRAG_NOSUPPORT, abi::DIR_EGRESS),
        1
    );

    let a6: Ipv6Addr = "fd00:200::1".parse().unwrap();
    let b6: Ipv6Addr = "fd00:200::2".parse().unwrap();
    let tcp = l4(6, 40000, 80, SYN);
    // Hop-by-hop options (8 bytes) before TCP are walked.
    let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &v6(a6, b6, 0, &hbh, &tcp)),
        TC_ACT_OK
    );
    // AH is not supported: dropped with its own reason.
    let ah = [6u8, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &v6(a6, b6, 51, &ah, &tcp)),
        TC_ACT_SHOT
    );
    assert_eq!(
        metric(&mut e, abi::drop::INVALID_EXTHDR, abi::DIR_EGRESS),
        1
    );
}

#[test]
fn ipv6_policy_and_neighbour_discovery() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS);
    let a6: Ipv6Addr = "fd00:200::1".parse().unwrap();
    let b6: Ipv6Addr = "fd00:200::2".parse().unwrap();
    // Neighbour solicitation passes with no rule at all.
    let ns = [135u8, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &v6(a6, b6, 58, &[], &ns)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&mut e, programs::TO_ENDPOINT, &v6(b6, a6, 58, &[], &ns)),
        TC_ACT_OK
    );
    // Neither do MLD reports (143).
    let mld = [143u8, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(
        run(&mut e, programs::TO_ENDPOINT, &v6(b6, a6, 58, &[], &mld)),
        TC_ACT_OK
    );
    // Echo request does not.
    let echo = [128u8, 0, 0, 0, 0, 1, 0, 1];
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &v6(a6, b6, 58, &[], &echo)),
        TC_ACT_SHOT
    );
    set_identity(&mut e, IpAddr::V6("fd00:200::".parse().unwrap()), 64, 500);
    allow_egress(&mut e, 500, 0, 0);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v6(a6, b6, 6, &[], &l4(6, 40000, 80, SYN))
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &v6(a6, b6, 58, &[], &echo)),
        TC_ACT_OK
    );
    // And the echo reply comes back through conntrack.
    let reply = [129u8, 0, 0, 0, 0, 1, 0, 1];
    assert_eq!(
        run(&mut e, programs::TO_ENDPOINT, &v6(b6, a6, 58, &[], &reply)),
        TC_ACT_OK
    );
}

#[test]
fn conntrack_is_scoped_to_the_endpoint() {
    let mut e = load();
    // Endpoint 7 (on lo) allows egress to B; its flow must not let another endpoint's traffic
    // pass as a reply. Re-registering lo as endpoint 8 stands in for the other endpoint.
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 32, B_ID);
    allow_egress(&mut e, B_ID, 80, 6);
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, B, 6, 40000, 80, SYN, 0)
        ),
        TC_ACT_OK
    );
    let mut m: HashMap<&mut MapData, u32, EndpointInfo> =
        HashMap::try_from(e.map_mut(maps::ENDPOINTS).unwrap()).unwrap();
    m.insert(
        LO,
        EndpointInfo {
            endpoint_id: 8,
            identity: 999,
            flags: abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS,
            pad: 0,
        },
        0,
    )
    .unwrap();
    assert_eq!(
        run(
            &mut e,
            programs::TO_ENDPOINT,
            &v4(B, A, 6, 80, 40000, SYN | ACK, 0)
        ),
        TC_ACT_SHOT
    );
}

#[test]
fn a_flow_keeps_its_verdict_until_the_policy_revision_moves() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 32, B_ID);
    allow_egress(&mut e, B_ID, 80, 6);
    let data = v4(A, B, 6, 40000, 80, ACK, 0);

    // Revision 0 is "none": every packet is judged, so a revoked rule bites at once.
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &data), TC_ACT_OK);
    assert_eq!(ct_entries(&mut e)[0].1.policy_rev, 0);
    policy(&mut e, B_ID, 80, 6, abi::DIR_EGRESS, None);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &data), TC_ACT_SHOT);

    // Under revision 7 the verdict is recorded with the flow...
    set_revision(&mut e, 7);
    allow_egress(&mut e, B_ID, 80, 6);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &data), TC_ACT_OK);
    let ct = ct_entries(&mut e);
    assert_eq!((ct[0].1.policy_rev, ct[0].1.packets), (7, 1));
    // ...and kept without lookups while the revision stands: the ipcache and policy entries are
    // gone (as only the agent could do, and it would bump), yet the flow passes.
    policy(&mut e, B_ID, 80, 6, abi::DIR_EGRESS, None);
    let mut m: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
        LpmTrie::try_from(e.map_mut(maps::IPCACHE4).unwrap()).unwrap();
    m.remove(&Key::new(32, B)).unwrap();
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &data), TC_ACT_OK);
    assert_eq!(ct_entries(&mut e)[0].1.packets, 2);
    // A new flow is judged: no rule, dropped.
    assert_eq!(
        run(
            &mut e,
            programs::FROM_ENDPOINT,
            &v4(A, B, 6, 40001, 80, SYN, 0)
        ),
        TC_ACT_SHOT
    );

    // The revision moves: the established flow is judged again, dropped and forgotten.
    set_revision(&mut e, 8);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &data), TC_ACT_SHOT);
    assert!(ct_entries(&mut e).is_empty());
}

#[test]
fn map_sizes_match_the_rust_mirror() {
    let e = load();
    let max_entries = |name: &str| match e.map(name).unwrap() {
        aya::maps::Map::HashMap(m) | aya::maps::Map::PerCpuArray(m) => {
            m.info().unwrap().max_entries()
        }
        other => panic!("{name}: unexpected map {other:?}"),
    };
    assert_eq!(max_entries(maps::ENDPOINTS), abi::MAX_ENDPOINTS);
    assert_eq!(max_entries(maps::METRICS), abi::METRICS_SLOTS);
    assert_eq!(
        max_entries(maps::LOCAL),
        abi::MAX_ENDPOINTS * abi::LOCAL_ADDRESSES_PER_ENDPOINT
    );
}

/// The IPv4 header checksum a packet builder leaves at 0, filled in.
fn with_ipv4_checksum(mut p: Vec<u8>) -> Vec<u8> {
    let sum = ipv4_header_sum(&p[14..34]);
    p[24..26].copy_from_slice(&(!sum).to_be_bytes());
    p
}

/// The one's-complement sum of a header's 16-bit words (0xffff when its checksum is right).
fn ipv4_header_sum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

const TC_ACT_REDIRECT: u32 = 7;
/// The receiving endpoint of local delivery, at address B.
const RX_EP: u32 = 8;
const RX_IFINDEX: u32 = 42;
const RX_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 8];
const RX_HOST_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 8];

fn set_local(ebpf: &mut Ebpf, addr: IpAddr, flags: u32) {
    let mut m: HashMap<&mut MapData, LocalKey, LocalEndpoint> =
        HashMap::try_from(ebpf.map_mut(maps::LOCAL).unwrap()).unwrap();
    let v = LocalEndpoint {
        ifindex: RX_IFINDEX,
        endpoint_id: RX_EP,
        identity: B_ID,
        flags,
        mac: RX_MAC,
        host_mac: RX_HOST_MAC,
        pad: 0,
    };
    m.insert(LocalKey::of(addr), v, 0).unwrap();
}

#[test]
fn local_delivery_judges_both_ends_and_hands_the_packet_over() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 32, B_ID);
    // The receiver knows the sender by its address, as from any local endpoint.
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(A)), 32, EP_IDENTITY);
    set_local(
        &mut e,
        IpAddr::V4(Ipv4Addr::from(B)),
        abi::EP_ENFORCE_INGRESS,
    );
    set_revision(&mut e, 1);
    allow_egress(&mut e, B_ID, 80, 6);
    allow_egress(&mut e, B_ID, 81, 6);
    let rx_allow = |e: &mut Ebpf, port: u16| {
        policy_of(
            e,
            RX_EP,
            EP_IDENTITY,
            port,
            6,
            abi::DIR_INGRESS,
            Some(abi::POLICY_ALLOW),
        )
    };
    rx_allow(&mut e, 80);

    let syn = with_ipv4_checksum(v4(A, B, 6, 40000, 80, SYN, 0));
    let (verdict, out) = run_out(&mut e, programs::FROM_ENDPOINT, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "both policies allow: delivered");
    assert_eq!(&out[0..6], &RX_MAC, "to the receiver's interface");
    assert_eq!(&out[6..12], &RX_HOST_MAC, "from its gateway");
    assert_eq!(out[22], 63, "one hop, as the host's forwarding would count");
    assert_eq!(
        ipv4_header_sum(&out[14..34]),
        0xffff,
        "the header checksum follows the TTL"
    );
    assert_eq!(&out[12..22], &syn[12..22]);
    assert_eq!(&out[23..24], &syn[23..24]);
    assert_eq!(&out[26..], &syn[26..], "nothing else changes");
    assert_eq!(metric(&mut e, 0, abi::DIR_EGRESS), 1);
    assert_eq!(metric(&mut e, 0, abi::DIR_INGRESS), 1);
    let mut ct: Vec<(u32, u8)> = ct_entries(&mut e)
        .iter()
        .map(|(k, v)| (k.endpoint_id, v.dir))
        .collect();
    ct.sort();
    assert_eq!(
        ct,
        vec![(EP, abi::DIR_EGRESS), (RX_EP, abi::DIR_INGRESS)],
        "each end tracks the flow under its own policy"
    );
    // The established flow takes the fast path on both ends.
    let ack = with_ipv4_checksum(v4(A, B, 6, 40000, 80, ACK, 0));
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &ack), TC_ACT_REDIRECT);
    events(&mut e);

    // The receiver's ingress denies 81: dropped here, counted and reported as its drop.
    let to_81 = with_ipv4_checksum(v4(A, B, 6, 40001, 81, SYN, 0));
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &to_81), TC_ACT_SHOT);
    assert_eq!(metric(&mut e, abi::drop::POLICY, abi::DIR_INGRESS), 1);
    let drop = events(&mut e)
        .into_iter()
        .find(|ev| ev.kind == abi::EVENT_DROP)
        .expect("a drop event");
    assert_eq!(
        (
            drop.dir,
            drop.endpoint_id,
            drop.ifindex,
            drop.src_identity,
            drop.dst_identity
        ),
        (abi::DIR_INGRESS, RX_EP, RX_IFINDEX, EP_IDENTITY, B_ID)
    );

    // A packet about to expire goes through the stack (which answers time exceeded), judged
    // by the sender only.
    let mut last_hop = v4(A, B, 6, 40002, 80, SYN, 0);
    last_hop[22] = 1;
    let last_hop = with_ipv4_checksum(last_hop);
    let before = ct_entries(&mut e).len();
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &last_hop), TC_ACT_OK);
    assert_eq!(
        ct_entries(&mut e).len(),
        before + 1,
        "the sender's entry only"
    );

    // A receiver whose ingress wants the proxy, which the sender's judgement did not see (here
    // the ipcache does not name B's endpoint, as while maps change): the packet goes the long
    // way, to the receiver's own program, with nothing recorded for the receiver.
    policy_of(
        &mut e,
        RX_EP,
        EP_IDENTITY,
        80,
        6,
        abi::DIR_INGRESS,
        Some(abi::POLICY_REDIRECT),
    );
    set_revision(&mut e, 2);
    let fresh = with_ipv4_checksum(v4(A, B, 6, 40003, 80, SYN, 0));
    let (verdict, out) = run_out(&mut e, programs::FROM_ENDPOINT, &fresh);
    assert_eq!((verdict, &out[..]), (TC_ACT_OK, &fresh[..]), "untouched");
    assert!(
        !ct_entries(&mut e)
            .iter()
            .any(|(k, _)| k.endpoint_id == RX_EP && k.sport == 40003),
        "nothing recorded for the receiver"
    );
}

#[test]
fn local_delivery_over_ipv6_counts_the_hop() {
    let mut e = load();
    let a: Ipv6Addr = "fd00::1".parse().unwrap();
    let b: Ipv6Addr = "fd00::2".parse().unwrap();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS);
    set_identity(&mut e, IpAddr::V6(b), 128, B_ID);
    set_local(&mut e, IpAddr::V6(b), 0);
    allow_egress(&mut e, B_ID, 443, 6);
    let syn = v6(a, b, 6, &[], &l4(6, 40000, 443, SYN));
    let (verdict, out) = run_out(&mut e, programs::FROM_ENDPOINT, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[0..6], &out[6..12]), (&RX_MAC[..], &RX_HOST_MAC[..]));
    assert_eq!(out[21], 63, "hop limit");
    assert_eq!(&out[22..], &syn[22..]);
    // Not allowed out: never delivered.
    let other = v6(a, b, 6, &[], &l4(6, 40000, 22, SYN));
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &other), TC_ACT_SHOT);
    assert_eq!(metric(&mut e, abi::drop::POLICY, abi::DIR_EGRESS), 1);
}

#[test]
fn an_echo_request_is_never_a_reply() {
    let mut e = load();
    set_endpoint(&mut e, abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS);
    set_identity(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 32, B_ID);
    set_revision(&mut e, 1);
    allow_egress(&mut e, B_ID, 0, 1);
    // The endpoint pings B; B's reply comes back through conntrack.
    let request = |src, dst| v4(src, dst, 1, 0, 0, 0, 0);
    let mut reply = request(B, A);
    reply[34] = 0; // echo reply
    assert_eq!(
        run(&mut e, programs::FROM_ENDPOINT, &request(A, B)),
        TC_ACT_OK
    );
    assert_eq!(run(&mut e, programs::TO_ENDPOINT, &reply), TC_ACT_OK);
    // B pings the endpoint: same addresses, no ports, so the same conntrack key; still a new
    // exchange, which the endpoint's ingress policy (no rule) refuses.
    assert_eq!(
        run(&mut e, programs::TO_ENDPOINT, &request(B, A)),
        TC_ACT_SHOT
    );
    assert_eq!(metric(&mut e, abi::drop::POLICY, abi::DIR_INGRESS), 1);
}

#[test]
fn an_endpoint_sends_only_from_its_own_addresses() {
    let mut e = load();
    set_endpoint(&mut e, 0);
    // Not even enforced: a spoofed source is dropped all the same, before any policy.
    let spoofed = v4([10, 200, 0, 9], B, 6, 40000, 80, SYN, 0);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &spoofed), TC_ACT_SHOT);
    assert_eq!(metric(&mut e, abi::drop::INVALID_SIP, abi::DIR_EGRESS), 1);
    let ev = events(&mut e);
    assert_eq!(
        (ev[0].kind, ev[0].reason, ev[0].endpoint_id),
        (abi::EVENT_DROP, abi::drop::INVALID_SIP, EP)
    );
    assert!(ct_entries(&mut e).is_empty(), "no flow to ride on");
    // Another endpoint's address is no better.
    set_local(&mut e, IpAddr::V4(Ipv4Addr::from(B)), 0);
    let as_b = v4(B, [10, 200, 0, 3], 6, 40000, 80, SYN, 0);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &as_b), TC_ACT_SHOT);
    assert_eq!(metric(&mut e, abi::drop::INVALID_SIP, abi::DIR_EGRESS), 2);
    // Its own passes.
    let own = v4(A, [10, 200, 0, 3], 6, 40000, 80, SYN, 0);
    assert_eq!(run(&mut e, programs::FROM_ENDPOINT, &own), TC_ACT_OK);
}
