//! The direct HTTP/1.1 path: the common request (HTTP/1.1, origin-form target, no body or a
//! `Content-Length` body of at most [`MAX_DIRECT_BODY`], no upgrade, no `Expect`) is judged and
//! forwarded by the connection's own task, on a pooled upstream socket it writes and reads
//! itself, with the response passed through as its framing says (length, chunked or until
//! close). hyper's server and client, and the hop between a downstream task and an upstream
//! connection task, cost about as much CPU per request as the kernel's loopback path; this is
//! what lets the proxy keep up with nginx `proxy_pass`.
//!
//! Every request byte still passes the [`Framer`] first (the same checks as the guard), requests
//! are judged by [`crate::service::judge`] and answered with the same local answers. Anything
//! else (HTTP/2, HTTP/1.0, chunked or large request bodies, upgrades, `Expect`, absolute-form or
//! `*` targets, a refused head) hands the connection, at that request's head, to hyper behind
//! the guard, which continues with the same framer.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use http::StatusCode;
use membrane_codec::http1::{
    Framer, ParsedResponse, ResponseHead, append_forwarded_fields, connection_tokens,
    parse_response, parse_response_with,
};
use membrane_codec::path::normalize_target;
use membrane_policy::l7::http::{HeaderLookup, HttpRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::guard::Refusal;
use crate::h1_upstream::ResponseFields;
use crate::policy::ConnPolicy;
use crate::service::{
    Connection, LocalAnswer, Outcome, RecordParts, Verdict, denied_outcome, judge, judge_normalized,
};
use crate::upstream::{Upstreams, drained};

/// Largest request body the direct path forwards. It sends a body whole before it reads the
/// response, which an upstream that answers early could stall if the body outgrew the socket
/// buffers; hyper streams both ways at once, so larger bodies go there.
pub const MAX_DIRECT_BODY: u64 = 64 * 1024;
/// Validated request bytes kept buffered for an idle connection at most.
const KEEP_BUFFER: usize = 16 * 1024;

/// How the direct path left a connection.
pub(crate) enum Exit {
    /// It is closed (or to be closed).
    Closed,
    /// hyper continues it from `pending` (the validated bytes not consumed, from a request
    /// head on), with the framer that checked them.
    Handoff {
        stream: TcpStream,
        framer: Framer,
        pending: Vec<u8>,
    },
}

/// The downstream side: the socket, its framer, and the validated bytes not consumed yet.
pub(crate) struct Down {
    stream: TcpStream,
    framer: Framer,
    buf: Vec<u8>,
    pos: usize,
}

impl Down {
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.pos = 0;
            if self.buf.capacity() > KEEP_BUFFER {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
    }

    /// Reads once through the framer; `Ok(0)` at EOF, an error when the framing broke.
    async fn read(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            // Keep what is pending at the start so the buffer does not grow with the stream.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let Down {
            stream,
            framer,
            buf,
            ..
        } = self;
        let n = poll_fn(|cx| {
            // On the stack, not in the connection's future: an idle connection holds no buffer.
            let mut scratch = [MaybeUninit::<u8>::uninit(); 8192];
            let mut rb = ReadBuf::uninit(&mut scratch);
            ready!(Pin::new(&mut *stream).poll_read(cx, &mut rb))?;
            framer.feed(rb.filled(), buf);
            Poll::Ready(Ok::<_, io::Error>(rb.filled().len()))
        })
        .await?;
        if let Some(e) = self.framer.failed() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        Ok(n)
    }

    /// Consumes `n` body bytes, reading as needed, passing each piece to `sink`.
    async fn body(&mut self, mut n: u64, mut sink: impl AsyncSink) -> Result<(), ExchangeError> {
        while n > 0 {
            if self.pending().is_empty() && self.read().await.map_err(|_| ExchangeError::Down)? == 0
            {
                return Err(ExchangeError::Down);
            }
            let take = (n.min(self.pending().len() as u64)) as usize;
            if take > 0 {
                sink.put(&self.buf[self.pos..self.pos + take]).await?;
                self.consume(take);
                n -= take as u64;
            }
        }
        Ok(())
    }
}

