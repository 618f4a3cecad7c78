//! Per-request handling: judge by the policy in force when the headers arrived, answer a refusal
//! locally, or forward to the connection's destination and stream the answer back.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either as EitherFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use membrane_codec::http1::protocol_name;
use membrane_policy::l7::http::{HeaderLookup, HttpRequest};
use membrane_policy::rule::Direction;

use crate::guard::{GuardState, Limits, Refusal, Upgrades};
use crate::h1_upstream::{self, UpstreamBody};
use crate::policy::{ConnDecision, ConnPolicy, Decision, Peers, PolicyHandle, Snapshot};
use crate::telemetry::{
    DirectionLabel, FlowRecord, FlowSink, Metrics, RequestLabels, no_policy, rfc3339,
};
use crate::upstream::Upstreams;
use membrane_codec::path::{lenient_reading, normalize_target};

/// The body of a response.
#[derive(Debug)]
pub enum ResponseBody {
    /// A local answer.
    Local(Full<Bytes>),
    /// An upstream's, through hyper's client (HTTP/2 upstreams, request bodies, upgrades).
    Hyper(Incoming),
    /// An upstream's, decoded from a pooled HTTP/1.1 socket (see `crate::h1_upstream`).
    Upstream(UpstreamBody),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ResponseBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ResponseBody::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(b) => b.is_end_stream(),
            ResponseBody::Hyper(b) => b.is_end_stream(),
            ResponseBody::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(b) => b.size_hint(),
            ResponseBody::Hyper(b) => b.size_hint(),
            ResponseBody::Upstream(b) => b.size_hint(),
        }
    }
}

fn hyper_response(r: Result<Response<Incoming>, String>) -> Result<Response<ResponseBody>, String> {
    r.map(|resp| resp.map(ResponseBody::Hyper))
}

/// The protocol spoken to upstreams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 for every request.
    Http1,
    /// HTTP/2 with prior knowledge for every request.
    Http2,
    /// The request's own: HTTP/2 for a request that came as HTTP/2 (a client speaks it with
    /// prior knowledge to a server it knows speaks it, gRPC for one), as Cilium's Envoy does.
    /// A destination that answers the HTTP/2 preface as an HTTP/1 server does is sent HTTP/1.1.
    Downstream,
}

/// Settings of the HTTP proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Head, header-count and URI limits.
    pub limits: Limits,
    /// Normalize request paths before matching and forwarding (see `membrane_codec::path`).
    pub normalize_paths: bool,
    /// Protocols an allowed request may switch the connection to; other `Upgrade` offers are
    /// dropped (h2c always: its HTTP/2 requests would pass unjudged).
    pub upgrades: Upgrades,
    /// Body of a `403` answer.
    pub deny_body: Bytes,
    /// Time allowed for a request head to arrive.
    pub header_timeout: Duration,
    /// A connection with no bytes moving and no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed to connect to an upstream.
    pub connect_timeout: Duration,
    /// Time allowed for an upstream's response headers (zero: no limit).
    pub upstream_timeout: Duration,
    /// TCP keepalive idle time on both sides (so idle long-lived connections survive conntrack).
    pub tcp_keepalive: Duration,
    /// The protocol spoken to upstreams.
    pub upstream_protocol: UpstreamProtocol,
    /// Forward plain HTTP/1.1 requests on the direct path (`crate::direct`), and bodyless
    /// requests hyper serves on its upstream sockets (`crate::h1_upstream`); when false, every
    /// request goes through hyper's server and client.
    pub http1_direct: bool,
    /// Concurrent streams per downstream HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// The SO_MARK of upstream sockets for a source identity (the agent's datapath reads the
    /// identity back from it); `None` leaves upstream sockets unmarked.
    pub upstream_mark: Option<fn(u32) -> u32>,
    /// Bound on one Kafka request frame; a longer one closes the connection.
    pub kafka_max_frame: usize,
    /// What a connection with no L7 rule is parsed as (HTTP; Kafka for a reverse proxy in front
    /// of a broker).
    pub unruled_protocol: crate::policy::ConnectionProtocol,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            limits: Limits::default(),
            normalize_paths: true,
            upgrades: Upgrades::default(),
            deny_body: Bytes::from_static(b"Access denied\r\n"),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            tcp_keepalive: Duration::from_secs(60),
            upstream_protocol: UpstreamProtocol::Http1,
            http1_direct: true,
            max_concurrent_streams: 256,
            upstream_mark: None,
            kafka_max_frame: membrane_codec::kafka::DEFAULT_MAX_REQUEST,
            unruled_protocol: crate::policy::ConnectionProtocol::Http,
        }
    }
}

