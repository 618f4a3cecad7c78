//! The ADS service over a real unix socket with tonic clients: first responses, ACK, updates,
//! NACK (logged, fails the waiting completion at once, never re-sent), resource-name filters,
//! stale nonces, and completions across several streams.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use membrane_api::{NETWORK_POLICY_TYPE, v1};
use membrane_xds_server::ads::{RealizeError, XdsCache, serve_unix};
use membrane_xds_server::client::AdsClient;
use prost::Message;

struct Server {
    cache: XdsCache,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xds.sock");
    let cache = XdsCache::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (c, s) = (cache.clone(), socket.clone());
    tokio::spawn(async move {
        serve_unix(&s, c, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Server {
        cache,
        socket,
        _dir: dir,
        stop: Some(stop),
    }
}

struct Client {
    inner: AdsClient,
}

async fn connect(socket: &Path, node: &str) -> Client {
    Client {
        inner: AdsClient::connect_unix(socket, node).await.unwrap(),
    }
}

impl Client {
    async fn send(&self, names: &[&str], nonce: &str, version: &str, error: Option<&str>) {
        self.inner
            .send(NETWORK_POLICY_TYPE, names, nonce, version, error)
            .await
            .unwrap();
    }

    async fn next(&mut self) -> DiscoveryResponse {
        self.inner
            .next(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("a response within 5 s")
    }

    async fn nothing_for(&mut self, ms: u64) -> bool {
        self.inner
            .next(Duration::from_millis(ms))
            .await
            .unwrap()
            .is_none()
    }
}

fn policies(endpoints: &[(&str, u32)]) -> BTreeMap<String, Vec<u8>> {
    endpoints
        .iter()
        .map(|(name, identity)| {
            let np = v1::NetworkPolicy {
                endpoint: name.to_string(),
                identity: *identity,
                ..Default::default()
            };
            (name.to_string(), np.encode_to_vec())
        })
        .collect()
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, NETWORK_POLICY_TYPE);
            v1::NetworkPolicy::decode(any.value.as_slice())
                .unwrap()
                .endpoint
        })
        .collect()
}

#[tokio::test]
async fn ack_update_nack_and_completions() {
    let server = start().await;
    let cache = &server.cache;
    let v1_ = cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 256), ("db", 257)]));
    assert_eq!(v1_, 1);
    assert_eq!(
        cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 256), ("db", 257)])),
        1,
        "an unchanged set keeps its version"
    );

    let mut a = connect(&server.socket, "sidecar-a").await;
    a.send(&[], "", "", None).await;
    let first = a.next().await;
    assert_eq!(first.version_info, "1");
    assert_eq!(names(&first), ["db", "web"]);
    // Versions restart with a new server instance; the identifier tells proxies so.
    let plane = first.control_plane.as_ref().map(|c| c.identifier.as_str());
    assert_eq!(plane, Some(cache.identifier()));
    assert_ne!(XdsCache::new().identifier(), cache.identifier());
    // No ACK yet: a completion for version 1 is pending on this stream.
    let pending = cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", 1, Duration::from_millis(200))
        .await;
    assert!(
        matches!(&pending, Err(RealizeError::Timeout { pending }) if pending[0].starts_with("sidecar-a#")),
        "{pending:?}"
    );
    a.send(&[], &first.nonce, &first.version_info, None).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", 1, Duration::from_secs(2))
        .await
        .expect("acknowledged");
    let status = cache.statuses(NETWORK_POLICY_TYPE);
    assert_eq!(status.values().next().unwrap().acked, Some(1));

    // A second stream subscribes to one resource only.
    let mut b = connect(&server.socket, "sidecar-b").await;
    b.send(&["db"], "", "", None).await;
    let first_b = b.next().await;
    assert_eq!(names(&first_b), ["db"]);
    b.send(&["db"], &first_b.nonce, "1", None).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "db", 1, Duration::from_secs(2))
        .await
        .expect("both streams acknowledged db at version 1");

    // A change reaches both; a completes, b rejects it.
    let v2 = cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 256), ("db", 300)]));
    let second = a.next().await;
    assert_eq!(second.version_info, v2.to_string());
    let second_b = b.next().await;
    assert_eq!(second_b.version_info, "2");
    a.send(&[], &second.nonce, "2", None).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", 2, Duration::from_secs(2))
        .await
        .expect("b does not subscribe to web");
    let waiting = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .wait_realized(NETWORK_POLICY_TYPE, "db", 2, Duration::from_secs(10))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    b.send(&["db"], &second_b.nonce, "1", Some("bad identity 300"))
        .await;
    let failed = waiting.await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "a NACK fails the completion at once"
    );
    assert!(
        matches!(&failed, Err(RealizeError::Nacked { detail, .. }) if detail == "bad identity 300"),
        "{failed:?}"
    );
    assert!(
        b.nothing_for(300).await,
        "the rejected version is not sent again"
    );
    // A stale reply (old nonce) changes nothing.
    b.send(&["db"], &first_b.nonce, "1", None).await;
    assert!(b.nothing_for(200).await);
    let st = cache.statuses(NETWORK_POLICY_TYPE);
    let b_status = st
        .iter()
        .find(|(k, _)| k.starts_with("sidecar-b#"))
        .unwrap()
        .1;
    assert_eq!(b_status.acked, Some(1));
    assert_eq!(
        b_status.nacked.as_ref().map(|(v, _)| *v),
        Some(2),
        "{b_status:?}"
    );

    // The next change goes out, and an ACK of it completes db's wait.
    cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 256), ("db", 301)]));
    let third_b = b.next().await;
    assert_eq!(third_b.version_info, "3");
    b.send(&["db"], &third_b.nonce, "3", None).await;
    let third = a.next().await;
    a.send(&[], &third.nonce, "3", None).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "db", 3, Duration::from_secs(2))
        .await
        .expect("both acknowledged");

    // A stream that goes away is no longer waited for.
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        cache
            .statuses(NETWORK_POLICY_TYPE)
            .keys()
            .all(|k| k.starts_with("sidecar-a#"))
    );
}

