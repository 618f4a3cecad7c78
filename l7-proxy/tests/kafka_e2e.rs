//! Kafka through membrane's proxy (reverse mode, on loopback) against a real broker (tansu 0.6)
//! and real clients (kafka-python, confluent-kafka / librdkafka 2.16, kcat), plus hostile frames
//! against a recording upstream.
//!
//! Needs the peers that `scripts/test.sh` prepares (`tansu_bin`, `kafka_clients` in
//! `scripts/env.sh`): MEMBRANE_TANSU, KAFKA_PYTHON and KCAT_LD_LIBRARY_PATH. Without them the
//! tests fail, saying so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use membrane_codec::kafka::kafka_protocol::messages::*;
use membrane_l7_proxy::policy::{PolicyHandle, SnapshotBuilder};
use membrane_l7_proxy::server::{Mode, Proxy};
use membrane_l7_proxy::service::{ProxyConfig, Shared};
use membrane_l7_proxy::telemetry::{FlowRecord, FlowSink, Metrics};
use membrane_policy::PolicySet;
use membrane_policy::endpoints::parse_endpoints;
use membrane_policy::rule::EnforcementMode;
use membrane_tests::kafka::{self, encode_request, produce, produce_answer, read_response};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BROKER_PORT: u16 = 19292;
const PROXY_PORT: u16 = 19291;

fn policy(port: u16) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: empire-kafka, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: kafka}}}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        kafka:
        - {{role: produce, topic: empire-announce, clientID: empire-hq}}
        - {{role: consume, topic: empire-announce, clientID: outpost}}
"#
    )
}

const WORKLOADS: &str =
    "endpoints:\n  - name: kafka\n    labels: {app: kafka}\n    ips: [127.0.0.3]\n";

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(kafka::peer(name))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Running {
    addr: SocketAddr,
    flows: FlowSink,
    metrics: Arc<Metrics>,
    policy: Arc<PolicyHandle>,
    builder: Mutex<SnapshotBuilder>,
    upstream_port: u16,
    _shutdown: watch::Sender<bool>,
}

impl Running {
    /// Puts a new policy in force (the builder keeps identities and the generation moving).
    fn set_policy(&self, text: &str) {
        let set = PolicySet::from_sources([("kafka.yaml", text)]).expect("valid policy");
        let workloads = parse_endpoints("ids.yaml", WORKLOADS).unwrap();
        let snap = self
            .builder
            .lock()
            .unwrap()
            .build(&set, &workloads)
            .unwrap();
        self.policy.store(snap);
    }
}

async fn start_proxy(upstream: SocketAddr, listen: SocketAddr) -> Running {
    let set = PolicySet::from_sources([("kafka.yaml", policy(upstream.port()).as_str())])
        .expect("valid policy");
    let workloads = parse_endpoints("ids.yaml", WORKLOADS).unwrap();
    let mut builder = SnapshotBuilder::new(EnforcementMode::Default);
    let snap = builder.build(&set, &workloads).unwrap();
    let metrics = Arc::new(Metrics::new());
    let flows = FlowSink::new();
    let policy = Arc::new(PolicyHandle::new(snap));
    let shared = Arc::new(Shared::new(
        ProxyConfig::default(),
        policy.clone(),
        metrics.clone(),
        flows.clone(),
    ));
    let proxy = Proxy::new(shared);
    let mode = Mode::Reverse { upstream };
    let listener = membrane_l7_proxy::server::bind(listen, mode).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        proxy
            .serve(listener, mode, rx, Duration::from_secs(1))
            .await
            .unwrap();
    });
    Running {
        addr,
        flows,
        metrics,
        policy,
        builder: Mutex::new(builder),
        upstream_port: upstream.port(),
        _shutdown: tx,
    }
}

fn start_broker() -> Proc {
    Proc(kafka::start_tansu(
        SocketAddr::from(([127, 0, 0, 3], BROKER_PORT)),
        // Clients must come back through the proxy after bootstrap.
        SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        &["empire-announce", "deathstar-plans"],
    ))
}

fn client(lib: &str, action: &str, topic: &str, client_id: &str) -> Value {
    kafka::client(
        &format!("127.0.0.1:{PROXY_PORT}"),
        lib,
        action,
        topic,
        client_id,
    )
}

