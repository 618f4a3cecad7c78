//! Kafka request decoding never panics or over-allocates; whatever decodes has a denial that is a
//! response of its own type and version (it decodes back with the request's correlation id), and
//! a Metadata request narrowed to some of its topics still decodes. Inputs starting with 0xff
//! are fed as broker answers to the response rewrites instead.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use membrane_codec::kafka::deny::deny_response;
use membrane_codec::kafka::kafka_protocol::messages::{ApiKey, ResponseHeader, ResponseKind};
use membrane_codec::kafka::kafka_protocol::protocol::Decodable;
use membrane_codec::kafka::rewrite::{
    amend_metadata_response, clamp_api_versions, fetch_session_id, metadata_request_keeping,
};
use membrane_codec::kafka::{LENGTH_PREFIX, decode_request, frame_len};

fuzz_target!(|input: &[u8]| {
    if let Some((&0xff, rest)) = input.split_first() {
        let version = i16::from(rest.first().copied().unwrap_or(0) % 14);
        let body = Bytes::copy_from_slice(rest.get(1..).unwrap_or_default());
        let _ = clamp_api_versions(body.clone(), version % 5);
        let _ = amend_metadata_response(body.clone(), version, &[], Some(&|t: &str| t.len() % 2 == 0));
        let _ = fetch_session_id(&body, version);
        return;
    }
    let _ = frame_len(input, 1 << 20);
    let Ok(req) = decode_request(Bytes::copy_from_slice(input)) else {
        return;
    };
    let _ = req.topics();
    if let Some(answer) = deny_response(&req) {
        let key = ApiKey::try_from(req.api_key).unwrap();
        let mut body = Bytes::copy_from_slice(&answer[LENGTH_PREFIX..]);
        let header =
            ResponseHeader::decode(&mut body, key.response_header_version(req.api_version)).unwrap();
        assert_eq!(header.correlation_id, req.correlation_id);
        ResponseKind::decode(key, &mut body, req.api_version).expect("a denial decodes back");
    }
    if let Some((frame, _)) = metadata_request_keeping(&req, &|t: &str| t.len() % 2 == 0) {
        decode_request(frame.freeze().slice(LENGTH_PREFIX..)).expect("a narrowed request decodes");
    }
});
