//! The proxy-wasm side: each VM's root context keeps its own ADS stream to the agent (an Envoy
//! cluster named in the configuration), reconnects from `on_tick`, ACKs what compiles and NACKs
//! what does not (keeping the last good state); HTTP contexts judge each request with
//! [`PolicyState`] and answer a deny with `403 Access denied`.
//!
//! Every policy a VM accepts is also written to Envoy's shared data, and a new VM (a worker
//! starting, or one rebuilt by `failure_policy: FAIL_RELOAD` after a panic) seeds itself from
//! there before its own stream answers, so a reload never opens a default-deny gap.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use membrane_api::discovery::{DiscoveryRequest, DiscoveryResponse, Node, Status};
use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, SPIFFE_IDENTITIES_TYPE};
use membrane_policy::l7::http::HeaderLookup;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
use serde::Deserialize;

use crate::state::{
    ConnFacts, Direction, L4Verdict, Parties, PolicyState, Verdict, compile_hosts,
    compile_policies, compile_spiffe, judge_http_fetching_host,
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
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Enforce,
    Noop,
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
    applied: u32,
    rejected: u32,
    seeded: u32,
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| {
            hostcalls::define_metric(MetricType::Counter, &format!("membrane.{name}")).unwrap_or(0)
        };
        Metrics {
            allowed: [
                counter("http.inbound.allowed"),
                counter("http.outbound.allowed"),
            ],
            denied: [
                counter("http.inbound.denied"),
                counter("http.outbound.denied"),
            ],
            applied: counter("xds.applied"),
            rejected: counter("xds.rejected"),
            seeded: counter("xds.seeded"),
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
}

impl Tally {
    fn flush(&self, metrics: &Metrics) {
        for (cells, ids) in [
            (&self.allowed, &metrics.allowed),
            (&self.denied, &metrics.denied),
        ] {
            for (cell, id) in cells.iter().zip(ids) {
                let n = cell.take();
                if n > 0 {
                    hostcalls::increment_metric(*id, n).ok();
                }
            }
        }
    }
}

fn log(level: LogLevel, message: &str) {
    hostcalls::log(level, message).ok();
}

#[derive(Default)]
struct Root {
    config: Config,
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
            resource_names: vec![],
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
            Ok(c) if c.mode == Mode::Enforce && c.xds_cluster.is_empty() => {
                log(LogLevel::Error, "membrane: xds_cluster is required");
                return false;
            }
            Ok(c) => self.config = c,
            Err(e) => {
                log(LogLevel::Error, &format!("membrane: configuration: {e}"));
                return false;
            }
        }
        if self.config.mode == Mode::Noop {
            return true;
        }
        if self.config.node.is_empty() {
            self.config.node = property(&["xds", "node", "id"])
                .and_then(|v| String::from_utf8(v).ok())
                .unwrap_or_default();
        }
        self.metrics = Metrics::define();
        self.seed_from_shared_data();
        self.open_stream();
        self.set_tick_period(Duration::from_millis(500));
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        self.tally.flush(&self.metrics);
        if self.stream.is_none() && self.ticks >= self.reconnect_at {
            self.open_stream();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        if self.config.mode == Mode::Noop {
            return Some(Box::new(Noop));
        }
        Some(Box::new(Http {
            state: self.state.clone(),
            conns: self.conns.clone(),
            tally: self.tally.clone(),
            crash_on_header: self.config.crash_on_header.clone(),
        }))
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}

struct Http {
    state: Rc<RefCell<PolicyState>>,
    conns: Rc<RefCell<HashMap<u64, Rc<ConnFacts>>>>,
    tally: Rc<Tally>,
    crash_on_header: Option<String>,
}

impl Context for Http {}

/// A property as bytes; errors (which the SDK's own call would panic on) are treated as absent.
fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

fn address(path: &[&str]) -> Option<(IpAddr, u16)> {
    let text = String::from_utf8(property(path)?).ok()?;
    text.parse::<SocketAddr>().ok().map(|a| (a.ip(), a.port()))
}

/// Reads what the filter needs to know about the request's connection.
fn read_conn_facts() -> Option<ConnFacts> {
    let direction = match property(&["xds", "listener_direction"]).as_deref() {
        Some([2, ..]) => Direction::Outbound,
        _ => Direction::Inbound,
    };
    let (source, _) = address(&["source", "address"])?;
    let (destination, port) = address(&["destination", "address"])?;
    let mtls = property(&["connection", "mtls"]).is_some_and(|v| v.first() == Some(&1));
    let peer_spiffe = if mtls {
        property(&["connection", "uri_san_peer_certificate"])
            .and_then(|v| String::from_utf8(v).ok())
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

struct Headers;

impl HeaderLookup for Headers {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
            .is_some_and(|v| f(&v))
    }
}

impl Http {
    /// The connection's facts, read once per connection (one property read per request after
    /// the first).
    fn conn_facts(&self) -> Option<Rc<ConnFacts>> {
        let id = property(&["connection", "id"])
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes);
        if let Some(facts) = id.and_then(|id| self.conns.borrow().get(&id).cloned()) {
            return Some(facts);
        }
        let facts = Rc::new(read_conn_facts()?);
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
        let n = &self.tally.allowed[conn.direction as usize];
        n.set(n.get() + 1);
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
            let n = &self.tally.denied[c.direction as usize];
            n.set(n.get() + 1);
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
        let Some(conn) = self.conn_facts() else {
            return self.deny(None, "no source or destination address", None);
        };
        let state = self.state.clone();
        let state = state.borrow();
        let parties = state.parties(&conn);
        let sets = match state.judge_l4(&conn, &parties, 6) {
            L4Verdict::Allow(_) => return self.allow(&conn),
            L4Verdict::Deny(why) => return self.deny(Some((&conn, &parties)), &why, None),
            L4Verdict::L7(sets) => sets,
        };
        // Only the pseudo-headers the rules read; other headers are fetched one by one if a
        // rule asks for them, the authority only if it can change the verdict.
        let (method, path) = (self.header(":method"), self.header(":path"));
        let verdict =
            judge_http_fetching_host(sets, &method, &path, &Headers, || self.header(":authority"));
        match verdict {
            Verdict::Allow(_) => self.allow(&conn),
            Verdict::Deny(why) => self.deny(Some((&conn, &parties)), &why, Some((method, path))),
        }
    }
}