/// Where request body bytes go: the upstream, or nowhere (a denied request's body).
trait AsyncSink {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), ExchangeError>;
}

struct Discard;

impl AsyncSink for Discard {
    async fn put(&mut self, _: &[u8]) -> Result<(), ExchangeError> {
        Ok(())
    }
}

impl AsyncSink for &mut TcpStream {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), ExchangeError> {
        self.write_all(bytes)
            .await
            .map_err(|e| ExchangeError::Upstream(format!("write: {e}")))
    }
}

/// Why an exchange with the upstream ended without a response head.
pub(crate) enum ExchangeError {
    /// The upstream failed (502).
    Upstream(String),
    /// The client went away or broke the framing: close.
    Down,
}

/// What the next request asks for, decided before any await.
enum Prepared {
    /// hyper handles it.
    Handoff,
    /// Answered locally; `body` more bytes of the request follow its head.
    Answer {
        head_len: usize,
        body: u64,
        answer: LocalAnswer,
        head_method: bool,
    },
    /// Forwarded.
    Forward(Box<Forward>),
}

struct Forward {
    head_len: usize,
    body: u64,
    /// The request head to send upstream.
    upstream_head: Vec<u8>,
    /// A HEAD request: its response has no body whatever its headers say.
    head_method: bool,
    /// An idempotent method (RFC 9110 §9.2.2): resent once on a new connection when a pooled
    /// one turns out closed before any answer.
    idempotent: bool,
    /// The client asked to close after this response.
    client_close: bool,
    cp: Arc<ConnPolicy>,
    record: RecordParts,
    /// The normalized target, kept only for flow records.
    target: String,
    direction: &'static str,
    policy: Arc<str>,
    started: Instant,
}

/// A request's headers as the matcher reads them.
struct RawHeaders<'a>(&'a [httparse::Header<'a>]);

impl HeaderLookup for RawHeaders<'_> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.0
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .any(|h| f(h.value))
    }
}

