//! Kafka pieces that the end-to-end tests share: a real broker (tansu), the Python client runner
//! (`l7-proxy/tests/kafka/client.py`: kafka-python or confluent-kafka), and hand-made frames for
//! what the clients cannot be made to send (pipelined requests on one connection).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use membrane_codec::kafka::kafka_protocol::messages::*;
use membrane_codec::kafka::kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A peer's path from the environment variable that `scripts/test.sh` sets; panics (the test
/// fails loudly) when it is missing.
pub fn peer(name: &str) -> String {
    let v = std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run scripts/test.sh, or `. scripts/env.sh; export MEMBRANE_TANSU=$(tansu_bin); kafka_clients`"
        )
    });
    assert!(
        std::path::Path::new(&v).exists(),
        "{name}={v} does not exist"
    );
    v
}

/// Starts tansu (in-memory storage) on `listen`, telling clients to come back through
/// `advertised`, and creates `topics` (one partition each). The caller owns (and kills) it.
pub fn start_tansu(listen: SocketAddr, advertised: SocketAddr, topics: &[&str]) -> Child {
    let tansu = peer("MEMBRANE_TANSU");
    let mut child = Command::new(&tansu)
        .args(["broker", "--listener-url", &format!("tcp://{listen}")])
        .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(listen).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tansu did not listen on {listen} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for topic in topics {
        let out = Command::new(&tansu)
            .args(["topic", "create", "--broker", &format!("tcp://{listen}")])
            .args(["--partitions", "1", topic])
            .output()
            .expect("tansu topic create");
        if !out.status.success() {
            let _ = child.kill();
            panic!("topic create {topic}: {out:?}");
        }
    }
    child
}

/// Runs one `client.py` action (`lib`: kafka-python or confluent-kafka; `action`: produce,
/// consume or metadata) against `bootstrap`; returns its JSON line.
pub fn client(
    bootstrap: &str,
    lib: &str,
    action: &str,
    topic: &str,
    client_id: &str,
) -> serde_json::Value {
    let python = peer("KAFKA_PYTHON");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../l7-proxy/tests/kafka/client.py"
    );
    let out = Command::new(python)
        .args([script, lib, action, bootstrap, topic, client_id])
        .output()
        .expect("run client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "{lib} {action} {topic}: no result line; stdout={stdout} stderr={}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A request frame (length prefix included) from client id `empire-hq`.
pub fn encode_request(key: ApiKey, version: i16, correlation_id: i32, body: &RequestKind) -> Bytes {
    let mut header = RequestHeader::default();
    header.request_api_key = key as i16;
    header.request_api_version = version;
    header.correlation_id = correlation_id;
    header.client_id = Some(StrBytes::from_static_str("empire-hq"));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header
        .encode(&mut buf, key.request_header_version(version))
        .expect("header encodes");
    body.encode(&mut buf, version).expect("body encodes");
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// A Produce (acks=1) of an empty record set to partition 0 of `topic`.
pub fn produce(topic: &'static str) -> RequestKind {
    let mut req = ProduceRequest::default();
    req.acks = 1;
    req.timeout_ms = 5000;
    let mut data = produce_request::TopicProduceData::default();
    data.name = TopicName(StrBytes::from_static_str(topic));
    let mut part = produce_request::PartitionProduceData::default();
    part.index = 0;
    part.records = Some(Bytes::new());
    data.partition_data.push(part);
    req.topic_data.push(data);
    RequestKind::Produce(req)
}

/// Reads one answer of `key`/`version`: its correlation id and body.
pub async fn read_response(s: &mut TcpStream, key: ApiKey, version: i16) -> (i32, ResponseKind) {
    let len = s.read_i32().await.expect("a response") as usize;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.expect("the whole response");
    let mut body = Bytes::from(body);
    let header = ResponseHeader::decode(&mut body, key.response_header_version(version))
        .expect("response header");
    (
        header.correlation_id,
        ResponseKind::decode(key, &mut body, version).expect("response body"),
    )
}

/// Reads one Produce v7 answer within 5 s: its correlation id and the first partition's error
/// code (29: TOPIC_AUTHORIZATION_FAILED).
pub async fn produce_answer(s: &mut TcpStream) -> (i32, i16) {
    let (corr, resp) =
        tokio::time::timeout(Duration::from_secs(5), read_response(s, ApiKey::Produce, 7))
            .await
            .expect("a Produce answer within 5 s");
    let ResponseKind::Produce(resp) = resp else {
        panic!("not a Produce answer")
    };
    (corr, resp.responses[0].partition_responses[0].error_code)
}

/// Asserts that a `client` result is a refusal the client library itself reports as an
/// authorization error (topic errors, or a group error where the group APIs are what is
/// refused), within `seconds`.
pub fn assert_refused(lib: &str, result: &serde_json::Value, seconds: f64) {
    assert_eq!(result["ok"], false, "{lib}: {result}");
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.ends_with("AuthorizationFailedError") || error.ends_with("_AUTHORIZATION_FAILED"),
        "{lib}: the client reports an authorization error: {result}"
    );
    assert!(
        result["seconds"].as_f64().unwrap_or(f64::MAX) < seconds,
        "{lib}: the error arrives within {seconds} s: {result}"
    );
}
