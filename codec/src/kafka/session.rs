//! The policy side of one Kafka client connection, without I/O, so that the proxy (tokio pumps)
//! and the wasm network filter (Envoy's buffers) enforce exactly the same thing.
//!
//! Requests: [`KafkaSession::settle`] decodes a frame, judges it with the caller's
//! [`KafkaJudge`] and says what goes to the broker (the frame, a narrowed Metadata request,
//! nothing, or "close") and what the client is owed, in request order ([`Owed`]): the broker's
//! next answer, possibly to be rewritten, or an answer made here (TOPIC/GROUP/CLUSTER_
//! AUTHORIZATION_FAILED, or UNSUPPORTED_VERSION for a too-new ApiVersions).
//!
//! Answers: a passed-through answer is streamed on after its head was shown to
//! [`KafkaSession::pass_head`] (which checks the correlation id and learns Fetch session ids, so
//! incremental fetches are judged with their whole session's topics); ApiVersions and Metadata
//! answers are read whole and rewritten by [`KafkaSession::rewrite`].

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, FetchRequest, RequestKind};
use membrane_policy::l7::kafka::KafkaRequest;

use super::deny::{api_versions_unsupported, denial_error_code, deny_response};
use super::rewrite::{
    DeniedTopic, amend_metadata_response, clamp_api_versions, fetch_session_id,
    metadata_request_keeping,
};
use super::{KafkaError, LENGTH_PREFIX, Request, TOPIC_AUTHORIZATION_FAILED, Topics, api_name};

/// Bytes of a passed-through answer to show [`KafkaSession::pass_head`] (enough for a Fetch
/// session id) before the rest is streamed.
pub const RESPONSE_HEAD: usize = 32;
/// Bound on an answer that is decoded and rewritten (ApiVersions, Metadata).
pub const MAX_REWRITTEN_RESPONSE: usize = 64 << 20;

/// What policy says about a connection and its requests. Implemented by each enforcement point
/// over its own policy representation; the rules themselves are `membrane_policy`'s Kafka matcher.
pub trait KafkaJudge {
    /// `Some((direction, why))` when the connection itself may no longer carry Kafka requests
    /// (L3/L4 now denies it, or its port is no longer governed by Kafka rules): every request
    /// then closes the connection.
    fn refuses_connection(&self) -> Option<(&'static str, String)> {
        None
    }

