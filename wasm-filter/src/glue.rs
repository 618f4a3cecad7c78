//! The proxy-wasm side: each VM's root context keeps its own ADS stream to the agent (an Envoy
//! cluster named in the configuration), reconnects from `on_tick`, ACKs what compiles and NACKs
//! what does not (keeping the last good state); HTTP contexts judge each request with
//! [`PolicyState`] and answer a deny with `403 Access denied`.
//!
//! Every policy a VM accepts is also written to Envoy's shared data, and a new VM (a worker
//! starting, or one rebuilt by `failure_policy: FAIL_RELOAD` after a panic) seeds itself from
//! there before its own stream answers, so a reload never opens a default-deny gap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use membrane_api::discovery::{DiscoveryRequest, DiscoveryResponse, Node, Status};
use membrane_api::{
    INIT_POLICY, NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, SPIFFE_IDENTITIES_TYPE,
};
use membrane_policy::l7::http::HeaderLookup;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
use serde::Deserialize;

use membrane_codec::kafka::session::{
    KafkaSession, MAX_REWRITTEN_RESPONSE, Owed, RESPONSE_HEAD, Record, ToBroker,
    placeholder_request,
};
use membrane_codec::kafka::{LENGTH_PREFIX, frame_len};
use membrane_codec::path::PathError;

use crate::state::{
    ConnFacts, Direction, KafkaPolicy, L4Verdict, Parties, PolicyState, StreamMode, Verdict,
    compile_hosts, compile_policies, compile_spiffe, is_istio_gateway, judge_http_fetching_host,
    judge_http_path,
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The plugin configuration (JSON).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `enforce` (the default) or `noop`: a filter that lets every request through at once, the
    /// floor of the proxy-wasm ABI's cost that `bench/wasm.sh` measures against.
    #[serde(default)]
    mode: Mode,
    /// The Envoy cluster (HTTP/2) that reaches the agent's xDS socket.
    #[serde(default)]
    xds_cluster: String,
    /// The node id this filter subscribes as; empty: Envoy's own (`xds.node.id`, which Istio
    /// makes unique per pod), since one WasmPlugin configuration serves every pod.
    #[serde(default)]
    node: String,
    /// Testing only: a request carrying this header panics the VM, so that tests can show
    /// FAIL_RELOAD recovering it without a policy gap. Never set it in production.
    #[serde(default)]
    crash_on_header: Option<String>,
    /// Judge (and forward) request paths normalized, as `membrane-proxy --normalize-path` does
    /// (the default); `false` judges `:path` exactly as Envoy passes it on.
    #[serde(default = "default_true")]
    normalize_path: bool,
    /// Kafka mode: the largest request frame accepted (bytes); larger ones close the connection.
    #[serde(default = "default_max_frame")]
    kafka_max_frame: usize,
    /// The filter is one of a cluster's upstream HTTP filters: an outbound request is judged
    /// against the backend Envoy picked for it (`upstream.address`), not the address the app
    /// dialled, which may be a Service's or the sidecar's own.
    #[serde(default)]
    upstream: bool,
}

fn default_true() -> bool {
    true
}

fn default_max_frame() -> usize {
    membrane_codec::kafka::DEFAULT_MAX_REQUEST
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// The HTTP filter.
    #[default]
    Enforce,
    /// The HTTP filter that judges nothing.
    Noop,
    /// The HTTP filter that reads what enforcement must read of every request (the connection
    /// id, `:method`, `:path`) and judges nothing: the floor of any filter that judges requests
    /// through proxy-wasm, which `bench/wasm.sh` measures next to the membrane filter.
    Fetch,
    /// A network filter (`envoy.filters.network.wasm`, before `tcp_proxy`) for Kafka ports.
    Kafka,
}

const TYPES: [&str; 3] = [
    NETWORK_POLICY_TYPE,
    NETWORK_POLICY_HOSTS_TYPE,
    SPIFFE_IDENTITIES_TYPE,
];

/// Shared-data keys are prefixed: Istio leaves `vm_id` empty, so the namespace is shared with
/// every other vm_id-less plugin.
fn shared_key(type_url: &str) -> String {
    format!("membrane/{type_url}")
}

/// Connections whose facts are cached; past this many the cache starts over (HTTP contexts do not
/// learn when a connection closes, so this bounds memory instead).
const CONN_CACHE_MAX: usize = 4096;

/// Counters (proxy-wasm metrics; Envoy shows them as `wasmcustom.membrane.*`).
#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    allowed: [u32; 2],
    denied: [u32; 2],
    kafka_allowed: [u32; 2],
    kafka_denied: [u32; 2],
    connections: u32,
    applied: u32,
    rejected: u32,
    seeded: u32,
    allocations: u32,
}

fn counter(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Counter, &format!("membrane.{name}")).unwrap_or(0)
}

