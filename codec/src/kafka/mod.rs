//! Kafka: request framing and decoding (the `kafka-protocol` schemas), the topics a request names,
//! synthetic authorization-failure answers ([`deny`]), the few response rewrites a policy proxy
//! needs ([`rewrite`]) and the policy side of a connection that puts them together ([`session`]).
//!
//! Every API key and version the `kafka-protocol` schemas know is decoded, including flexible
//! (compact, tagged-field) versions, with four caps: Produce and Fetch stop at 12 and OffsetCommit
//! and OffsetFetch at 9, the last versions that name topics rather than topic ids (a topic id
//! cannot be judged against a topic rule). The proxy advertises exactly these ranges to clients
//! by rewriting the broker's ApiVersions answer, so a conforming client never sends anything else.

pub mod deny;
pub mod rewrite;
pub mod session;

use std::fmt;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind};
use kafka_protocol::protocol::{Decodable, StrBytes};

pub use kafka_protocol;

/// Error code: the client may not use the topic.
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
/// Error code: the client may not use the consumer group.
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
/// Error code: the client may not perform a cluster-level operation.
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
/// Error code: the API version is not supported.
pub const UNSUPPORTED_VERSION: i16 = 35;
/// Error code: the client may not use the transactional id.
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;

/// Bytes of the length prefix in front of every request and response.
pub const LENGTH_PREFIX: usize = 4;
/// Default bound on one request frame; a producer's default `max.request.size` is 1 MiB.
pub const DEFAULT_MAX_REQUEST: usize = 16 << 20;

/// Why a request cannot be judged. The connection is closed after any of these: nothing of the
/// offending frame is forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KafkaError {
    /// The length prefix is negative or beyond the bound.
    BadLength {
        /// The length as sent.
        length: i32,
        /// The bound in force.
        max: usize,
    },
    /// The frame is shorter than the fixed request header (key, version, correlation id).
    Truncated {
        /// Bytes in the frame.
        len: usize,
    },
    /// The API key is not one the schemas know.
    UnknownApiKey {
        /// The key as sent.
        api_key: i16,
        /// The request's correlation id.
        correlation_id: i32,
    },
    /// The version is outside what membrane parses for that key.
    UnsupportedVersion {
        /// API key.
        api_key: i16,
        /// The version as sent.
        api_version: i16,
        /// Lowest supported version.
        min: i16,
        /// Highest supported version.
        max: i16,
        /// The request's correlation id.
        correlation_id: i32,
    },
    /// The header or body does not decode with its schema, or bytes follow the body.
    Malformed {
        /// API key.
        api_key: i16,
        /// API version.
        api_version: i16,
        /// The request's correlation id.
        correlation_id: i32,
        /// What the decoder said.
        detail: String,
    },
}

impl KafkaError {
    /// API key and version, when the frame got that far.
    pub fn api(&self) -> Option<(i16, i16)> {
        match self {
            KafkaError::BadLength { .. } | KafkaError::Truncated { .. } => None,
            KafkaError::UnknownApiKey { api_key, .. } => Some((*api_key, -1)),
            KafkaError::UnsupportedVersion {
                api_key,
                api_version,
                ..
            }
            | KafkaError::Malformed {
                api_key,
                api_version,
                ..
            } => Some((*api_key, *api_version)),
        }
    }

    /// A short stable name for metrics and flow records.
    pub fn kind(&self) -> &'static str {
        match self {
            KafkaError::BadLength { .. } => "bad-length",
            KafkaError::Truncated { .. } => "truncated",
            KafkaError::UnknownApiKey { .. } => "unknown-api-key",
            KafkaError::UnsupportedVersion { .. } => "unsupported-version",
            KafkaError::Malformed { .. } => "malformed",
        }
    }
}

impl fmt::Display for KafkaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KafkaError::BadLength { length, max } => {
                write!(f, "frame length {length} is outside 0..={max}")
            }
            KafkaError::Truncated { len } => write!(
                f,
                "frame of {len} bytes is shorter than a request header (8 bytes)"
            ),
            KafkaError::UnknownApiKey {
                api_key,
                correlation_id,
            } => write!(
                f,
                "unknown API key {api_key} (correlation id {correlation_id})"
            ),
            KafkaError::UnsupportedVersion {
                api_key,
                api_version,
                min,
                max,
                correlation_id,
            } => write!(
                f,
                "{} v{api_version} is not supported (supported v{min}..=v{max}; correlation id {correlation_id})",
                api_name(*api_key)
            ),
            KafkaError::Malformed {
                api_key,
                api_version,
                correlation_id,
                detail,
            } => write!(
                f,
                "malformed {} v{api_version} request (correlation id {correlation_id}): {detail}",
                api_name(*api_key)
            ),
        }
    }
}

