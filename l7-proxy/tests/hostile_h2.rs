//! Hostile HTTP/2 requests, written frame by frame (a real client library refuses to send most
//! of them), against the proxy on each of its ways upstream. HTTP/2 arrives judged as a whole
//! request and often leaves as HTTP/1.1: every field that would frame or split that request
//! (a content-length the stream contradicts, connection-specific fields, CR/LF or NUL in a
//! field, a second Host) must be refused or rewritten before a byte reaches the upstream.

mod common;

use std::time::Duration;

use common::start;
use membrane_l7_proxy::service::{ProxyConfig, UpstreamProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields, not indexed, names and values sent as they are (no
/// Huffman): whatever bytes the case needs reach the proxy's decoder unchanged.
fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// One request on stream 1: its header block, then DATA frames, then a trailer block. The
/// stream ends with the last of these.
struct Case {
    name: &'static str,
    fields: Vec<(&'static [u8], &'static [u8])>,
    data: Vec<&'static [u8]>,
    trailers: Vec<(&'static [u8], &'static [u8])>,
    want: Want,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Stream or connection reset, or a 4xx, and nothing reaches the upstream.
    Refused,
    /// This status, and the upstream saw exactly this request line (`common`'s log format).
    Answered(u16, &'static str),
}

#[derive(Debug)]
enum Got {
    Status(u16),
    /// RST_STREAM or GOAWAY with this error code, or the connection closed (None).
    Reset(Option<u32>),
    Nothing,
}

fn wire(case: &Case) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let headers_end = case.data.is_empty() && case.trailers.is_empty();
    let flags = END_HEADERS | if headers_end { END_STREAM } else { 0 };
    out.extend(frame(HEADERS, flags, 1, &block(&case.fields)));
    for (i, d) in case.data.iter().enumerate() {
        let last = i + 1 == case.data.len() && case.trailers.is_empty();
        out.extend(frame(DATA, if last { END_STREAM } else { 0 }, 1, d));
    }
    if !case.trailers.is_empty() {
        out.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &block(&case.trailers),
        ));
    }
    out
}

/// The `:status` of a response header block as hyper's encoder writes it: a static-table index,
/// or a literal with the name indexed and the digits raw or Huffman-coded.
fn status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    if first & 0x80 != 0 {
        return [200, 204, 206, 304, 400, 404, 500]
            .get(usize::from(first & 0x7f).checked_sub(8)?)
            .copied();
    }
    let len_byte = *block.get(1)?;
    let len = usize::from(len_byte & 0x7f);
    let bytes = block.get(2..2 + len)?;
    let digits = if len_byte & 0x80 == 0 {
        String::from_utf8(bytes.to_vec()).ok()?
    } else {
        // Huffman codes of '0'-'2' are 5 bits (00000-00010), of '3'-'9' 6 bits (011001-011111).
        let bits: Vec<u8> = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let (mut at, mut s) = (0, String::new());
        while s.len() < 3 {
            let take = |n: usize| {
                bits.get(at..at + n)
                    .map(|b| b.iter().fold(0u8, |v, &bit| v << 1 | bit))
            };
            let five = take(5)?;
            if five < 3 {
                s.push(char::from(b'0' + five));
                at += 5;
            } else {
                let six = take(6)?;
                s.push(char::from(b'0' + six.checked_sub(0b011001 - 3)?));
                at += 6;
            }
        }
        s
    };
    digits.parse().ok()
}

async fn send(proxy: std::net::SocketAddr, case: &Case) -> Got {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&wire(case)).await.unwrap();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = buf.drain(..9 + len).skip(9).collect();
            match (kind, stream) {
                (SETTINGS, 0) if flags & 1 == 0 => {
                    s.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
                }
                (HEADERS, 1) => {
                    return Got::Status(status(&payload).expect("a :status the test can read"));
                }
                (RST_STREAM, 1) => {
                    return Got::Reset(
                        payload
                            .get(..4)
                            .map(|c| u32::from_be_bytes(c.try_into().unwrap())),
                    );
                }
                (GOAWAY, 0) => {
                    return Got::Reset(
                        payload
                            .get(4..8)
                            .map(|c| u32::from_be_bytes(c.try_into().unwrap())),
                    );
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Got::Reset(None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Got::Nothing,
        }
    }
}

