//! A strict HTTP/1 request-stream framer.
//!
//! hyper is lenient where a proxy must not be: it accepts `Content-Length` together with
//! `Transfer-Encoding` (dropping the length), bare `LF` line ends, and chunk-size lines that a
//! different parser would read differently. Any such disagreement between a proxy and the
//! upstream is a request-smuggling hole. [`Framer`] sees every byte of a connection's request
//! stream first: it holds a head back until it is complete, validates it with `httparse` plus
//! the checks below, and tracks the body framing (length or chunked, each chunk line checked) to
//! know where the next head starts. An HTTP/2 preface, an upgrade to an allowed protocol
//! ([`Upgrades`]) or a `CONNECT` switches it to pass-through.
//!
//! A refused head is never delivered: the framer delivers a fixed stand-in request instead and
//! reports its index, so the server can answer that request with the refusal (400, 414, 431 or
//! 501) after the responses to earlier pipelined requests. Framing errors inside a body that
//! already started are reported as failures (the connection must abort).
//!
//! Pure: no I/O; fuzzed by `codec/fuzz`.

use std::mem::MaybeUninit;

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

impl Limits {
    /// The limits an HTTP/2 request's decoded head must keep, as an HTTP/1.1 head checked by
    /// the framer does (its size is bounded by the connection's SETTINGS_MAX_HEADER_LIST_SIZE):
    /// it is forwarded as one.
    pub fn check_decoded(&self, fields: usize, target_len: usize) -> Result<(), Refusal> {
        if target_len > self.max_uri_bytes {
            return Err(target_too_long());
        }
        if fields > self.max_headers {
            return Err(too_large("header count"));
        }
        Ok(())
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

/// The protocols a request may switch the connection to (`Upgrade`, RFC 9110 §7.8).
///
/// `Upgrade` is hop-by-hop: a proxy passes on only the offers it supports, so a request's other
/// offers are dropped and a request left with none is forwarded as the plain request it also
/// is (RFC 9110 lets a server ignore `Upgrade`). After a switch the proxy sees only opaque
/// bytes, so a protocol that carries HTTP requests onward can never be allowed: `h2c` (the
/// h2c smuggling of HTTP/2 requests past an HTTP/1 proxy's rules), `HTTP/...`, `h2` and
/// `TLS/...` (RFC 2817). Envoy drops h2c offers alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrades(std::sync::Arc<[String]>);

/// Protocol names whose switched connections would carry HTTP requests past the rules.
const CARRIES_HTTP: [&str; 4] = ["h2c", "h2", "http", "tls"];

impl Upgrades {
    /// Allows the named protocols (names without a version, matched case-insensitively);
    /// empty names are ignored, so an empty list allows none.
    pub fn new<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Upgrades, String> {
        let mut allowed = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            if !name.bytes().all(is_token_byte) || name.contains('/') {
                return Err(format!(
                    "upgrade protocol {name:?}: not a protocol name (a token such as websocket, \
                     without a version)"
                ));
            }
            if CARRIES_HTTP.iter().any(|p| p.eq_ignore_ascii_case(name)) {
                return Err(format!(
                    "upgrade protocol {name:?} cannot be allowed: the switched connection would \
                     carry HTTP requests that the proxy cannot judge"
                ));
            }
            allowed.push(name.to_ascii_lowercase());
        }
        Ok(Upgrades(allowed.into()))
    }

    /// The allowed protocol names.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Whether `offer` (`name` or `name/version`) names an allowed protocol.
    pub fn allows(&self, offer: &[u8]) -> bool {
        let name = protocol_name(offer);
        self.0
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(name))
    }

    /// What of a request's `Upgrade` field values may be passed on: the allowed offers, in
    /// order, as one field value; `None` when no offer is allowed.
    pub fn kept<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
        let mut kept: Option<Vec<u8>> = None;
        for offer in values
            .into_iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(trim)
            .filter(|o| self.allows(o))
        {
            let out = kept.get_or_insert_with(Vec::new);
            if !out.is_empty() {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(offer);
        }
        kept
    }
}

