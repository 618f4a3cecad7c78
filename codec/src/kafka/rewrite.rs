//! The few rewrites a policy proxy makes to otherwise untouched traffic:
//!
//! - ApiVersions answers are narrowed to the versions membrane parses ([`clamp_api_versions`]),
//!   so that conforming clients never send a request the proxy would have to refuse as unknown;
//! - a Metadata request naming allowed and denied topics is forwarded for the allowed ones only,
//!   and the answer gets the denied ones back with TOPIC_AUTHORIZATION_FAILED; a Metadata request
//!   for every topic has its answer filtered to the topics the client may see
//!   ([`metadata_request_keeping`], [`amend_metadata_response`]). The client learns that a denied
//!   topic exists only when it named it itself, as with Kafka's own ACLs;
//! - the session id of a Fetch answer is read ([`fetch_session_id`]), so that incremental fetches,
//!   which name only changed partitions, are judged with the topics of their whole session.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable};

use super::deny::{encode_response, metadata_topic_denied};
use super::{LENGTH_PREFIX, Request, supported_versions};

fn response_header(frame: &mut Bytes, key: ApiKey, version: i16) -> Result<i32, String> {
    ResponseHeader::decode(frame, key.response_header_version(version))
        .map(|h| h.correlation_id)
        .map_err(|e| format!("response header: {e}"))
}

/// Narrows an ApiVersions answer (a frame without its length prefix) to the keys and versions
/// membrane parses. `Ok(None)` means "forward unchanged": the broker reported an error, whose
/// body may be in version 0 whatever was asked.
pub fn clamp_api_versions(mut frame: Bytes, api_version: i16) -> Result<Option<BytesMut>, String> {
    // ApiVersions answers always use header version 0: the correlation id, then the error code.
    if frame.len() < 6 {
        return Err(format!("ApiVersions answer of {} bytes", frame.len()));
    }
    if i16::from_be_bytes([frame[4], frame[5]]) != 0 {
        return Ok(None);
    }
    let correlation_id = response_header(&mut frame, ApiKey::ApiVersions, api_version)?;
    let mut body = ApiVersionsResponse::decode(&mut frame, api_version)
        .map_err(|e| format!("ApiVersions v{api_version} answer: {e}"))?;
    drop_unwritable_tags(&mut body.unknown_tagged_fields);
    for range in &mut body.api_keys {
        drop_unwritable_tags(&mut range.unknown_tagged_fields);
    }
    body.api_keys.retain_mut(|range| {
        let Some((min, max)) = supported_versions(range.api_key) else {
            return false;
        };
        range.min_version = range.min_version.max(min);
        range.max_version = range.max_version.min(max);
        range.min_version <= range.max_version
    });
    encode_response(
        correlation_id,
        ApiKey::ApiVersions as i16,
        api_version,
        &ResponseKind::ApiVersions(body),
    )
    .map(Some)
    .ok_or_else(|| format!("ApiVersions v{api_version} answer does not re-encode"))
}

/// A topic entry the proxy answers itself as denied.
#[derive(Clone, Debug)]
pub struct DeniedTopic {
    /// Name as the client gave it (absent when it gave a topic id).
    pub name: Option<TopicName>,
    /// Topic id as the client gave it.
    pub topic_id: uuid::Uuid,
}