fn get(path: &'static [u8]) -> Vec<(&'static [u8], &'static [u8])> {
    vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"svc"),
        (b":path", path),
    ]
}

fn upload() -> Vec<(&'static [u8], &'static [u8])> {
    vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"svc"),
        (b":path", b"/upload"),
    ]
}

fn with(
    mut fields: Vec<(&'static [u8], &'static [u8])>,
    more: &[(&'static [u8], &'static [u8])],
) -> Vec<(&'static [u8], &'static [u8])> {
    fields.extend_from_slice(more);
    fields
}

/// `n` fields `x-0: v` .. (leaked: cases hold static bytes).
fn fields(n: usize) -> Vec<(&'static [u8], &'static [u8])> {
    (0..n)
        .map(|i| {
            let name: &'static [u8] = Box::leak(format!("x-{i}").into_bytes().into_boxed_slice());
            (name, &b"v"[..])
        })
        .collect()
}

fn long_path(len: usize) -> &'static [u8] {
    let path = format!("/public/{}", "a".repeat(len - "/public/".len()));
    Box::leak(path.into_bytes().into_boxed_slice())
}

fn cases() -> Vec<Case> {
    let case = |name, fields, data: &[&'static [u8]], want| Case {
        name,
        fields,
        data: data.to_vec(),
        trailers: Vec::new(),
        want,
    };
    let refused = |name, fields| case(name, fields, &[], Want::Refused);
    let ok_get = Want::Answered(200, "GET /public/h2 host=svc body=0");
    vec![
        // Controls: the hand-written frames are well-formed HTTP/2.
        case("control: a plain GET", get(b"/public/h2"), &[], ok_get),
        case(
            "control: a POST whose DATA matches its content-length",
            with(upload(), &[(b"content-length", b"5")]),
            &[b"hel", b"lo"],
            Want::Answered(200, "POST /upload host=svc body=5"),
        ),
        // --- body length the HTTP/1.1 request upstream would be framed by ---
        refused(
            "content-length 5 on a stream that ends with its headers",
            with(get(b"/public/h2"), &[(b"content-length", b"5")]),
        ),
        case(
            "DATA longer than content-length",
            with(upload(), &[(b"content-length", b"1")]),
            &[b"hello"],
            Want::Refused,
        ),
        case(
            "DATA shorter than content-length",
            with(upload(), &[(b"content-length", b"10")]),
            &[b"hello"],
            Want::Refused,
        ),
        case(
            "two differing content-length fields",
            with(
                upload(),
                &[(b"content-length", b"5"), (b"content-length", b"6")],
            ),
            &[b"hello"],
            Want::Refused,
        ),
        case(
            "content-length that is not a number",
            with(upload(), &[(b"content-length", b"5, 5")]),
            &[b"hello"],
            Want::Refused,
        ),
        // --- connection-specific fields (RFC 9113 §8.2.2) ---
        case(
            "transfer-encoding: chunked",
            with(upload(), &[(b"transfer-encoding", b"chunked")]),
            &[b"5\r\nhello\r\n0\r\n\r\n"],
            Want::Refused,
        ),
        refused(
            "connection: keep-alive",
            with(get(b"/public/h2"), &[(b"connection", b"keep-alive")]),
        ),
        refused("te: gzip", with(get(b"/public/h2"), &[(b"te", b"gzip")])),
        refused(
            "upgrade: h2c inside HTTP/2",
            with(get(b"/public/h2"), &[(b"upgrade", b"h2c")]),
        ),
        refused(
            "keep-alive field",
            with(get(b"/public/h2"), &[(b"keep-alive", b"timeout=5")]),
        ),
        refused(
            "proxy-connection field",
            with(get(b"/public/h2"), &[(b"proxy-connection", b"close")]),
        ),
        // --- bytes HTTP/1.1 would read as structure ---
        refused(
            "CR LF in a field value (an injected header line)",
            with(get(b"/public/h2"), &[(b"x-a", b"1\r\nx-injected: 1")]),
        ),
        refused(
            "a whole injected request in a field value",
            with(
                get(b"/public/h2"),
                &[(b"x-a", b"1\r\n\r\nGET /private HTTP/1.1\r\nHost: svc")],
            ),
        ),
        refused(
            "NUL in a field value",
            with(get(b"/public/h2"), &[(b"x-a", b"a\0b")]),
        ),
        refused(
            "an uppercase field name",
            with(get(b"/public/h2"), &[(b"X-Upper", b"a")]),
        ),
        refused(
            "a space in a field name",
            with(get(b"/public/h2"), &[(b"x a", b"b")]),
        ),
        refused(
            "a colon inside a field name",
            with(get(b"/public/h2"), &[(b"x:a", b"b")]),
        ),
        refused(
            "CR LF in :authority",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"svc\r\nx-injected: 1"),
                (b":path", b"/public/h2"),
            ],
        ),
        refused(
            "a space in :path",
            get(b"/public/h2 HTTP/1.1\r\nHost: svc\r\n\r\nGET /private"),
        ),
        // --- the limits an HTTP/1.1 head is held to (100 fields, 8 KiB of target) ---
        case(
            "control: 50 header fields",
            with(get(b"/public/h2"), &fields(50)),
            &[],
            ok_get,
        ),
        refused("101 header fields", with(get(b"/public/h2"), &fields(101))),
        refused(
            "a :path of 8 KiB and one byte",
            get(long_path(8 * 1024 + 1)),
        ),
        // --- pseudo-header fields out of place ---
        refused(
            "no :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"svc"),
            ],
        ),
        refused(
            "two :path fields",
            with(get(b"/public/h2"), &[(b":path", b"/private")]),
        ),
        refused(
            "a pseudo-header after a regular field",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"svc"),
                (b"x-a", b"1"),
                (b":path", b"/public/h2"),
            ],
        ),
        refused(
            "an unknown pseudo-header",
            with(get(b"/public/h2"), &[(b":real-path", b"/private")]),
        ),
        refused(
            ":protocol (extended CONNECT, not enabled)",
            vec![
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"http"),
                (b":authority", b"svc"),
                (b":path", b"/public/h2"),
            ],
        ),
        refused(
            "CONNECT to another authority",
            vec![(b":method", b"CONNECT"), (b":authority", b"svc:80")],
        ),
        // --- what is judged is what is forwarded ---
        case(
            "a Host field naming another authority",
            with(get(b"/public/h2"), &[(b"host", b"evil")]),
            &[],
            Want::Answered(200, "GET /public/h2 host=svc body=0"),
        ),
        refused(
            "dot segments out of an allowed prefix",
            get(b"/public/../private"),
        ),
        refused(
            "an encoded slash out of an allowed prefix",
            get(b"/public/..%2fprivate"),
        ),
        case(
            "dot segments that stay inside the prefix are forwarded normalized",
            get(b"/public/x/../h2"),
            &[],
            ok_get,
        ),
        refused(
            "a method no rule allows",
            get(b"/public/h2")
                .into_iter()
                .map(|(n, v)| {
                    if n == b":method" {
                        (n, &b"DELETE"[..])
                    } else {
                        (n, v)
                    }
                })
                .collect(),
        ),
    ]
}

