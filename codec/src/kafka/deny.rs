//! Synthetic answers to denied requests: a response of the request's own type and version, with its
//! correlation id, carrying the authorization error the protocol defines for that type, so that
//! real clients report "not authorized" at once instead of waiting for a timeout.
//!
//! - Topic-carrying types answer every topic (and partition) of the request with
//!   TOPIC_AUTHORIZATION_FAILED (29): the request as a whole was refused, nothing of it reached
//!   the broker.
//! - Group types answer GROUP_AUTHORIZATION_FAILED (30); FindCoordinator for a transaction and the
//!   transaction types answer TRANSACTIONAL_ID_AUTHORIZATION_FAILED (53); cluster-level types
//!   answer CLUSTER_AUTHORIZATION_FAILED (31).
//! - A denied GetTelemetrySubscriptions (which has no authorization error) is told that no
//!   metrics are wanted.
//! - Types whose schema has no place for an error (and the broker-internal ones) get `None`: the
//!   caller closes the connection, which is also what Kafka does when it cannot answer.

use bytes::{BufMut, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, StrBytes};

use super::{
    CLUSTER_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED, Request, TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED, UNSUPPORTED_VERSION,
};

const SASL_AUTHENTICATION_FAILED: i16 = 58;

/// Encodes a complete response frame: length prefix, header with the correlation id, body.
pub fn encode_response(
    correlation_id: i32,
    api_key: i16,
    api_version: i16,
    body: &ResponseKind,
) -> Option<BytesMut> {
    let key = ApiKey::try_from(api_key).ok()?;
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    header
        .encode(&mut buf, key.response_header_version(api_version))
        .ok()?;
    body.encode(&mut buf, api_version).ok()?;
    let len = i32::try_from(buf.len() - super::LENGTH_PREFIX).ok()?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Some(buf)
}

/// The answer to an ApiVersions request of a version membrane does not parse: version 0 with
/// UNSUPPORTED_VERSION and membrane's ApiVersions range, which is what a broker says so that the
/// client retries with a version both sides know.
pub fn api_versions_unsupported(correlation_id: i32) -> BytesMut {
    let (min, max) = super::supported_versions(ApiKey::ApiVersions as i16).unwrap_or((0, 0));
    let mut body = ApiVersionsResponse::default();
    body.error_code = UNSUPPORTED_VERSION;
    let mut range = api_versions_response::ApiVersion::default();
    range.api_key = ApiKey::ApiVersions as i16;
    range.min_version = min;
    range.max_version = max;
    body.api_keys.push(range);
    encode_response(
        correlation_id,
        ApiKey::ApiVersions as i16,
        0,
        &ResponseKind::ApiVersions(body),
    )
    .expect("a version 0 ApiVersions response always encodes")
}

/// The synthetic answer to a denied request, or `None` when the request gets no response
/// (Produce with `acks=0`) or its type cannot carry an authorization error.
pub fn deny_response(req: &Request) -> Option<BytesMut> {
    if !req.expects_response() {
        return None;
    }
    let body = deny_body(req)?;
    encode_response(req.correlation_id, req.api_key, req.api_version, &body)
}

/// The error code the denial of `req` carries (the first one, where it carries several), for
/// flow records and logs.
pub fn denial_error_code(req: &Request) -> i16 {
    match &req.body {
        RequestKind::FindCoordinator(r) if r.key_type == 1 => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        RequestKind::InitProducerId(r) if r.transactional_id.is_some() => {
            TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        }
        RequestKind::AddOffsetsToTxn(_) | RequestKind::EndTxn(_) => {
            TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        }
        RequestKind::AddPartitionsToTxn(_) if req.api_version > 3 => {
            TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        }
        RequestKind::FindCoordinator(_)
        | RequestKind::JoinGroup(_)
        | RequestKind::Heartbeat(_)
        | RequestKind::LeaveGroup(_)
        | RequestKind::SyncGroup(_)
        | RequestKind::DescribeGroups(_)
        | RequestKind::DeleteGroups(_)
        | RequestKind::ConsumerGroupHeartbeat(_)
        | RequestKind::ConsumerGroupDescribe(_) => GROUP_AUTHORIZATION_FAILED,
        RequestKind::ListGroups(_)
        | RequestKind::ApiVersions(_)
        | RequestKind::SaslHandshake(_)
        | RequestKind::DescribeCluster(_)
        | RequestKind::ListTransactions(_)
        | RequestKind::DescribeAcls(_)
        | RequestKind::PushTelemetry(_)
        | RequestKind::InitProducerId(_) => CLUSTER_AUTHORIZATION_FAILED,
        RequestKind::GetTelemetrySubscriptions(_) => 0,
        RequestKind::SaslAuthenticate(_) => SASL_AUTHENTICATION_FAILED,
        _ => TOPIC_AUTHORIZATION_FAILED,
    }
}