/// Parses and judges the head at the start of `pending` (complete: the framer delivers heads
/// whole).
fn prepare(conn: &Connection, pending: &[u8]) -> Prepared {
    let shared = conn.shared();
    let cfg = &shared.config;
    let started = Instant::now();
    let mut storage = [const { MaybeUninit::uninit() }; 256];
    let slots = cfg.limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(pending, &mut storage[..slots]) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Prepared::Handoff,
    };
    let (Some(method), Some(raw_target), Some(1)) = (req.method, req.path, req.version) else {
        return Prepared::Handoff;
    };
    let headers: &[httparse::Header<'_>] = req.headers;
    let mut body: u64 = 0;
    let mut host: Option<&str> = None;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // The framer refused conflicting values; a list of equal ones goes to hyper.
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.parse().ok())
            {
                Some(n) => body = n,
                None => return Prepared::Handoff,
            }
        } else if name.eq_ignore_ascii_case("host") {
            match std::str::from_utf8(h.value) {
                Ok(v) if !v.is_empty() => host = Some(v),
                _ => return Prepared::Handoff,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Prepared::Handoff;
        }
    }
    // hyper's own parse of the target decides what it accepts; the direct path takes only
    // what hyper would.
    let (Some(host), false, true, true) = (
        host,
        body > MAX_DIRECT_BODY || method == "CONNECT",
        raw_target.starts_with('/'),
        raw_target.parse::<http::uri::PathAndQuery>().is_ok(),
    ) else {
        return Prepared::Handoff;
    };
    let head_method = method == "HEAD";
    let snap = shared.policy.load();
    let cp = conn.policy(&snap);
    let wanted = shared.flows.wanted();
    let record = |target: &str| {
        let target = if wanted {
            target.to_string()
        } else {
            String::new()
        };
        (RecordParts::new(&shared.flows, method, host), target)
    };
    let bad_request = |target: &str, reason: String| {
        let (parts, target) = record(target);
        let refusal = Refusal {
            status: 400,
            reason,
        };
        Prepared::Answer {
            head_len,
            body,
            answer: conn.answer_refusal(parts, &target, &cp, started, refusal),
            head_method,
        }
    };
    let target = if cfg.normalize_paths {
        match normalize_target(raw_target) {
            Ok(t) => t,
            Err(e) => return bad_request(raw_target, e.to_string()),
        }
    } else {
        std::borrow::Cow::Borrowed(raw_target)
    };
    let facts = HttpRequest {
        method,
        path: &target,
        host,
        headers: &RawHeaders(headers),
    };
    let verdict = if cfg.normalize_paths {
        judge_normalized(&cp, &facts)
    } else {
        judge(&cp, &facts)
    };
    let (direction, policy) = match verdict {
        Verdict::Allow { direction, policy } => (direction, policy),
        Verdict::Deny {
            direction,
            l34,
            read_as,
        } => {
            let (parts, target) = record(&target);
            let outcome = denied_outcome(direction, l34, read_as);
            conn.record_parts(parts, &target, &cp, started, outcome);
            return Prepared::Answer {
                head_len,
                body,
                answer: LocalAnswer {
                    status: StatusCode::FORBIDDEN,
                    body: cfg.deny_body.clone(),
                    close: l34,
                },
                head_method,
            };
        }
    };
    // A target normalization left as it was passed this check above.
    if matches!(target, std::borrow::Cow::Owned(_))
        && target.parse::<http::uri::PathAndQuery>().is_err()
    {
        return bad_request(&target, "request target cannot be forwarded".into());
    }
    let (client_close, named) = connection_tokens(headers);
    let mut up = Vec::with_capacity(head_len + 32 + body.min(MAX_DIRECT_BODY) as usize);
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    append_forwarded_fields(&mut up, headers, &named);
    up.extend_from_slice(b"\r\n");
    let (record, target) = record(&target);
    Prepared::Forward(Box::new(Forward {
        head_len,
        body,
        upstream_head: up,
        head_method,
        idempotent: idempotent(method),
        client_close,
        cp,
        record,
        target,
        direction,
        policy,
        started,
    }))
}