/// Trailers are carried to an HTTP/2 upstream and dropped on the way to an HTTP/1.1 one (hyper's
/// client sends none it was not told of in a `Trailer` field); in neither do the ones HTTP/2
/// forbids get through.
fn trailer_cases(upstream_http2: bool) -> Vec<Case> {
    let (legit, emptied) = if upstream_http2 {
        (
            "POST /upload host=svc body=5 trailers=x-t",
            "POST /upload host=svc body=5 trailers=",
        )
    } else {
        (
            "POST /upload host=svc body=5",
            "POST /upload host=svc body=5",
        )
    };
    let trailing = |name, fields, trailers, want| Case {
        name,
        fields,
        data: vec![b"hello"],
        trailers,
        want,
    };
    vec![
        trailing(
            "control: trailers",
            upload(),
            vec![(b"x-t", b"1")],
            Want::Answered(200, legit),
        ),
        // The h2 crate leaves pseudo-header fields out of the trailer map it hands on.
        trailing(
            "a pseudo-header in trailers is dropped",
            upload(),
            vec![(b":path", b"/private")],
            Want::Answered(200, emptied),
        ),
        trailing(
            "a pseudo-header in trailers after a content-length body is dropped",
            with(upload(), &[(b"content-length", b"5")]),
            vec![(b":path", b"/private")],
            Want::Answered(200, emptied),
        ),
        trailing(
            "CR LF in a trailer value",
            with(upload(), &[(b"content-length", b"5")]),
            vec![(b"x-t", b"1\r\nx-injected: 1")],
            Want::Refused,
        ),
        trailing(
            "transfer-encoding in trailers",
            upload(),
            vec![(b"transfer-encoding", b"chunked")],
            Want::Refused,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http2_requests_never_reach_the_upstream_unjudged() {
    let mut failures = Vec::new();
    let mut count = 0;
    // The ways upstream: direct sockets, hyper's HTTP/1.1 client, HTTP/2, and HTTP/2 asked of
    // an upstream that answers as HTTP/1 (which then gets HTTP/1.1).
    for (http1_direct, upstream_protocol) in [
        (true, UpstreamProtocol::Http1),
        (false, UpstreamProtocol::Http1),
        (true, UpstreamProtocol::Http2),
        (true, UpstreamProtocol::Downstream),
    ] {
        let upstream_http2 = upstream_protocol == UpstreamProtocol::Http2;
        for case in cases().iter().chain(&trailer_cases(upstream_http2)) {
            count += 1;
            // A proxy per case: the upstream's log is then this case's alone.
            let h = start(ProxyConfig {
                http1_direct,
                upstream_protocol,
                ..ProxyConfig::default()
            })
            .await;
            let got = send(h.proxy, case).await;
            // The upstream logs a request once its body is complete.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let saw = h.upstream_saw();
            let ok = match (&case.want, &got) {
                // NO_ERROR would be a graceful close, not a refusal.
                (Want::Refused, Got::Reset(code)) => *code != Some(0) && saw.is_empty(),
                (Want::Refused, Got::Status(s)) => (400..500).contains(s) && saw.is_empty(),
                (Want::Answered(st, line), Got::Status(s)) => s == st && saw == [*line],
                _ => false,
            };
            if !ok {
                let saw: Vec<String> = saw.iter().map(|l| l.chars().take(120).collect()).collect();
                failures.push(format!(
                    "direct={http1_direct} {upstream_protocol:?} {}: want {:?}, got {got:?}, upstream saw {saw:?}",
                    case.name, case.want
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        count,
        failures.join("\n")
    );
}

#[test]
fn the_status_reader_reads_what_hyper_writes() {
    assert_eq!(status(&[0x88]), Some(200));
    assert_eq!(status(&[0x08, 0x03, b'4', b'0', b'3']), Some(403));
    // "403" Huffman-coded: 011010 00000 011001, padded with ones.
    assert_eq!(
        status(&[0x08, 0x83, 0b0110_1000, 0b0000_1100, 0b1111_1111]),
        Some(403)
    );
    assert_eq!(
        status(&[0x48, 0x83, 0b0110_1000, 0b0000_1100, 0b1111_1111]),
        Some(403)
    );
}