impl ProxyConfig {
    /// How often a connection's task checks its idle, header and (on the direct path) upstream
    /// timeouts: half the shortest, so none overshoots by more than half, but at most once a
    /// second and at least every 10 ms.
    pub fn timeout_check_interval(&self) -> Duration {
        let mut shortest = self.idle_timeout.min(self.header_timeout);
        if !self.upstream_timeout.is_zero() {
            shortest = shortest.min(self.upstream_timeout);
        }
        (shortest / 2)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(10))
    }
}

/// What every connection of a proxy shares.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub config: ProxyConfig,
    /// The policy in force.
    pub policy: Arc<PolicyHandle>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Flow records.
    pub flows: FlowSink,
    pub(crate) upstreams: Upstreams,
}

impl Shared {
    /// Shared state with a pooled upstream client built from `config`.
    pub fn new(
        config: ProxyConfig,
        policy: Arc<PolicyHandle>,
        metrics: Arc<Metrics>,
        flows: FlowSink,
    ) -> Shared {
        Shared {
            upstreams: Upstreams::new(&config),
            config,
            policy,
            metrics,
            flows,
        }
    }
}

/// One downstream connection's request handler.
#[derive(Debug)]
pub struct Connection {
    shared: Arc<Shared>,
    src: SocketAddr,
    dst: SocketAddr,
    guard: Arc<GuardState>,
    next_index: AtomicU64,
    inflight: AtomicU32,
    decision: ConnDecision,
}

struct Headers<'a>(&'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.0.get_all(name).iter().any(|v| f(v.as_bytes()))
    }
}

/// Facts of one request for its flow record and metrics.
pub(crate) struct Outcome {
    pub(crate) verdict: &'static str,
    pub(crate) direction: &'static str,
    pub(crate) policy: Arc<str>,
    pub(crate) status: StatusCode,
    pub(crate) reason: Option<String>,
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

impl Connection {
    /// A handler for a connection from `src` to `dst`, judged first by `snapshot`.
    pub fn new(
        shared: Arc<Shared>,
        src: SocketAddr,
        dst: SocketAddr,
        guard: Arc<GuardState>,
        snapshot: &Snapshot,
        peers: Peers,
        decision: Decision,
    ) -> Connection {
        Connection {
            shared,
            src,
            dst,
            guard,
            next_index: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
            decision: ConnDecision::new(src, dst, snapshot, peers, decision),
        }
    }

    /// Whether a request is being handled.
    pub fn busy(&self) -> bool {
        self.inflight.load(Ordering::Relaxed) > 0
    }

    /// The decision under the snapshot in force, recomputed only when the policy changed.
    pub(crate) fn policy(&self, snap: &Snapshot) -> Arc<ConnPolicy> {
        self.decision.under(snap)
    }

    /// What the connection's proxy shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Where the connection goes.
    pub(crate) fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// The arrival index the next request will get.
    pub(crate) fn next_index(&self) -> u64 {
        self.next_index.load(Ordering::Relaxed)
    }

    /// The arrival index of the next request (requests served by either HTTP/1 path count).
    pub(crate) fn take_index(&self) -> u64 {
        self.next_index.fetch_add(1, Ordering::Relaxed)
    }

    /// Handles one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let resp = self.handle_inner(req).await;
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        Ok(resp)
    }