fn group_error_for_coordinator(key_type: i8) -> i16 {
    if key_type == 1 {
        TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    } else {
        GROUP_AUTHORIZATION_FAILED
    }
}

fn deny_body(req: &Request) -> Option<ResponseKind> {
    use RequestKind as R;
    const TOPIC: i16 = TOPIC_AUTHORIZATION_FAILED;
    const GROUP: i16 = GROUP_AUTHORIZATION_FAILED;
    const CLUSTER: i16 = CLUSTER_AUTHORIZATION_FAILED;
    const TXN: i16 = TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
    let v = req.api_version;
    Some(match &req.body {
        R::Produce(r) => {
            let mut resp = ProduceResponse::default();
            for t in &r.topic_data {
                let mut topic = produce_response::TopicProduceResponse::default();
                topic.name = t.name.clone();
                topic.topic_id = t.topic_id;
                for p in &t.partition_data {
                    let mut part = produce_response::PartitionProduceResponse::default();
                    part.index = p.index;
                    part.error_code = TOPIC;
                    part.base_offset = -1;
                    topic.partition_responses.push(part);
                }
                resp.responses.push(topic);
            }
            ResponseKind::Produce(resp)
        }
        R::Fetch(r) => {
            let mut resp = FetchResponse::default();
            resp.session_id = 0;
            for t in &r.topics {
                let mut topic = fetch_response::FetchableTopicResponse::default();
                topic.topic = t.topic.clone();
                topic.topic_id = t.topic_id;
                for p in &t.partitions {
                    let mut part = fetch_response::PartitionData::default();
                    part.partition_index = p.partition;
                    part.error_code = TOPIC;
                    part.high_watermark = -1;
                    part.last_stable_offset = -1;
                    part.log_start_offset = -1;
                    part.records = Some(Default::default());
                    topic.partitions.push(part);
                }
                resp.responses.push(topic);
            }
            ResponseKind::Fetch(resp)
        }
        R::ListOffsets(r) => {
            let mut resp = ListOffsetsResponse::default();
            for t in &r.topics {
                let mut topic = list_offsets_response::ListOffsetsTopicResponse::default();
                topic.name = t.name.clone();
                for p in &t.partitions {
                    let mut part = list_offsets_response::ListOffsetsPartitionResponse::default();
                    part.partition_index = p.partition_index;
                    part.error_code = TOPIC;
                    part.timestamp = -1;
                    part.offset = -1;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::ListOffsets(resp)
        }
        R::Metadata(r) => {
            let mut resp = MetadataResponse::default();
            resp.controller_id = BrokerId(-1);
            for t in r.topics.iter().flatten() {
                resp.topics
                    .push(metadata_topic_denied(t.name.clone(), t.topic_id));
            }
            ResponseKind::Metadata(resp)
        }
        R::OffsetCommit(r) => {
            let mut resp = OffsetCommitResponse::default();
            for t in &r.topics {
                let mut topic = offset_commit_response::OffsetCommitResponseTopic::default();
                topic.name = t.name.clone();
                topic.topic_id = t.topic_id;
                for p in &t.partitions {
                    let mut part = offset_commit_response::OffsetCommitResponsePartition::default();
                    part.partition_index = p.partition_index;
                    part.error_code = TOPIC;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::OffsetCommit(resp)
        }
        R::OffsetFetch(r) => {
            let mut resp = OffsetFetchResponse::default();
            if v <= 7 {
                match &r.topics {
                    Some(topics) => {
                        for t in topics {
                            let mut topic =
                                offset_fetch_response::OffsetFetchResponseTopic::default();
                            topic.name = t.name.clone();
                            for &p in &t.partition_indexes {
                                let mut part =
                                    offset_fetch_response::OffsetFetchResponsePartition::default();
                                part.partition_index = p;
                                part.committed_offset = -1;
                                part.error_code = TOPIC;
                                topic.partitions.push(part);
                            }
                            resp.topics.push(topic);
                        }
                    }
                    // "Every topic of the group": only a group-level error can say no, and
                    // versions before 2 have no place for one.
                    None if v >= 2 => resp.error_code = GROUP,
                    None => return None,
                }
            } else {
                for g in &r.groups {
                    let mut group = offset_fetch_response::OffsetFetchResponseGroup::default();
                    group.group_id = g.group_id.clone();
                    match &g.topics {
                        Some(topics) => {
                            for t in topics {
                                let mut topic =
                                    offset_fetch_response::OffsetFetchResponseTopics::default();
                                topic.name = t.name.clone();
                                topic.topic_id = t.topic_id;
                                for &p in &t.partition_indexes {
                                    let mut part = offset_fetch_response::OffsetFetchResponsePartitions::default();
                                    part.partition_index = p;
                                    part.committed_offset = -1;
                                    part.error_code = TOPIC;
                                    topic.partitions.push(part);
                                }
                                group.topics.push(topic);
                            }
                        }
                        None => group.error_code = GROUP,
                    }
                    resp.groups.push(group);
                }
            }
            ResponseKind::OffsetFetch(resp)
        }
        R::FindCoordinator(r) => {
            let error = group_error_for_coordinator(r.key_type);
            let mut resp = FindCoordinatorResponse::default();
            if v < 4 {
                resp.error_code = error;
                resp.node_id = BrokerId(-1);
                resp.port = -1;
            } else {
                for key in &r.coordinator_keys {
                    let mut c = find_coordinator_response::Coordinator::default();
                    c.key = key.clone();
                    c.node_id = BrokerId(-1);
                    c.port = -1;
                    c.error_code = error;
                    resp.coordinators.push(c);
                }
            }
            ResponseKind::FindCoordinator(resp)
        }
        R::JoinGroup(r) => {
            let mut resp = JoinGroupResponse::default();
            resp.error_code = GROUP;
            resp.generation_id = -1;
            resp.member_id = r.member_id.clone();
            ResponseKind::JoinGroup(resp)
        }
        R::Heartbeat(_) => {
            let mut resp = HeartbeatResponse::default();
            resp.error_code = GROUP;
            ResponseKind::Heartbeat(resp)
        }
        R::LeaveGroup(_) => {
            let mut resp = LeaveGroupResponse::default();
            resp.error_code = GROUP;
            ResponseKind::LeaveGroup(resp)
        }
        R::SyncGroup(_) => {
            let mut resp = SyncGroupResponse::default();
            resp.error_code = GROUP;
            ResponseKind::SyncGroup(resp)
        }
        R::DescribeGroups(r) => {
            let mut resp = DescribeGroupsResponse::default();
            for g in &r.groups {
                let mut group = describe_groups_response::DescribedGroup::default();
                group.group_id = g.clone();
                group.error_code = GROUP;
                resp.groups.push(group);
            }
            ResponseKind::DescribeGroups(resp)
        }
        R::ListGroups(_) => {
            let mut resp = ListGroupsResponse::default();
            resp.error_code = CLUSTER;
            ResponseKind::ListGroups(resp)
        }
        R::SaslHandshake(_) => {
            let mut resp = SaslHandshakeResponse::default();
            resp.error_code = CLUSTER;
            ResponseKind::SaslHandshake(resp)
        }
        R::ApiVersions(_) => {
            let mut resp = ApiVersionsResponse::default();
            resp.error_code = CLUSTER;
            ResponseKind::ApiVersions(resp)
        }
        R::CreateTopics(r) => {
            let mut resp = CreateTopicsResponse::default();
            for t in &r.topics {
                let mut topic = create_topics_response::CreatableTopicResult::default();
                topic.name = t.name.clone();
                topic.error_code = TOPIC;
                topic.num_partitions = -1;
                topic.replication_factor = -1;
                resp.topics.push(topic);
            }
            ResponseKind::CreateTopics(resp)
        }
        R::DeleteTopics(r) => {
            let mut resp = DeleteTopicsResponse::default();
            let mut push = |name: Option<TopicName>, id| {
                let mut topic = delete_topics_response::DeletableTopicResult::default();
                topic.name = name;
                topic.topic_id = id;
                topic.error_code = TOPIC;
                resp.responses.push(topic);
            };
            for t in &r.topic_names {
                push(Some(t.clone()), Default::default());
            }
            for t in &r.topics {
                push(t.name.clone(), t.topic_id);
            }
            ResponseKind::DeleteTopics(resp)
        }
        R::DeleteRecords(r) => {
            let mut resp = DeleteRecordsResponse::default();
            for t in &r.topics {
                let mut topic = delete_records_response::DeleteRecordsTopicResult::default();
                topic.name = t.name.clone();
                for p in &t.partitions {
                    let mut part = delete_records_response::DeleteRecordsPartitionResult::default();
                    part.partition_index = p.partition_index;
                    part.low_watermark = -1;
                    part.error_code = TOPIC;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::DeleteRecords(resp)
        }
        R::InitProducerId(r) => {
            let mut resp = InitProducerIdResponse::default();
            resp.error_code = if r.transactional_id.is_some() {
                TXN
            } else {
                CLUSTER
            };
            resp.producer_id = ProducerId(-1);
            resp.producer_epoch = -1;
            ResponseKind::InitProducerId(resp)
        }
        R::OffsetForLeaderEpoch(r) => {
            let mut resp = OffsetForLeaderEpochResponse::default();
            for t in &r.topics {
                let mut topic =
                    offset_for_leader_epoch_response::OffsetForLeaderTopicResult::default();
                topic.topic = t.topic.clone();
                for p in &t.partitions {
                    let mut part = offset_for_leader_epoch_response::EpochEndOffset::default();
                    part.partition = p.partition;
                    part.error_code = TOPIC;
                    part.leader_epoch = -1;
                    part.end_offset = -1;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::OffsetForLeaderEpoch(resp)
        }
        R::AddPartitionsToTxn(r) if v <= 3 => {
            let mut resp = AddPartitionsToTxnResponse::default();
            for t in &r.v3_and_below_topics {
                let mut topic =
                    add_partitions_to_txn_response::AddPartitionsToTxnTopicResult::default();
                topic.name = t.name.clone();
                for &p in &t.partitions {
                    let mut part =
                        add_partitions_to_txn_response::AddPartitionsToTxnPartitionResult::default(
                        );
                    part.partition_index = p;
                    part.partition_error_code = TOPIC;
                    topic.results_by_partition.push(part);
                }
                resp.results_by_topic_v3_and_below.push(topic);
            }
            ResponseKind::AddPartitionsToTxn(resp)
        }
        R::AddPartitionsToTxn(_) => {
            let mut resp = AddPartitionsToTxnResponse::default();
            resp.error_code = TXN;
            ResponseKind::AddPartitionsToTxn(resp)
        }
        R::AddOffsetsToTxn(_) => {
            let mut resp = AddOffsetsToTxnResponse::default();
            resp.error_code = TXN;
            ResponseKind::AddOffsetsToTxn(resp)
        }
        R::EndTxn(_) => {
            let mut resp = EndTxnResponse::default();
            resp.error_code = TXN;
            resp.producer_id = ProducerId(-1);
            resp.producer_epoch = -1;
            ResponseKind::EndTxn(resp)
        }
        R::TxnOffsetCommit(r) => {
            let mut resp = TxnOffsetCommitResponse::default();
            for t in &r.topics {
                let mut topic = txn_offset_commit_response::TxnOffsetCommitResponseTopic::default();
                topic.name = t.name.clone();
                for p in &t.partitions {
                    let mut part =
                        txn_offset_commit_response::TxnOffsetCommitResponsePartition::default();
                    part.partition_index = p.partition_index;
                    part.error_code = TOPIC;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::TxnOffsetCommit(resp)
        }
        R::DescribeConfigs(r) => {
            let mut resp = DescribeConfigsResponse::default();
            for res in &r.resources {
                let mut result = describe_configs_response::DescribeConfigsResult::default();
                // Resource type 2 is a topic; anything else (broker, logger) is cluster-level.
                result.error_code = if res.resource_type == 2 {
                    TOPIC
                } else {
                    CLUSTER
                };
                result.resource_type = res.resource_type;
                result.resource_name = res.resource_name.clone();
                resp.results.push(result);
            }
            ResponseKind::DescribeConfigs(resp)
        }
        R::SaslAuthenticate(_) => {
            let mut resp = SaslAuthenticateResponse::default();
            resp.error_code = SASL_AUTHENTICATION_FAILED;
            resp.error_message = Some(StrBytes::from_static_str("denied by membrane policy"));
            ResponseKind::SaslAuthenticate(resp)
        }
        R::CreatePartitions(r) => {
            let mut resp = CreatePartitionsResponse::default();
            for t in &r.topics {
                let mut result = create_partitions_response::CreatePartitionsTopicResult::default();
                result.name = t.name.clone();
                result.error_code = TOPIC;
                resp.results.push(result);
            }
            ResponseKind::CreatePartitions(resp)
        }
        R::DeleteGroups(r) => {
            let mut resp = DeleteGroupsResponse::default();
            for g in &r.groups_names {
                let mut result = delete_groups_response::DeletableGroupResult::default();
                result.group_id = g.clone();
                result.error_code = GROUP;
                resp.results.push(result);
            }
            ResponseKind::DeleteGroups(resp)
        }
        R::OffsetDelete(r) => {
            let mut resp = OffsetDeleteResponse::default();
            for t in &r.topics {
                let mut topic = offset_delete_response::OffsetDeleteResponseTopic::default();
                topic.name = t.name.clone();
                for p in &t.partitions {
                    let mut part = offset_delete_response::OffsetDeleteResponsePartition::default();
                    part.partition_index = p.partition_index;
                    part.error_code = TOPIC;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::OffsetDelete(resp)
        }
        R::DescribeCluster(_) => {
            let mut resp = DescribeClusterResponse::default();
            resp.error_code = CLUSTER;
            resp.controller_id = BrokerId(-1);
            ResponseKind::DescribeCluster(resp)
        }
        R::DescribeProducers(r) => {
            let mut resp = DescribeProducersResponse::default();
            for t in &r.topics {
                let mut topic = describe_producers_response::TopicResponse::default();
                topic.name = t.name.clone();
                for &p in &t.partition_indexes {
                    let mut part = describe_producers_response::PartitionResponse::default();
                    part.partition_index = p;
                    part.error_code = TOPIC;
                    topic.partitions.push(part);
                }
                resp.topics.push(topic);
            }
            ResponseKind::DescribeProducers(resp)
        }
        R::ListTransactions(_) => {
            let mut resp = ListTransactionsResponse::default();
            resp.error_code = CLUSTER;
            ResponseKind::ListTransactions(resp)
        }
        R::DescribeAcls(_) => {
            let mut resp = DescribeAclsResponse::default();
            resp.error_code = CLUSTER;
            ResponseKind::DescribeAcls(resp)
        }
        R::ConsumerGroupHeartbeat(_) => {
            let mut resp = ConsumerGroupHeartbeatResponse::default();
            resp.error_code = GROUP;
            ResponseKind::ConsumerGroupHeartbeat(resp)
        }
        R::ConsumerGroupDescribe(r) => {
            let mut resp = ConsumerGroupDescribeResponse::default();
            for g in &r.group_ids {
                let mut group = consumer_group_describe_response::DescribedGroup::default();
                group.group_id = g.clone();
                group.error_code = GROUP;
                resp.groups.push(group);
            }
            ResponseKind::ConsumerGroupDescribe(resp)
        }
        // Client telemetry (KIP-714) has no authorization error: a denied client is told that no
        // metrics are wanted, as a broker without a telemetry receiver says, and asks again in
        // five minutes.
        R::GetTelemetrySubscriptions(_) => {
            let mut resp = GetTelemetrySubscriptionsResponse::default();
            resp.push_interval_ms = 300_000;
            ResponseKind::GetTelemetrySubscriptions(resp)
        }
        R::PushTelemetry(_) => {
            let mut resp = PushTelemetryResponse::default();
            resp.error_code = CLUSTER;
            ResponseKind::PushTelemetry(resp)
        }
        _ => return None,
    })
}

/// A Metadata topic entry that says "not authorized".
pub(crate) fn metadata_topic_denied(
    name: Option<TopicName>,
    topic_id: uuid::Uuid,
) -> metadata_response::MetadataResponseTopic {
    let mut topic = metadata_response::MetadataResponseTopic::default();
    topic.name = name;
    topic.topic_id = topic_id;
    topic.error_code = TOPIC_AUTHORIZATION_FAILED;
    topic
}