impl Default for Upgrades {
    /// WebSocket only, as Envoy's `upgrade_configs` are usually set (Istio's and Cilium's).
    fn default() -> Upgrades {
        Upgrades(vec!["websocket".to_string()].into())
    }
}

/// The name of an `Upgrade` protocol (`name` or `name/version`), without surrounding spaces.
pub fn protocol_name(offer: &[u8]) -> &[u8] {
    offer
        .trim_ascii()
        .split(|&b| b == b'/')
        .next()
        .unwrap_or_default()
}

/// A `tchar` of RFC 9110 §5.6.2.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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
    /// A chunked body (state in `Framer::chunked`).
    Chunked,
    /// Not HTTP/1 framing any more (HTTP/2, an upgrade, CONNECT).
    Passthrough,
    /// A head was refused: hyper got the stand-in; nothing more is delivered.
    Refused,
}

/// The HTTP/1 framing state of one connection's request stream.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    upgrades: Upgrades,
    phase: Phase,
    /// A head being collected (or the first bytes while detecting HTTP/2).
    head: Vec<u8>,
    remaining: u64,
    chunked: ChunkedBody,
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
    /// A framer at the start of a connection whose requests may switch to `upgrades`.
    pub fn new(limits: Limits, upgrades: Upgrades) -> Framer {
        Framer {
            limits,
            upgrades,
            phase: Phase::Detect,
            head: Vec::new(),
            remaining: 0,
            chunked: ChunkedBody::new(limits.max_head_bytes),
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
                    match check_head(&head, &self.limits, &self.upgrades) {
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
                                    self.chunked = ChunkedBody::new(self.limits.max_head_bytes);
                                    self.phase = Phase::Chunked;
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
                Phase::Chunked => match self.chunked.scan(data) {
                    Ok(Some(n)) => {
                        out.extend_from_slice(&data[..n]);
                        data = &data[n..];
                        self.body_done();
                    }
                    Ok(None) => {
                        out.extend_from_slice(data);
                        return;
                    }
                    Err((n, e)) => {
                        out.extend_from_slice(&data[..n]);
                        self.failed = Some(e);
                        return;
                    }
                },
            }
        }
    }
}

/// The framing of one chunked body (RFC 9112 §7.1), checked byte by byte: sizes in hex (at most
/// 15 digits), extensions and trailer lines without bare CR or LF or control bytes, CRLF after
/// each chunk's data, and a bounded trailer section. Used for request bodies by [`Framer`] and for
/// response bodies by the proxy, which passes them through as they are to HTTP/1.1 clients and
/// decodes them ([`ChunkedBody::decode`]) for hyper to frame anew.
#[derive(Clone, Debug)]
pub struct ChunkedBody {
    state: Chunk,
    remaining: u64,
    trailer_bytes: usize,
    max_trailer_bytes: usize,
}

impl ChunkedBody {
    /// A body about to start, whose trailer section may hold up to `max_trailer_bytes`.
    pub fn new(max_trailer_bytes: usize) -> ChunkedBody {
        ChunkedBody {
            state: Chunk::Size { digits: 0 },
            remaining: 0,
            trailer_bytes: 0,
            max_trailer_bytes,
        }
    }