/// A locally built answer on the wire (without its body for a HEAD request).
fn local_response(answer: &LocalAnswer, head_method: bool) -> Vec<u8> {
    let status = answer.status;
    let mut out = Vec::with_capacity(160 + answer.body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain\r\ncontent-length: ");
    out.extend_from_slice(answer.body.len().to_string().as_bytes());
    if answer.close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    if !head_method {
        out.extend_from_slice(&answer.body);
    }
    out
}

/// What became of one request.
enum Step {
    Continue,
    Close,
    Handoff,
}

/// Serves a connection's requests while they suit the direct path.
pub(crate) async fn serve(
    conn: &Connection,
    stream: TcpStream,
    shutdown: &mut watch::Receiver<bool>,
) -> Exit {
    let cfg = &conn.shared().config;
    let (idle, header_timeout) = (cfg.idle_timeout, cfg.header_timeout);
    let mut down = Down {
        stream,
        framer: Framer::new(cfg.limits, cfg.upgrades.clone()),
        buf: Vec::new(),
        pos: 0,
    };
    // One timer for the connection's life, re-armed when it fires (see server.rs).
    let tick = cfg.timeout_check_interval();
    let checks = tokio::time::sleep(tick);
    tokio::pin!(checks);
    let mut idle_since = Instant::now();
    loop {
        let mut head_since: Option<Instant> = None;
        // The framer delivers heads whole: pending bytes start with a complete one, or with
        // HTTP/2's preface, or nothing was delivered yet.
        while down.pending().is_empty() && !down.framer.is_refused() {
            if down.framer.head_in_progress() {
                head_since.get_or_insert_with(Instant::now);
            }
            let quiet = !down.framer.head_in_progress();
            tokio::select! {
                biased;
                r = down.read() => match r {
                    Ok(0) | Err(_) => return Exit::Closed,
                    Ok(_) => {}
                },
                _ = checks.as_mut() => {
                    checks.as_mut().reset(tokio::time::Instant::now() + tick);
                    match head_since {
                        Some(t) if t.elapsed() >= header_timeout => return Exit::Closed,
                        None if idle_since.elapsed() >= idle => return Exit::Closed,
                        _ => {}
                    }
                }
                _ = stopped(shutdown), if quiet => return Exit::Closed,
            }
        }
        let refused_here = down
            .framer
            .refused()
            .is_some_and(|(i, _)| *i == conn.next_index());
        if refused_here || down.framer.is_passthrough() || down.pending().is_empty() {
            return handoff(down);
        }
        match one_request(conn, &mut down, checks.as_mut(), tick).await {
            Step::Continue => {}
            Step::Close => {
                let _ = down.stream.shutdown().await;
                return Exit::Closed;
            }
            Step::Handoff => return handoff(down),
        }
        if *shutdown.borrow() {
            let _ = down.stream.shutdown().await;
            return Exit::Closed;
        }
        idle_since = Instant::now();
    }
}

fn handoff(down: Down) -> Exit {
    let Down {
        stream,
        framer,
        mut buf,
        pos,
    } = down;
    buf.drain(..pos);
    Exit::Handoff {
        stream,
        framer,
        pending: buf,
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Judges and answers or forwards the request whose head starts the pending bytes. The
/// connection's timer (`checks`, re-armed every `tick`) also bounds the wait for the upstream:
/// a timer of its own per request would cost a timer-wheel entry and more clock reads.
async fn one_request(
    conn: &Connection,
    down: &mut Down,
    mut checks: Pin<&mut Sleep>,
    tick: Duration,
) -> Step {
    let mut fwd = match prepare(conn, down.pending()) {
        Prepared::Handoff => return Step::Handoff,
        Prepared::Answer {
            head_len,
            body,
            answer,
            head_method,
        } => {
            conn.take_index();
            down.consume(head_len);
            let close = answer.close;
            if !close && down.body(body, Discard).await.is_err() {
                return Step::Close;
            }
            let wire = local_response(&answer, head_method);
            if down.stream.write_all(&wire).await.is_err() || close {
                return Step::Close;
            }
            return Step::Continue;
        }
        Prepared::Forward(f) => *f,
    };
    conn.take_index();
    down.consume(fwd.head_len);
    let shared = conn.shared().clone();
    let cfg = &shared.config;
    let dst = conn.dst();
    let mark = cfg.upstream_mark.map(|m| m(fwd.cp.peers.src.0));
    let mut head = std::mem::take(&mut fwd.upstream_head);
    // The body bytes already here go out with the head, in one write.
    let here = (fwd.body.min(down.pending().len() as u64)) as usize;
    head.extend_from_slice(&down.pending()[..here]);
    down.consume(here);
    let rest = fwd.body - here as u64;
    let request = UpstreamRequest {
        dst,
        mark,
        head: &head,
        body_rest: rest,
        head_method: fwd.head_method,
        resendable: fwd.idempotent && rest == 0,
        client_close: fwd.client_close,
    };
    let exchange = exchange(&shared.upstreams, Some(&mut *down), request, None);
    let result = if cfg.upstream_timeout.is_zero() {
        Ok(exchange.await)
    } else {
        let deadline = fwd.started + cfg.upstream_timeout;
        let mut exchange = pin!(exchange);
        loop {
            tokio::select! {
                biased;
                r = &mut exchange => break Ok(r),
                _ = checks.as_mut() => {
                    checks.as_mut().reset(tokio::time::Instant::now() + tick);
                    if Instant::now() >= deadline {
                        break Err(());
                    }
                }
            }
        }
    };
    let (mut upstream, mut rbuf, resp) = match result {
        Ok(Ok(r)) => r,
        Ok(Err(ExchangeError::Down)) => return Step::Close,
        Ok(Err(ExchangeError::Upstream(e))) => {
            let refusal = Refusal {
                status: 502,
                reason: format!("upstream {dst}: {e}"),
            };
            return answer_failure(conn, down, fwd, refusal).await;
        }
        Err(_) => {
            let refusal = Refusal {
                status: 504,
                reason: format!("upstream {dst} sent no response headers in time"),
            };
            return answer_failure(conn, down, fwd, refusal).await;
        }
    };
    conn.record_parts(
        fwd.record,
        &fwd.target,
        &fwd.cp,
        fwd.started,
        Outcome {
            verdict: "forwarded",
            direction: fwd.direction,
            policy: fwd.policy,
            status: StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY),
            reason: None,
        },
    );
    // The response: head and what arrived of the body in one write, then the rest as it comes.
    // Bytes past the body make the upstream connection unusable.
    let mut out = resp.forward_head;
    let mut body = resp.body;
    let mut reusable = resp.reusable;
    let mut data_from = resp.head_len;
    loop {
        let data = &rbuf[data_from..];
        let Ok((used, finished)) = body.take(data) else {
            // The upstream broke the chunked framing: the client must not get a complete
            // response out of it.
            return Step::Close;
        };
        out.extend_from_slice(&data[..used]);
        reusable &= used == data.len();
        // No `.await` since the read that brought the last byte; a read that filled the buffer
        // may have left bytes in the kernel, which the pool's check must still find.
        if finished && reusable && rbuf.len() < rbuf.capacity() {
            drained(&upstream);
        }
        if down.stream.write_all(&out).await.is_err() {
            return Step::Close;
        }
        if finished {
            break;
        }
        out.clear();
        rbuf.clear();
        rbuf.reserve(16 * 1024);
        data_from = 0;
        // EOF ends an until-close body as it ends the client's connection (close_downstream).
        match upstream.read_buf(&mut rbuf).await {
            Ok(0) | Err(_) => return Step::Close,
            Ok(_) => {}
        }
    }
    if reusable {
        shared.upstreams.checkin_raw(dst, mark, upstream);
    }
    if resp.close_downstream {
        Step::Close
    } else {
        Step::Continue
    }
}

/// Whether a request with this method may be sent again when its connection turns out closed
/// (RFC 9110 §9.2.2).
pub(crate) fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// A request on its way upstream.
pub(crate) struct UpstreamRequest<'a> {
    pub dst: std::net::SocketAddr,
    pub mark: Option<u32>,
    /// The head and the body bytes that came with it.
    pub head: &'a [u8],
    /// Body bytes still to read from the client (who is then the `down` of [`exchange`]).
    pub body_rest: u64,
    pub head_method: bool,
    /// All of it is in `head` and its method is idempotent: it may be sent again.
    pub resendable: bool,
    pub client_close: bool,
}

/// Why a pooled connection gave no answer.
enum Attempt {
    /// It was closed before any byte of an answer: the request may not have been seen.
    Stale(String),
    Failed(ExchangeError),
}

/// Sends the request to the upstream (a pooled connection, or a new one) and reads the response
/// head, skipping interim responses. The pool drops connections the upstream closed or wrote to
/// while they sat idle once the runtime has seen it; one closed a moment ago is only noticed by
/// using it: a resendable request then goes again on a new connection, and any other one is
/// sent only on a connection the kernel has nothing on (one extra read).
pub(crate) async fn exchange(
    upstreams: &Upstreams,
    mut down: Option<&mut Down>,
    req: UpstreamRequest<'_>,
    mut fields: Option<&mut ResponseFields>,
) -> Result<(TcpStream, Vec<u8>, ResponseHead), ExchangeError> {
    let mut pooled = upstreams.checkout_raw(req.dst, req.mark, !req.resendable);
    loop {
        let reused = pooled.is_some();
        let upstream = match pooled.take() {
            Some(s) => s,
            None => upstreams
                .connect_raw(req.dst, req.mark)
                .await
                .map_err(ExchangeError::Upstream)?,
        };
        match attempt(
            down.as_deref_mut(),
            upstream,
            &req,
            reused && req.resendable,
            fields.as_deref_mut(),
        )
        .await
        {
            Ok(r) => return Ok(r),
            Err(Attempt::Stale(_)) if reused && req.resendable => continue,
            Err(Attempt::Stale(e)) => return Err(ExchangeError::Upstream(e)),
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
}

/// One try on `upstream`; `may_resend`: a stale connection's answer is not taken for the
/// request's.
async fn attempt(
    down: Option<&mut Down>,
    mut upstream: TcpStream,
    req: &UpstreamRequest<'_>,
    may_resend: bool,
    mut fields: Option<&mut ResponseFields>,
) -> Result<(TcpStream, Vec<u8>, ResponseHead), Attempt> {
    if let Err(e) = upstream.write_all(req.head).await {
        return Err(Attempt::Stale(format!("write: {e}")));
    }
    if let Some(down) = down {
        down.body(req.body_rest, &mut upstream)
            .await
            .map_err(Attempt::Failed)?;
    }
    let mut rbuf: Vec<u8> = Vec::with_capacity(8 * 1024);
    loop {
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(8 * 1024);
        }
        // Only the first read can show a connection closed while it sat in the pool.
        let nothing_yet = rbuf.is_empty();
        match upstream.read_buf(&mut rbuf).await {
            Ok(0) if nothing_yet => {
                return Err(Attempt::Stale("closed before its response".into()));
            }
            Err(e) if nothing_yet => return Err(Attempt::Stale(format!("read: {e}"))),
            Ok(0) => {
                let e = "closed in the middle of its response head".into();
                return Err(Attempt::Failed(ExchangeError::Upstream(e)));
            }
            Err(e) => {
                let e = format!("read: {e}");
                return Err(Attempt::Failed(ExchangeError::Upstream(e)));
            }
            Ok(_) => {}
        }
        loop {
            let parsed = match fields.as_deref_mut() {
                Some(f) => {
                    // Only a final head reports fields, and only the last one parsed counts.
                    f.clear();
                    parse_response_with(&rbuf, req.head_method, req.client_close, |n, v| {
                        f.add(n, v)
                    })
                }
                None => parse_response(&rbuf, req.head_method, req.client_close),
            };
            match parsed.map_err(|e| Attempt::Failed(ExchangeError::Upstream(e)))? {
                ParsedResponse::Incomplete => break,
                ParsedResponse::Interim(len) => {
                    rbuf.drain(..len);
                }
                // What servers send on a keep-alive connection they time out (and then close),
                // read here as if it answered the request: the request was never seen.
                ParsedResponse::Final(resp) if resp.status == 408 && nothing_yet && may_resend => {
                    return Err(Attempt::Stale("408 on an idle connection".into()));
                }
                ParsedResponse::Final(resp) => return Ok((upstream, rbuf, resp)),
            }
        }
    }
}

/// Answers a failed exchange locally; closes when request body bytes may be left unread.
async fn answer_failure(
    conn: &Connection,
    down: &mut Down,
    fwd: Forward,
    refusal: Refusal,
) -> Step {
    let mut answer = conn.answer_refusal(fwd.record, &fwd.target, &fwd.cp, fwd.started, refusal);
    answer.close |= fwd.body > 0;
    let wire = local_response(&answer, fwd.head_method);
    if down.stream.write_all(&wire).await.is_err() || answer.close {
        Step::Close
    } else {
        Step::Continue
    }
}
