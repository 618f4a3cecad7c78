//! Per-packet cost of the datapath programs, measured by the kernel itself: BPF_PROG_TEST_RUN
//! runs each crafted packet a million times and reports the mean run time. No network, no VM
//! scheduling noise: this is what to compare before and after a change to the programs.
//! Needs root (CAP_BPF). `cargo bench -p membrane-bpf --bench packet`.

use std::net::Ipv4Addr;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use membrane_bpf::abi::{
    self, EndpointInfo, IpcacheValue, LocalEndpoint, LocalKey, PolicyKey, PolicyValue,
    RevisionValue,
};
use membrane_bpf::{OBJECT, maps, programs};

/// BPF_PROG_TEST_RUN runs sched_cls programs on the loopback device.
const LO: u32 = 1;
const EP: u32 = 7;
const A: [u8; 4] = [10, 200, 0, 1];
const B: [u8; 4] = [10, 200, 0, 2];
const B_ID: u32 = 301;
const REPEAT: u32 = 1_000_000;

fn load() -> Ebpf {
    let mut ebpf = Ebpf::load(OBJECT).expect("the datapath object loads (as root, with clang)");
    for name in [programs::FROM_ENDPOINT, programs::TO_ENDPOINT] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().expect("verifier accepts the program");
    }
    ebpf
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    p.extend(ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    p.extend(tcp);
    p
}

/// Mean nanoseconds per run of `prog` on `packet`, and its verdict.
fn measure(ebpf: &mut Ebpf, prog: &str, packet: &[u8]) -> (Duration, u32) {
    let p: &mut SchedClassifier = ebpf.program_mut(prog).unwrap().try_into().unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.repeat = REPEAT;
    let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
    (r.duration, r.return_value)
}

fn main() {
    let mut e = load();
    {
        let mut m: HashMap<&mut MapData, u32, EndpointInfo> =
            HashMap::try_from(e.map_mut(maps::ENDPOINTS).unwrap()).unwrap();
        let flags = abi::EP_ENFORCE_EGRESS | abi::EP_ENFORCE_INGRESS;
        let info = EndpointInfo {
            endpoint_id: EP,
            identity: 300,
            flags,
            pad: 0,
        };
        m.insert(LO, info, 0).unwrap();
        // Its own address (judged packets must come from it).
        let mut local: HashMap<&mut MapData, LocalKey, LocalEndpoint> =
            HashMap::try_from(e.map_mut(maps::LOCAL).unwrap()).unwrap();
        let own = LocalEndpoint {
            ifindex: LO,
            endpoint_id: EP,
            identity: 300,
            flags,
            ..LocalEndpoint::default()
        };
        local
            .insert(LocalKey::of(Ipv4Addr::from(A).into()), own, 0)
            .unwrap();
    }
    {
        // 10,000 CIDR identities in the ipcache, as in bench/datapath.sh.
        let mut m: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
            LpmTrie::try_from(e.map_mut(maps::IPCACHE4).unwrap()).unwrap();
        for i in 0..10_000u32 {
            let net = Ipv4Addr::from(0x0b00_0000 + (i << 8)).octets();
            let v = IpcacheValue {
                identity: 20_000 + i,
                endpoint_id: 0,
            };
            m.insert(&Key::new(24, net), v, 0).unwrap();
        }
        let v = IpcacheValue {
            identity: B_ID,
            endpoint_id: 0,
        };
        m.insert(&Key::new(32, B), v, 0).unwrap();
    }
    {
        // 1,000 rules' worth of keys for this endpoint, the one that matters among them.
        let mut m: HashMap<&mut MapData, PolicyKey, PolicyValue> =
            HashMap::try_from(e.map_mut(maps::POLICY).unwrap()).unwrap();
        let allow = PolicyValue {
            action: abi::POLICY_ALLOW,
            pad: 0,
            proxy_port: 0,
            pad2: 0,
        };
        for i in 0..1_000u32 {
            let k = PolicyKey {
                endpoint_id: EP,
                identity: 20_000 + i,
                dport: 80,
                proto: 6,
                dir: abi::DIR_EGRESS,
            };
            m.insert(k, allow, 0).unwrap();
        }
        let k = PolicyKey {
            endpoint_id: EP,
            identity: B_ID,
            dport: 80,
            proto: 6,
            dir: abi::DIR_EGRESS,
        };
        m.insert(k, allow, 0).unwrap();
    }
    let set_revision = |e: &mut Ebpf, policy: u32| {
        let mut m: Array<&mut MapData, RevisionValue> =
            Array::try_from(e.map_mut(maps::REVISION).unwrap()).unwrap();
        m.set(0, RevisionValue { policy, pad: 0 }, 0).unwrap();
    };

    let out = tcp4(A, B, 40000, 80, 0x10);
    let back = tcp4(B, A, 80, 40000, 0x10);
    let cases = [
        (
            "established, judged every packet (revision 0)",
            programs::FROM_ENDPOINT,
            &out,
            0,
        ),
        (
            "established, leaving the endpoint",
            programs::FROM_ENDPOINT,
            &out,
            1,
        ),
        (
            "established, reply entering the endpoint",
            programs::TO_ENDPOINT,
            &back,
            1,
        ),
    ];
    println!(
        "membrane-bpf packet bench: mean ns per packet over {REPEAT} runs (BPF_PROG_TEST_RUN)"
    );
    for (name, prog, packet, revision) in cases {
        set_revision(&mut e, revision);
        report(&mut e, name, prog, packet);
    }
    // Last, as it unregisters the endpoint: the floor every packet of the node pays.
    let mut m: HashMap<&mut MapData, u32, EndpointInfo> =
        HashMap::try_from(e.map_mut(maps::ENDPOINTS).unwrap()).unwrap();
    m.remove(&LO).unwrap();
    report(
        &mut e,
        "a packet of an interface that is no endpoint",
        programs::TO_ENDPOINT,
        &back,
    );
}

/// Prints the best of five million-run means (the least disturbed by the rest of the machine).
fn report(e: &mut Ebpf, name: &str, prog: &str, packet: &[u8]) {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let (d, verdict) = measure(e, prog, packet);
        assert_eq!(verdict, 0, "{name}: the packet must pass");
        best = best.min(d);
    }
    println!("  {name:<48} {:>5} ns", best.as_nanos());
}