/// The Metadata request to forward in place of `req`, keeping only the named topics for which
/// `keep` holds, and the entries dropped. `None` when nothing can be forwarded: version 0 reads an
/// empty topic list as "every topic", so a version 0 request with no topic left is answered by
/// the proxy alone.
pub fn metadata_request_keeping(
    req: &Request,
    keep: &dyn Fn(&str) -> bool,
) -> Option<(BytesMut, Vec<DeniedTopic>)> {
    let RequestKind::Metadata(body) = &req.body else {
        return None;
    };
    let mut body = body.clone();
    // Tagged fields the schema does not know mean nothing to the broker either; they are dropped
    // rather than re-encoded (kafka-protocol 0.18 counts, but does not write, tags beyond
    // i32::MAX, which would corrupt the frame).
    body.unknown_tagged_fields.clear();
    for t in body.topics.iter_mut().flatten() {
        t.unknown_tagged_fields.clear();
    }
    let mut denied = Vec::new();
    if let Some(topics) = body.topics.as_mut() {
        topics.retain(|t| match &t.name {
            Some(name) if keep(name.as_str()) => true,
            _ => {
                denied.push(DeniedTopic {
                    name: t.name.clone(),
                    topic_id: t.topic_id,
                });
                false
            }
        });
        if topics.is_empty() && req.api_version == 0 {
            return None;
        }
    }
    let mut header = RequestHeader::default();
    header.request_api_key = req.api_key;
    header.request_api_version = req.api_version;
    header.correlation_id = req.correlation_id;
    header.client_id = req.client_id.clone();
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    header
        .encode(
            &mut buf,
            ApiKey::Metadata.request_header_version(req.api_version),
        )
        .ok()?;
    body.encode(&mut buf, req.api_version).ok()?;
    let len = i32::try_from(buf.len() - LENGTH_PREFIX).ok()?;
    buf[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    Some((buf, denied))
}

/// Rewrites a Metadata answer (a frame without its length prefix): keeps only the topics for which
/// `visible` holds (when given: the request asked for every topic), then appends `denied` as
/// TOPIC_AUTHORIZATION_FAILED entries. Returns the new frame with its length prefix.
pub fn amend_metadata_response(
    mut frame: Bytes,
    api_version: i16,
    denied: &[DeniedTopic],
    visible: Option<&dyn Fn(&str) -> bool>,
) -> Result<BytesMut, String> {
    let correlation_id = response_header(&mut frame, ApiKey::Metadata, api_version)?;
    let mut body = MetadataResponse::decode(&mut frame, api_version)
        .map_err(|e| format!("Metadata v{api_version} answer: {e}"))?;
    drop_unwritable_tags(&mut body.unknown_tagged_fields);
    for t in &mut body.topics {
        drop_unwritable_tags(&mut t.unknown_tagged_fields);
        for p in &mut t.partitions {
            drop_unwritable_tags(&mut p.unknown_tagged_fields);
        }
    }
    for b in &mut body.brokers {
        drop_unwritable_tags(&mut b.unknown_tagged_fields);
    }
    if let Some(visible) = visible {
        body.topics
            .retain(|t| t.name.as_ref().is_some_and(|n| visible(n.as_str())));
    }
    for d in denied {
        body.topics
            .push(metadata_topic_denied(d.name.clone(), d.topic_id));
    }
    encode_response(
        correlation_id,
        ApiKey::Metadata as i16,
        api_version,
        &ResponseKind::Metadata(body),
    )
    .ok_or_else(|| format!("Metadata v{api_version} answer does not re-encode"))
}

/// Drops tags that kafka-protocol 0.18 counts but does not write (those beyond i32::MAX, kept as
/// negative numbers), so that a re-encoded answer stays well-formed.
fn drop_unwritable_tags(tags: &mut std::collections::BTreeMap<i32, Bytes>) {
    tags.retain(|tag, _| *tag >= 0);
}

fn unsigned_varint(buf: &mut &[u8]) -> Option<u32> {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        let byte = *buf.first()?;
        buf.advance(1);
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The session id of a Fetch answer (a frame without its length prefix), read without decoding
/// the records. `None` before version 7 (no sessions) or when the frame is too short.
pub fn fetch_session_id(frame: &[u8], api_version: i16) -> Option<i32> {
    if api_version < 7 {
        return None;
    }
    let mut buf = frame.get(4..)?; // correlation id
    if ApiKey::Fetch.response_header_version(api_version) >= 1 {
        let fields = unsigned_varint(&mut buf)?;
        for _ in 0..fields {
            unsigned_varint(&mut buf)?;
            let size = unsigned_varint(&mut buf)? as usize;
            buf = buf.get(size..)?;
        }
    }
    // throttle_time_ms (4), error_code (2), session_id (4)
    let id = buf.get(6..10)?;
    Some(i32::from_be_bytes([id[0], id[1], id[2], id[3]]))
}