impl Metrics {
    fn define() -> Metrics {
        Metrics {
            allowed: [
                counter("http.inbound.allowed"),
                counter("http.outbound.allowed"),
            ],
            denied: [
                counter("http.inbound.denied"),
                counter("http.outbound.denied"),
            ],
            kafka_allowed: [
                counter("kafka.inbound.allowed"),
                counter("kafka.outbound.allowed"),
            ],
            kafka_denied: [
                counter("kafka.inbound.denied"),
                counter("kafka.outbound.denied"),
            ],
            connections: counter("http.connections"),
            applied: counter("xds.applied"),
            rejected: counter("xds.rejected"),
            seeded: counter("xds.seeded"),
            allocations: counter(ALLOCATIONS_METRIC),
        }
    }

    fn bump(id: u32) {
        hostcalls::increment_metric(id, 1).ok();
    }
}

/// Verdicts counted in the VM and added to the metrics on each tick, which saves a hostcall per
/// request.
#[derive(Debug, Default)]
struct Tally {
    allowed: [Cell<i64>; 2],
    denied: [Cell<i64>; 2],
    kafka_allowed: [Cell<i64>; 2],
    kafka_denied: [Cell<i64>; 2],
    /// Connections whose facts were read (once per connection while it stays cached).
    connections: Cell<i64>,
}

impl Tally {
    fn count(cell: &Cell<i64>) {
        cell.set(cell.get() + 1);
    }

    fn flush(&self, metrics: &Metrics) {
        for (cells, ids) in [
            (&self.allowed, &metrics.allowed),
            (&self.denied, &metrics.denied),
            (&self.kafka_allowed, &metrics.kafka_allowed),
            (&self.kafka_denied, &metrics.kafka_denied),
        ] {
            for (cell, id) in cells.iter().zip(ids) {
                let n = cell.take();
                if n > 0 {
                    hostcalls::increment_metric(*id, n).ok();
                }
            }
        }
        let n = self.connections.take();
        if n > 0 {
            hostcalls::increment_metric(metrics.connections, n).ok();
        }
    }
}

/// The module's heap allocations, counted by its allocator: what the filter allocates per
/// request is held to what the ABI forces (the SDK's box for the request's context, and each
/// answer the host writes into the module), which envoy_e2e checks and bench/wasm.sh prints.
const ALLOCATIONS_METRIC: &str = "vm.allocations";

/// The system allocator, counting. wasm32-wasip1 has no threads: the atomic is a plain add.
struct CountingAllocator;

static ALLOCATIONS: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call goes unchanged to the system allocator, which upholds GlobalAlloc's
// contract; the counter has no effect on the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Adds the allocations since the last call to the metric.
fn flush_allocations(metric: u32) {
    let n = ALLOCATIONS.swap(0, Ordering::Relaxed);
    if n > 0 {
        hostcalls::increment_metric(metric, n).ok();
    }
}

fn log(level: LogLevel, message: &str) {
    hostcalls::log(level, message).ok();
}

#[derive(Default)]
struct Root {
    config: Config,
    /// NetworkPolicy resource names subscribed to: the pod's addresses (the server aliases each
    /// endpoint's policy by its addresses) and the init policy, or none (every resource).
    policy_names: Vec<String>,
    /// This Envoy is an Istio gateway: everything passes (see [`is_istio_gateway`]).
    gateway: bool,
    state: Rc<RefCell<PolicyState>>,
    conns: Rc<RefCell<HashMap<u64, Rc<ConnFacts>>>>,
    metrics: Metrics,
    tally: Rc<Tally>,
    stream: Option<u32>,
    ticks: u64,
    reconnect_at: u64,
    backoff: u64,
}