impl std::error::Error for KafkaError {}

/// The name of an API key as the Kafka protocol spells it (`Produce`, `Fetch`, ...), or `Api<N>`.
pub fn api_name(api_key: i16) -> String {
    match ApiKey::try_from(api_key) {
        Ok(key) => format!("{key:?}"),
        Err(()) => format!("Api{api_key}"),
    }
}

/// The versions membrane decodes for an API key, or `None` for a key the schemas do not know.
pub fn supported_versions(api_key: i16) -> Option<(i16, i16)> {
    let key = ApiKey::try_from(api_key).ok()?;
    let range = key.valid_versions();
    // Later versions of these name topics by id only, which a topic rule cannot judge.
    let cap = match key {
        ApiKey::Produce | ApiKey::Fetch => 12,
        ApiKey::OffsetCommit | ApiKey::OffsetFetch => 9,
        _ => i16::MAX,
    };
    Some((range.min, range.max.min(cap)))
}

/// The length of the frame body that starts `buf` (after its 4-byte prefix), once the prefix is
/// complete. Errors when the length is negative or beyond `max`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, KafkaError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    match usize::try_from(length) {
        Ok(len) if len <= max => Ok(Some(len)),
        _ => Err(KafkaError::BadLength { length, max }),
    }
}

/// The topics a request names, as far as policy is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topics {
    /// The request type carries no topics.
    None,
    /// These topics (deduplicated, in first-seen order).
    Named(Vec<String>),
    /// Every topic (a Metadata or OffsetFetch request with a null list), or topics given by id:
    /// no topic rule can allow this.
    Unknown,
}

impl Topics {
    /// The named topics (none when the type carries none or they are unknown).
    pub fn names(&self) -> Vec<String> {
        match self {
            Topics::Named(t) => t.clone(),
            _ => Vec::new(),
        }
    }
}

/// One decoded request.
#[derive(Clone, Debug)]
pub struct Request {
    /// API key.
    pub api_key: i16,
    /// API version.
    pub api_version: i16,
    /// Correlation id, echoed by the response.
    pub correlation_id: i32,
    /// Client id from the header.
    pub client_id: Option<StrBytes>,
    /// The decoded body.
    pub body: RequestKind,
}

impl Request {
    /// The client id as text.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_ref().map(|c| c.as_str())
    }

    /// Whether the broker answers this request (a Produce with `acks=0` gets no response).
    pub fn expects_response(&self) -> bool {
        !matches!(&self.body, RequestKind::Produce(p) if p.acks == 0)
    }

    /// The topics the request names.
    pub fn topics(&self) -> Topics {
        topics_of(&self.body)
    }
}

/// Decodes one request frame (without its length prefix). Bytes after the body are ignored, as
/// Kafka's own request parser ignores them: librdkafka 2.16 sends three of them after a Metadata
/// v12 request for every topic, and the broker reads the same fields membrane judged.
pub fn decode_request(mut frame: Bytes) -> Result<Request, KafkaError> {
    if frame.len() < 8 {
        return Err(KafkaError::Truncated { len: frame.len() });
    }
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let api_version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Err(KafkaError::UnknownApiKey {
            api_key,
            correlation_id,
        });
    };
    let (min, max) = supported_versions(api_key).unwrap_or((0, -1));
    if !(min..=max).contains(&api_version) {
        return Err(KafkaError::UnsupportedVersion {
            api_key,
            api_version,
            min,
            max,
            correlation_id,
        });
    }
    let malformed = |detail: String| KafkaError::Malformed {
        api_key,
        api_version,
        correlation_id,
        detail,
    };
    let header = RequestHeader::decode(&mut frame, key.request_header_version(api_version))
        .map_err(|e| malformed(format!("header: {e}")))?;
    let body = RequestKind::decode(key, &mut frame, api_version)
        .map_err(|e| malformed(format!("body: {e}")))?;
    Ok(Request {
        api_key,
        api_version,
        correlation_id,
        client_id: header.client_id,
        body,
    })
}

/// Collects topic names, deduplicated in first-seen order.
#[derive(Default)]
struct TopicList(Vec<String>);

impl TopicList {
    fn add(&mut self, name: &str) {
        if !self.0.iter().any(|t| t == name) {
            self.0.push(name.to_string());
        }
    }