#[tokio::test]
async fn a_stream_must_name_its_node() {
    let server = start().await;
    let mut c = connect(&server.socket, "").await;
    c.send(&[], "", "", None).await;
    let err = c.inner.next(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[test]
fn the_filters_hand_written_messages_match_envoys() {
    use envoy_types::pb::envoy::service::discovery::v3 as envoy;
    use membrane_api::discovery as mine;
    let req = mine::DiscoveryRequest {
        version_info: "3".into(),
        node: Some(mine::Node {
            id: "sidecar".into(),
        }),
        resource_names: vec!["web".into()],
        type_url: NETWORK_POLICY_TYPE.into(),
        response_nonce: "7".into(),
        error_detail: Some(mine::Status {
            code: 3,
            message: "bad".into(),
        }),
    };
    let theirs = envoy::DiscoveryRequest::decode(req.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        (
            theirs.version_info.as_str(),
            theirs.node.unwrap().id.as_str(),
            theirs.resource_names,
            theirs.type_url.as_str(),
            theirs.response_nonce.as_str(),
            theirs.error_detail.unwrap().message.as_str()
        ),
        (
            "3",
            "sidecar",
            vec!["web".to_string()],
            NETWORK_POLICY_TYPE,
            "7",
            "bad"
        )
    );
    let resp = envoy::DiscoveryResponse {
        version_info: "4".into(),
        resources: vec![envoy_types::pb::google::protobuf::Any {
            type_url: NETWORK_POLICY_TYPE.into(),
            value: vec![1, 2, 3],
        }],
        type_url: NETWORK_POLICY_TYPE.into(),
        nonce: "9".into(),
        ..Default::default()
    };
    let mine = mine::DiscoveryResponse::decode(resp.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        (
            mine.version_info.as_str(),
            mine.nonce.as_str(),
            mine.resources[0].value.as_slice()
        ),
        ("4", "9", &[1u8, 2, 3][..])
    );
}

#[tokio::test]
async fn a_stream_subscribes_to_its_own_policy_by_address() {
    let server = start().await;
    let cache = &server.cache;
    let aliased = |endpoints: &[(&str, u32, &str)]| {
        endpoints
            .iter()
            .map(|(name, identity, addr)| {
                let np = v1::NetworkPolicy {
                    endpoint: name.to_string(),
                    identity: *identity,
                    addresses: vec![addr.to_string()],
                    ..Default::default()
                };
                (
                    name.to_string(),
                    membrane_xds_server::translate::aliased(&np),
                )
            })
            .collect()
    };
    let v1_ = cache.set_aliased_resources(
        NETWORK_POLICY_TYPE,
        aliased(&[("web", 256, "10.0.0.1"), ("db", 257, "10.0.0.2")]),
    );
    let mut web = connect(&server.socket, "sidecar-web").await;
    web.send(&["10.0.0.1"], "", "", None).await;
    let first = web.next().await;
    assert_eq!(names(&first), ["web"], "only its own endpoint's policy");
    web.send(&["10.0.0.1"], &first.nonce, "1", None).await;
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v1_, Duration::from_secs(2))
        .await
        .expect("web's sidecar acknowledged web's policy");
    assert_eq!(cache.subscribers(NETWORK_POLICY_TYPE, "web").len(), 1);
    assert!(
        cache.subscribers(NETWORK_POLICY_TYPE, "db").is_empty(),
        "db's policy waits for nobody"
    );
    // An address that moves to another endpoint takes the subscription with it.
    cache.set_aliased_resources(
        NETWORK_POLICY_TYPE,
        aliased(&[("web", 256, "10.0.0.9"), ("db", 257, "10.0.0.1")]),
    );
    let moved = web.next().await;
    assert_eq!(names(&moved), ["db"]);
    assert_eq!(cache.subscribers(NETWORK_POLICY_TYPE, "db").len(), 1);
}

async fn delta_next(
    c: &mut membrane_xds_server::client::DeltaAdsClient,
) -> membrane_xds_server::client::DeltaDiscoveryResponse {
    c.next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a response within 5 s")
}

#[tokio::test]
async fn delta_streams_get_only_what_changed_for_them() {
    use membrane_xds_server::client::{DeltaAdsClient, DeltaDiscoveryResponse};
    let server = start().await;
    let cache = &server.cache;
    let v1_ = cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 256), ("db", 257)]));
    let mut web = DeltaAdsClient::connect_unix(&server.socket, "sidecar-web")
        .await
        .unwrap();
    let got = |r: &DeltaDiscoveryResponse| -> Vec<(String, String)> {
        r.resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    };
    web.send(NETWORK_POLICY_TYPE, &["web"], &[], "", None)
        .await
        .unwrap();
    let first = delta_next(&mut web).await;
    assert_eq!(got(&first), [("web".to_string(), "1".to_string())]);
    assert_eq!(first.system_version_info, "1");
    web.send(NETWORK_POLICY_TYPE, &[], &[], &first.nonce, None)
        .await
        .unwrap();
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v1_, Duration::from_secs(2))
        .await
        .expect("acknowledged over delta");

    // A change to db only: web's stream gets nothing, yet holds version 2 of what it wants.
    let v2 = cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 256), ("db", 300)]));
    assert!(
        web.next(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none(),
        "nothing changed for web"
    );
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v2, Duration::from_secs(2))
        .await
        .expect("in sync without a response");

    // A change to web: sent with its new version; a NACK fails the completion and the stream
    // is not in sync with later versions until it accepts something.
    let v3 = cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 301), ("db", 300)]));
    let third = delta_next(&mut web).await;
    assert_eq!(got(&third), [("web".to_string(), v3.to_string())]);
    web.send(
        NETWORK_POLICY_TYPE,
        &[],
        &[],
        &third.nonce,
        Some("bad identity"),
    )
    .await
    .unwrap();
    let nack = cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v3, Duration::from_secs(2))
        .await;
    assert!(
        matches!(&nack, Err(RealizeError::Nacked { detail, .. }) if detail == "bad identity"),
        "{nack:?}"
    );
    let v4 = cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("web", 301), ("db", 302)]));
    let still = cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v4, Duration::from_millis(300))
        .await;
    assert!(
        still.is_err(),
        "a rejecting stream is not in sync: {still:?}"
    );

    // Subscribing to db as well sends db alone; removing web from the set says so.
    web.send(NETWORK_POLICY_TYPE, &["db"], &[], "", None)
        .await
        .unwrap();
    let added = delta_next(&mut web).await;
    assert_eq!(got(&added), [("db".to_string(), v4.to_string())]);
    web.send(NETWORK_POLICY_TYPE, &[], &[], &added.nonce, None)
        .await
        .unwrap();
    cache.set_resources(NETWORK_POLICY_TYPE, policies(&[("db", 302)]));
    let removed = delta_next(&mut web).await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, ["web"]);

    // A wildcard stream (no names) gets everything there is.
    let mut all = DeltaAdsClient::connect_unix(&server.socket, "sidecar-all")
        .await
        .unwrap();
    all.send(NETWORK_POLICY_TYPE, &[], &[], "", None)
        .await
        .unwrap();
    let everything = delta_next(&mut all).await;
    assert_eq!(
        everything
            .resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["db"]
    );
}