    async fn handle_inner(&self, mut req: Request<Incoming>) -> Response<ResponseBody> {
        let index = self.take_index();
        let started = Instant::now();
        let shared = &*self.shared;
        if req.version() < Version::HTTP_2
            && let Some(refusal) = self.guard.refusal_for(index)
        {
            // The request hyper parsed is the guard's stand-in: record only the refusal.
            let parts = RecordParts::default();
            let cp = self.policy(&self.shared.policy.load());
            return self.local_answer(parts, "", &cp, started, refusal.clone());
        }
        let snap = shared.policy.load();
        let cp = self.policy(&snap);
        let raw_target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // HTTP/1 heads were held to the limits by the guard; HTTP/2 ones arrive decoded.
        if req.version() >= Version::HTTP_2
            && let Err(refusal) = shared
                .config
                .limits
                .check_decoded(req.headers().len(), raw_target.len())
        {
            return self.refused(&req, started, refusal, &cp);
        }
        let target: Cow<'_, str> =
            if shared.config.normalize_paths && req.method() != Method::CONNECT {
                match normalize_target(raw_target) {
                    Ok(t) => t,
                    Err(e) => {
                        let refusal = Refusal {
                            status: 400,
                            reason: e.to_string(),
                        };
                        return self.refused(&req, started, refusal, &cp);
                    }
                }
            } else {
                Cow::Borrowed(raw_target)
            };
        let host = authority(&req);
        // Only offers of allowed protocols are passed on; a request left with none is a plain
        // one (h2c offers always end here). After an upgrade request the guard passes bytes
        // through unchecked, so a connection whose upgrade does not happen must close.
        let upgrade_to = if req.version() == Version::HTTP_11 {
            shared.config.upgrades.kept(
                req.headers()
                    .get_all(header::UPGRADE)
                    .iter()
                    .map(HeaderValue::as_bytes),
            )
        } else {
            None
        };
        let wants_upgrade = upgrade_to.is_some();
        let verdict = {
            let facts = HttpRequest {
                method: req.method().as_str(),
                path: &target,
                host: &host,
                headers: &Headers(req.headers()),
            };
            if shared.config.normalize_paths && req.method() != Method::CONNECT {
                judge_normalized(&cp, &facts)
            } else {
                judge(&cp, &facts)
            }
        };
        let (direction, policy) = match verdict {
            Verdict::Allow { direction, policy } => (direction, policy),
            Verdict::Deny {
                direction,
                l34,
                read_as,
            } => {
                let target = target.into_owned();
                self.record(
                    &req,
                    &target,
                    &host,
                    &cp,
                    started,
                    denied_outcome(direction, l34, read_as),
                );
                let mut resp = self.deny_response();
                // After a refused upgrade request the guard would pass bytes through unchecked.
                if l34 || wants_upgrade {
                    close(&mut resp);
                }
                return resp;
            }
        };
        let host = host.into_owned();
        if req.method() == Method::CONNECT {
            let refusal = Refusal {
                status: 501,
                reason: "CONNECT is not supported by membrane's proxy".into(),
            };
            return self.refused(&req, started, refusal, &cp);
        }
        let target = target.into_owned();
        let downstream_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let record_parts = RecordParts::new(&shared.flows, parts.method.as_str(), &host);
        // `te: trailers` is the one TE an HTTP/2 hop carries, and gRPC servers refuse calls
        // without it.
        let te_trailers = accepts_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers, wants_upgrade);
        if let Some(offers) = upgrade_to
            .as_deref()
            .and_then(|v| HeaderValue::from_bytes(v).ok())
        {
            parts.headers.insert(header::UPGRADE, offers);
        }
        // The upstream must see the authority that was judged (an absolute-form URI's wins over
        // Host; HTTP/2 has only :authority; HTTP/1.0 may have none, and then gets the address).
        let authority = if host.is_empty() {
            self.dst.to_string()
        } else {
            host.clone()
        };
        // Upstream sockets act for the source workload.
        let mark = shared.config.upstream_mark.map(|m| m(cp.peers.src.0));
        let h2_upstream = match shared.config.upstream_protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Downstream => {
                parts.version == Version::HTTP_2 && shared.upstreams.speaks_h2(self.dst, mark).await
            }
        };
        let upstream = if h2_upstream {
            // :authority carries the host; the pool connects to the destination.
            parts.headers.remove(header::HOST);
            if te_trailers {
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            parts.version = Version::HTTP_2;
            parts.uri = match Uri::try_from(format!("http://{authority}{target}")) {
                Ok(u) => u,
                Err(_) => return self.unforwardable(record_parts, &target, &cp, started),
            };
            EitherFuture::Left(
                shared
                    .upstreams
                    .send_h2(self.dst, mark, Request::from_parts(parts, body))
                    .map(hyper_response),
            )
        } else if let Some(head) = (shared.config.http1_direct
            && !wants_upgrade
            && body.is_end_stream())
        .then(|| h1_upstream::request_head(&parts.method, &target, &authority, &parts.headers))
        .flatten()
        {
            // Most requests: no body, no upgrade. No hyper client task in between.
            let (shared, dst, method) = (&self.shared, self.dst, parts.method);
            EitherFuture::Right(EitherFuture::Left(async move {
                h1_upstream::send(shared, dst, mark, &head, &method)
                    .await
                    .map(|resp| resp.map(ResponseBody::Upstream))
            }))
        } else {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
            parts.version = Version::HTTP_11;
            parts.uri = match Uri::try_from(target.as_str()) {
                Ok(u) => u,
                Err(_) => return self.unforwardable(record_parts, &target, &cp, started),
            };
            EitherFuture::Right(EitherFuture::Right(
                shared
                    .upstreams
                    .send_h1(self.dst, mark, Request::from_parts(parts, body))
                    .map(hyper_response),
            ))
        };
        let result = if shared.config.upstream_timeout.is_zero() {
            Ok(upstream.await)
        } else {
            tokio::time::timeout(shared.config.upstream_timeout, upstream).await
        };
        let mut resp = match result {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let refusal = Refusal {
                    status: 502,
                    reason: format!("upstream {}: {e}", self.dst),
                };
                return self.local_answer(record_parts, &target, &cp, started, refusal);
            }
            Err(_) => {
                let refusal = Refusal {
                    status: 504,
                    reason: format!("upstream {} sent no response headers in time", self.dst),
                };
                return self.local_answer(record_parts, &target, &cp, started, refusal);
            }
        };
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching
            && (downstream_upgrade.is_none()
                || !switches_to_an_offer(resp.headers(), upgrade_to.as_deref().unwrap_or_default()))
        {
            // Whatever the upstream switched to, the proxy could not judge what follows.
            let refusal = Refusal {
                status: 502,
                reason: format!(
                    "upstream {} switched protocols to {:?}, which the request did not offer",
                    self.dst,
                    resp.headers()
                        .get(header::UPGRADE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default()
                ),
            };
            let mut answer = self.local_answer(record_parts, &target, &cp, started, refusal);
            close(&mut answer);
            return answer;
        }
        if switching && let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(down), Ok(up)) = (down.await, up.await) {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
        strip_hop_by_hop(resp.headers_mut(), switching);
        if wants_upgrade && !switching {
            close(&mut resp);
        }
        self.record_parts(
            record_parts,
            &target,
            &cp,
            started,
            Outcome {
                verdict: "forwarded",
                direction,
                policy,
                status: resp.status(),
                reason: None,
            },
        );
        resp
    }

    fn unforwardable(
        &self,
        parts: RecordParts,
        target: &str,
        cp: &ConnPolicy,
        started: Instant,
    ) -> Response<ResponseBody> {
        let refusal = Refusal {
            status: 400,
            reason: "request target cannot be forwarded".into(),
        };
        self.local_answer(parts, target, cp, started, refusal)
    }

    fn deny_response(&self) -> Response<ResponseBody> {
        text_response(StatusCode::FORBIDDEN, self.shared.config.deny_body.clone())
    }

    /// Answers a refusal locally (`Connection: close` for malformed requests).
    fn refused(
        &self,
        req: &Request<Incoming>,
        started: Instant,
        refusal: Refusal,
        cp: &ConnPolicy,
    ) -> Response<ResponseBody> {
        let parts = RecordParts::new(&self.shared.flows, req.method().as_str(), &authority(req));
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        self.local_answer(parts, target, cp, started, refusal)
    }

    fn local_answer(
        &self,
        parts: RecordParts,
        target: &str,
        cp: &ConnPolicy,
        started: Instant,
        refusal: Refusal,
    ) -> Response<ResponseBody> {
        let answer = self.answer_refusal(parts, target, cp, started, refusal);
        let mut resp = text_response(answer.status, answer.body);
        if answer.close {
            close(&mut resp);
        }
        resp
    }

    /// What to answer for `refusal` (a malformed request, an upstream failure), logged and
    /// recorded; both HTTP/1 paths serve it.
    pub(crate) fn answer_refusal(
        &self,
        parts: RecordParts,
        target: &str,
        cp: &ConnPolicy,
        started: Instant,
        refusal: Refusal,
    ) -> LocalAnswer {
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
        if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED {
            // The upstream failed: the operator needs to hear about it, not only the client.
            eprintln!(
                "membrane-proxy: {} {} -> {}: {}",
                self.src, parts.method, self.dst, refusal.reason
            );
        }
        let body = format!(
            "{}\r\n",
            status.canonical_reason().unwrap_or("Request refused")
        );
        self.record_parts(
            parts,
            target,
            cp,
            started,
            Outcome {
                verdict: "error",
                direction: "none",
                policy: no_policy(),
                status,
                reason: Some(refusal.reason),
            },
        );
        LocalAnswer {
            status,
            body: Bytes::from(body),
            close: status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED,
        }
    }

    fn record(
        &self,
        req: &Request<Incoming>,
        target: &str,
        host: &str,
        cp: &ConnPolicy,
        started: Instant,
        outcome: Outcome,
    ) {
        let parts = RecordParts::new(&self.shared.flows, req.method().as_str(), host);
        self.record_parts(parts, target, cp, started, outcome);
    }

    pub(crate) fn record_parts(
        &self,
        parts: RecordParts,
        target: &str,
        cp: &ConnPolicy,
        started: Instant,
        outcome: Outcome,
    ) {
        let m = &self.shared.metrics;
        let elapsed = started.elapsed();
        m.requests
            .get_or_create(&RequestLabels {
                direction: outcome.direction,
                verdict: outcome.verdict,
                policy: outcome.policy.clone(),
            })
            .inc();
        m.latency
            .get_or_create(&DirectionLabel {
                direction: outcome.direction,
            })
            .observe(elapsed.as_secs_f64());
        if self.shared.flows.wanted() {
            self.shared.flows.publish(FlowRecord {
                protocol: "http",
                time: rfc3339(SystemTime::now() - elapsed),
                src: self.src,
                dst: self.dst,
                src_identity: cp.peers.src.0,
                dst_identity: cp.peers.dst.0,
                method: parts.method,
                path: target.to_string(),
                host: parts.host,
                verdict: outcome.verdict,
                direction: outcome.direction,
                policy: outcome.policy.to_string(),
                status: outcome.status.as_u16(),
                latency_us: elapsed.as_micros() as u64,
                reason: outcome.reason,
                kafka: None,
            });
        }
    }
}