    /// Judges one request: every requirement (destination ingress, source egress) must allow.
    fn judge(&self, facts: &KafkaRequest<'_>) -> Judged;
}

/// A judge's answer.
#[derive(Clone, Debug)]
pub enum Judged {
    /// Allowed; the direction and policy credited.
    Allow {
        /// `ingress`, `egress` or `none`.
        direction: &'static str,
        /// The policy whose rules allowed it (empty when no L7 rule applies).
        policy: Arc<str>,
    },
    /// Denied by the rules of `direction`.
    Deny {
        /// `ingress` or `egress`.
        direction: &'static str,
        /// The request's topics that no rule allowed.
        denied_topics: Vec<String>,
    },
}

/// What goes to the broker for a request.
#[derive(Debug)]
pub enum ToBroker {
    /// These bytes (the frame, length prefix included, possibly rewritten).
    Frame(Bytes),
    /// Nothing: the request was answered here, or dropped (acks=0).
    Nothing,
    /// Close the connection: nothing of this request is forwarded.
    Close,
}

/// What the client is owed for a request, in request order.
#[derive(Debug)]
pub enum Owed {
    /// The broker's next answer.
    Broker(Expect),
    /// This answer, made here (length prefix included).
    Local(BytesMut),
}

/// A broker answer the client is owed, and what must happen to it.
#[derive(Debug)]
pub struct Expect {
    correlation_id: i32,
    api_version: i16,
    fixup: Fixup,
}

#[derive(Debug)]
enum Fixup {
    None,
    ApiVersions,
    Metadata {
        denied: Vec<DeniedTopic>,
        client_id: Option<String>,
    },
    FetchSession {
        topics: Vec<String>,
    },
}

impl Expect {
    /// Whether the whole answer must be read and given to [`KafkaSession::rewrite`]; otherwise
    /// its first [`RESPONSE_HEAD`] bytes go to [`KafkaSession::pass_head`] and the rest streams.
    pub fn rewrites(&self) -> bool {
        matches!(self.fixup, Fixup::ApiVersions | Fixup::Metadata { .. })
    }
}

/// How one request was settled: for flow records, metrics and logs.
#[derive(Clone, Debug)]
pub struct Record {
    /// `forwarded`, `denied` or `error`.
    pub verdict: &'static str,
    /// `ingress`, `egress` or `none`.
    pub direction: &'static str,
    /// The policy credited for a forward.
    pub policy: Arc<str>,
    /// API key (-1 when the frame could not be read that far).
    pub api_key: i16,
    /// API version (-1 likewise).
    pub api_version: i16,
    /// Correlation id (-1 likewise).
    pub correlation_id: i32,
    /// Client id.
    pub client_id: Option<String>,
    /// Topics the request named.
    pub topics: Vec<String>,
    /// Topics refused.
    pub denied_topics: Vec<String>,
    /// The error code answered, when the answer was made here.
    pub error_code: Option<i16>,
    /// Why, when it was not a plain forward.
    pub reason: Option<String>,
}

impl Record {
    /// The record of a frame that could not be decoded (the connection closes).
    pub fn refused(e: &KafkaError) -> Record {
        let (api_key, api_version) = e.api().unwrap_or((-1, -1));
        let correlation_id = match e {
            KafkaError::UnknownApiKey { correlation_id, .. }
            | KafkaError::UnsupportedVersion { correlation_id, .. }
            | KafkaError::Malformed { correlation_id, .. } => *correlation_id,
            _ => -1,
        };
        Record {
            verdict: "error",
            direction: "none",
            policy: Arc::from(""),
            api_key,
            api_version,
            correlation_id,
            client_id: None,
            topics: Vec::new(),
            denied_topics: Vec::new(),
            error_code: None,
            reason: Some(format!("{} ({})", e, e.kind())),
        }
    }

    fn of(
        req: &Request,
        topics: &Topics,
        verdict: &'static str,
        direction: &'static str,
    ) -> Record {
        Record {
            verdict,
            direction,
            policy: Arc::from(""),
            api_key: req.api_key,
            api_version: req.api_version,
            correlation_id: req.correlation_id,
            client_id: req.client_id().map(str::to_string),
            topics: topics.names(),
            denied_topics: Vec::new(),
            error_code: None,
            reason: None,
        }
    }