/// Envoy's ECDS service, for a filter whose `config_discovery` has an `api_config_source` of its
/// own: the ADS streams restricted to `TypedExtensionConfig` (state of the world and delta); a
/// request may leave the type out, and a stream asking for another type is refused.
#[tokio::test]
async fn the_ecds_service_serves_extension_configs_alone() {
    use envoy_types::pb::envoy::config::core::v3::{Node, TypedExtensionConfig};
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
    use envoy_types::pb::google::protobuf::StringValue;
    use membrane_xds_server::translate::{TYPED_EXTENSION_CONFIG_TYPE, standalone_extensions};
    use tokio_stream::wrappers::ReceiverStream;

    let server = start().await;
    let version = server.cache.set_resources(
        TYPED_EXTENSION_CONFIG_TYPE,
        standalone_extensions("/var/lib/membrane/filter.wasm", "membrane_xds"),
    );
    let channel = membrane_xds_server::client::unix_channel(&server.socket)
        .await
        .unwrap();
    let mut client = ExtensionConfigDiscoveryServiceClient::new(channel);
    let node = Some(Node {
        id: "standalone".into(),
        ..Default::default()
    });
    let wait = Duration::from_secs(5);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = |nonce: &str, version: &str| DiscoveryRequest {
        node: node.clone(),
        resource_names: vec!["membrane_upstream".into()],
        response_nonce: nonce.into(),
        version_info: version.into(),
        ..Default::default()
    };
    tx.send(request("", "")).await.unwrap();
    let mut responses = client
        .stream_extension_configs(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(wait, responses.message())
        .await
        .expect("a response within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(first.type_url, TYPED_EXTENSION_CONFIG_TYPE);
    assert_eq!(first.resources.len(), 1);
    let extension = TypedExtensionConfig::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(extension.name, "membrane_upstream");
    let wasm = Wasm::decode(extension.typed_config.unwrap().value.as_slice()).unwrap();
    let configuration = wasm.config.unwrap().configuration.unwrap();
    let configuration = StringValue::decode(configuration.value.as_slice()).unwrap();
    assert_eq!(
        configuration.value,
        r#"{"xds_cluster":"membrane_xds","upstream":true}"#
    );
    tx.send(request(&first.nonce, &first.version_info))
        .await
        .unwrap();
    server
        .cache
        .wait_realized(
            TYPED_EXTENSION_CONFIG_TYPE,
            "membrane_upstream",
            version,
            Duration::from_secs(2),
        )
        .await
        .expect("acknowledged over the ECDS service");

    // Delta, the type left out too.
    let (delta_tx, delta_rx) = tokio::sync::mpsc::channel(4);
    delta_tx
        .send(DeltaDiscoveryRequest {
            node: node.clone(),
            resource_names_subscribe: vec!["membrane".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut delta = client
        .delta_extension_configs(ReceiverStream::new(delta_rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(wait, delta.message())
        .await
        .expect("a delta response within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(first.type_url, TYPED_EXTENSION_CONFIG_TYPE);
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["membrane"]);

    // Another type on this service: refused, naming both.
    let (other_tx, other_rx) = tokio::sync::mpsc::channel(4);
    other_tx
        .send(DiscoveryRequest {
            node,
            type_url: NETWORK_POLICY_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut other = client
        .stream_extension_configs(ReceiverStream::new(other_rx))
        .await
        .unwrap()
        .into_inner();
    let refused = tokio::time::timeout(wait, other.message())
        .await
        .expect("an answer within 5 s")
        .expect_err("another type is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains(NETWORK_POLICY_TYPE)
            && refused.message().contains(TYPED_EXTENSION_CONFIG_TYPE),
        "{refused:?}"
    );
}
