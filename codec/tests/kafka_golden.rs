//! Golden tests: request frames captured from real clients (kafka-python 3.0.12, confluent-kafka
//! and kcat on librdkafka 2.16) talking to tansu 0.6, directly (`<client>-...`) and through
//! membrane's proxy (`via-<client>-...`, where the ApiVersions answer was narrowed), with
//! `tests/golden/kafka/capture.py`. Each frame's decoding and its synthetic denial are compared
//! with `tests/golden/kafka/expected.txt`; `BLESS=1 cargo test` rewrites that file (review it).

use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use membrane_codec::kafka::deny::deny_response;
use membrane_codec::kafka::kafka_protocol::messages::{ApiKey, ResponseHeader, ResponseKind};
use membrane_codec::kafka::kafka_protocol::protocol::Decodable;
use membrane_codec::kafka::{LENGTH_PREFIX, decode_request, frame_len};

fn describe(name: &str, frame: &[u8]) -> String {
    let len = frame_len(frame, usize::MAX >> 1)
        .expect("valid length")
        .expect("complete prefix");
    assert_eq!(len + LENGTH_PREFIX, frame.len(), "{name}: one whole frame");
    let req = match decode_request(Bytes::copy_from_slice(&frame[LENGTH_PREFIX..])) {
        Ok(r) => r,
        Err(e) => return format!("{name}: refused ({}): {e}", e.kind()),
    };
    let mut line = format!(
        "{name}: {} v{} corr={} client={:?} topics={:?}",
        membrane_codec::kafka::api_name(req.api_key),
        req.api_version,
        req.correlation_id,
        req.client_id().unwrap_or(""),
        req.topics()
    );
    match deny_response(&req) {
        None => line.push_str(" deny=close"),
        Some(answer) => {
            // The denial is a response of the same type and version that decodes back.
            let key = ApiKey::try_from(req.api_key).unwrap();
            let mut body = Bytes::copy_from_slice(&answer[LENGTH_PREFIX..]);
            let header =
                ResponseHeader::decode(&mut body, key.response_header_version(req.api_version))
                    .unwrap();
            assert_eq!(header.correlation_id, req.correlation_id, "{name}");
            ResponseKind::decode(key, &mut body, req.api_version)
                .unwrap_or_else(|e| panic!("{name}: denial does not decode: {e}"));
            let _ = write!(line, " deny=");
            for b in &answer[..] {
                let _ = write!(line, "{b:02x}");
            }
        }
    }
    line
}

#[test]
fn captured_frames_decode_as_recorded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kafka");
    let mut names: Vec<_> = std::fs::read_dir(dir.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 30, "the captures are present");
    let mut got = String::new();
    for name in &names {
        let frame = std::fs::read(dir.join("frames").join(name)).unwrap();
        got.push_str(&describe(name, &frame));
        got.push('\n');
    }
    let expected_path = dir.join("expected.txt");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    for (g, e) in got.lines().zip(expected.lines()) {
        assert_eq!(g, e);
    }
    assert_eq!(got.lines().count(), expected.lines().count());
    // What the captures show: clients speak flexible versions, and librdkafka asks for Fetch v16
    // (topic ids) unless membrane's ApiVersions answer caps it at 12.
    assert!(expected.contains("Fetch v16") && expected.contains("refused (unsupported-version)"));
    assert!(expected.contains("via-confluent-k1-v12"));
}