fn kcat(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("kcat");
    cmd.env("LD_LIBRARY_PATH", env_path("KCAT_LD_LIBRARY_PATH"))
        .args(["-b", &format!("127.0.0.1:{PROXY_PORT}")])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kcat (apt install kcat)");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn collect(rx: &mut tokio::sync::broadcast::Receiver<Arc<FlowRecord>>) -> Vec<Arc<FlowRecord>> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_the_proxy_against_a_real_broker() {
    let _broker = start_broker();
    let proxy = start_proxy(
        SocketAddr::from(([127, 0, 0, 3], BROKER_PORT)),
        SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
    )
    .await;
    assert_eq!(proxy.addr.port(), PROXY_PORT);
    let mut flows = proxy.flows.subscribe();

    for lib in ["kafka-python", "confluent-kafka"] {
        let r = tokio::task::spawn_blocking(move || {
            [
                client(lib, "produce", "empire-announce", "empire-hq"),
                client(lib, "produce", "deathstar-plans", "empire-hq"),
                client(lib, "produce", "empire-announce", "outpost"),
                client(lib, "consume", "empire-announce", "outpost"),
                client(lib, "consume", "deathstar-plans", "outpost"),
                client(lib, "consume", "empire-announce", "empire-hq"),
                client(lib, "metadata", "", "outpost"),
            ]
        })
        .await
        .unwrap();
        let [
            produce_ok,
            produce_denied,
            produce_wrong_client,
            consume_ok,
            consume_denied,
            consume_wrong_client,
            metadata_all,
        ] = r;
        assert_eq!(produce_ok["ok"], true, "{produce_ok}");
        assert_eq!(consume_ok["ok"], true, "{consume_ok}");
        assert!(
            consume_ok["value"]
                .as_str()
                .unwrap()
                .starts_with("membrane"),
            "{consume_ok}"
        );
        for denied in [
            &produce_denied,
            &produce_wrong_client,
            &consume_denied,
            &consume_wrong_client,
        ] {
            kafka::assert_refused(lib, denied, 1.0);
        }
        let topics = metadata_all["topics"].as_object().unwrap();
        assert!(topics.contains_key("empire-announce"), "{metadata_all}");
        assert!(
            !topics.contains_key("deathstar-plans"),
            "{lib}: a client lists only the topics it may see: {metadata_all}"
        );
    }

    // Metadata naming a denied topic: confluent-kafka sees the topic's authorization error.
    let named = tokio::task::spawn_blocking(|| {
        client("confluent-kafka", "metadata", "deathstar-plans", "outpost")
    })
    .await
    .unwrap();
    assert_eq!(
        named["topics"]["deathstar-plans"], "TOPIC_AUTHORIZATION_FAILED",
        "{named}"
    );

    // kcat (librdkafka 2.16): produce allowed, a listing shows only what it may see.
    let (ok, out) = tokio::task::spawn_blocking(|| {
        kcat(
            &[
                "-P",
                "-t",
                "empire-announce",
                "-X",
                "client.id=empire-hq",
                "-X",
                "acks=1",
            ],
            Some("from-kcat\n"),
        )
    })
    .await
    .unwrap();
    assert!(ok, "kcat produce: {out}");
    let (ok, out) = tokio::task::spawn_blocking(|| kcat(&["-L", "-X", "client.id=outpost"], None))
        .await
        .unwrap();
    assert!(ok, "kcat -L: {out}");
    assert!(out.contains("topic \"empire-announce\""), "{out}");
    assert!(!out.contains("deathstar-plans"), "{out}");

    // Pipelined on one connection: allowed, denied, allowed. Answers come back in request order,
    // the denied one made by the proxy, and the connection stays open.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut batch = BytesMut::new();
    for (corr, topic) in [
        (1, "empire-announce"),
        (2, "deathstar-plans"),
        (3, "empire-announce"),
    ] {
        batch.put_slice(&encode_request(ApiKey::Produce, 7, corr, &produce(topic)));
    }
    s.write_all(&batch).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(produce_answer(&mut s).await);
    }
    assert_eq!(answers[0].0, 1);
    assert_eq!(answers[1], (2, 29), "denied in place: {answers:?}");
    assert_eq!(answers[2].0, 3);
    s.write_all(&encode_request(
        ApiKey::Metadata,
        9,
        4,
        &RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![]))),
    ))
    .await
    .unwrap();
    let (corr, _) = read_response(&mut s, ApiKey::Metadata, 9).await;
    assert_eq!(corr, 4, "the connection is still usable");

    // A policy change while the connection is open: its next request meets the new rules.
    proxy.set_policy(
        &policy(proxy.upstream_port).replace("clientID: empire-hq", "clientID: somebody-else"),
    );
    s.write_all(&encode_request(
        ApiKey::Produce,
        7,
        5,
        &produce("empire-announce"),
    ))
    .await
    .unwrap();
    assert_eq!(
        produce_answer(&mut s).await,
        (5, 29),
        "refused on the same connection after the change"
    );

    let records = collect(&mut flows);
    let denied_produce = records
        .iter()
        .filter_map(|r| Some((r, r.kafka.as_ref()?)))
        .find(|(r, k)| {
            r.verdict == "denied" && k.api == "Produce" && k.topics == ["deathstar-plans"]
        })
        .expect("a flow record for a denied produce");
    assert_eq!(denied_produce.1.error_code, Some(29));
    assert_eq!(denied_produce.0.direction, "ingress");
    assert!(
        records.iter().any(|r| {
            r.verdict == "forwarded"
                && r.policy.contains("empire-kafka")
                && r.kafka.as_ref().is_some_and(|k| {
                    k.api == "Produce" && k.client_id.as_deref() == Some("empire-hq")
                })
        }),
        "a forwarded produce credited to its policy"
    );
    let metrics = proxy.metrics.encode();
    for line in [
        "membrane_proxy_kafka_requests_total{direction=\"ingress\",verdict=\"denied\",api_key=\"produce\"}",
        "membrane_proxy_kafka_requests_total{direction=\"ingress\",verdict=\"forwarded\",api_key=\"fetch\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

/// A fake broker that records every byte it receives and never answers.
async fn recording_upstream() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `bytes`; returns what came back before the proxy closed (None: it did not close).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn hostile_frames_close_the_connection_and_reach_nothing() {
    let (upstream, seen) = recording_upstream().await;
    let proxy = start_proxy(upstream, "127.0.0.1:0".parse().unwrap()).await;
    let mut flows = proxy.flows.subscribe();
    let valid = encode_request(ApiKey::Produce, 7, 1, &produce("empire-announce"));
    let mut truncated_body = BytesMut::from(&valid[..valid.len() - 6]);
    let new_len = (truncated_body.len() - 4) as i32;
    truncated_body[..4].copy_from_slice(&new_len.to_be_bytes());
    let mut huge_array = BytesMut::from(
        &encode_request(
            ApiKey::Metadata,
            1,
            1,
            &RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![]))),
        )[..],
    );
    let n = huge_array.len();
    huge_array[n - 4..].copy_from_slice(&i32::MAX.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "negative length",
            vec![0xff, 0xff, 0xff, 0xfe, 0, 0],
            "bad-length",
        ),
        (
            "length beyond the bound",
            (64i32 << 20).to_be_bytes().to_vec(),
            "bad-length",
        ),
        (
            "shorter than a header",
            vec![0, 0, 0, 3, 0, 0, 0],
            "truncated",
        ),
        (
            "unknown API key",
            vec![0, 0, 0, 8, 0x7f, 0x00, 0, 0, 0, 0, 0, 9],
            "unknown-api-key",
        ),
        (
            "Fetch v13 (topic ids)",
            encode_request(
                ApiKey::Fetch,
                13,
                5,
                &RequestKind::Fetch(FetchRequest::default()),
            )
            .to_vec(),
            "unsupported-version",
        ),
        ("produce cut short", truncated_body.to_vec(), "malformed"),
        ("2^31 topics in 12 bytes", huge_array.to_vec(), "malformed"),
    ];
    for (name, bytes, kind) in &cases {
        let answer = exchange(proxy.addr, bytes).await;
        assert_eq!(
            answer.as_deref(),
            Some(&[][..]),
            "{name}: closed without an answer"
        );
        let records = collect(&mut flows);
        assert!(
            records
                .iter()
                .any(|r| r.verdict == "error"
                    && r.reason.as_deref().is_some_and(|x| x.contains(kind))),
            "{name}: a flow record saying {kind}: {records:?}"
        );
    }
    // An ApiVersions newer than membrane parses is answered like a broker would: version 0,
    // UNSUPPORTED_VERSION, and the range to retry with. Nothing is forwarded.
    let mut newer = BytesMut::new();
    newer.put_i32(0);
    newer.put_slice(&[0, 18, 0, 99, 0, 0, 0, 7, 0, 0, 0]);
    let len = (newer.len() - 4) as i32;
    newer[..4].copy_from_slice(&len.to_be_bytes());
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&newer).await.unwrap();
    let (corr, resp) = read_response(&mut s, ApiKey::ApiVersions, 0).await;
    assert_eq!(corr, 7);
    let ResponseKind::ApiVersions(resp) = resp else {
        panic!()
    };
    assert_eq!(resp.error_code, 35);
    assert_eq!(resp.api_keys[0].max_version, 4);
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "not one byte of a refused frame reached the broker"
    );
}