impl Root {
    fn open_stream(&mut self) {
        match self.open_grpc_stream(
            &self.config.xds_cluster,
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "StreamAggregatedResources",
            vec![],
        ) {
            Ok(token) => {
                self.stream = Some(token);
                // Report what is in force; a new stream is answered with the current state.
                let versions = self.state.borrow().versions.clone();
                for t in TYPES {
                    let v = versions.get(t).map_or("", String::as_str);
                    self.send(t, v, "", None);
                }
            }
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("membrane: cannot open the xDS stream: {e:?}"),
                );
                self.retry_later();
            }
        }
    }

    /// Reconnects after 1, 2, 4 ... up to 16 ticks (0.5 s each).
    fn retry_later(&mut self) {
        self.backoff = (self.backoff * 2).clamp(1, 16);
        self.reconnect_at = self.ticks + self.backoff;
    }

    fn send(&self, type_url: &str, version: &str, nonce: &str, error: Option<String>) {
        let Some(token) = self.stream else { return };
        let req = DiscoveryRequest {
            version_info: version.to_string(),
            node: Some(Node {
                id: self.config.node.clone(),
            }),
            resource_names: if type_url == NETWORK_POLICY_TYPE {
                self.policy_names.clone()
            } else {
                Vec::new()
            },
            type_url: type_url.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(|message| Status { code: 3, message }),
        };
        self.send_grpc_stream_message(token, Some(&req.encode_to_vec()), false);
    }

    /// Compiles a response's resources and swaps them in; on error nothing changes.
    fn apply(&self, resp: &DiscoveryResponse) -> Result<(), String> {
        let mut st = self.state.borrow_mut();
        match resp.type_url.as_str() {
            NETWORK_POLICY_TYPE => st.endpoints = compile_policies(&resp.resources)?,
            NETWORK_POLICY_HOSTS_TYPE => st.hosts = compile_hosts(&resp.resources)?,
            SPIFFE_IDENTITIES_TYPE => st.spiffe = compile_spiffe(&resp.resources)?,
            other => return Err(format!("unexpected type {other}")),
        }
        st.versions
            .insert(resp.type_url.clone(), resp.version_info.clone());
        st.generation += 1;
        Ok(())
    }

    /// Publishes an accepted response for VMs that start later, unless another VM already
    /// published a newer version from the same control plane (a restarted agent starts its
    /// versions again, so across control planes the latest write wins).
    fn publish(&self, resp: &DiscoveryResponse, body: &[u8]) {
        let key = shared_key(&resp.type_url);
        let (current, cas) = hostcalls::get_shared_data(&key).unwrap_or((None, None));
        let plane = |r: &DiscoveryResponse| r.control_plane.as_ref().map(|c| c.identifier.clone());
        let newer_there = current
            .and_then(|b| DiscoveryResponse::decode(b.as_slice()).ok())
            .filter(|there| plane(there) == plane(resp))
            .and_then(|there| there.version_info.parse::<u64>().ok())
            .zip(resp.version_info.parse::<u64>().ok())
            .is_some_and(|(there, ours)| there > ours);
        if !newer_there {
            // A CAS mismatch means another VM wrote meanwhile; its copy is as good as ours.
            hostcalls::set_shared_data(&key, Some(body), cas).ok();
        }
    }

    /// Seeds a new VM with what other VMs accepted, before its own stream answers.
    fn seed_from_shared_data(&self) {
        for t in TYPES {
            let Ok((Some(body), _)) = hostcalls::get_shared_data(&shared_key(t)) else {
                continue;
            };
            match DiscoveryResponse::decode(body.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|resp| self.apply(&resp).map(|()| resp))
            {
                Ok(resp) => {
                    Metrics::bump(self.metrics.seeded);
                    log(
                        LogLevel::Info,
                        &format!(
                            "membrane: seeded {t} version {} from shared data",
                            resp.version_info
                        ),
                    );
                }
                Err(e) => log(
                    LogLevel::Warn,
                    &format!("membrane: ignoring shared {t}: {e}"),
                ),
            }
        }
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let body = self.get_grpc_stream_message(0, size).unwrap_or_default();
        let resp = match DiscoveryResponse::decode(body.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                log(LogLevel::Error, &format!("membrane: bad xDS message: {e}"));
                return;
            }
        };
        self.backoff = 0;
        let last_good = self
            .state
            .borrow()
            .versions
            .get(&resp.type_url)
            .cloned()
            .unwrap_or_default();
        match self.apply(&resp) {
            Ok(()) => {
                Metrics::bump(self.metrics.applied);
                log(
                    LogLevel::Info,
                    &format!(
                        "membrane: {} version {} in force",
                        resp.type_url, resp.version_info
                    ),
                );
                self.publish(&resp, &body);
                self.send(&resp.type_url, &resp.version_info, &resp.nonce, None);
            }
            Err(e) => {
                Metrics::bump(self.metrics.rejected);
                log(
                    LogLevel::Error,
                    &format!(
                        "membrane: rejected {} version {}: {e}",
                        resp.type_url, resp.version_info
                    ),
                );
                self.send(&resp.type_url, &last_good, &resp.nonce, Some(e));
            }
        }
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        // Keep enforcing the last good policy; try again with backoff.
        log(
            LogLevel::Warn,
            &format!("membrane: xDS stream closed (grpc status {status}); keeping the last policy"),
        );
        self.stream = None;
        self.retry_later();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) if matches!(c.mode, Mode::Enforce | Mode::Kafka) && c.xds_cluster.is_empty() => {
                log(LogLevel::Error, "membrane: xds_cluster is required");
                return false;
            }
            Ok(c) if c.upstream && c.mode == Mode::Kafka => {
                log(
                    LogLevel::Error,
                    "membrane: upstream applies to the HTTP filter, not to kafka mode",
                );
                return false;
            }
            Ok(c) => self.config = c,
            Err(e) => {
                log(LogLevel::Error, &format!("membrane: configuration: {e}"));
                return false;
            }
        }
        if matches!(self.config.mode, Mode::Noop | Mode::Fetch) {
            // Ticks only to report allocations (bench/wasm.sh compares them across modes).
            self.metrics.allocations = counter(ALLOCATIONS_METRIC);
            self.set_tick_period(Duration::from_millis(500));
            return true;
        }
        let own_node = property(b"xds\0node\0id")
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default();
        if is_istio_gateway(&own_node) {
            self.gateway = true;
            log(
                LogLevel::Info,
                &format!(
                    "membrane: {own_node} is an Istio gateway: its traffic passes here, and the \
                     sidecars it forwards to enforce membrane's policy"
                ),
            );
            return true;
        }
        if self.config.node.is_empty() {
            self.config.node = own_node;
        }
        self.policy_names = instance_ips();
        log(
            LogLevel::Info,
            &if self.policy_names.is_empty() {
                "membrane: subscribing to every endpoint's policy (no INSTANCE_IPS in the node \
                 metadata)"
                    .to_string()
            } else {
                format!(
                    "membrane: subscribing to the policy of {} and to the init policy",
                    self.policy_names.join(", ")
                )
            },
        );
        // Until the pod's own policy arrives, the init policy's allows are all that passes.
        if !self.policy_names.is_empty() {
            self.policy_names.push(INIT_POLICY.to_string());
        }
        self.metrics = Metrics::define();
        self.seed_from_shared_data();
        self.open_stream();
        self.set_tick_period(Duration::from_millis(500));
        true
    }

    fn on_tick(&mut self) {
        flush_allocations(self.metrics.allocations);
        if matches!(self.config.mode, Mode::Noop | Mode::Fetch) {
            return;
        }
        self.ticks += 1;
        self.tally.flush(&self.metrics);
        if self.stream.is_none() && self.ticks >= self.reconnect_at {
            self.open_stream();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        match self.config.mode {
            Mode::Kafka => Some(ContextType::StreamContext),
            Mode::Enforce | Mode::Noop | Mode::Fetch => Some(ContextType::HttpContext),
        }
    }

    fn create_stream_context(&self, _id: u32) -> Option<Box<dyn StreamContext>> {
        if self.gateway {
            return Some(Box::new(Pass));
        }
        Some(Box::new(KafkaStream {
            state: self.state.clone(),
            tally: self.tally.clone(),
            max_frame: self.config.kafka_max_frame,
            conn: None,
            session: KafkaSession::default(),
            requests: BytesMut::new(),
            owed: VecDeque::new(),
            answer: BytesMut::new(),
            passing: 0,
            swallowing: 0,
            passthrough: false,
            classified_at: 0,
            closed: false,
        }))
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        match self.config.mode {
            Mode::Noop => return Some(Box::new(Noop)),
            Mode::Fetch => {
                return Some(Box::new(Fetch {
                    state: self.state.clone(),
                }));
            }
            _ if self.gateway => return Some(Box::new(Noop)),
            _ => {}
        }
        Some(Box::new(Http {
            state: self.state.clone(),
            conns: self.conns.clone(),
            tally: self.tally.clone(),
            crash_on_header: self.config.crash_on_header.clone(),
            normalize_path: self.config.normalize_path,
            upstream: self.config.upstream,
        }))
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}

/// A connection whose bytes pass unread (a gateway's).
struct Pass;

impl Context for Pass {}

impl StreamContext for Pass {}

/// The floor of a judging filter: a context that holds its policy (so the SDK boxes it, as it
/// boxes `Http`), and the reads `Http` makes; no judging.
struct Fetch {
    state: Rc<RefCell<PolicyState>>,
}

impl Context for Fetch {}

impl HttpContext for Fetch {
    fn on_http_request_headers(&mut self, _headers: usize, _eos: bool) -> Action {
        // The same reads as `Http`: one property and two headers.
        let id = property(b"connection_id");
        let method = self.get_http_request_header(":method");
        let path = self.get_http_request_header(":path");
        std::hint::black_box((&self.state, id, method, path));
        Action::Continue
    }
}

struct Http {
    state: Rc<RefCell<PolicyState>>,
    conns: Rc<RefCell<HashMap<u64, Rc<ConnFacts>>>>,
    tally: Rc<Tally>,
    crash_on_header: Option<String>,
    normalize_path: bool,
    upstream: bool,
}

impl Context for Http {}

#[allow(unsafe_code)]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    /// Answers the ABI's status, 0 for Ok: taken as an integer, since a host may answer codes
    /// the SDK's `Status` enum lacks.
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// A property as bytes; errors (which the SDK's own call would panic on) are treated as absent.
/// `path` is already in the ABI's form, its segments joined by NUL (`b"upstream\0address"`):
/// the SDK's `get_property` takes a `Vec` of segments and serializes it on every call, two
/// allocations per read that the per-request reads do not need. What the host answers is
/// allocated in the module by the host (the ABI's way), and owned here.
#[allow(unsafe_code)]
fn property(path: &'static [u8]) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: the path outlives the call; on Ok the host has allocated `size` bytes at `data`
    // with this module's allocator (proxy_on_memory_allocate), handed over to the Vec.
    unsafe {
        match proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) {
            0 if !data.is_null() => Some(Vec::from_raw_parts(data, size, size)),
            _ => None,
        }
    }
}

