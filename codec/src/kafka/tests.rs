use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::deny::{api_versions_unsupported, deny_response};
use super::rewrite::{
    amend_metadata_response, clamp_api_versions, fetch_session_id, metadata_request_keeping,
};
use super::*;

/// A request frame without its length prefix, as a client would send it.
pub(crate) fn request_frame(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &RequestKind,
) -> Bytes {
    let mut header = RequestHeader::default();
    header.request_api_key = key as i16;
    header.request_api_version = version;
    header.correlation_id = correlation_id;
    header.client_id = Some(StrBytes::from_static_str("test-client"));
    let mut buf = BytesMut::new();
    header
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    buf.freeze()
}

/// Decodes a response frame (with its length prefix) of `key`/`version`.
fn decode_response(frame: &[u8], key: ApiKey, version: i16) -> (i32, ResponseKind) {
    let len = i32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "length prefix matches");
    let mut body = Bytes::copy_from_slice(&frame[4..]);
    let header = ResponseHeader::decode(&mut body, key.response_header_version(version)).unwrap();
    let resp = ResponseKind::decode(key, &mut body, version).unwrap();
    assert!(body.is_empty(), "no trailing bytes");
    (header.correlation_id, resp)
}

fn topic(name: &'static str) -> TopicName {
    TopicName(StrBytes::from_static_str(name))
}