    /// Scans the next bytes of the body: `Some(n)` when the body ends after `data[..n]`, `None`
    /// when all of `data` belongs to it and more is to come, `Err((n, why))` when `data[n]` breaks
    /// the framing (`data[..n]` was valid).
    pub fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, (usize, String)> {
        let mut at = 0;
        while at < data.len() {
            let step = self.decode(&data[at..]).map_err(|(i, e)| (at + i, e))?;
            at += step.consumed;
            if step.finished {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Decodes the next bytes of the body up to the end of its first run of chunk data (or the
    /// body's end): how many bytes of `data` that took, where the payload lies in them, and
    /// whether the body ended. `Err((n, why))` as for [`ChunkedBody::scan`].
    pub fn decode(&mut self, data: &[u8]) -> Result<Decoded, (usize, String)> {
        let mut i = 0;
        // Trailer bytes come after the last chunk, so those of one call are contiguous.
        let mut trailer_from = None;
        while i < data.len() {
            if self.state == Chunk::Data {
                let take = (self.remaining.min((data.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = Chunk::DataCr;
                }
                return Ok(Decoded {
                    consumed: i + take,
                    payload: i..i + take,
                    finished: false,
                    trailer: i..i,
                });
            }
            if trailer_from.is_none()
                && matches!(
                    self.state,
                    Chunk::TrailerLineStart | Chunk::TrailerLine | Chunk::TrailerLf { .. }
                )
            {
                trailer_from = Some(i);
            }
            match self.step(data[i]) {
                Ok(true) => {
                    return Ok(Decoded {
                        consumed: i + 1,
                        payload: i + 1..i + 1,
                        finished: true,
                        trailer: trailer_from.unwrap_or(i + 1)..i + 1,
                    });
                }
                Ok(false) => i += 1,
                Err(e) => return Err((i, e)),
            }
        }
        Ok(Decoded {
            consumed: i,
            payload: i..i,
            finished: false,
            trailer: trailer_from.unwrap_or(i)..i,
        })
    }

    /// One framing byte; `Ok(true)` when it ends the body.
    fn step(&mut self, b: u8) -> Result<bool, String> {
        let next = match (self.state, b) {
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
                    return Ok(true);
                }
                Chunk::TrailerLineStart
            }
            (Chunk::TrailerLf { .. }, _) => return Err("bare CR in trailer".into()),
        };
        if matches!(next, Chunk::TrailerLine | Chunk::TrailerLf { .. }) {
            self.trailer_bytes += 1;
            if self.trailer_bytes > self.max_trailer_bytes {
                return Err("trailer section too large".into());
            }
        }
        self.state = next;
        Ok(false)
    }
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

fn target_too_long() -> Refusal {
    Refusal {
        status: 414,
        reason: "request target too long".into(),
    }
}

fn too_large(what: &str) -> Refusal {
    Refusal {
        status: 431,
        reason: format!("{what} too large"),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// A CR not followed by LF, or an LF not preceded by CR, in `head[from..]` (the last byte may be
/// a CR whose LF has not arrived).
fn bare_line_end(head: &[u8], from: usize) -> Option<Refusal> {
    let from = from.min(head.len());
    for i in memchr::memchr2_iter(b'\r', b'\n', &head[from..]).map(|i| from + i) {
        match head[i] {
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
fn check_head(head: &[u8], limits: &Limits, upgrades: &Upgrades) -> Result<Framing, Refusal> {
    if let Some(r) = bare_line_end(head, 0) {
        return Err(r);
    }
    // Uninitialized slots: filling 256 empty headers was most of this function's time.
    let mut storage = [const { MaybeUninit::uninit() }; 256];
    let slots = limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut storage[..slots]) {
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
        return Err(target_too_long());
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
            // Offers the proxy drops switch nothing: the next head is checked as usual.
            upgrade |= upgrades.kept([h.value]).is_some();
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

/// Bound on a response head the proxy reads from an upstream.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bound on a response's header count.
const MAX_RESPONSE_HEADERS: usize = 128;

/// Hop-by-hop fields (RFC 9110 §7.6.1), which a proxy never forwards. `Transfer-Encoding` is
/// not among them here: a proxy that passes a chunked body through as it is keeps it.
pub fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The tokens of a message's `Connection` fields: whether one is `close`, and the field names
/// the others list (hop-by-hop as well).
pub fn connection_tokens<'a>(headers: &[httparse::Header<'a>]) -> (bool, Vec<&'a [u8]>) {
    let mut close = false;
    let mut named = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        for token in h.value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !token.is_empty() {
                named.push(token);
            }
        }
    }
    (close, named)
}

/// Whether a field is forwarded: not hop-by-hop and not named by `Connection`. The fields that
/// frame the message or name its authority stay whatever `Connection` says: dropping
/// `Content-Length` from a message whose body is forwarded would let the body pass for the
/// next message.
pub fn is_forwarded(name: &str, named: &[&[u8]]) -> bool {
    if ["content-length", "transfer-encoding", "host"]
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f))
    {
        return true;
    }
    !is_hop_by_hop(name)
        && !named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// Appends the fields a proxy forwards (see [`is_forwarded`]), one `name: value` line each.
pub fn append_forwarded_fields(
    out: &mut Vec<u8>,
    headers: &[httparse::Header<'_>],
    named: &[&[u8]],
) {
    for h in headers.iter().filter(|h| is_forwarded(h.name, named)) {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
}

/// One step of decoding a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input this step used (framing and payload).
    pub consumed: usize,
    /// Where the payload lies in the input (empty when there was none).
    pub payload: std::ops::Range<usize>,
    /// The body ended within `consumed`.
    pub finished: bool,
    /// Where bytes of a chunked body's trailer section lie in the input (its field lines and
    /// the empty line that ends it; empty when there were none).
    pub trailer: std::ops::Range<usize>,
}

/// How a response's body is framed (RFC 9112 §6.3).
#[derive(Clone, Debug)]
pub enum ResponseBody {
    /// No body (a HEAD request's response, 204, 304, `Content-Length: 0`).
    None,
    /// This many bytes.
    Length(u64),
    /// Chunked, passed through as it is and checked as it goes.
    Chunked(ChunkedBody),
    /// Everything until the upstream closes.
    UntilClose,
}

impl ResponseBody {
    /// How much of `data` (the next bytes from the upstream) belongs to the body and whether
    /// the body ends there; an error when the chunked framing breaks.
    pub fn take(&mut self, data: &[u8]) -> Result<(usize, bool), String> {
        Ok(match self {
            ResponseBody::None => (0, true),
            ResponseBody::Length(n) => {
                let take = ((*n).min(data.len() as u64)) as usize;
                *n -= take as u64;
                (take, *n == 0)
            }
            ResponseBody::Chunked(c) => match c.scan(data) {
                Ok(Some(k)) => (k, true),
                Ok(None) => (data.len(), false),
                Err((_, e)) => return Err(e),
            },
            ResponseBody::UntilClose => (data.len(), false),
        })
    }

    /// Decodes the next bytes from the upstream (for a client that gets the payload without
    /// HTTP/1.1's framing, over HTTP/2): up to the end of the first run of payload.
    pub fn decode(&mut self, data: &[u8]) -> Result<Decoded, String> {
        Ok(match self {
            ResponseBody::Chunked(c) => c.decode(data).map_err(|(_, e)| e)?,
            _ => {
                let (used, finished) = self.take(data)?;
                Decoded {
                    consumed: used,
                    payload: 0..used,
                    finished,
                    trailer: used..used,
                }
            }
        })
    }
}

/// A final response head a proxy may pass on.
#[derive(Debug)]
pub struct ResponseHead {
    /// Bytes of the head in the input.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// The body's framing.
    pub body: ResponseBody,
    /// The head to send downstream: HTTP/1.1, hop-by-hop fields removed, `connection: close`
    /// when the downstream connection must close after it.
    pub forward_head: Vec<u8>,
    /// The upstream connection may carry another request after this response.
    pub reusable: bool,
    /// The downstream connection closes after this response (the client asked, or the body
    /// ends with the upstream's close).
    pub close_downstream: bool,
}

/// What the bytes at the start of an upstream's response stream hold.
#[derive(Debug)]
pub enum ParsedResponse {
    /// Not a complete head yet.
    Incomplete,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    /// A final response.
    Final(ResponseHead),
}

/// Parses the response head at the start of `buf`, for a request that was `HEAD` or not and
/// whose client asked to close or not. Refused (an error): malformed heads, bare LFs, both
/// `Content-Length` and `Transfer-Encoding`, conflicting or malformed lengths, a 101 nobody
/// asked for, heads over [`MAX_RESPONSE_HEAD`]: a response a proxy cannot frame exactly as the
/// client will is a desync waiting to happen.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    client_close: bool,
) -> Result<ParsedResponse, String> {
    parse_response_with(buf, head_request, client_close, |_, _| {})
}

/// [`parse_response`], also handing each field of a final head that is forwarded (the fields
/// of `forward_head`, minus the `connection: close` it may add) to `on_field`: a proxy that
/// rebuilds the head in another form (HTTP/2) needs no second parse.
pub fn parse_response_with(
    buf: &[u8],
    head_request: bool,
    client_close: bool,
    mut on_field: impl FnMut(&str, &[u8]),
) -> Result<ParsedResponse, String> {
    let mut storage = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => {
            return Ok(ParsedResponse::Incomplete);
        }
        Ok(_) => return Err("response head too large".into()),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let head = &buf[..head_len];
    if memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r') {
        return Err("bare LF in response head".into());
    }
    let status = resp.code.unwrap_or_default();
    if !(100..=999).contains(&status) {
        return Err(format!("invalid status {status}"));
    }
    if status == 101 {
        return Err("101 to a request that asked for no upgrade".into());
    }
    if status < 200 {
        return Ok(ParsedResponse::Interim(head_len));
    }
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || part.len() > 18 || !part.iter().all(u8::is_ascii_digit) {
                    return Err("invalid Content-Length in response".into());
                }
                let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length values in response".into());
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    if chunked.is_some() && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding in response".into());
    }
    let http11 = resp.version == Some(1);
    let (upstream_close, named) = connection_tokens(headers);
    let no_body = head_request || status == 204 || status == 304;
    let body = match (no_body, chunked, length) {
        (true, _, _) | (false, None, Some(0)) => ResponseBody::None,
        (false, Some(true), _) => ResponseBody::Chunked(ChunkedBody::new(MAX_RESPONSE_HEAD)),
        (false, Some(false), _) | (false, None, None) => ResponseBody::UntilClose,
        (false, None, Some(n)) => ResponseBody::Length(n),
    };
    let until_close = matches!(body, ResponseBody::UntilClose);
    let close_downstream = client_close || until_close;
    let mut out = Vec::with_capacity(head_len + 24);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    append_forwarded_fields(&mut out, headers, &named);
    for h in headers.iter().filter(|h| is_forwarded(h.name, &named)) {
        on_field(h.name, h.value);
    }
    if close_downstream {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ParsedResponse::Final(ResponseHead {
        head_len,
        status,
        body,
        forward_head: out,
        reusable: http11 && !upstream_close && !until_close,
        close_downstream,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper would see, the refusal (with its request index) and a body framing error.
    type Seen = (Vec<u8>, Option<(u64, Refusal)>, Option<String>);

    /// Feeds `input` in pieces of `step` bytes.
    fn run(input: &[u8], step: usize) -> Seen {
        let mut g = Framer::new(Limits::default(), Upgrades::default());
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
    fn decoded_heads_keep_the_same_limits() {
        let limits = Limits {
            max_head_bytes: 256,
            max_headers: 8,
            max_uri_bytes: 64,
        };
        assert_eq!(limits.check_decoded(8, 64), Ok(()));
        assert_eq!(limits.check_decoded(9, 10).unwrap_err().status, 431);
        assert_eq!(limits.check_decoded(1, 65).unwrap_err().status, 414);
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
        // Offers the proxy drops switch nothing: what follows is a request, checked as usual.
        for offer in ["h2c", "echo", "TLS/1.2"] {
            let stream = format!(
                "GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {offer}\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            for (_, refusal, _) in every_split(stream.as_bytes()) {
                assert_eq!(
                    refusal.map(|(i, r)| (i, r.status)),
                    Some((1, 400)),
                    "{offer}"
                );
            }
        }
        // "PRI" that is not the preface is an HTTP/1 method like any other.
        let (out, refusal, _) = run(b"PRIX / HTTP/1.1\r\nHost: x\r\n\r\n", 1);
        assert_eq!(refusal, None);
        assert_eq!(out, b"PRIX / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
    }

    #[test]
    fn upgrades_keep_only_allowed_offers() {
        let ws = Upgrades::default();
        let kept = |u: &Upgrades, values: &[&str]| {
            u.kept(values.iter().map(|v| v.as_bytes()))
                .map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(kept(&ws, &["websocket"]).as_deref(), Some("websocket"));
        assert_eq!(
            kept(&ws, &["WebSocket/13"]).as_deref(),
            Some("WebSocket/13")
        );
        assert_eq!(kept(&ws, &["h2c"]), None);
        assert_eq!(kept(&ws, &["h2c, websocket"]).as_deref(), Some("websocket"));
        assert_eq!(
            kept(&ws, &["h2c", " websocket ,echo"]).as_deref(),
            Some("websocket")
        );
        assert_eq!(kept(&ws, &["websocketx", "web", ""]), None);
        let two = Upgrades::new(["Echo", "websocket", ""]).unwrap();
        assert_eq!(two.names(), ["echo", "websocket"]);
        assert_eq!(
            kept(&two, &["echo/2, h2c, websocket"]).as_deref(),
            Some("echo/2, websocket")
        );
        assert_eq!(Upgrades::new([""; 0]).unwrap().names().len(), 0);
        for carrier in ["h2c", "H2C", "h2", "HTTP", "tls"] {
            let e = Upgrades::new([carrier]).unwrap_err();
            assert!(e.contains("cannot be allowed"), "{e}");
        }
        for bad in ["web socket", "websocket/13", "a,b"] {
            let e = Upgrades::new([bad]).unwrap_err();
            assert!(e.contains("not a protocol name"), "{e}");
        }
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
                let mut f = Framer::new(limits, Upgrades::default());
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

    fn final_head(text: &str) -> ResponseHead {
        match parse_response(text.as_bytes(), false, false) {
            Ok(ParsedResponse::Final(h)) => h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = final_head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert!(matches!(h.body, ResponseBody::Length(5)) && h.reusable && !h.close_downstream);
        assert_eq!(h.head_len, 38);
        let h = final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(h.body, ResponseBody::Chunked(_)) && h.reusable);
        let h = final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert!(matches!(h.body, ResponseBody::UntilClose) && !h.reusable && h.close_downstream);
        let h = final_head("HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(h.body, ResponseBody::UntilClose) && h.close_downstream);
        let h = final_head("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n");
        assert!(matches!(h.body, ResponseBody::None) && h.reusable);
        let h = final_head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.reusable && !h.close_downstream);
        match parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false) {
            Ok(ParsedResponse::Final(h)) => assert!(matches!(h.body, ResponseBody::None)),
            other => panic!("a HEAD response: {other:?}"),
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", false, false),
            Ok(ParsedResponse::Interim(25))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n", false, false),
            Ok(ParsedResponse::Incomplete)
        ));
    }

    #[test]
    fn ambiguous_responses_are_refused() {
        for (text, why) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting",
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", "invalid"),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "invalid",
            ),
            ("HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n", "bare LF"),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        ] {
            match parse_response(text.as_bytes(), false, false) {
                Err(e) => assert!(e.contains(why), "{text:?}: {e}"),
                Ok(r) => panic!("{text:?} was accepted: {r:?}"),
            }
        }
        let mut huge = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        huge.resize(MAX_RESPONSE_HEAD + 1, b'a');
        assert!(parse_response(&huge, false, false).is_err());
    }

    #[test]
    fn hop_by_hop_response_fields_stay_behind() {
        let h = final_head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
             X-Kept: 1\r\nContent-Length: 0\r\n\r\n",
        );
        let text = String::from_utf8(h.forward_head).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nX-Kept: 1\r\nContent-Length: 0\r\n\r\n"
        );
        assert!(!h.reusable && !h.close_downstream);
        match parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false, true) {
            Ok(ParsedResponse::Final(h)) => {
                assert!(h.close_downstream);
                let text = String::from_utf8(h.forward_head).unwrap();
                assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connection_cannot_remove_the_framing() {
        let h = final_head(
            "HTTP/1.1 200 OK\r\nConnection: Content-Length, Transfer-Encoding\r\n\
             Content-Length: 3\r\n\r\nabc",
        );
        assert!(matches!(h.body, ResponseBody::Length(3)));
        let text = String::from_utf8(h.forward_head).unwrap();
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(is_forwarded("Host", &[b"host"]) && !is_forwarded("X-A", &[b"x-a"]));
    }

    #[test]
    fn response_bodies_end_where_their_framing_says() {
        let mut body = ResponseBody::Chunked(ChunkedBody::new(1024));
        assert_eq!(body.take(b"3\r\nab"), Ok((5, false)));
        assert_eq!(body.take(b"c\r\n0\r\n\r\nextra"), Ok((8, true)));
        let mut body = ResponseBody::Chunked(ChunkedBody::new(1024));
        assert!(body.take(b"zz\r\n").is_err());
        let mut body = ResponseBody::Length(4);
        assert_eq!(body.take(b"ab"), Ok((2, false)));
        assert_eq!(body.take(b"cdef"), Ok((2, true)));
        assert_eq!(ResponseBody::None.take(b"x"), Ok((0, true)));
        assert_eq!(ResponseBody::UntilClose.take(b"xyz"), Ok((3, false)));
    }

    /// Decodes `wire` in reads of `split` bytes: the payload, the trailer section, and where the
    /// body ended.
    fn decode_all(
        mut body: ResponseBody,
        wire: &[u8],
        split: usize,
    ) -> (Vec<u8>, Vec<u8>, Option<usize>) {
        let (mut payload, mut trailer, mut at) = (Vec::new(), Vec::new(), 0);
        for piece in wire.chunks(split) {
            let mut rest = piece;
            while !rest.is_empty() {
                let d = body.decode(rest).unwrap();
                payload.extend_from_slice(&rest[d.payload]);
                trailer.extend_from_slice(&rest[d.trailer]);
                at += d.consumed;
                if d.finished {
                    return (payload, trailer, Some(at));
                }
                rest = &rest[d.consumed..];
            }
        }
        (payload, trailer, None)
    }

    #[test]
    fn chunked_bodies_decode_to_their_payload_however_they_are_read() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for split in 1..wire.len() {
            let chunked = ResponseBody::Chunked(ChunkedBody::new(1024));
            assert_eq!(
                decode_all(chunked, wire, split),
                (
                    b"hello world".to_vec(),
                    b"X-Trailer: t\r\n\r\n".to_vec(),
                    Some(wire.len() - 4)
                ),
                "split {split}"
            );
        }
        let no_trailer = ResponseBody::Chunked(ChunkedBody::new(1024));
        assert_eq!(
            decode_all(no_trailer, b"1\r\na\r\n0\r\n\r\n", 3),
            (b"a".to_vec(), b"\r\n".to_vec(), Some(11))
        );
        assert_eq!(
            decode_all(ResponseBody::Length(3), b"abcdef", 2),
            (b"abc".to_vec(), vec![], Some(3))
        );
        assert_eq!(
            decode_all(ResponseBody::UntilClose, b"abcdef", 4),
            (b"abcdef".to_vec(), vec![], None)
        );
        let mut broken = ResponseBody::Chunked(ChunkedBody::new(1024));
        assert!(
            broken
                .decode(b"2\r\nabc\r\n")
                .is_ok_and(|d| d.payload == (3..5))
        );
        assert!(broken.decode(b"c").is_err(), "data longer than its size");
    }
}
