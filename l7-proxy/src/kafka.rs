//! Kafka connections: every request frame is decoded and judged with the policy's Kafka matcher
//! (the same code the wasm filter runs) before a byte of it reaches the broker.
//!
//! Two pumps share a connection. The request pump reads frames from the client (length-prefixed,
//! bounded), decodes them with `membrane_codec::kafka`, judges them by the policy in force when
//! they arrived, forwards the allowed ones and queues what the client must get back, in request
//! order: "the broker's next answer" for a forwarded request, or a synthetic answer for a denied
//! one (its own type and version, its correlation id, TOPIC/GROUP/CLUSTER_AUTHORIZATION_FAILED).
//! The response pump works through that queue, streaming the broker's answers back untouched
//! except for the three that policy needs to see: ApiVersions (narrowed to what membrane parses),
//! Metadata (narrowed to what the client may see) and the session id of a Fetch.
//!
//! Malformed frames, unknown keys and unsupported versions are logged, recorded and close the
//! connection; nothing of them is forwarded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use membrane_codec::kafka::deny::{api_versions_unsupported, denial_error_code, deny_response};
use membrane_codec::kafka::kafka_protocol::messages::{ApiKey, RequestKind};
use membrane_codec::kafka::rewrite::{
    DeniedTopic, amend_metadata_response, clamp_api_versions, fetch_session_id,
    metadata_request_keeping,
};
use membrane_codec::kafka::{
    KafkaError, LENGTH_PREFIX, Request, Topics, api_name, decode_request, frame_len,
};
use membrane_policy::l7::kafka::{KafkaRequest, api_key_name};
use membrane_policy::rule::Direction;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

use crate::policy::{ConnDecision, ConnPolicy, ConnectionProtocol, Decision, Peers, Snapshot};
use crate::service::Shared;
use crate::telemetry::{DirectionLabel, FlowRecord, KafkaFlow, KafkaLabels, rfc3339};

/// Requests in flight per connection before the proxy stops reading from the client.
const MAX_IN_FLIGHT: usize = 1024;
/// Bound on a broker answer that is decoded and rewritten (ApiVersions, Metadata).
const MAX_REWRITTEN_RESPONSE: usize = 64 << 20;
/// Bytes of a passed-through answer read before it is streamed on (enough for a Fetch session id).
const RESPONSE_HEAD: usize = 32;

/// One client connection to a broker.
#[derive(Debug)]
pub struct KafkaConnection {
    shared: Arc<Shared>,
    src: SocketAddr,
    dst: SocketAddr,
    decision: ConnDecision,
    /// Fetch session id -> the topics fetched in it, for judging incremental fetches.
    sessions: Mutex<HashMap<i32, Vec<String>>>,
    pending: AtomicUsize,
}

/// What the client gets back for a request, in request order.
enum Pending {
    /// The broker's next answer, possibly rewritten.
    Broker {
        correlation_id: i32,
        api_version: i16,
        fixup: Fixup,
    },
    /// An answer made by the proxy.
    Local(BytesMut),
}

enum Fixup {
    None,
    ApiVersions,
    Metadata {
        denied: Vec<DeniedTopic>,
        /// Only topics this judge allows stay in the answer.
        visible: TopicJudge,
    },
    FetchSession {
        topics: Vec<String>,
    },
}

/// Judges single topics for a Metadata answer, by the policy the request was judged with.
struct TopicJudge {
    policy: Arc<ConnPolicy>,
    api_version: i16,
    client_id: Option<String>,
}

impl TopicJudge {
    fn allows(&self, topic: &str) -> bool {
        let facts = KafkaRequest {
            api_key: ApiKey::Metadata as i16,
            api_version: self.api_version,
            client_id: self.client_id.as_deref(),
            topics: Some(&[topic]),
        };
        allows_all(&self.policy, &facts)
    }
}

/// Whether every requirement allows the request.
fn allows_all(cp: &ConnPolicy, facts: &KafkaRequest<'_>) -> bool {
    match &cp.decision {
        Decision::Deny { .. } => false,
        Decision::Allow(reqs) => reqs.iter().all(|r| r.judge_kafka(facts).0.is_allowed()),
    }
}

/// Why the request pump stopped.
enum Stop {
    /// The client went away, or the connection must close at once.
    Now,
    /// Shutdown: answer what is in flight, then close.
    Drain,
}