/// The pod's addresses from Istio's node metadata (`INSTANCE_IPS`, comma-separated). A sidecar
/// only ever judges traffic to or from its own pod, so its own endpoint's policy is all it needs.
fn instance_ips() -> Vec<String> {
    let Some(text) = property(b"xds\0node\0metadata\0INSTANCE_IPS")
        .or_else(|| property(b"node\0metadata\0INSTANCE_IPS"))
        .and_then(|v| String::from_utf8(v).ok())
    else {
        return Vec::new();
    };
    text.split(',')
        .map(str::trim)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|a| a.to_string())
        .collect()
}

fn address(path: &'static [u8]) -> Option<(IpAddr, u16)> {
    let text = String::from_utf8(property(path)?).ok()?;
    text.parse::<SocketAddr>().ok().map(|a| (a.ip(), a.port()))
}

/// Reads what the filter needs to know about the request's connection.
fn read_conn_facts() -> Option<ConnFacts> {
    let direction = match property(b"xds\0listener_direction").as_deref() {
        Some([2, ..]) => Direction::Outbound,
        _ => Direction::Inbound,
    };
    let (source, _) = address(b"source\0address")?;
    let (destination, port) = address(b"destination\0address")?;
    let mtls = property(b"connection\0mtls").is_some_and(|v| v.first() == Some(&1));
    let peer_spiffe = if mtls {
        property(b"connection\0uri_san_peer_certificate")
            .and_then(|v| String::from_utf8(v).ok())
            .map(Rc::from)
    } else {
        None
    };
    Some(ConnFacts {
        direction,
        source,
        destination,
        port,
        peer_spiffe,
    })
}

