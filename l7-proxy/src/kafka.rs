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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use membrane_codec::kafka::session::{
    Expect, Judged, KafkaJudge, KafkaSession, MAX_REWRITTEN_RESPONSE, Owed, RESPONSE_HEAD, Record,
    ToBroker,
};
use membrane_codec::kafka::{KafkaError, LENGTH_PREFIX, frame_len};
use membrane_policy::l7::kafka::{KafkaRequest, KafkaVerdict, api_key_name};
use membrane_policy::rule::Direction;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

use crate::policy::{ConnDecision, ConnPolicy, ConnectionProtocol, Decision, Peers, Snapshot};
use crate::service::Shared;
use crate::telemetry::{DirectionLabel, FlowRecord, KafkaFlow, KafkaLabels, no_policy, rfc3339};

/// Requests in flight per connection before the proxy stops reading from the client.
const MAX_IN_FLIGHT: usize = 1024;

/// One client connection to a broker.
#[derive(Debug)]
pub struct KafkaConnection {
    shared: Arc<Shared>,
    src: SocketAddr,
    dst: SocketAddr,
    decision: ConnDecision,
    /// The connection's Kafka state, shared by the two pumps (each holds it only between awaits).
    session: Mutex<KafkaSession>,
    pending: AtomicUsize,
}

/// Why the request pump stopped.
enum Stop {
    /// The client went away, or the connection must close at once.
    Now,
    /// Shutdown: answer what is in flight, then close.
    Drain,
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// The proxy's policy for a connection, as the Kafka session asks for it.
impl KafkaJudge for ConnPolicy {
    fn refuses_connection(&self) -> Option<(&'static str, String)> {
        match &self.decision {
            Decision::Deny { direction } => Some((
                direction_name(*direction),
                "L3/L4 policy now denies this connection".into(),
            )),
            Decision::Allow(reqs)
                if !reqs.is_empty() && self.decision.protocol() != ConnectionProtocol::Kafka =>
            {
                Some(("none", "policy for this port is no longer Kafka".into()))
            }
            // No L7 requirement any more: requests pass (still parsed, still recorded).
            Decision::Allow(_) => None,
        }
    }

    fn judge(&self, facts: &KafkaRequest<'_>) -> Judged {
        let Decision::Allow(reqs) = &self.decision else {
            return Judged::Deny {
                direction: "none",
                denied_topics: Vec::new(),
            };
        };
        let mut credited: Option<(&'static str, Arc<str>)> = None;
        for r in reqs {
            let (verdict, policy) = r.judge_kafka(facts);
            if let KafkaVerdict::Deny { denied_topics } = verdict {
                return Judged::Deny {
                    direction: direction_name(r.direction),
                    denied_topics,
                };
            }
            if credited.is_none() {
                credited = policy.map(|p| (direction_name(r.direction), p.clone()));
            }
        }
        let (direction, policy) = credited.unwrap_or(("none", no_policy()));
        Judged::Allow { direction, policy }
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
            session: Mutex::default(),
            pending: AtomicUsize::new(0),
        }
    }

    fn policy(&self) -> Arc<ConnPolicy> {
        self.decision.under(&self.shared.policy.load())
    }

    fn session(&self) -> MutexGuard<'_, KafkaSession> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
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
        queue: mpsc::Sender<Owed>,
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
        self.account(&self.policy(), Instant::now(), Record::refused(e));
    }

    /// Judges one frame (length prefix included): forwards it, answers it, or stops.
    async fn settle(
        &self,
        frame: Bytes,
        broker: &mut BufWriter<OwnedWriteHalf>,
        queue: &mpsc::Sender<Owed>,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let cp = self.policy();
        let settled = self.session().settle(frame, &*cp);
        if let Some(owed) = settled.owed {
            self.pending.fetch_add(1, Ordering::AcqRel);
            queue.send(owed).await.map_err(|_| Stop::Now)?;
        }
        let close = match settled.to_broker {
            ToBroker::Frame(frame) => {
                broker.write_all(&frame).await.map_err(|_| Stop::Now)?;
                false
            }
            ToBroker::Nothing => false,
            ToBroker::Close => true,
        };
        if close {
            eprintln!(
                "membrane-proxy: kafka {} -> {}: {}; closing the connection",
                self.src,
                self.dst,
                settled.record.reason.as_deref().unwrap_or("refused")
            );
        }
        self.account(&cp, started, settled.record);
        if close { Err(Stop::Now) } else { Ok(()) }
    }

    fn account(&self, cp: &ConnPolicy, started: Instant, record: Record) {
        let m = &self.shared.metrics;
        m.kafka_requests
            .get_or_create(&KafkaLabels {
                direction: record.direction,
                verdict: record.verdict,
                api_key: api_key_name(record.api_key).unwrap_or("other"),
            })
            .inc();
        let elapsed = started.elapsed();
        m.latency
            .get_or_create(&DirectionLabel {
                direction: record.direction,
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
            verdict: record.verdict,
            direction: record.direction,
            policy: record.policy.to_string(),
            status: 0,
            latency_us: elapsed.as_micros() as u64,
            reason: record.reason.clone(),
            kafka: Some(KafkaFlow {
                api: record.api(),
                api_key: record.api_key,
                api_version: record.api_version,
                correlation_id: record.correlation_id,
                client_id: record.client_id,
                topics: record.topics,
                denied_topics: record.denied_topics,
                error_code: record.error_code,
            }),
        });
    }

    async fn response_pump(
        self: Arc<Self>,
        broker: OwnedReadHalf,
        client: OwnedWriteHalf,
        mut queue: mpsc::Receiver<Owed>,
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
                Owed::Local(answer) => client.write_all(&answer).await.map_err(|e| e.to_string()),
                Owed::Broker(expect) => {
                    // About to wait for the broker: what the client is owed must leave now.
                    if broker.buffer().is_empty() && client.flush().await.is_err() {
                        return;
                    }
                    self.relay(&mut broker, &mut client, expect).await
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

    /// Passes the broker's next answer to the client, rewritten when the session says so.
    async fn relay(
        &self,
        broker: &mut BufReader<OwnedReadHalf>,
        client: &mut BufWriter<OwnedWriteHalf>,
        expect: Expect,
    ) -> Result<(), String> {
        let len = broker
            .read_i32()
            .await
            .map_err(|e| format!("broker closed: {e}"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l >= 4)
            .ok_or_else(|| format!("broker answer with length {len}"))?;
        if expect.rewrites() {
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
            let cp = self.policy();
            let frame = self.session().rewrite(expect, Bytes::from(body), &*cp)?;
            return client.write_all(&frame).await.map_err(|e| e.to_string());
        }
        let head_len = len.min(RESPONSE_HEAD);
        let mut head = [0u8; RESPONSE_HEAD];
        broker
            .read_exact(&mut head[..head_len])
            .await
            .map_err(|e| format!("broker answer cut short: {e}"))?;
        self.session().pass_head(expect, &head[..head_len])?;
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
