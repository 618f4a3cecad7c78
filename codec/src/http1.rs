//! A strict HTTP/1 request-stream framer.
//!
//! hyper is lenient where a proxy must not be: it accepts `Content-Length` together with
//! `Transfer-Encoding` (dropping the length), bare `LF` line ends, and chunk-size lines that a
//! different parser would read differently. Any such disagreement between a proxy and the
//! upstream is a request-smuggling hole. [`Framer`] sees every byte of a connection's request
//! stream first: it holds a head back until it is complete, validates it with `httparse` plus
//! the checks below, and tracks the body framing (length or chunked, each chunk line checked) to
//! know where the next head starts. An HTTP/2 preface, an upgrade or a `CONNECT` switches it to
//! pass-through.
//!
//! A refused head is never delivered: the framer delivers a fixed stand-in request instead and
//! reports its index, so the server can answer that request with the refusal (400, 414, 431 or
//! 501) after the responses to earlier pipelined requests. Framing errors inside a body that
//! already started are reported as failures (the connection must abort).
//!
//! Pure: no I/O; fuzzed by `codec/fuzz`.

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the guard gives hyper in place of a refused head.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nhost: membrane.invalid\r\n\r\n";

/// Limits the guard enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one request head (request line, headers, final CRLF).
    pub max_head_bytes: usize,
    /// Header fields of one request.
    pub max_headers: usize,
    /// Bytes of the request target.
    pub max_uri_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
        }
    }
}

/// Why a request head was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status to answer with.
    pub status: u16,
    /// What was wrong, for the log and the flow record.
    pub reason: String,
}

impl Refusal {
    fn bad(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: 400,
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size (`digits` so far).
    Size {
        digits: u8,
    },
    /// In a chunk extension, up to CR.
    Ext,
    /// Saw CR ending the size line; want LF. `size` is the chunk's size.
    SizeLf,
    /// Chunk data.
    Data,
    /// After data: want CR then LF.
    DataCr,
    DataLf,
    /// Trailer section: at the start of a line.
    TrailerLineStart,
    /// Inside a trailer line.
    TrailerLine,
    /// CR seen inside a trailer line.
    TrailerLf {
        empty: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before the first byte: HTTP/2 preface or HTTP/1.
    Detect,
    /// Collecting a head.
    Head,
    /// `remaining` body bytes with a known length.
    Length,
    /// A chunked body.
    Chunked(Chunk),
    /// Not HTTP/1 framing any more (HTTP/2, an upgrade, CONNECT).
    Passthrough,
    /// A head was refused: hyper got the stand-in; nothing more is delivered.
    Refused,
}

/// The HTTP/1 framing state of one connection's request stream.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    phase: Phase,
    /// A head being collected (or the first bytes while detecting HTTP/2).
    head: Vec<u8>,
    remaining: u64,
    trailer_bytes: usize,
    /// The head just finished asks to switch protocols once its body is done.
    upgrade_after_body: bool,
    /// Requests delivered so far (the stand-in included).
    delivered: u64,
    /// A body framing error.
    failed: Option<String>,
    /// The refused head's request index and why.
    refused: Option<(u64, Refusal)>,
}

impl Framer {
    /// A framer at the start of a connection.
    pub fn new(limits: Limits) -> Framer {
        Framer {
            limits,
            phase: Phase::Detect,
            head: Vec::new(),
            remaining: 0,
            trailer_bytes: 0,
            upgrade_after_body: false,
            delivered: 0,
            failed: None,
            refused: None,
        }
    }

    /// The refused head's request index (the stand-in's) and the refusal.
    pub fn refused(&self) -> Option<&(u64, Refusal)> {
        self.refused.as_ref()
    }

    /// A framing error inside a body that was already delivered: the connection must abort.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Nothing is checked any more (HTTP/2, or after an upgrade): bytes may bypass `feed`.
    pub fn is_passthrough(&self) -> bool {
        self.phase == Phase::Passthrough
    }