/// How one request was settled, for its flow record and metrics.
struct Settled {
    verdict: &'static str,
    direction: &'static str,
    policy: Arc<str>,
    denied_topics: Vec<String>,
    error_code: Option<i16>,
    reason: Option<String>,
}

impl Settled {
    fn forwarded(direction: &'static str, policy: Arc<str>) -> Settled {
        Settled {
            verdict: "forwarded",
            direction,
            policy,
            denied_topics: Vec::new(),
            error_code: None,
            reason: None,
        }
    }

    fn error(reason: String) -> Settled {
        Settled {
            verdict: "error",
            direction: "none",
            policy: Arc::from(""),
            denied_topics: Vec::new(),
            error_code: None,
            reason: Some(reason),
        }
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

impl KafkaConnection {
    /// A connection from `src` to the broker at `dst`, first judged by `snapshot`.
    pub fn new(
        shared: Arc<Shared>,
        src: SocketAddr,
        dst: SocketAddr,
        snapshot: &Snapshot,
        peers: Peers,
        decision: Decision,
    ) -> KafkaConnection {
        KafkaConnection {
            shared,
            src,
            dst,
            decision: ConnDecision::new(src, dst, snapshot, peers, decision),
            sessions: Mutex::default(),
            pending: AtomicUsize::new(0),
        }
    }

    fn policy(&self) -> Arc<ConnPolicy> {
        self.decision.under(&self.shared.policy.load())
    }

    /// Serves the connection until either side closes, the client breaks the protocol, or
    /// shutdown (then in-flight requests are answered for up to `drain`).
    pub async fn serve(
        self: Arc<Self>,
        client: TcpStream,
        mut shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let cfg = &self.shared.config;
        let mark = cfg
            .upstream_mark
            .map(|m| m(self.decision.last().peers.src.0));
        let upstream =
            match crate::upstream::connect(self.dst, mark, cfg.connect_timeout, cfg.tcp_keepalive)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "membrane-proxy: kafka {} -> {}: broker unreachable: {e}",
                        self.src, self.dst
                    );
                    return;
                }
            };
        let (client_rx, client_tx) = client.into_split();
        let (broker_rx, broker_tx) = upstream.into_split();
        let (queue_tx, queue_rx) = mpsc::channel(MAX_IN_FLIGHT);
        let requests = self
            .clone()
            .request_pump(client_rx, broker_tx, queue_tx, &mut shutdown);
        let responses = self.clone().response_pump(broker_rx, client_tx, queue_rx);
        tokio::pin!(requests, responses);
        tokio::select! {
            _ = &mut responses => {}
            stop = &mut requests => {
                if let Stop::Drain = stop {
                    let _ = tokio::time::timeout(drain, responses).await;
                }
            }
        }
    }

    async fn request_pump(
        self: Arc<Self>,
        client: OwnedReadHalf,
        broker: OwnedWriteHalf,
        queue: mpsc::Sender<Pending>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Stop {
        let max = self.shared.config.kafka_max_frame;
        let idle = self.shared.config.idle_timeout;
        let mut client = client;
        let mut broker = BufWriter::with_capacity(64 * 1024, broker);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            // Settle every complete frame already read.
            loop {
                let len = match frame_len(&buf, max) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        self.refuse_frame(&e);
                        return Stop::Now;
                    }
                };
                if buf.len() < LENGTH_PREFIX + len {
                    buf.reserve(LENGTH_PREFIX + len - buf.len());
                    break;
                }
                let frame = buf.split_to(LENGTH_PREFIX + len).freeze();
                match self.settle(frame, &mut broker, &queue).await {
                    Ok(()) => {}
                    Err(stop) => return stop,
                }
            }
            // About to wait for the client: what was forwarded must leave now.
            if broker.flush().await.is_err() {
                return Stop::Now;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
            tokio::select! {
                read = tokio::time::timeout(idle, client.read_buf(&mut buf)) => match read {
                    Ok(Ok(0)) | Ok(Err(_)) => return Stop::Now,
                    Ok(Ok(_)) => {}
                    // Idle: close unless the broker still owes answers (a long-polling Fetch).
                    Err(_) if self.pending.load(Ordering::Acquire) == 0 => return Stop::Now,
                    Err(_) => {}
                },
                _ = shutdown.wait_for(|s| *s) => return Stop::Drain,
            }
        }
    }

    fn refuse_frame(&self, e: &KafkaError) {
        eprintln!(
            "membrane-proxy: kafka {} -> {}: {e}; closing the connection",
            self.src, self.dst
        );
        let (api_key, api_version) = e.api().unwrap_or((-1, -1));
        let correlation_id = match e {
            KafkaError::UnknownApiKey { correlation_id, .. }
            | KafkaError::UnsupportedVersion { correlation_id, .. }
            | KafkaError::Malformed { correlation_id, .. } => *correlation_id,
            _ => -1,
        };
        let cp = self.policy();
        self.account(
            &cp,
            Instant::now(),
            api_key,
            api_version,
            correlation_id,
            None,
            &Topics::None,
            Settled::error(format!("{} ({})", e, e.kind())),
        );
    }

    /// Judges one frame (length prefix included): forwards it, answers it, or stops.
    async fn settle(
        &self,
        frame: Bytes,
        broker: &mut BufWriter<OwnedWriteHalf>,
        queue: &mpsc::Sender<Pending>,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let req = match decode_request(frame.slice(LENGTH_PREFIX..)) {
            Ok(r) => r,
            Err(KafkaError::UnsupportedVersion {
                api_key: 18,
                correlation_id,
                ..
            }) => {
                // A client newer than membrane: say so the way a broker does, and it retries.
                self.enqueue(
                    queue,
                    Pending::Local(api_versions_unsupported(correlation_id)),
                )
                .await?;
                return Ok(());
            }
            Err(e) => {
                self.refuse_frame(&e);
                return Err(Stop::Now);
            }
        };
        let cp = self.policy();
        let reqs = match &cp.decision {
            Decision::Deny { direction } => {
                let mut s = Settled::error("L3/L4 policy now denies this connection".into());
                s.verdict = "denied";
                s.direction = direction_name(*direction);
                self.account_request(&cp, started, &req, &req.topics(), s);
                return Err(Stop::Now);
            }
            // No L7 requirement any more: requests pass (still parsed, still recorded).
            Decision::Allow(reqs)
                if !reqs.is_empty() && cp.decision.protocol() != ConnectionProtocol::Kafka =>
            {
                let mut s = Settled::error("policy for this port is no longer Kafka".into());
                s.verdict = "denied";
                self.account_request(&cp, started, &req, &req.topics(), s);
                return Err(Stop::Now);
            }
            Decision::Allow(reqs) => reqs,
        };
        let mut topics = req.topics();
        let mut fixup = Fixup::None;
        if let RequestKind::Fetch(fetch) = &req.body {
            topics = self.fetch_topics(fetch, topics);
            if let Topics::Named(t) = &topics
                && req.api_version >= 7
                && fetch.session_epoch != -1
            {
                fixup = Fixup::FetchSession { topics: t.clone() };
            }
        }
        let names: Vec<&str> = match &topics {
            Topics::Named(t) => t.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        let facts = KafkaRequest {
            api_key: req.api_key,
            api_version: req.api_version,
            client_id: req.client_id(),
            topics: match &topics {
                Topics::Unknown => None,
                _ => Some(&names),
            },
        };
        if req.api_key == ApiKey::Metadata as i16 {
            return self
                .settle_metadata(frame, &req, &cp, reqs, &topics, started, broker, queue)
                .await;
        }
        // Every requirement (destination ingress, source egress) must allow.
        let mut credited: Option<(&'static str, Arc<str>)> = None;
        for r in reqs {
            let (verdict, policy) = r.judge_kafka(&facts);
            if !verdict.is_allowed() {
                let denied_topics = match verdict {
                    membrane_policy::l7::kafka::KafkaVerdict::Deny { denied_topics } => {
                        denied_topics
                    }
                    _ => Vec::new(),
                };
                return self
                    .deny(
                        &req,
                        &cp,
                        started,
                        &topics,
                        direction_name(r.direction),
                        denied_topics,
                        queue,
                    )
                    .await;
            }
            if credited.is_none() {
                credited = policy.map(|p| (direction_name(r.direction), p.clone()));
            }
        }
        let (direction, policy) = credited.unwrap_or(("none", Arc::from("")));
        if req.api_key == ApiKey::ApiVersions as i16 {
            fixup = Fixup::ApiVersions;
        }
        self.forward(&req, &frame, fixup, broker, queue).await?;
        self.account_request(
            &cp,
            started,
            &req,
            &topics,
            Settled::forwarded(direction, policy),
        );
        Ok(())
    }

    /// The topics an incremental fetch is about: its own plus those of its session. A session
    /// this connection did not open is unknown, which no topic rule allows.
    fn fetch_topics(
        &self,
        fetch: &membrane_codec::kafka::kafka_protocol::messages::FetchRequest,
        topics: Topics,
    ) -> Topics {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if fetch.session_id == 0 {
            return topics;
        }
        let Some(known) = sessions.get(&fetch.session_id) else {
            return Topics::Unknown;
        };
        let mut all = known.clone();
        if let Topics::Named(t) = topics {
            for name in t {
                if !all.contains(&name) {
                    all.push(name);
                }
            }
        }
        if fetch.session_epoch == -1 {
            sessions.remove(&fetch.session_id);
        }
        Topics::Named(all)
    }

    #[allow(clippy::too_many_arguments)]
    async fn settle_metadata(
        &self,
        frame: Bytes,
        req: &Request,
        cp: &Arc<ConnPolicy>,
        reqs: &[crate::policy::L7Requirement],
        topics: &Topics,
        started: Instant,
        broker: &mut BufWriter<OwnedWriteHalf>,
        queue: &mpsc::Sender<Pending>,
    ) -> Result<(), Stop> {
        let client_id = req.client_id();
        let judge = |topics: Option<&[&str]>| -> Result<(&'static str, Arc<str>), &'static str> {
            let facts = KafkaRequest {
                api_key: req.api_key,
                api_version: req.api_version,
                client_id,
                topics,
            };
            let mut credited = None;
            for r in reqs {
                let (verdict, policy) = r.judge_kafka(&facts);
                if !verdict.is_allowed() {
                    return Err(direction_name(r.direction));
                }
                if credited.is_none() {
                    credited = policy.map(|p| (direction_name(r.direction), p.clone()));
                }
            }
            Ok(credited.unwrap_or(("none", Arc::from(""))))
        };
        // May this client ask for metadata at all?
        let (direction, policy) = match judge(Some(&[])) {
            Ok(c) => c,
            Err(direction) => {
                return self
                    .deny(req, cp, started, topics, direction, topics.names(), queue)
                    .await;
            }
        };
        let mut forward = frame;
        let mut denied = Vec::new();
        let mut denied_names = Vec::new();
        let keep = |t: &str| judge(Some(&[t])).is_ok();
        let every_name_kept = match topics {
            Topics::Named(t) => t.iter().all(|t| keep(t)),
            _ => false,
        };
        let all_topics = matches!(&req.body, RequestKind::Metadata(m) if m.topics.is_none());
        if !all_topics && !every_name_kept {
            let Some((rewritten, dropped)) = metadata_request_keeping(req, &keep) else {
                return self
                    .deny(req, cp, started, topics, direction, topics.names(), queue)
                    .await;
            };
            denied_names = dropped
                .iter()
                .map(|d| {
                    d.name
                        .as_ref()
                        .map_or_else(|| format!("id:{}", d.topic_id), |n| n.to_string())
                })
                .collect();
            forward = rewritten.freeze();
            denied = dropped;
        }
        // Every answer is filtered, not only those to "every topic" requests: a broker may list
        // more than was asked (tansu answers an empty list with every topic).
        let fixup = Fixup::Metadata {
            denied,
            visible: TopicJudge {
                policy: cp.clone(),
                api_version: req.api_version,
                client_id: client_id.map(str::to_string),
            },
        };
        self.forward(req, &forward, fixup, broker, queue).await?;
        let mut settled = Settled::forwarded(direction, policy);
        let nothing_kept = matches!(&req.body, RequestKind::Metadata(m)
            if m.topics.as_ref().is_some_and(|t| t.len() == denied_names.len()));
        if nothing_kept && !denied_names.is_empty() {
            // Forwarded only for the broker list: every topic it named was refused.
            settled.verdict = "denied";
        }
        if !denied_names.is_empty() {
            settled.denied_topics = denied_names;
            settled.error_code = Some(membrane_codec::kafka::TOPIC_AUTHORIZATION_FAILED);
            settled.reason = Some("denied topics answered by the proxy, the rest forwarded".into());
        }
        self.account_request(cp, started, req, topics, settled);
        Ok(())
    }

    /// Answers a denied request locally; a type that cannot carry an authorization error closes
    /// the connection instead.
    #[allow(clippy::too_many_arguments)]
    async fn deny(
        &self,
        req: &Request,
        cp: &Arc<ConnPolicy>,
        started: Instant,
        topics: &Topics,
        direction: &'static str,
        denied_topics: Vec<String>,
        queue: &mpsc::Sender<Pending>,
    ) -> Result<(), Stop> {
        let answer = deny_response(req);
        let mut settled = Settled {
            verdict: "denied",
            direction,
            policy: Arc::from(""),
            denied_topics,
            error_code: None,
            reason: None,
        };
        match answer {
            Some(answer) => {
                settled.error_code = Some(denial_error_code(req));
                self.account_request(cp, started, req, topics, settled);
                self.enqueue(queue, Pending::Local(answer)).await
            }
            None if !req.expects_response() => {
                settled.reason = Some("acks=0: dropped, the client expects no answer".into());
                self.account_request(cp, started, req, topics, settled);
                Ok(())
            }
            None => {
                eprintln!(
                    "membrane-proxy: kafka {} -> {}: denied {} v{} has no authorization error to answer with; closing the connection",
                    self.src,
                    self.dst,
                    api_name(req.api_key),
                    req.api_version
                );
                settled.reason =
                    Some("no authorization error for this type: connection closed".into());
                self.account_request(cp, started, req, topics, settled);
                Err(Stop::Now)
            }
        }
    }

    /// Sends `frame` (the request, possibly rewritten) to the broker, after queueing "the
    /// broker's next answer" for it when one comes.
    async fn forward(
        &self,
        req: &Request,
        frame: &[u8],
        fixup: Fixup,
        broker: &mut BufWriter<OwnedWriteHalf>,
        queue: &mpsc::Sender<Pending>,
    ) -> Result<(), Stop> {
        if req.expects_response() {
            let pending = Pending::Broker {
                correlation_id: req.correlation_id,
                api_version: req.api_version,
                fixup,
            };
            self.enqueue(queue, pending).await?;
        }
        broker.write_all(frame).await.map_err(|_| Stop::Now)
    }

    async fn enqueue(&self, queue: &mpsc::Sender<Pending>, p: Pending) -> Result<(), Stop> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        queue.send(p).await.map_err(|_| Stop::Now)
    }

    fn account_request(
        &self,
        cp: &ConnPolicy,
        started: Instant,
        req: &Request,
        topics: &Topics,
        settled: Settled,
    ) {
        self.account(
            cp,
            started,
            req.api_key,
            req.api_version,
            req.correlation_id,
            req.client_id(),
            topics,
            settled,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn account(
        &self,
        cp: &ConnPolicy,
        started: Instant,
        api_key: i16,
        api_version: i16,
        correlation_id: i32,
        client_id: Option<&str>,
        topics: &Topics,
        settled: Settled,
    ) {
        let m = &self.shared.metrics;
        m.kafka_requests
            .get_or_create(&KafkaLabels {
                direction: settled.direction,
                verdict: settled.verdict,
                api_key: api_key_name(api_key).unwrap_or("other"),
            })
            .inc();
        let elapsed = started.elapsed();
        m.latency
            .get_or_create(&DirectionLabel {
                direction: settled.direction,
            })
            .observe(elapsed.as_secs_f64());
        if !self.shared.flows.wanted() {
            return;
        }
        self.shared.flows.publish(FlowRecord {
            protocol: "kafka",
            time: rfc3339(SystemTime::now() - elapsed),
            src: self.src,
            dst: self.dst,
            src_identity: cp.peers.src.0,
            dst_identity: cp.peers.dst.0,
            method: String::new(),
            path: String::new(),
            host: String::new(),
            verdict: settled.verdict,
            direction: settled.direction,
            policy: settled.policy.to_string(),
            status: 0,
            latency_us: elapsed.as_micros() as u64,
            reason: settled.reason,
            kafka: Some(KafkaFlow {
                api_key,
                api: api_name(api_key),
                api_version,
                correlation_id,
                client_id: client_id.map(str::to_string),
                topics: topics.names(),
                denied_topics: settled.denied_topics,
                error_code: settled.error_code,
            }),
        });
    }

    async fn response_pump(
        self: Arc<Self>,
        broker: OwnedReadHalf,
        client: OwnedWriteHalf,
        mut queue: mpsc::Receiver<Pending>,
    ) {
        let mut broker = BufReader::with_capacity(64 * 1024, broker);
        let mut client = BufWriter::with_capacity(64 * 1024, client);
        loop {
            let next = match queue.try_recv() {
                Ok(p) => p,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if client.flush().await.is_err() {
                        return;
                    }
                    match queue.recv().await {
                        Some(p) => p,
                        None => break,
                    }
                }
            };
            let result = match next {
                Pending::Local(answer) => {
                    client.write_all(&answer).await.map_err(|e| e.to_string())
                }
                Pending::Broker {
                    correlation_id,
                    api_version,
                    fixup,
                } => {
                    // About to wait for the broker: what the client is owed must leave now.
                    if broker.buffer().is_empty() && client.flush().await.is_err() {
                        return;
                    }
                    self.relay(&mut broker, &mut client, correlation_id, api_version, fixup)
                        .await
                }
            };
            self.pending.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = result {
                eprintln!(
                    "membrane-proxy: kafka {} -> {}: {e}; closing the connection",
                    self.src, self.dst
                );
                return;
            }
        }
        let _ = client.flush().await;
    }

    /// Passes the broker's next answer to the client, rewriting it when `fixup` says so.
    async fn relay(
        &self,
        broker: &mut BufReader<OwnedReadHalf>,
        client: &mut BufWriter<OwnedWriteHalf>,
        correlation_id: i32,
        api_version: i16,
        fixup: Fixup,
    ) -> Result<(), String> {
        let len = broker
            .read_i32()
            .await
            .map_err(|e| format!("broker closed: {e}"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l >= 4)
            .ok_or_else(|| format!("broker answer with length {len}"))?;
        match fixup {
            Fixup::ApiVersions | Fixup::Metadata { .. } => {
                if len > MAX_REWRITTEN_RESPONSE {
                    return Err(format!(
                        "broker answer of {len} bytes is too large to rewrite"
                    ));
                }
                let mut body = vec![0; len];
                broker
                    .read_exact(&mut body)
                    .await
                    .map_err(|e| format!("broker answer cut short: {e}"))?;
                check_correlation(&body, correlation_id)?;
                let body = Bytes::from(body);
                let rewritten = match fixup {
                    Fixup::ApiVersions => clamp_api_versions(body.clone(), api_version)?,
                    Fixup::Metadata { denied, visible } => Some(amend_metadata_response(
                        body.clone(),
                        api_version,
                        &denied,
                        Some(&|t: &str| visible.allows(t)),
                    )?),
                    _ => None,
                };
                let written = match rewritten {
                    Some(frame) => client.write_all(&frame).await,
                    None => match client.write_all(&(len as i32).to_be_bytes()).await {
                        Ok(()) => client.write_all(&body).await,
                        Err(e) => Err(e),
                    },
                };
                written.map_err(|e| e.to_string())
            }
            Fixup::None | Fixup::FetchSession { .. } => {
                let head_len = len.min(RESPONSE_HEAD);
                let mut head = [0u8; RESPONSE_HEAD];
                broker
                    .read_exact(&mut head[..head_len])
                    .await
                    .map_err(|e| format!("broker answer cut short: {e}"))?;
                check_correlation(&head[..head_len], correlation_id)?;
                if let Fixup::FetchSession { topics } = fixup
                    && let Some(id) = fetch_session_id(&head[..head_len], api_version)
                    && id != 0
                {
                    self.sessions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, topics);
                }
                let io = |e: std::io::Error| e.to_string();
                client
                    .write_all(&(len as i32).to_be_bytes())
                    .await
                    .map_err(io)?;
                client.write_all(&head[..head_len]).await.map_err(io)?;
                let rest = (len - head_len) as u64;
                let copied = copy_exact(broker, client, rest).await.map_err(io)?;
                if copied != rest {
                    return Err("broker closed in the middle of an answer".into());
                }
                Ok(())
            }
        }
    }
}

async fn copy_exact(
    from: &mut BufReader<OwnedReadHalf>,
    to: &mut BufWriter<OwnedWriteHalf>,
    n: u64,
) -> std::io::Result<u64> {
    let mut limited = AsyncReadExt::take(from, n);
    let mut copied = 0;
    loop {
        let chunk = limited.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(copied);
        }
        let k = chunk.len();
        to.write_all(chunk).await?;
        limited.consume(k);
        copied += k as u64;
    }
}

fn check_correlation(body: &[u8], expected: i32) -> Result<(), String> {
    let got = body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("broker answer shorter than its header")?;
    if got != expected {
        return Err(format!(
            "broker answered correlation id {got} where {expected} was due"
        ));
    }
    Ok(())
}