/// The request's headers, read from Envoy on first use (most rules name none).
#[derive(Default)]
struct Headers {
    all: std::cell::OnceCell<Vec<(String, Vec<u8>)>>,
}

impl HeaderLookup for Headers {
    /// Every value of the header, in order: Envoy's single-value read returns only the first
    /// copy of a repeated header, and a rule judges all of them (as the proxy does).
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        let all = self.all.get_or_init(|| {
            hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
        });
        all.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .any(|(_, v)| f(v))
    }
}

impl Http {
    /// The connection's facts, read once per connection (one property read per request after
    /// the first).
    fn conn_facts(&self) -> Option<Rc<ConnFacts>> {
        // `connection_id`, not `connection.id`: the latter builds Envoy's CEL connection
        // wrapper in a fresh arena and looks the field up by name, on every request.
        let id = property(b"connection_id")
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes);
        if let Some(facts) = id.and_then(|id| self.conns.borrow().get(&id).cloned()) {
            return Some(facts);
        }
        let facts = Rc::new(read_conn_facts()?);
        Tally::count(&self.tally.connections);
        if let Some(id) = id {
            let mut conns = self.conns.borrow_mut();
            if conns.len() >= CONN_CACHE_MAX {
                conns.clear();
            }
            conns.insert(id, facts.clone());
        }
        Some(facts)
    }

    fn header(&self, name: &str) -> String {
        self.get_http_request_header(name).unwrap_or_default()
    }

    fn allow(&self, conn: &ConnFacts) -> Action {
        Tally::count(&self.tally.allowed[conn.direction as usize]);
        Action::Continue
    }

    /// Answers 403 and logs the deny (`request`: method and path when already fetched).
    fn deny(
        &self,
        facts: Option<(&ConnFacts, &Parties<'_>)>,
        why: &str,
        request: Option<(String, String)>,
    ) -> Action {
        if let Some((c, _)) = facts {
            Tally::count(&self.tally.denied[c.direction as usize]);
        }
        // Formatting costs more than the log call: skip it when Envoy would drop the line.
        if hostcalls::get_log_level().is_ok_and(|l| (l as u32) <= LogLevel::Info as u32) {
            self.log_deny(facts, why, request);
        }
        self.send_http_response(
            403,
            vec![("content-type", "text/plain")],
            Some(b"Access denied\r\n"),
        );
        Action::Pause
    }

    /// Answers 400 to a request whose path cannot be normalized (as the proxy does).
    fn refuse_path(&self, conn: &ConnFacts, method: &str, path: &str, e: PathError) -> Action {
        Tally::count(&self.tally.denied[conn.direction as usize]);
        log(
            LogLevel::Info,
            &format!(
                "membrane: refused {} {method} {path:?}: {e}",
                conn.direction.name()
            ),
        );
        self.send_http_response(
            400,
            vec![("content-type", "text/plain")],
            Some(b"Bad Request\r\n"),
        );
        Action::Pause
    }

    fn log_deny(
        &self,
        facts: Option<(&ConnFacts, &Parties<'_>)>,
        why: &str,
        request: Option<(String, String)>,
    ) {
        let (method, path) =
            request.unwrap_or_else(|| (self.header(":method"), self.header(":path")));
        let line = match facts {
            Some((c, p)) => {
                let local = p.local.map_or_else(
                    || "no endpoint".to_string(),
                    |e| format!("{} identity {}", e.name, e.identity),
                );
                let peer = c
                    .peer_spiffe
                    .as_deref()
                    .map_or_else(String::new, |s| format!(" ({s})"));
                let (from, to) = match c.direction {
                    Direction::Inbound => (
                        format!("{} identity {}{peer}", p.remote_addr, p.remote),
                        local,
                    ),
                    Direction::Outbound => {
                        (local, format!("{} identity {}", p.remote_addr, p.remote))
                    }
                };
                format!(
                    "membrane: denied {} {method} {path} from {from} to {to} port {}: {why}",
                    c.direction.name(),
                    c.port
                )
            }
            None => format!("membrane: denied {method} {path}: {why}"),
        };
        log(LogLevel::Info, &line);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _eos: bool) -> Action {
        if let Some(h) = &self.crash_on_header
            && self.get_http_request_header(h).is_some()
        {
            panic!("membrane: {h} asked for a crash (crash_on_header is set: testing only)");
        }
        let Some(cached) = self.conn_facts() else {
            return self.deny(None, "no source or destination address", None);
        };
        // Read per request: each request, and each retry, may go to another backend.
        let picked;
        let conn = if self.upstream && cached.direction == Direction::Outbound {
            let Some((destination, port)) = address(b"upstream\0address") else {
                Tally::count(&self.tally.denied[Direction::Outbound as usize]);
                return self.deny(
                    None,
                    "no upstream address (upstream: true needs the filter among a cluster's \
                     upstream HTTP filters)",
                    None,
                );
            };
            picked = ConnFacts {
                destination,
                port,
                ..(*cached).clone()
            };
            &picked
        } else {
            &*cached
        };
        let state = self.state.clone();
        let state = state.borrow();
        let parties = state.parties(conn);
        let sets = match state.judge_l4(conn, &parties, 6) {
            L4Verdict::Allow(_) => return self.allow(conn),
            L4Verdict::Deny(why) => return self.deny(Some((conn, &parties)), &why, None),
            L4Verdict::L7(sets) => sets,
        };
        // Only the pseudo-headers the rules read; other headers are fetched one by one if a
        // rule asks for them, the authority only if it can change the verdict.
        let (method, path) = (self.header(":method"), self.header(":path"));
        let host = || self.header(":authority");
        let headers = Headers::default();
        let (verdict, normalized) = if !self.normalize_path {
            (
                judge_http_fetching_host(sets, &method, &path, &headers, host),
                None,
            )
        } else {
            match judge_http_path(sets, &method, &path, &headers, host) {
                Ok(judged) => judged,
                Err(e) => return self.refuse_path(conn, &method, &path, e),
            }
        };
        match verdict {
            Verdict::Allow(_) => {
                // The upstream gets the path that was judged (the proxy forwards it too).
                if let Some(p) = normalized {
                    self.set_http_request_header(":path", Some(&p));
                }
                self.allow(conn)
            }
            Verdict::Deny(why) => self.deny(Some((conn, &parties)), &why, Some((method, path))),
        }
    }
}

/// A Kafka connection through the sidecar: request frames are judged by the shared Kafka
/// session before a byte of them moves on; the broker's answers are streamed back, rewritten
/// where policy needs it. proxy-wasm cannot write to the client, so a request answered here
/// (denied, or a too-new ApiVersions) is replaced on its way to the broker by an ApiVersions v0
/// placeholder with the same correlation id, and the broker's answer to that placeholder by the
/// local answer: the client gets its authorization error, in order, on a connection that stays
/// usable.
struct KafkaStream {
    state: Rc<RefCell<PolicyState>>,
    tally: Rc<Tally>,
    max_frame: usize,
    conn: Option<ConnFacts>,
    session: KafkaSession,
    /// Client bytes not yet making a whole frame (Envoy's buffer is replaced by what is
    /// forwarded, so each call shows only new bytes).
    requests: BytesMut,
    /// What the client is owed, in request order.
    owed: VecDeque<Owed>,
    /// The start of the next answer, gathered until it can be judged.
    answer: BytesMut,
    /// Bytes of the current answer still to stream on untouched.
    passing: usize,
    /// Bytes of a placeholder's answer still to drop.
    swallowing: usize,
    /// The connection's port carries no Kafka rules: bytes pass unread.
    passthrough: bool,
    /// The policy generation it was classified under.
    classified_at: u64,
    closed: bool,
}

impl Context for KafkaStream {}

impl KafkaStream {
    fn close(&mut self, why: &str) {
        log(
            LogLevel::Warn,
            &format!("membrane: kafka: {why}; closing the connection"),
        );
        self.closed = true;
        self.close_downstream();
        self.close_upstream();
    }

    /// Whether a new connection's bytes pass unread (`Ok(true)`: its port has no L7 rules, or
    /// HTTP rules, which the HTTP filter enforces), are parsed as Kafka (`Ok(false)`), or must
    /// not pass at all (`Err`). So the filter can sit on every port of a sidecar, as Istio's
    /// WasmPlugin puts it, and policy decides which ports speak Kafka. A parsed connection's
    /// L3/L4 verdict is taken again for every request; a passed one is classified again after
    /// each policy update ([`still_passes`](Self::still_passes)).
    fn classify(&mut self, conn: &ConnFacts) -> Result<bool, String> {
        let state = self.state.clone();
        let state = state.borrow();
        self.classified_at = state.generation;
        let parties = state.parties(conn);
        match StreamMode::of(state.judge_l4(conn, &parties, 6)) {
            StreamMode::Refuse(why) => {
                Tally::count(&self.tally.kafka_denied[conn.direction as usize]);
                Err(why)
            }
            StreamMode::Pass => Ok(true),
            StreamMode::Kafka => Ok(false),
        }
    }

    /// For a connection passed unread: whether the policy in force still says so. One that its
    /// port's new rules would parse as Kafka (its frame boundaries are unknown mid-stream) or
    /// that L3/L4 no longer allows is closed.
    fn still_passes(&mut self, conn: &ConnFacts) -> bool {
        if !self.passthrough || self.state.borrow().generation == self.classified_at {
            return true;
        }
        match self.classify(conn) {
            Ok(true) => true,
            Ok(false) => {
                self.close("the port now has Kafka rules; a connection passed unread until now cannot be parsed from its middle");
                false
            }
            Err(why) => {
                self.close(&why);
                false
            }
        }
    }

    /// Counts and logs how a request was settled.
    fn account(&self, conn: &ConnFacts, record: &Record) {
        let dir = conn.direction as usize;
        match record.verdict {
            "forwarded" => Tally::count(&self.tally.kafka_allowed[dir]),
            _ => Tally::count(&self.tally.kafka_denied[dir]),
        }
        if record.verdict == "forwarded" && record.denied_topics.is_empty()
            || hostcalls::get_log_level().is_ok_and(|l| (l as u32) > LogLevel::Info as u32)
        {
            return;
        }
        let state = self.state.borrow();
        let parties = state.parties(conn);
        let local = parties.local.map_or_else(
            || "no endpoint".to_string(),
            |e| format!("{} identity {}", e.name, e.identity),
        );
        let peer = conn
            .peer_spiffe
            .as_deref()
            .map_or_else(String::new, |s| format!(" ({s})"));
        let remote = format!("{} identity {}{peer}", parties.remote_addr, parties.remote);
        let (from, to) = match conn.direction {
            Direction::Inbound => (remote, local),
            Direction::Outbound => (local, remote),
        };
        log(
            LogLevel::Info,
            &format!(
                "membrane: {} {} kafka {} v{} correlation {} client {:?} topics {:?} from {from} to {to} port {}: denied topics {:?}, error code {:?}{}",
                record.verdict,
                conn.direction.name(),
                record.api(),
                record.api_version,
                record.correlation_id,
                record.client_id.as_deref().unwrap_or(""),
                record.topics,
                conn.port,
                record.denied_topics,
                record.error_code,
                record
                    .reason
                    .as_deref()
                    .map_or_else(String::new, |r| format!(" ({r})")),
            ),
        );
    }

    /// Settles every whole request frame gathered; returns what goes to the broker.
    fn settle_requests(&mut self, conn: &ConnFacts) -> Result<BytesMut, String> {
        let mut out = BytesMut::new();
        loop {
            let len = match frame_len(&self.requests, self.max_frame) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(out),
                Err(e) => {
                    let record = Record::refused(&e);
                    self.account(conn, &record);
                    return Err(e.to_string());
                }
            };
            if self.requests.len() < LENGTH_PREFIX + len {
                return Ok(out);
            }
            let frame = self.requests.split_to(LENGTH_PREFIX + len).freeze();
            let state = self.state.clone();
            let state = state.borrow();
            let parties = state.parties(conn);
            let judge = KafkaPolicy::of(&state, conn, &parties);
            let settled = self.session.settle(frame, &judge);
            self.account(conn, &settled.record);
            match settled.to_broker {
                ToBroker::Close => {
                    return Err(settled
                        .record
                        .reason
                        .unwrap_or_else(|| "request refused".into()));
                }
                ToBroker::Frame(frame) => out.extend_from_slice(&frame),
                ToBroker::Nothing => {
                    if let Some(Owed::Local(_)) = &settled.owed {
                        out.extend_from_slice(&placeholder_request(settled.record.correlation_id));
                    }
                }
            }
            if let Some(owed) = settled.owed {
                self.owed.push_back(owed);
            }
        }
    }

    /// Takes up to `want` bytes of `input` into the gathered answer; whether it now has `want`.
    fn gather(&mut self, input: &mut &[u8], want: usize) -> bool {
        let take = want.saturating_sub(self.answer.len()).min(input.len());
        self.answer.extend_from_slice(&input[..take]);
        *input = &input[take..];
        self.answer.len() >= want
    }

    /// Passes broker bytes through the answer queue; returns what goes to the client.
    fn relay_answers(&mut self, conn: &ConnFacts, mut input: &[u8]) -> Result<BytesMut, String> {
        let mut out = BytesMut::with_capacity(input.len());
        loop {
            if self.passing > 0 {
                let n = self.passing.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.passing -= n;
                input = &input[n..];
            }
            if self.swallowing > 0 {
                let n = self.swallowing.min(input.len());
                self.swallowing -= n;
                input = &input[n..];
            }
            if input.is_empty() || self.passing > 0 || self.swallowing > 0 {
                return Ok(out);
            }
            // At the start of an answer: its length, then as much as its handling needs.
            if !self.gather(&mut input, LENGTH_PREFIX) {
                return Ok(out);
            }
            let len = i32::from_be_bytes([
                self.answer[0],
                self.answer[1],
                self.answer[2],
                self.answer[3],
            ]);
            let len = usize::try_from(len)
                .ok()
                .filter(|l| *l >= 4)
                .ok_or_else(|| format!("broker answer with length {len}"))?;
            let want = match self.owed.front() {
                None => return Err("the broker answered a request nobody made".into()),
                Some(Owed::Local(_)) => LENGTH_PREFIX,
                Some(Owed::Broker(e)) if e.rewrites() => {
                    if len > MAX_REWRITTEN_RESPONSE {
                        return Err(format!(
                            "broker answer of {len} bytes is too large to rewrite"
                        ));
                    }
                    LENGTH_PREFIX + len
                }
                Some(Owed::Broker(_)) => LENGTH_PREFIX + len.min(RESPONSE_HEAD),
            };
            if !self.gather(&mut input, want) {
                return Ok(out);
            }
            let gathered = self.answer.split().freeze();
            match self.owed.pop_front() {
                Some(Owed::Local(answer)) => {
                    out.extend_from_slice(&answer);
                    self.swallowing = len;
                }
                Some(Owed::Broker(expect)) if expect.rewrites() => {
                    let state = self.state.clone();
                    let state = state.borrow();
                    let parties = state.parties(conn);
                    let judge = KafkaPolicy::of(&state, conn, &parties);
                    let body: Bytes = gathered.slice(LENGTH_PREFIX..);
                    out.extend_from_slice(&self.session.rewrite(expect, body, &judge)?);
                }
                Some(Owed::Broker(expect)) => {
                    self.session.pass_head(expect, &gathered[LENGTH_PREFIX..])?;
                    out.extend_from_slice(&gathered);
                    self.passing = LENGTH_PREFIX + len - gathered.len();
                }
                None => return Err("the broker answered a request nobody made".into()),
            }
        }
    }
}