    /// A head was refused: nothing after it may be delivered.
    pub fn is_refused(&self) -> bool {
        self.phase == Phase::Refused
    }

    /// Part of a head has arrived and the rest has not.
    pub fn head_in_progress(&self) -> bool {
        matches!(self.phase, Phase::Head | Phase::Detect) && !self.head.is_empty()
    }

    fn refuse(&mut self, refusal: Refusal, out: &mut Vec<u8>) {
        self.head.clear();
        out.extend_from_slice(STAND_IN);
        self.refused = Some((self.delivered, refusal));
        self.delivered += 1;
        self.phase = Phase::Refused;
    }

    fn body_done(&mut self) {
        self.phase = if self.upgrade_after_body {
            Phase::Passthrough
        } else {
            Phase::Head
        };
    }

    /// Runs received bytes through the framing state machine, appending what may be delivered
    /// to `out` (validated heads, body bytes, the stand-in after a refusal).
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            match self.phase {
                Phase::Refused => return,
                Phase::Passthrough => {
                    out.extend_from_slice(data);
                    return;
                }
                Phase::Detect => {
                    let want = H2_PREFACE.len() - self.head.len();
                    let take = want.min(data.len());
                    self.head.extend_from_slice(&data[..take]);
                    if !H2_PREFACE.starts_with(&self.head) {
                        // HTTP/1: re-run what was collected through the head parser.
                        let collected = std::mem::take(&mut self.head);
                        self.phase = Phase::Head;
                        self.feed(&collected, out);
                        data = &data[take..];
                        continue;
                    }
                    data = &data[take..];
                    if self.head.len() == H2_PREFACE.len() {
                        let preface = std::mem::take(&mut self.head);
                        out.extend_from_slice(&preface);
                        self.phase = Phase::Passthrough;
                    }
                }
                Phase::Head => {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2); a CR
                    // whose LF has not arrived waits in `head`.
                    while !data.is_empty() {
                        if self.head.is_empty() && data[0] == b'\r' {
                            self.head.extend_from_slice(b"\r");
                        } else if &self.head[..] == b"\r" && data[0] == b'\n' {
                            self.head.clear();
                        } else {
                            break;
                        }
                        data = &data[1..];
                    }
                    if data.is_empty() {
                        return;
                    }
                    let start = self.head.len();
                    self.head.extend_from_slice(data);
                    // A terminator may straddle reads: look from 3 bytes before the new data.
                    let from = start.saturating_sub(3);
                    // Which refusal a head gets must not depend on how its bytes were split
                    // into reads: the earliest offence in stream order wins, and bytes past the
                    // size limit are never looked at.
                    let limit = self.limits.max_head_bytes + 1;
                    let Some(p) = find(&self.head[from..], b"\r\n\r\n") else {
                        // A bare CR or LF is refused now, not when the head completes.
                        let seen = &self.head[..self.head.len().min(limit)];
                        let resume = start.saturating_sub(1).min(seen.len());
                        if let Some(r) = bare_line_end(seen, resume) {
                            return self.refuse(r, out);
                        }
                        if self.head.len() > self.limits.max_head_bytes {
                            return self.refuse(too_large("request head"), out);
                        }
                        return;
                    };
                    let end = from + p + 4;
                    self.head.truncate(end);
                    data = &data[end - start..];
                    if end > self.limits.max_head_bytes {
                        let r = bare_line_end(&self.head[..limit], 0)
                            .unwrap_or_else(|| too_large("request head"));
                        return self.refuse(r, out);
                    }
                    let head = std::mem::take(&mut self.head);
                    match check_head(&head, &self.limits) {
                        Ok(framing) => {
                            out.extend_from_slice(&head);
                            self.delivered += 1;
                            self.upgrade_after_body = framing.upgrade;
                            match framing.body {
                                Body::None => self.body_done(),
                                Body::Length(n) => {
                                    self.remaining = n;
                                    self.phase = Phase::Length;
                                }
                                Body::Chunked => {
                                    self.phase = Phase::Chunked(Chunk::Size { digits: 0 });
                                }
                            }
                        }
                        Err(refusal) => return self.refuse(refusal, out),
                    }
                }
                Phase::Length => {
                    let take = (self.remaining.min(data.len() as u64)) as usize;
                    out.extend_from_slice(&data[..take]);
                    self.remaining -= take as u64;
                    data = &data[take..];
                    if self.remaining == 0 {
                        self.body_done();
                    }
                }
                Phase::Chunked(Chunk::Data) => {
                    let take = (self.remaining.min(data.len() as u64)) as usize;
                    out.extend_from_slice(&data[..take]);
                    self.remaining -= take as u64;
                    data = &data[take..];
                    if self.remaining == 0 {
                        self.phase = Phase::Chunked(Chunk::DataCr);
                    }
                }
                Phase::Chunked(c) => {
                    let b = data[0];
                    match self.chunk_step(c, b) {
                        Ok(()) => {
                            out.extend_from_slice(&data[..1]);
                            data = &data[1..];
                        }
                        Err(e) => {
                            self.failed = Some(e);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn chunk_step(&mut self, c: Chunk, b: u8) -> Result<(), String> {
        let next = match (c, b) {
            (Chunk::Size { digits }, _) if b.is_ascii_hexdigit() => {
                if digits >= 15 {
                    return Err("chunk size too large".into());
                }
                if digits == 0 {
                    self.remaining = 0;
                }
                self.remaining = self.remaining << 4 | u64::from(hex_val(b));
                Chunk::Size { digits: digits + 1 }
            }
            (Chunk::Size { digits }, b';') if digits > 0 => Chunk::Ext,
            (Chunk::Size { digits }, b'\r') if digits > 0 => Chunk::SizeLf,
            (Chunk::Size { .. }, _) => return Err("invalid chunk size line".into()),
            (Chunk::Ext, b'\r') => Chunk::SizeLf,
            (Chunk::Ext, b'\n') => return Err("bare LF in chunk extension".into()),
            (Chunk::Ext, b) if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => Chunk::Ext,
            (Chunk::Ext, _) => return Err("invalid byte in chunk extension".into()),
            (Chunk::SizeLf, b'\n') => {
                if self.remaining == 0 {
                    self.trailer_bytes = 0;
                    Chunk::TrailerLineStart
                } else {
                    Chunk::Data
                }
            }
            (Chunk::SizeLf, _) => return Err("bare CR in chunk size line".into()),
            (Chunk::Data, _) => unreachable!("data is copied in bulk"),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataCr, _) => return Err("chunk data longer than its size".into()),
            (Chunk::DataLf, b'\n') => Chunk::Size { digits: 0 },
            (Chunk::DataLf, _) => return Err("bare CR after chunk data".into()),
            (Chunk::TrailerLineStart, b'\r') => Chunk::TrailerLf { empty: true },
            (Chunk::TrailerLineStart | Chunk::TrailerLine, b'\n') => {
                return Err("bare LF in trailer".into());
            }
            (Chunk::TrailerLine, b'\r') => Chunk::TrailerLf { empty: false },
            (Chunk::TrailerLineStart | Chunk::TrailerLine, b)
                if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 =>
            {
                Chunk::TrailerLine
            }
            (Chunk::TrailerLineStart | Chunk::TrailerLine, _) => {
                return Err("invalid byte in trailer".into());
            }
            (Chunk::TrailerLf { empty }, b'\n') => {
                if empty {
                    self.body_done();
                    return Ok(());
                }
                Chunk::TrailerLineStart
            }
            (Chunk::TrailerLf { .. }, _) => return Err("bare CR in trailer".into()),
        };
        if matches!(next, Chunk::TrailerLine | Chunk::TrailerLf { .. }) {
            self.trailer_bytes += 1;
            if self.trailer_bytes > self.limits.max_head_bytes {
                return Err("trailer section too large".into());
            }
        }
        self.phase = Phase::Chunked(next);
        Ok(())
    }
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

fn too_large(what: &str) -> Refusal {
    Refusal {
        status: 431,
        reason: format!("{what} too large"),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A CR not followed by LF, or an LF not preceded by CR, in `head[from..]` (the last byte may be
/// a CR whose LF has not arrived).
fn bare_line_end(head: &[u8], from: usize) -> Option<Refusal> {
    for (i, &b) in head.iter().enumerate().skip(from) {
        match b {
            b'\n' if i == 0 || head[i - 1] != b'\r' => {
                return Some(Refusal::bad("bare LF in request head"));
            }
            b'\r' if i + 1 < head.len() && head[i + 1] != b'\n' => {
                return Some(Refusal::bad("bare CR in request head"));
            }
            _ => {}
        }
    }
    None
}

enum Body {
    None,
    Length(u64),
    Chunked,
}

struct Framing {
    body: Body,
    upgrade: bool,
}

/// Validates a complete head (ending in CRLFCRLF) and returns its body framing.
fn check_head(head: &[u8], limits: &Limits) -> Result<Framing, Refusal> {
    if let Some(r) = bare_line_end(head, 0) {
        return Err(r);
    }
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let slots = limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut storage[..slots]);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(Refusal::bad("malformed request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(too_large("header count"));
        }
        Err(e) => return Err(Refusal::bad(format!("malformed request head: {e}"))),
    }
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if target.len() > limits.max_uri_bytes {
        return Err(Refusal {
            status: 414,
            reason: "request target too long".into(),
        });
    }
    let http11 = req.version == Some(1);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut te_seen = false;
    let mut hosts = 0;
    let mut upgrade = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                let part = trim(part);
                if part.is_empty() || part.len() > 18 || !part.iter().all(u8::is_ascii_digit) {
                    return Err(Refusal::bad("invalid Content-Length"));
                }
                let n: u64 = std::str::from_utf8(part)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Refusal::bad("invalid Content-Length"))?;
                match content_length {
                    Some(prev) if prev != n => {
                        return Err(Refusal::bad("conflicting Content-Length values"));
                    }
                    _ => content_length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err(Refusal::bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            if te_seen {
                return Err(Refusal::bad("more than one Transfer-Encoding field"));
            }
            te_seen = true;
            if !trim(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal {
                    status: 501,
                    reason: "unsupported Transfer-Encoding (only \"chunked\")".into(),
                });
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te_seen && content_length.is_some() {
        return Err(Refusal::bad(
            "both Content-Length and Transfer-Encoding (request smuggling)",
        ));
    }
    if hosts > 1 {
        return Err(Refusal::bad("more than one Host field"));
    }
    if http11 && hosts == 0 {
        return Err(Refusal::bad("HTTP/1.1 request without Host"));
    }
    let body = if chunked {
        Body::Chunked
    } else {
        match content_length {
            Some(0) | None => Body::None,
            Some(n) => Body::Length(n),
        }
    };
    Ok(Framing {
        body,
        upgrade: (upgrade && http11) || method == "CONNECT",
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t'));
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &b[s..=e],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper would see, the refusal (with its request index) and a body framing error.
    type Seen = (Vec<u8>, Option<(u64, Refusal)>, Option<String>);

    /// Feeds `input` in pieces of `step` bytes.
    fn run(input: &[u8], step: usize) -> Seen {
        let mut g = Framer::new(Limits::default());
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            g.feed(piece, &mut out);
            if g.failed.is_some() {
                break;
            }
        }
        (out, g.refused.clone(), g.failed.clone())
    }

    fn every_split(input: &[u8]) -> Vec<Seen> {
        [1, 2, 3, 5, 7, 64, input.len()]
            .iter()
            .map(|&s| run(input, s))
            .collect()
    }

    #[test]
    fn valid_pipelined_requests_pass_unchanged_whatever_the_split() {
        let input = b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.0\r\n\r\n";
        for (out, refusal, failed) in every_split(input) {
            assert_eq!(refusal, None);
            assert_eq!(failed, None);
            assert_eq!(out, input[2..].to_vec());
        }
    }

    #[test]
    fn smuggling_heads_are_replaced_by_the_stand_in() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\nHost: x\n\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        ];
        for (input, status) in cases {
            let mut stream = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            stream.extend_from_slice(input);
            stream.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n");
            for (out, refusal, _) in every_split(&stream) {
                let (idx, r) = refusal
                    .unwrap_or_else(|| panic!("{:?} passed", String::from_utf8_lossy(input)));
                assert_eq!(idx, 1);
                assert_eq!(
                    r.status,
                    *status,
                    "{r:?} for {:?}",
                    String::from_utf8_lossy(input)
                );
                let mut want = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
                want.extend_from_slice(STAND_IN);
                assert_eq!(out, want);
            }
        }
    }

    #[test]
    fn limits_answer_414_and_431() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
        assert_eq!(run(long.as_bytes(), 100).1.unwrap().1.status, 414);
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(17000)
        );
        assert_eq!(run(huge.as_bytes(), 100).1.unwrap().1.status, 431);
        // Without a terminator, the limit still applies as bytes arrive.
        assert_eq!(
            run(&huge.as_bytes()[..16500], 1000).1.unwrap().1.status,
            431
        );
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(run(req.as_bytes(), 4096).1.unwrap().1.status, 431);
    }

    #[test]
    fn chunk_framing_errors_abort() {
        for body in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"z\r\n",
            b"5 ;x\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0\r\nX: a\nb\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        ] {
            let mut input =
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            for (_, refusal, failed) in every_split(&input) {
                assert_eq!(refusal, None);
                assert!(
                    failed.is_some(),
                    "{:?} passed",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn h2_preface_and_upgrades_pass_through() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00 anything \n goes");
        for (out, refusal, _) in every_split(&input) {
            assert_eq!(refusal, None);
            assert_eq!(out, input);
        }
        let ws = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello\n raw";
        for (out, refusal, _) in every_split(ws) {
            assert_eq!(refusal, None);
            assert_eq!(out, ws.to_vec());
        }
        // "PRI" that is not the preface is an HTTP/1 method like any other.
        let (out, refusal, _) = run(b"PRIX / HTTP/1.1\r\nHost: x\r\n\r\n", 1);
        assert_eq!(refusal, None);
        assert_eq!(out, b"PRIX / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
    }

    proptest::proptest! {
        /// What is delivered and refused never depends on how bytes were split into reads.
        #[test]
        fn verdicts_do_not_depend_on_read_splits(
            data in proptest::collection::vec(proptest::sample::select(
                b"GET /a HTTP/1.1\r\n: Host xContent-Length0123456789Transfer-Encodingchunked;PRI*\x00\t".to_vec()), 0..700),
            step in 1usize..40,
        ) {
            let limits = Limits { max_head_bytes: 256, max_headers: 8, max_uri_bytes: 64 };
            let run = |step: usize| {
                let mut f = Framer::new(limits);
                let mut out = Vec::new();
                for piece in data.chunks(step) {
                    f.feed(piece, &mut out);
                    if f.failed.is_some() {
                        break;
                    }
                }
                (out, f.refused.clone(), f.failed.is_some())
            };
            let whole = run(data.len().max(1));
            let split = run(step);
            proptest::prop_assert_eq!(whole.2, split.2);
            if !whole.2 {
                proptest::prop_assert_eq!(whole, split);
            }
        }
    }
}