/// The method and host of a flow record (empty unless somebody listens to flows).
#[derive(Default)]
pub(crate) struct RecordParts {
    pub(crate) method: String,
    pub(crate) host: String,
}

impl RecordParts {
    /// The parts, or empty ones when nobody listens to flows: no strings are built per request
    /// then.
    pub(crate) fn new(flows: &FlowSink, method: &str, host: &str) -> RecordParts {
        if flows.wanted() {
            RecordParts {
                method: method.to_string(),
                host: host.to_string(),
            }
        } else {
            RecordParts::default()
        }
    }
}

/// A locally built answer.
pub(crate) struct LocalAnswer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
    /// The connection closes after it.
    pub(crate) close: bool,
}

/// A request's verdict.
pub(crate) enum Verdict {
    /// Every requirement allows; the first allowing one names direction and policy.
    Allow {
        direction: &'static str,
        policy: Arc<str>,
    },
    /// Denied in `direction`: by L3/L4 (the policy changed under an open connection: answer and
    /// close) or by the L7 rules (`read_as`: only as a lenient upstream reads the path, this).
    Deny {
        direction: &'static str,
        l34: bool,
        read_as: Option<String>,
    },
}

/// Judges a request: every requirement (destination ingress, source egress) must allow. The one
/// judgement both HTTP/1 paths and HTTP/2 use.
pub(crate) fn judge(cp: &ConnPolicy, facts: &HttpRequest<'_>) -> Verdict {
    let reqs = match &cp.decision {
        Decision::Deny { direction } => {
            return Verdict::Deny {
                direction: direction_name(*direction),
                l34: true,
                read_as: None,
            };
        }
        Decision::Allow(reqs) => reqs,
    };
    let mut allowing: Option<(&'static str, Arc<str>)> = None;
    for r in reqs {
        match r.allowing_policy(facts) {
            Some(p) => {
                if allowing.is_none() {
                    allowing = Some((direction_name(r.direction), p.clone()));
                }
            }
            None => {
                return Verdict::Deny {
                    direction: direction_name(r.direction),
                    l34: false,
                    read_as: None,
                };
            }
        }
    }
    let (direction, policy) = allowing.unwrap_or(("none", no_policy()));
    Verdict::Allow { direction, policy }
}

/// Judges a request whose path was normalized: it must also be allowed as a lenient upstream
/// would read that path ([`lenient_reading`]: escaped slashes and backslashes as separators,
/// segment parameters cut), so no upstream resolves it to a resource the rules deny.
pub(crate) fn judge_normalized(cp: &ConnPolicy, facts: &HttpRequest<'_>) -> Verdict {
    let verdict = judge(cp, facts);
    if !matches!(verdict, Verdict::Allow { .. }) {
        return verdict;
    }
    let Some(read) = lenient_reading(facts.path) else {
        return verdict;
    };
    let lenient = HttpRequest {
        method: facts.method,
        path: &read,
        host: facts.host,
        headers: facts.headers,
    };
    match judge(cp, &lenient) {
        Verdict::Allow { .. } => verdict,
        Verdict::Deny { direction, l34, .. } => Verdict::Deny {
            direction,
            l34,
            read_as: Some(read),
        },
    }
}

/// The record of a denied request.
pub(crate) fn denied_outcome(
    direction: &'static str,
    l34: bool,
    read_as: Option<String>,
) -> Outcome {
    let reason = if l34 {
        Some("L3/L4 policy denies this connection".into())
    } else {
        read_as.map(|r| format!("no HTTP rule allows the path as a lenient upstream reads it: {r}"))
    };
    Outcome {
        verdict: "denied",
        direction,
        policy: no_policy(),
        status: StatusCode::FORBIDDEN,
        reason,
    }
}

/// The authority a request names: the absolute-form URI's (RFC 9112 §3.2.2: it wins over Host)
/// or `:authority`, else the Host header.
fn authority(req: &Request<Incoming>) -> Cow<'_, str> {
    if let Some(a) = req.uri().authority() {
        return Cow::Borrowed(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map_or(Cow::Borrowed(""), Cow::Borrowed)
}

fn text_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::Local(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Whether a `101` answer switches to one of the protocols `offered` (the allowed offers that
/// were passed on, as one field value).
fn switches_to_an_offer(headers: &HeaderMap, offered: &[u8]) -> bool {
    let mut fields = headers.get_all(header::UPGRADE).iter();
    let (Some(chosen), None) = (fields.next(), fields.next()) else {
        return false;
    };
    let chosen = protocol_name(chosen.as_bytes());
    !chosen.is_empty()
        && !chosen.contains(&b',')
        && offered
            .split(|&b| b == b',')
            .any(|o| protocol_name(o).eq_ignore_ascii_case(chosen))
}

fn close<B>(resp: &mut Response<B>) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Whether the request's TE field offers `trailers` (RFC 9110 §10.1.4).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Removes hop-by-hop fields (those of RFC 9110 §7.6.1 and any the Connection field names);
/// an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        // h2c's upgrade settings, which only the next hop may read (RFC 7540 §3.2.1).
        HeaderName::from_static("http2-settings"),
    ] {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn te_offers_trailers() {
        let te = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TE, HeaderValue::from_static(v));
            }
            accepts_trailers(&h)
        };
        assert!(te(&["trailers"]));
        assert!(te(&["gzip;q=0.5, Trailers"]));
        assert!(te(&["gzip", "trailers"]));
        assert!(!te(&[]));
        assert!(!te(&["gzip, deflate"]));
        assert!(!te(&["trailersx"]));
    }

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut up = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
        assert!(!up.contains_key("x-secret"));
        // h2c's settings go even when the Connection field does not name them.
        let mut h2c = HeaderMap::new();
        h2c.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        strip_hop_by_hop(&mut h2c, false);
        assert!(h2c.is_empty(), "{h2c:?}");
    }

    #[test]
    fn a_switch_must_be_to_one_protocol_offered() {
        let answer = |values: &[&'static str], offered: &str| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::UPGRADE, HeaderValue::from_static(v));
            }
            switches_to_an_offer(&h, offered.as_bytes())
        };
        assert!(answer(&["websocket"], "websocket"));
        assert!(answer(&["WebSocket"], "websocket/13"));
        assert!(answer(&["echo/2"], "websocket, echo"));
        assert!(!answer(&[], "websocket"));
        assert!(!answer(&["h2c"], "websocket"));
        assert!(!answer(&["websocket, h2c"], "websocket"));
        assert!(!answer(&["websocket", "websocket"], "websocket"));
        assert!(!answer(&["echo"], "websocket"));
        assert!(!answer(&["websocket"], ""));
    }
}
