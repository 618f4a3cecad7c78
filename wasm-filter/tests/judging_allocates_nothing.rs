//! The filter's judging allocates nothing for a request it allows: the connection's parties,
//! the L3/L4 lookup and the HTTP rules (regex sets per port) run on what was compiled when the
//! policy arrived. Counted by this test binary's allocator, on this thread only. (Inside Envoy,
//! envoy_e2e counts the whole module's allocations per request.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;

use membrane_api::discovery::Any;
use membrane_api::v1;
use membrane_policy::l7::http::NoHeaders;
use membrane_wasm_filter::state::{
    ConnFacts, Direction, L4Verdict, PolicyState, Verdict, compile_hosts, compile_policies,
    compile_spiffe, judge_http_fetching_host,
};
use prost::Message;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct CountingAllocator;

fn count() {
    // `try_with`: the thread's slot may already be gone while it exits.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call goes unchanged to the system allocator; only counted.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn any(msg: &impl Message) -> Any {
    Any {
        type_url: String::new(),
        value: msg.encode_to_vec(),
    }
}

/// A policy like bench/wasm.sh's: web (10.0.0.1, identity 300) takes ten HTTP rules from luke
/// (301, known by its SPIFFE ID) on port 80 and anything from 302 on port 81; 201 identities.
fn state() -> PolicyState {
    let rule = |method: &str, path: &str| v1::HttpRule {
        method: method.into(),
        path: path.into(),
        ..Default::default()
    };
    let mut rules: Vec<v1::HttpRule> = (0..9)
        .map(|i| rule("GET|HEAD", &format!("/api/v{i}/[a-z]+/[0-9]+")))
        .collect();
    rules.push(rule("GET", "/api/v1/items/[0-9]+"));
    let l7 = v1::L7RuleSet {
        policy: "CiliumNetworkPolicy default/web".into(),
        rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules { rules })),
    };
    let entry = |remote, port, l7| v1::PolicyEntry {
        remote_identity: remote,
        port,
        protocol: 6,
        l7,
    };
    let web = v1::NetworkPolicy {
        endpoint: "web".into(),
        identity: 300,
        addresses: vec!["10.0.0.1".into()],
        ingress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: vec![entry(301, 80, vec![l7]), entry(302, 81, vec![])],
        }),
        egress: None,
    };
    let hosts: Vec<Any> = (0..200u32)
        .map(|i| {
            any(&v1::NetworkPolicyHosts {
                identity: 1000 + i,
                host_addresses: vec![format!("10.1.{}.{}/32", i / 250, i % 250)],
            })
        })
        .chain([any(&v1::NetworkPolicyHosts {
            identity: 302,
            host_addresses: vec!["10.0.2.0/24".into()],
        })])
        .collect();
    let spiffe = v1::SpiffeIdentities {
        identities: [("spiffe://cluster.local/ns/default/sa/luke".to_string(), 301)]
            .into_iter()
            .collect(),
    };
    PolicyState {
        endpoints: compile_policies(&[any(&web)]).unwrap(),
        hosts: compile_hosts(&hosts).unwrap(),
        spiffe: compile_spiffe(&[any(&spiffe)]).unwrap(),
        versions: BTreeMap::new(),
        generation: 0,
    }
}

/// What the filter does with a request: parties, L3/L4, then the HTTP rules.
fn judge(st: &PolicyState, conn: &ConnFacts, method: &str, path: &str) -> bool {
    let parties = st.parties(conn);
    match st.judge_l4(conn, &parties, 6) {
        L4Verdict::Allow(_) => true,
        L4Verdict::Deny(_) => false,
        L4Verdict::L7(sets) => matches!(
            judge_http_fetching_host(sets, method, path, &NoHeaders, String::new),
            Verdict::Allow(_)
        ),
    }
}

#[test]
fn an_allowed_request_is_judged_without_allocating() {
    let st = state();
    let luke = ConnFacts {
        direction: Direction::Inbound,
        source: "10.0.0.9".parse().unwrap(),
        destination: "10.0.0.1".parse().unwrap(),
        port: 80,
        peer_spiffe: Some(Rc::from("spiffe://cluster.local/ns/default/sa/luke")),
    };
    let by_address = ConnFacts {
        source: "10.0.2.7".parse().unwrap(),
        port: 81,
        peer_spiffe: None,
        ..luke.clone()
    };
    let allowed = || {
        assert!(judge(&st, &luke, "GET", "/api/v1/items/42"));
        assert!(judge(&st, &luke, "HEAD", "/api/v3/orders/7"));
        assert!(judge(&st, &by_address, "POST", "/anything"));
    };
    // The first judgements fill the regex sets' scratch space, once.
    allowed();
    let n = allocations_in(|| (0..1000).for_each(|_| allowed()));
    assert_eq!(n, 0, "allocations in 3000 allowed judgements");
    // The counter counts: a denial builds its log line.
    let n = allocations_in(|| assert!(!judge(&st, &luke, "GET", "/private")));
    assert!(n > 0, "the counting allocator counted nothing");
}