impl StreamContext for KafkaStream {
    fn on_downstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        if self.closed {
            return Action::Pause;
        }
        // Read at the first bytes, not at on_new_connection: on an mTLS listener the peer
        // certificate is known only once the handshake is done.
        if self.conn.is_none() {
            self.conn = read_conn_facts();
            let Some(conn) = self.conn.clone() else {
                self.close("no source or destination address");
                return Action::Pause;
            };
            match self.classify(&conn) {
                Ok(passthrough) => self.passthrough = passthrough,
                Err(why) => {
                    self.close(&why);
                    return Action::Pause;
                }
            }
        }
        let Some(conn) = self.conn.clone() else {
            return Action::Pause;
        };
        if !self.still_passes(&conn) {
            return Action::Pause;
        }
        if self.passthrough || size == 0 {
            return Action::Continue;
        }
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        self.requests.extend_from_slice(&data);
        match self.settle_requests(&conn) {
            Ok(out) => {
                if out[..] != data[..] {
                    self.set_downstream_data(0, size, &out);
                }
                Action::Continue
            }
            Err(why) => {
                self.set_downstream_data(0, size, &[]);
                self.close(&why);
                Action::Pause
            }
        }
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let Some(conn) = self.conn.clone().filter(|_| !self.closed) else {
            return Action::Pause;
        };
        if !self.still_passes(&conn) {
            return Action::Pause;
        }
        if self.passthrough || size == 0 {
            return Action::Continue;
        }
        // The middle of a large answer (a Fetch) passes without being read into the VM.
        if self.passing >= size && self.answer.is_empty() {
            self.passing -= size;
            return Action::Continue;
        }
        let data = self.get_upstream_data(0, size).unwrap_or_default();
        match self.relay_answers(&conn, &data) {
            Ok(out) => {
                if out[..] != data[..] {
                    self.set_upstream_data(0, size, &out);
                }
                Action::Continue
            }
            Err(why) => {
                self.set_upstream_data(0, size, &[]);
                self.close(&why);
                Action::Pause
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Config, Mode};

    #[test]
    fn modes_parse_by_name_and_unknown_ones_are_refused() {
        let mode = |json: &str| serde_json::from_str::<Config>(json).map(|c| c.mode);
        assert_eq!(mode("{}").unwrap(), Mode::Enforce);
        assert_eq!(mode(r#"{"mode":"noop"}"#).unwrap(), Mode::Noop);
        assert_eq!(mode(r#"{"mode":"fetch"}"#).unwrap(), Mode::Fetch);
        assert_eq!(mode(r#"{"mode":"kafka"}"#).unwrap(), Mode::Kafka);
        assert!(mode(r#"{"mode":"judge-less"}"#).is_err());
    }
}