    /// The API's name (`Produce`, `key 9999`).
    pub fn api(&self) -> String {
        api_name(self.api_key)
    }
}

/// The outcome of [`KafkaSession::settle`].
#[derive(Debug)]
pub struct Settlement {
    /// What goes to the broker.
    pub to_broker: ToBroker,
    /// What the client is owed, to be queued before the frame is sent (`None`: nothing, as for a
    /// Produce with acks=0, or the connection closes).
    pub owed: Option<Owed>,
    /// The record of it.
    pub record: Record,
}

/// One client connection's Kafka state: the topics of the Fetch sessions it opened.
#[derive(Debug, Default)]
pub struct KafkaSession {
    fetch_sessions: HashMap<i32, Vec<String>>,
}

impl KafkaSession {
    /// Settles one request frame (length prefix included).
    pub fn settle(&mut self, frame: Bytes, judge: &dyn KafkaJudge) -> Settlement {
        let req = match super::decode_request(frame.slice(LENGTH_PREFIX..)) {
            Ok(r) => r,
            Err(
                e @ KafkaError::UnsupportedVersion {
                    api_key: 18,
                    api_version,
                    correlation_id,
                    ..
                },
            ) => {
                // A client newer than membrane: say so the way a broker does, and it retries.
                let mut record = Record::refused(&e);
                record.error_code = Some(super::UNSUPPORTED_VERSION);
                record.reason = Some(format!(
                    "ApiVersions v{api_version} is newer than membrane parses: answered \
                     UNSUPPORTED_VERSION so that the client asks again with v0"
                ));
                return Settlement {
                    to_broker: ToBroker::Nothing,
                    owed: Some(Owed::Local(api_versions_unsupported(correlation_id))),
                    record,
                };
            }
            Err(e) => return close(Record::refused(&e)),
        };
        if let Some((direction, why)) = judge.refuses_connection() {
            let mut record = Record::of(&req, &req.topics(), "denied", direction);
            record.reason = Some(why);
            return close(record);
        }
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
        if req.api_key == ApiKey::Metadata as i16 {
            return settle_metadata(frame, &req, &topics, judge);
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
        match judge.judge(&facts) {
            Judged::Deny {
                direction,
                denied_topics,
            } => deny(&req, &topics, direction, denied_topics),
            Judged::Allow { direction, policy } => {
                if req.api_key == ApiKey::ApiVersions as i16 {
                    fixup = Fixup::ApiVersions;
                }
                let mut record = Record::of(&req, &topics, "forwarded", direction);
                record.policy = policy;
                forward(&req, frame, fixup, record)
            }
        }
    }

    /// The topics an incremental fetch is about: its own plus those of its session. A session
    /// this connection did not open is unknown, which no topic rule allows.
    fn fetch_topics(&mut self, fetch: &FetchRequest, topics: Topics) -> Topics {
        if fetch.session_id == 0 {
            return topics;
        }
        let Some(known) = self.fetch_sessions.get(&fetch.session_id) else {
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
            self.fetch_sessions.remove(&fetch.session_id);
        }
        Topics::Named(all)
    }

    /// Looks at the head of a passed-through answer (after its length prefix; up to
    /// [`RESPONSE_HEAD`] bytes): checks the correlation id and learns a Fetch session.
    pub fn pass_head(&mut self, expect: Expect, head: &[u8]) -> Result<(), String> {
        check_correlation(head, expect.correlation_id)?;
        if let Fixup::FetchSession { topics } = expect.fixup
            && let Some(id) = fetch_session_id(head, expect.api_version)
            && id != 0
        {
            self.fetch_sessions.insert(id, topics);
        }
        Ok(())
    }

    /// Rewrites a whole answer (after its length prefix) that [`Expect::rewrites`]; returns the
    /// frame to send, length prefix included. Topics of an answer to Metadata are kept only when
    /// `judge` (the policy in force now) lets the client see them.
    pub fn rewrite(
        &mut self,
        expect: Expect,
        body: Bytes,
        judge: &dyn KafkaJudge,
    ) -> Result<BytesMut, String> {
        check_correlation(&body, expect.correlation_id)?;
        let rewritten = match expect.fixup {
            Fixup::ApiVersions => clamp_api_versions(body.clone(), expect.api_version)?,
            Fixup::Metadata { denied, client_id } => {
                let visible = |topic: &str| {
                    let facts = KafkaRequest {
                        api_key: ApiKey::Metadata as i16,
                        api_version: expect.api_version,
                        client_id: client_id.as_deref(),
                        topics: Some(&[topic]),
                    };
                    judge.refuses_connection().is_none()
                        && matches!(judge.judge(&facts), Judged::Allow { .. })
                };
                Some(amend_metadata_response(
                    body.clone(),
                    expect.api_version,
                    &denied,
                    Some(&visible),
                )?)
            }
            Fixup::None | Fixup::FetchSession { .. } => None,
        };
        Ok(rewritten.unwrap_or_else(|| {
            let mut frame = BytesMut::with_capacity(LENGTH_PREFIX + body.len());
            frame.extend_from_slice(&(body.len() as i32).to_be_bytes());
            frame.extend_from_slice(&body);
            frame
        }))
    }
}

fn close(record: Record) -> Settlement {
    Settlement {
        to_broker: ToBroker::Close,
        owed: None,
        record,
    }
}

fn forward(req: &Request, frame: Bytes, fixup: Fixup, record: Record) -> Settlement {
    let owed = req.expects_response().then_some(Owed::Broker(Expect {
        correlation_id: req.correlation_id,
        api_version: req.api_version,
        fixup,
    }));
    Settlement {
        to_broker: ToBroker::Frame(frame),
        owed,
        record,
    }
}

/// Answers a denied request here; a type that cannot carry an authorization error closes the
/// connection instead.
fn deny(
    req: &Request,
    topics: &Topics,
    direction: &'static str,
    denied_topics: Vec<String>,
) -> Settlement {
    let mut record = Record::of(req, topics, "denied", direction);
    record.denied_topics = denied_topics;
    match deny_response(req) {
        Some(answer) => {
            record.error_code = Some(denial_error_code(req));
            Settlement {
                to_broker: ToBroker::Nothing,
                owed: Some(Owed::Local(answer)),
                record,
            }
        }
        None if !req.expects_response() => {
            record.reason = Some("acks=0: dropped, the client expects no answer".into());
            Settlement {
                to_broker: ToBroker::Nothing,
                owed: None,
                record,
            }
        }
        None => {
            record.reason = Some(format!(
                "denied {} v{} has no authorization error to answer with: connection closed",
                api_name(req.api_key),
                req.api_version
            ));
            close(record)
        }
    }
}

/// Metadata: the client may ask at all, and learns only about the topics it may use. Named
/// denied topics are taken out of the forwarded request and answered as TOPIC_AUTHORIZATION_
/// FAILED in the broker's answer; every answer is filtered to visible topics, not only those to
/// "every topic" requests, since a broker may list more than was asked (tansu answers an empty
/// list with every topic).
fn settle_metadata(
    frame: Bytes,
    req: &Request,
    topics: &Topics,
    judge: &dyn KafkaJudge,
) -> Settlement {
    let judged = |topics: Option<&[&str]>| {
        judge.judge(&KafkaRequest {
            api_key: req.api_key,
            api_version: req.api_version,
            client_id: req.client_id(),
            topics,
        })
    };
    let (direction, policy) = match judged(Some(&[])) {
        Judged::Allow { direction, policy } => (direction, policy),
        Judged::Deny { direction, .. } => return deny(req, topics, direction, topics.names()),
    };
    let keep = |t: &str| matches!(judged(Some(&[t])), Judged::Allow { .. });
    let every_name_kept = match topics {
        Topics::Named(t) => t.iter().all(|t| keep(t)),
        _ => false,
    };
    let all_topics = matches!(&req.body, RequestKind::Metadata(m) if m.topics.is_none());
    let mut forwarded = frame;
    let mut denied = Vec::new();
    let mut denied_names = Vec::new();
    if !all_topics && !every_name_kept {
        let Some((rewritten, dropped)) = metadata_request_keeping(req, &keep) else {
            return deny(req, topics, direction, topics.names());
        };
        denied_names = dropped
            .iter()
            .map(|d| {
                d.name
                    .as_ref()
                    .map_or_else(|| format!("id:{}", d.topic_id), |n| n.to_string())
            })
            .collect();
        forwarded = rewritten.freeze();
        denied = dropped;
    }
    let nothing_kept = matches!(&req.body, RequestKind::Metadata(m)
        if m.topics.as_ref().is_some_and(|t| t.len() == denied_names.len()));
    // Forwarded only for the broker list when every topic it named was refused.
    let verdict = if nothing_kept && !denied_names.is_empty() {
        "denied"
    } else {
        "forwarded"
    };
    let mut record = Record::of(req, topics, verdict, direction);
    record.policy = policy;
    if !denied_names.is_empty() {
        record.denied_topics = denied_names;
        record.error_code = Some(TOPIC_AUTHORIZATION_FAILED);
        record.reason = Some("denied topics answered by membrane, the rest forwarded".into());
    }
    let fixup = Fixup::Metadata {
        denied,
        client_id: req.client_id().map(str::to_string),
    };
    forward(req, forwarded, fixup, record)
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

/// An ApiVersions v0 request with `correlation_id`, length prefix included: what an enforcement
/// point that cannot write to the client (a proxy-wasm network filter) sends the broker in place
/// of a request it answers itself. The broker's answer keeps the connection's answers in order,
/// and is replaced by the local answer on its way back.
pub fn placeholder_request(correlation_id: i32) -> Bytes {
    let mut frame = BytesMut::with_capacity(LENGTH_PREFIX + 10);
    frame.extend_from_slice(&10i32.to_be_bytes());
    frame.extend_from_slice(&(ApiKey::ApiVersions as i16).to_be_bytes());
    frame.extend_from_slice(&0i16.to_be_bytes());
    frame.extend_from_slice(&correlation_id.to_be_bytes());
    // Null client id.
    frame.extend_from_slice(&(-1i16).to_be_bytes());
    frame.freeze()
}