    fn done(self) -> Topics {
        Topics::Named(self.0)
    }
}

fn names<'a>(it: impl IntoIterator<Item = &'a StrBytes>) -> Topics {
    let mut list = TopicList::default();
    for name in it {
        list.add(name.as_str());
    }
    list.done()
}

/// Names that may be absent (a topic given by id instead): any absent or empty one makes the
/// set unknown.
fn optional_names<'a>(it: impl IntoIterator<Item = Option<&'a StrBytes>>) -> Topics {
    let mut list = TopicList::default();
    for name in it {
        match name {
            Some(n) if !n.is_empty() => list.add(n.as_str()),
            _ => return Topics::Unknown,
        }
    }
    list.done()
}

fn topics_of(body: &RequestKind) -> Topics {
    use RequestKind as R;
    match body {
        R::Produce(r) => names(r.topic_data.iter().map(|t| &t.name.0)),
        R::Fetch(r) => {
            let mut list = TopicList::default();
            for t in &r.topics {
                list.add(t.topic.as_str());
            }
            // Forgotten topics leave the fetch session: naming them is harmless, but they are
            // topics the request is about, so they are judged too.
            for t in &r.forgotten_topics_data {
                list.add(t.topic.as_str());
            }
            list.done()
        }
        R::ListOffsets(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::Metadata(r) => match &r.topics {
            None => Topics::Unknown,
            Some(t) => optional_names(t.iter().map(|t| t.name.as_ref().map(|n| &n.0))),
        },
        R::OffsetCommit(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::OffsetFetch(r) => {
            let mut list = TopicList::default();
            match &r.topics {
                Some(t) => t.iter().for_each(|t| list.add(t.name.as_str())),
                None if r.groups.is_empty() => return Topics::Unknown,
                None => {}
            }
            for g in &r.groups {
                match &g.topics {
                    Some(t) => t.iter().for_each(|t| list.add(t.name.as_str())),
                    None => return Topics::Unknown,
                }
            }
            list.done()
        }
        R::CreateTopics(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::DeleteTopics(r) => {
            if r.topics.is_empty() {
                names(r.topic_names.iter().map(|t| &t.0))
            } else {
                optional_names(r.topics.iter().map(|t| t.name.as_ref().map(|n| &n.0)))
            }
        }
        R::DeleteRecords(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::OffsetForLeaderEpoch(r) => names(r.topics.iter().map(|t| &t.topic.0)),
        R::AddPartitionsToTxn(r) => {
            let mut list = TopicList::default();
            r.v3_and_below_topics
                .iter()
                .for_each(|t| list.add(t.name.as_str()));
            for txn in &r.transactions {
                txn.topics.iter().for_each(|t| list.add(t.name.as_str()));
            }
            list.done()
        }
        R::TxnOffsetCommit(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::CreatePartitions(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::DescribeProducers(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::OffsetDelete(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::AlterPartitionReassignments(r) => names(r.topics.iter().map(|t| &t.name.0)),
        R::ListPartitionReassignments(r) => match &r.topics {
            None => Topics::Unknown,
            Some(t) => names(t.iter().map(|t| &t.name.0)),
        },
        R::ElectLeaders(r) => match &r.topic_partitions {
            None => Topics::Unknown,
            Some(t) => names(t.iter().map(|t| &t.topic.0)),
        },
        R::AlterReplicaLogDirs(r) => {
            let mut list = TopicList::default();
            for dir in &r.dirs {
                dir.topics.iter().for_each(|t| list.add(t.name.as_str()));
            }
            list.done()
        }
        R::DescribeLogDirs(r) => match &r.topics {
            None => Topics::Unknown,
            Some(t) => names(t.iter().map(|t| &t.topic.0)),
        },
        R::WriteTxnMarkers(r) => {
            let mut list = TopicList::default();
            for m in &r.markers {
                m.topics.iter().for_each(|t| list.add(t.name.as_str()));
            }
            list.done()
        }
        // Inter-broker topic-carrying APIs (LeaderAndIsr, StopReplica, UpdateMetadata) are not in
        // these schemas any more; anything else names no topics.
        _ if policy_topic_key(body) => Topics::Unknown,
        _ => Topics::None,
    }
}

/// Keys that the policy treats as topic-carrying but whose topics are not extracted above: judged
/// as unknown topics, which no topic rule allows.
fn policy_topic_key(body: &RequestKind) -> bool {
    matches!(
        body,
        RequestKind::ShareFetch(_) | RequestKind::ShareAcknowledge(_)
    )
}

#[cfg(test)]
mod tests;