fn produce(topics: &[&'static str], acks: i16) -> RequestKind {
    let mut req = ProduceRequest::default();
    req.acks = acks;
    req.timeout_ms = 1000;
    for t in topics {
        let mut data = produce_request::TopicProduceData::default();
        data.name = topic(t);
        let mut part = produce_request::PartitionProduceData::default();
        part.index = 0;
        part.records = Some(Bytes::from_static(b"opaque record batch"));
        data.partition_data.push(part);
        req.topic_data.push(data);
    }
    RequestKind::Produce(req)
}

fn metadata(topics: Option<&[&'static str]>) -> RequestKind {
    let mut req = MetadataRequest::default();
    req.topics = topics.map(|ts| {
        ts.iter()
            .map(|t| {
                let mut m = metadata_request::MetadataRequestTopic::default();
                m.name = Some(topic(t));
                m
            })
            .collect()
    });
    RequestKind::Metadata(req)
}

#[test]
fn produce_decodes_in_every_supported_version_with_its_topics() {
    let (min, max) = supported_versions(0).unwrap();
    assert_eq!((min, max), (3, 12));
    for v in min..=max {
        let frame = request_frame(ApiKey::Produce, v, 7, &produce(&["a", "b", "a"], 1));
        let req = decode_request(frame).unwrap();
        assert_eq!(
            (req.api_key, req.api_version, req.correlation_id),
            (0, v, 7)
        );
        assert_eq!(req.client_id(), Some("test-client"));
        assert_eq!(req.topics(), Topics::Named(vec!["a".into(), "b".into()]));
        assert!(req.expects_response());
    }
    let req = decode_request(request_frame(ApiKey::Produce, 9, 1, &produce(&["a"], 0))).unwrap();
    assert!(!req.expects_response(), "acks=0 gets no answer");
    assert!(deny_response(&req).is_none());
}

#[test]
fn refusals_name_what_is_wrong() {
    assert_eq!(
        decode_request(Bytes::from_static(b"\0\0\0")).unwrap_err(),
        KafkaError::Truncated { len: 3 }
    );
    let unknown = decode_request(Bytes::from_static(&[0x7f, 0, 0, 1, 0, 0, 0, 9])).unwrap_err();
    assert_eq!(
        unknown,
        KafkaError::UnknownApiKey {
            api_key: 0x7f00,
            correlation_id: 9
        }
    );
    let too_new = request_frame(
        ApiKey::Fetch,
        13,
        5,
        &RequestKind::Fetch(Default::default()),
    );
    let err = decode_request(too_new).unwrap_err();
    assert!(matches!(
        err,
        KafkaError::UnsupportedVersion {
            api_key: 1,
            api_version: 13,
            max: 12,
            ..
        }
    ));
    assert!(
        err.to_string().contains("Fetch v13 is not supported"),
        "{err}"
    );
    let mut trailing = BytesMut::from(&request_frame(ApiKey::Metadata, 4, 3, &metadata(None))[..]);
    trailing.put_u8(0);
    let req = decode_request(trailing.freeze()).expect("trailing bytes are ignored, as by Kafka");
    assert_eq!(req.topics(), Topics::Unknown);
    // A count of 2^31-1 topics in a 12-byte body: refused before anything is allocated.
    let mut huge = BytesMut::new();
    huge.put_slice(&request_frame(ApiKey::Metadata, 1, 3, &metadata(Some(&[])))[..]);
    let len = huge.len();
    huge[len - 4..].copy_from_slice(&i32::MAX.to_be_bytes());
    let err = decode_request(huge.freeze()).unwrap_err();
    assert!(matches!(err, KafkaError::Malformed { .. }), "{err}");
}

#[test]
fn frame_lengths_are_bounded() {
    assert_eq!(frame_len(&[0, 0], 100), Ok(None));
    assert_eq!(frame_len(&[0, 0, 0, 100, 1], 100), Ok(Some(100)));
    assert_eq!(
        frame_len(&[0, 0, 0, 101], 100),
        Err(KafkaError::BadLength {
            length: 101,
            max: 100
        })
    );
    assert!(frame_len(&[0xff, 0xff, 0xff, 0xff], 100).is_err());
}

#[test]
fn topics_of_the_consumer_apis() {
    let mut fetch = FetchRequest::default();
    let mut t = fetch_request::FetchTopic::default();
    t.topic = topic("orders");
    t.partitions.push(Default::default());
    fetch.topics.push(t);
    let mut forgotten = fetch_request::ForgottenTopic::default();
    forgotten.topic = topic("old");
    fetch.forgotten_topics_data.push(forgotten);
    let req = decode_request(request_frame(
        ApiKey::Fetch,
        11,
        1,
        &RequestKind::Fetch(fetch),
    ))
    .unwrap();
    assert_eq!(
        req.topics(),
        Topics::Named(vec!["orders".into(), "old".into()])
    );

    let all = decode_request(request_frame(ApiKey::Metadata, 9, 1, &metadata(None))).unwrap();
    assert_eq!(all.topics(), Topics::Unknown, "null list means every topic");

    let mut by_id = MetadataRequest::default();
    let mut entry = metadata_request::MetadataRequestTopic::default();
    entry.name = None;
    entry.topic_id = uuid::Uuid::from_u128(7);
    by_id.topics = Some(vec![entry]);
    let req = decode_request(request_frame(
        ApiKey::Metadata,
        12,
        1,
        &RequestKind::Metadata(by_id),
    ))
    .unwrap();
    assert_eq!(req.topics(), Topics::Unknown, "a topic id cannot be judged");

    let join = decode_request(request_frame(
        ApiKey::JoinGroup,
        5,
        1,
        &RequestKind::JoinGroup(Default::default()),
    ))
    .unwrap();
    assert_eq!(join.topics(), Topics::None);
}

#[test]
fn denied_produce_is_answered_per_partition_with_topic_authorization_failed() {
    for v in [3, 7, 9, 12] {
        let req = decode_request(request_frame(
            ApiKey::Produce,
            v,
            42,
            &produce(&["x", "y"], -1),
        ))
        .unwrap();
        let frame = deny_response(&req).unwrap();
        let (corr, resp) = decode_response(&frame, ApiKey::Produce, v);
        assert_eq!(corr, 42);
        let ResponseKind::Produce(resp) = resp else {
            panic!()
        };
        let got: Vec<_> = resp
            .responses
            .iter()
            .map(|t| {
                (
                    t.name.as_str().to_string(),
                    t.partition_responses[0].error_code,
                )
            })
            .collect();
        assert_eq!(got, [("x".into(), 29), ("y".into(), 29)], "v{v}");
    }
}

#[test]
fn group_and_cluster_apis_get_their_own_errors() {
    let mut find = FindCoordinatorRequest::default();
    find.key = StrBytes::from_static_str("g1");
    for v in [1, 3] {
        let req = decode_request(request_frame(
            ApiKey::FindCoordinator,
            v,
            1,
            &RequestKind::FindCoordinator(find.clone()),
        ))
        .unwrap();
        let (_, resp) = decode_response(&deny_response(&req).unwrap(), ApiKey::FindCoordinator, v);
        let ResponseKind::FindCoordinator(resp) = resp else {
            panic!()
        };
        assert_eq!(resp.error_code, 30);
    }
    find.key = StrBytes::default();
    find.coordinator_keys = vec![StrBytes::from_static_str("g1")];
    let req = decode_request(request_frame(
        ApiKey::FindCoordinator,
        4,
        1,
        &RequestKind::FindCoordinator(find),
    ))
    .unwrap();
    let (_, resp) = decode_response(&deny_response(&req).unwrap(), ApiKey::FindCoordinator, 4);
    let ResponseKind::FindCoordinator(resp) = resp else {
        panic!()
    };
    assert_eq!(resp.coordinators[0].error_code, 30);

    for (key, body, want) in [
        (
            ApiKey::JoinGroup,
            RequestKind::JoinGroup(Default::default()),
            30,
        ),
        (
            ApiKey::Heartbeat,
            RequestKind::Heartbeat(Default::default()),
            30,
        ),
        (
            ApiKey::SyncGroup,
            RequestKind::SyncGroup(Default::default()),
            30,
        ),
        (
            ApiKey::ListGroups,
            RequestKind::ListGroups(Default::default()),
            31,
        ),
        (
            ApiKey::DescribeCluster,
            RequestKind::DescribeCluster(Default::default()),
            31,
        ),
    ] {
        let (min, max) = supported_versions(key as i16).unwrap();
        for v in min..=max {
            let req = decode_request(request_frame(key, v, 9, &body)).unwrap();
            let frame = deny_response(&req).unwrap_or_else(|| panic!("{key:?} v{v}"));
            let (corr, resp) = decode_response(&frame, key, v);
            assert_eq!(corr, 9);
            assert_eq!(
                super::deny::denial_error_code(&req),
                want,
                "the recorded code is the answer's"
            );
            let code = match resp {
                ResponseKind::JoinGroup(r) => r.error_code,
                ResponseKind::Heartbeat(r) => r.error_code,
                ResponseKind::SyncGroup(r) => r.error_code,
                ResponseKind::ListGroups(r) => r.error_code,
                ResponseKind::DescribeCluster(r) => r.error_code,
                other => panic!("{other:?}"),
            };
            assert_eq!(code, want, "{key:?} v{v}");
        }
    }
}

#[test]
fn every_supported_request_type_decodes_from_its_default_and_denial_encodes() {
    // Each request type's default body, in every supported version: the decoder accepts it, and
    // where a denial exists it is a response of the same type and version that decodes back.
    let mut answered = 0;
    for key in 0..=i16::from(u8::MAX) {
        let Some((min, max)) = supported_versions(key) else {
            continue;
        };
        let api = ApiKey::try_from(key).unwrap();
        for v in min..=max {
            let Ok(mut body) = RequestKind::decode(api, &mut default_body(api, v), v) else {
                continue;
            };
            if let RequestKind::Produce(p) = &mut body {
                p.acks = 1;
            }
            let frame = request_frame(api, v, 77, &body);
            let req = decode_request(frame).unwrap_or_else(|e| panic!("{api:?} v{v}: {e}"));
            if let Some(resp) = deny_response(&req) {
                let (corr, _) = decode_response(&resp, api, v);
                assert_eq!(corr, 77);
                answered += 1;
            }
        }
    }
    assert!(answered > 150, "{answered} denials checked");
}

/// The encoding of a request type's default body in version `v`.
fn default_body(api: ApiKey, v: i16) -> Bytes {
    // Build through the enum so that every key is covered without naming each type.
    let mut buf = BytesMut::new();
    let empty = RequestKind::decode(api, &mut Bytes::new(), v);
    if let Ok(kind) = empty {
        kind.encode(&mut buf, v).unwrap();
        return buf.freeze();
    }
    default_kind(api)
        .and_then(|k| k.encode(&mut buf, v).ok())
        .map(|()| buf.freeze())
        .unwrap_or_default()
}

fn default_kind(api: ApiKey) -> Option<RequestKind> {
    use RequestKind as R;
    Some(match api {
        ApiKey::Produce => R::Produce(Default::default()),
        ApiKey::Fetch => R::Fetch(Default::default()),
        ApiKey::ListOffsets => R::ListOffsets(Default::default()),
        ApiKey::Metadata => R::Metadata(Default::default()),
        ApiKey::OffsetCommit => R::OffsetCommit(Default::default()),
        ApiKey::OffsetFetch => R::OffsetFetch(Default::default()),
        ApiKey::FindCoordinator => R::FindCoordinator(Default::default()),
        ApiKey::JoinGroup => R::JoinGroup(Default::default()),
        ApiKey::Heartbeat => R::Heartbeat(Default::default()),
        ApiKey::LeaveGroup => R::LeaveGroup(Default::default()),
        ApiKey::SyncGroup => R::SyncGroup(Default::default()),
        ApiKey::DescribeGroups => R::DescribeGroups(Default::default()),
        ApiKey::ListGroups => R::ListGroups(Default::default()),
        ApiKey::SaslHandshake => R::SaslHandshake(Default::default()),
        ApiKey::ApiVersions => R::ApiVersions(Default::default()),
        ApiKey::CreateTopics => R::CreateTopics(Default::default()),
        ApiKey::DeleteTopics => R::DeleteTopics(Default::default()),
        ApiKey::DeleteRecords => R::DeleteRecords(Default::default()),
        ApiKey::InitProducerId => R::InitProducerId(Default::default()),
        ApiKey::OffsetForLeaderEpoch => R::OffsetForLeaderEpoch(Default::default()),
        ApiKey::AddPartitionsToTxn => R::AddPartitionsToTxn(Default::default()),
        ApiKey::AddOffsetsToTxn => R::AddOffsetsToTxn(Default::default()),
        ApiKey::EndTxn => R::EndTxn(Default::default()),
        ApiKey::TxnOffsetCommit => R::TxnOffsetCommit(Default::default()),
        ApiKey::DescribeConfigs => R::DescribeConfigs(Default::default()),
        ApiKey::SaslAuthenticate => R::SaslAuthenticate(Default::default()),
        ApiKey::CreatePartitions => R::CreatePartitions(Default::default()),
        ApiKey::DeleteGroups => R::DeleteGroups(Default::default()),
        ApiKey::OffsetDelete => R::OffsetDelete(Default::default()),
        ApiKey::DescribeCluster => R::DescribeCluster(Default::default()),
        ApiKey::DescribeProducers => R::DescribeProducers(Default::default()),
        ApiKey::ListTransactions => R::ListTransactions(Default::default()),
        ApiKey::DescribeAcls => R::DescribeAcls(Default::default()),
        ApiKey::ConsumerGroupHeartbeat => R::ConsumerGroupHeartbeat(Default::default()),
        ApiKey::ConsumerGroupDescribe => R::ConsumerGroupDescribe(Default::default()),
        ApiKey::GetTelemetrySubscriptions => R::GetTelemetrySubscriptions(Default::default()),
        ApiKey::PushTelemetry => R::PushTelemetry(Default::default()),
        _ => return None,
    })
}

#[test]
fn api_versions_answers_are_narrowed_to_what_membrane_parses() {
    let mut body = ApiVersionsResponse::default();
    for (key, min, max) in [(0, 0, 13), (1, 0, 17), (3, 0, 12), (18, 0, 4), (999, 0, 1)] {
        let mut r = api_versions_response::ApiVersion::default();
        r.api_key = key;
        r.min_version = min;
        r.max_version = max;
        body.api_keys.push(r);
    }
    let frame = super::deny::encode_response(5, 18, 3, &ResponseKind::ApiVersions(body)).unwrap();
    let out = clamp_api_versions(Bytes::copy_from_slice(&frame[4..]), 3)
        .unwrap()
        .unwrap();
    let (corr, resp) = decode_response(&out, ApiKey::ApiVersions, 3);
    assert_eq!(corr, 5);
    let ResponseKind::ApiVersions(resp) = resp else {
        panic!()
    };
    let got: Vec<_> = resp
        .api_keys
        .iter()
        .map(|r| (r.api_key, r.min_version, r.max_version))
        .collect();
    assert_eq!(got, [(0, 3, 12), (1, 4, 12), (3, 0, 12), (18, 0, 4)]);

    let unsupported = api_versions_unsupported(11);
    let (corr, resp) = decode_response(&unsupported, ApiKey::ApiVersions, 0);
    assert_eq!(corr, 11);
    let ResponseKind::ApiVersions(resp) = resp else {
        panic!()
    };
    assert_eq!(resp.error_code, 35);
    assert!(
        clamp_api_versions(Bytes::copy_from_slice(&unsupported[4..]), 3)
            .unwrap()
            .is_none(),
        "an error answer passes unchanged"
    );
}

#[test]
fn metadata_for_a_mix_is_forwarded_for_the_allowed_and_answered_for_the_denied() {
    let req = decode_request(request_frame(
        ApiKey::Metadata,
        9,
        4,
        &metadata(Some(&["ok", "secret"])),
    ))
    .unwrap();
    let (forward, denied) = metadata_request_keeping(&req, &|t| t == "ok").unwrap();
    let fwd = decode_request(Bytes::copy_from_slice(&forward[4..])).unwrap();
    assert_eq!(fwd.topics(), Topics::Named(vec!["ok".into()]));
    assert_eq!(fwd.correlation_id, 4);
    assert_eq!(fwd.client_id(), Some("test-client"));

    // The broker's answer names "ok" and "other" (as if asked for everything).
    let mut resp = MetadataResponse::default();
    for name in ["ok", "other"] {
        let mut t = metadata_response::MetadataResponseTopic::default();
        t.name = Some(topic(name));
        resp.topics.push(t);
    }
    let answer = super::deny::encode_response(4, 3, 9, &ResponseKind::Metadata(resp)).unwrap();
    let amended = amend_metadata_response(
        Bytes::copy_from_slice(&answer[4..]),
        9,
        &denied,
        Some(&|t: &str| t == "ok"),
    )
    .unwrap();
    let (corr, resp) = decode_response(&amended, ApiKey::Metadata, 9);
    assert_eq!(corr, 4);
    let ResponseKind::Metadata(resp) = resp else {
        panic!()
    };
    let got: Vec<_> = resp
        .topics
        .iter()
        .map(|t| (t.name.as_ref().unwrap().as_str().to_string(), t.error_code))
        .collect();
    assert_eq!(got, [("ok".into(), 0), ("secret".into(), 29)]);

    let v0 = decode_request(request_frame(
        ApiKey::Metadata,
        0,
        4,
        &metadata(Some(&["secret"])),
    ))
    .unwrap();
    assert!(
        metadata_request_keeping(&v0, &|_| false).is_none(),
        "v0 cannot ask for no topics"
    );
}

#[test]
fn fetch_session_id_is_read_in_flexible_and_classic_answers() {
    for v in [7, 11, 12] {
        let mut resp = FetchResponse::default();
        resp.session_id = 0x01020304;
        let frame = super::deny::encode_response(1, 1, v, &ResponseKind::Fetch(resp)).unwrap();
        assert_eq!(fetch_session_id(&frame[4..], v), Some(0x01020304), "v{v}");
    }
    assert_eq!(fetch_session_id(&[0; 20], 6), None);
    assert_eq!(fetch_session_id(&[0; 5], 12), None);
}

#[test]
fn a_narrowed_metadata_request_with_a_tag_beyond_i32_still_decodes() {
    // Found by the kafka_request fuzz target: a top-level tag number beyond i32::MAX, which
    // kafka-protocol counts but does not write back.
    let frame = include_bytes!("../../tests/golden/kafka/regress-metadata-huge-tag.bin");
    let req = decode_request(Bytes::from_static(frame)).unwrap();
    let (narrowed, denied) = metadata_request_keeping(&req, &|t| t.len() % 2 == 0).unwrap();
    assert_eq!(denied.len(), 1);
    let again = decode_request(narrowed.freeze().slice(LENGTH_PREFIX..)).unwrap();
    assert_eq!(again.topics(), Topics::Named(vec![]));
}

mod session {
    use super::*;
    use crate::kafka::session::{
        Judged, KafkaJudge, KafkaSession, Owed, ToBroker, placeholder_request,
    };
    use membrane_policy::l7::kafka::KafkaRequest;

    /// Allows requests whose topics are all in `allowed` (and those without topics).
    struct Topics(&'static [&'static str], bool);

    impl KafkaJudge for Topics {
        fn refuses_connection(&self) -> Option<(&'static str, String)> {
            self.1.then(|| ("ingress", "L3/L4 denies".to_string()))
        }

        fn judge(&self, facts: &KafkaRequest<'_>) -> Judged {
            let denied: Vec<String> = match facts.topics {
                None => {
                    return Judged::Deny {
                        direction: "ingress",
                        denied_topics: vec![],
                    };
                }
                Some(t) => t
                    .iter()
                    .filter(|t| !self.0.contains(t))
                    .map(|t| t.to_string())
                    .collect(),
            };
            if denied.is_empty() {
                Judged::Allow {
                    direction: "ingress",
                    policy: "p".into(),
                }
            } else {
                Judged::Deny {
                    direction: "ingress",
                    denied_topics: denied,
                }
            }
        }
    }

    fn prefixed(frame: Bytes) -> Bytes {
        let mut out = BytesMut::new();
        out.put_i32(frame.len() as i32);
        out.extend_from_slice(&frame);
        out.freeze()
    }

    #[test]
    fn allowed_requests_go_to_the_broker_unchanged_and_denied_ones_are_answered_here() {
        let mut session = KafkaSession::default();
        let judge = Topics(&["ok"], false);
        let frame = prefixed(request_frame(ApiKey::Produce, 7, 1, &produce(&["ok"], 1)));
        let s = session.settle(frame.clone(), &judge);
        assert!(matches!(&s.to_broker, ToBroker::Frame(f) if *f == frame));
        assert!(matches!(s.owed, Some(Owed::Broker(ref e)) if !e.rewrites()));
        assert_eq!((s.record.verdict, &*s.record.policy), ("forwarded", "p"));

        let s = session.settle(
            prefixed(request_frame(
                ApiKey::Produce,
                7,
                2,
                &produce(&["secret"], 1),
            )),
            &judge,
        );
        assert!(matches!(s.to_broker, ToBroker::Nothing));
        let Some(Owed::Local(answer)) = s.owed else {
            panic!("a local answer")
        };
        let (corr, ResponseKind::Produce(resp)) = decode_response(&answer, ApiKey::Produce, 7)
        else {
            panic!()
        };
        assert_eq!(corr, 2);
        assert_eq!(
            resp.responses[0].partition_responses[0].error_code,
            TOPIC_AUTHORIZATION_FAILED
        );
        assert_eq!(s.record.denied_topics, ["secret"]);

        // acks=0: the client expects nothing, so nothing is owed.
        let s = session.settle(
            prefixed(request_frame(
                ApiKey::Produce,
                7,
                3,
                &produce(&["secret"], 0),
            )),
            &judge,
        );
        assert!(matches!(s.to_broker, ToBroker::Nothing) && s.owed.is_none());

        // The connection refused at L3/L4: close, forward nothing.
        let s = session.settle(frame, &Topics(&["ok"], true));
        assert!(matches!(s.to_broker, ToBroker::Close) && s.owed.is_none());
        assert_eq!(s.record.verdict, "denied");

        // Garbage closes too, with the codec's reason.
        let s = session.settle(prefixed(Bytes::from_static(b"\x00\x00\x00")), &judge);
        assert!(matches!(s.to_broker, ToBroker::Close));
        assert_eq!(s.record.verdict, "error");
    }

    #[test]
    fn an_incremental_fetch_is_judged_with_its_session_topics() {
        let mut session = KafkaSession::default();
        let judge = Topics(&["ok"], false);
        let fetch = |session_id, epoch, topics: &[&'static str]| {
            let mut f = FetchRequest::default();
            f.session_id = session_id;
            f.session_epoch = epoch;
            for t in topics {
                let mut ft = fetch_request::FetchTopic::default();
                ft.topic = topic(t);
                ft.partitions.push(fetch_request::FetchPartition::default());
                f.topics.push(ft);
            }
            prefixed(request_frame(ApiKey::Fetch, 7, 1, &RequestKind::Fetch(f)))
        };
        // A session this connection never opened: unknown topics, denied.
        let s = session.settle(fetch(77, 1, &[]), &judge);
        assert_eq!(s.record.verdict, "denied");
        // Opened with "ok"; the broker's answer names session 77.
        let s = session.settle(fetch(0, 0, &["ok"]), &judge);
        let Some(Owed::Broker(expect)) = s.owed else {
            panic!()
        };
        let mut resp = FetchResponse::default();
        resp.session_id = 77;
        let answer =
            super::super::deny::encode_response(1, 1, 7, &ResponseKind::Fetch(resp)).unwrap();
        session.pass_head(expect, &answer[4..]).unwrap();
        // Now an incremental fetch naming nothing is about "ok".
        let s = session.settle(fetch(77, 1, &[]), &judge);
        assert_eq!(
            (s.record.verdict, s.record.topics.clone()),
            ("forwarded", vec!["ok".to_string()])
        );
    }

    #[test]
    fn answers_must_carry_the_due_correlation_id() {
        let mut session = KafkaSession::default();
        let judge = Topics(&["ok"], false);
        let s = session.settle(
            prefixed(request_frame(ApiKey::Produce, 7, 5, &produce(&["ok"], 1))),
            &judge,
        );
        let Some(Owed::Broker(expect)) = s.owed else {
            panic!()
        };
        let err = session.pass_head(expect, &6i32.to_be_bytes()).unwrap_err();
        assert!(err.contains("correlation id 6 where 5 was due"), "{err}");
    }

    #[test]
    fn the_placeholder_is_an_api_versions_v0_request_with_the_same_correlation_id() {
        let frame = placeholder_request(42);
        assert_eq!(frame_len(&frame, 100).unwrap(), Some(frame.len() - 4));
        let req = decode_request(frame.slice(4..)).unwrap();
        assert_eq!(
            (
                req.api_key,
                req.api_version,
                req.correlation_id,
                req.client_id()
            ),
            (ApiKey::ApiVersions as i16, 0, 42, None)
        );
    }
}
