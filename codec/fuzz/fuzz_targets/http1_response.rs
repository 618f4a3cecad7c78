//! The upstream response parser of the proxy's direct path must never panic, the head it
//! forwards must frame the body exactly as the head it read (or the client and the proxy would
//! disagree on where the response ends), and where a chunked body ends must not depend on how
//! the bytes were split into reads; nor may the payload decoded for an HTTP/2 client.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_codec::http1::{ParsedResponse, ResponseBody, parse_response};

/// A framing's kind and length, comparable.
fn kind(b: &ResponseBody) -> (u8, u64) {
    match b {
        ResponseBody::None => (0, 0),
        ResponseBody::Length(n) => (1, *n),
        ResponseBody::Chunked(_) => (2, 0),
        ResponseBody::UntilClose => (3, 0),
    }
}

/// Feeds `data` to the body in pieces of `split`: where it ended, or whether it failed.
fn body_end(mut body: ResponseBody, data: &[u8], split: usize) -> Result<Option<usize>, ()> {
    let mut at = 0;
    for piece in data.chunks(split.max(1)) {
        match body.take(piece) {
            Ok((used, true)) => return Ok(Some(at + used)),
            Ok((used, false)) => at += used,
            Err(_) => return Err(()),
        }
    }
    Ok(None)
}

/// The payload, the trailer section and where the body ended.
type Decoding = (Vec<u8>, Vec<u8>, Option<usize>);

/// Decodes `data` in pieces of `split`, or fails.
fn decode(mut body: ResponseBody, data: &[u8], split: usize) -> Result<Decoding, ()> {
    let (mut payload, mut trailer, mut at) = (Vec::new(), Vec::new(), 0);
    for piece in data.chunks(split.max(1)) {
        let mut rest = piece;
        while !rest.is_empty() {
            let d = body.decode(rest).map_err(|_| ())?;
            assert!(d.consumed <= rest.len() && d.payload.end <= d.consumed);
            assert!(d.trailer.end <= d.consumed && (d.trailer.is_empty() || d.payload.is_empty()));
            assert!(d.consumed > 0 || d.finished, "no progress");
            payload.extend_from_slice(&rest[d.payload]);
            trailer.extend_from_slice(&rest[d.trailer]);
            at += d.consumed;
            if d.finished {
                return Ok((payload, trailer, Some(at)));
            }
            rest = &rest[d.consumed..];
        }
    }
    Ok((payload, trailer, None))
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, data)) = input.split_first() else {
        return;
    };
    let (head_request, client_close) = (flags & 1 == 1, flags & 2 == 2);
    let Ok(ParsedResponse::Final(head)) = parse_response(data, head_request, client_close) else {
        return;
    };
    match parse_response(&head.forward_head, head_request, false) {
        Ok(ParsedResponse::Final(again)) => {
            assert_eq!(again.status, head.status);
            assert_eq!(kind(&again.body), kind(&head.body), "framing changed on the way");
            assert_eq!(again.head_len, head.forward_head.len());
            assert!(!again.reusable || !head.close_downstream);
        }
        // `connection: close` added to a head at the header-count limit: not a framing change.
        Err(e) if e.contains("too many headers") => return,
        other => panic!("the forwarded head does not parse: {other:?}"),
    }
    let rest = &data[head.head_len..];
    let whole = body_end(head.body.clone(), rest, rest.len());
    let split = usize::from(flags >> 2) + 1;
    let pieces = body_end(head.body.clone(), rest, split);
    assert_eq!(whole, pieces, "where the body ends depends on the read split");
    let decoded = decode(head.body.clone(), rest, rest.len());
    assert_eq!(decoded, decode(head.body, rest, split), "the payload depends on the read split");
    assert_eq!(decoded.as_ref().map(|d| d.2).map_err(|_| ()), whole, "decoding and passing through disagree on the end");
});
