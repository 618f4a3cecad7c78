//! HTTP/1.1 upstream exchanges for requests hyper serves (HTTP/2 streams, and HTTP/1.x requests
//! the direct path handed over) that carry no body and ask for no upgrade: the request head is
//! written to a pooled upstream socket of the direct path, the response head is read by the
//! same fuzzed parser ([`parse_response`]), and the body is decoded from the socket as hyper
//! asks for it ([`UpstreamBody`]). hyper's client would cost a connection task and two channel
//! hops per request; HTTP/2 clients send most of their requests this way.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use membrane_codec::http1::ResponseBody as Framing;
use tokio::net::TcpStream;

use crate::direct::{ExchangeError, UpstreamRequest, exchange, idempotent};
use crate::service::Shared;
use crate::upstream::drained;

/// The HTTP/1.1 head of a bodyless request, or `None` when a field cannot be written as one
/// (hyper's parsers refuse such bytes already; this keeps the serializer safe on its own).
pub(crate) fn request_head(
    method: &Method,
    target: &str,
    authority: &str,
    headers: &HeaderMap,
) -> Option<Vec<u8>> {
    let safe = |b: &[u8]| !b.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0);
    let origin_form = target.starts_with('/') && !target.bytes().any(|c| c <= b' ' || c == 0x7f);
    if !origin_form || !safe(authority.as_bytes()) {
        return None;
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // Hop-by-hop fields are gone already; the body is empty, so no framing field may claim
        // one (an HTTP/2 `content-length: 0` is harmless and kept).
        if name == header::HOST || name == header::TRANSFER_ENCODING {
            continue;
        }
        if !safe(value.as_bytes()) {
            return None;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// Sends a bodyless request head to `dst` (pooled connection or new) and returns the response
/// with its body still on the socket; the connection goes back to the pool when the body ends.
pub(crate) async fn send(
    shared: &Arc<Shared>,
    dst: SocketAddr,
    mark: Option<u32>,
    head: &[u8],
    method: &Method,
) -> Result<Response<UpstreamBody>, String> {
    let request = UpstreamRequest {
        dst,
        mark,
        head,
        body_rest: 0,
        head_method: method == Method::HEAD,
        resendable: idempotent(method.as_str()),
        client_close: false,
    };
    let mut fields = ResponseFields::default();
    let (stream, rbuf, resp) =
        match exchange(&shared.upstreams, None, request, Some(&mut fields)).await {
            Ok(r) => r,
            Err(ExchangeError::Upstream(e)) => return Err(e),
            Err(ExchangeError::Down) => return Err("client went away".into()),
        };
    if let Some(e) = fields.invalid {
        return Err(e);
    }
    let status = StatusCode::from_u16(resp.status).map_err(|e| format!("status: {e}"))?;
    // The last read left nothing in the kernel unless it filled the buffer.
    let short_read = rbuf.len() < rbuf.capacity();
    let mut buf = BytesMut::from(&rbuf[..]);
    let _ = buf.split_to(resp.head_len);
    let mut body = UpstreamBody {
        upstream: Some(Pooled {
            stream,
            shared: shared.clone(),
            dst,
            mark,
        }),
        buf,
        framing: resp.body,
        reusable: resp.reusable,
        done: false,
        trailer: Vec::new(),
        trailers: None,
    };
    body.settle_known_length(short_read);
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = fields.map;
    Ok(out)
}

/// The fields of a response head, as `membrane_codec::http1::parse_response_with` reports them,
/// for hyper to send on. The framing fields other than `Content-Length` stay behind: hyper frames
/// the decoded body for its client.
#[derive(Default)]
pub(crate) struct ResponseFields {
    map: HeaderMap,
    /// The first field that is no valid HTTP field.
    invalid: Option<String>,
}

impl ResponseFields {
    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.invalid = None;
    }

    pub(crate) fn add(&mut self, name: &str, value: &[u8]) {
        if self.invalid.is_some() {
            return;
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            (Ok(n), Ok(v)) => {
                if n != header::TRANSFER_ENCODING && n != header::CONNECTION {
                    self.map.append(n, v);
                }
            }
            _ => self.invalid = Some(format!("invalid response field {name:?}")),
        }
    }
}

/// A pooled connection on loan to a response body.
struct Pooled {
    stream: TcpStream,
    shared: Arc<Shared>,
    dst: SocketAddr,
    mark: Option<u32>,
}

/// A response body read from an upstream socket and decoded from its HTTP/1.1 framing. The
/// socket goes back to the pool when the body ends exactly where its framing says; a body
/// dropped before its end (the client reset the stream) closes it.
pub struct UpstreamBody {
    upstream: Option<Pooled>,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    framing: Framing,
    reusable: bool,
    done: bool,
    /// A chunked body's trailer section as read so far.
    trailer: Vec<u8>,
    /// Its fields, to send once the payload is out.
    trailers: Option<HeaderMap>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("buffered", &self.buf.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// A body with nothing left to read (the common small response came whole with its head)
    /// frees its connection now, not when hyper gets to the body. `short_read`: the read that
    /// brought it did not fill its buffer.
    fn settle_known_length(&mut self, short_read: bool) {
        let whole = match self.framing {
            Framing::None => true,
            Framing::Length(n) => self.buf.len() as u64 >= n,
            Framing::Chunked(_) | Framing::UntilClose => false,
        };
        if whole {
            if let Framing::Length(n) = self.framing {
                // Bytes past the body make the connection unusable; they are not the client's.
                self.reusable &= self.buf.len() as u64 == n;
                self.buf.truncate(n as usize);
            } else {
                self.reusable &= self.buf.is_empty();
                self.buf.clear();
            }
            // `send` calls this with no `.await` since the read that brought the last byte.
            self.release(short_read);
            self.framing = Framing::UntilClose;
        }
    }

    /// Returns the connection to the pool if it may carry another request, else closes it.
    /// `drained_now`: the read that brought the body's last byte happened with no `.await` since
    /// and did not fill its buffer, so the socket may be marked [`drained`]; else the pool's
    /// check reads it once more.
    fn release(&mut self, drained_now: bool) {
        if let Some(up) = self.upstream.take()
            && self.reusable
        {
            if drained_now {
                drained(&up.stream);
            }
            up.shared.upstreams.checkin_raw(up.dst, up.mark, up.stream);
        }
    }

    /// The trailer section's fields, minus those that may not be trailers; an error for a
    /// section that does not parse.
    fn parse_trailer(&self) -> Result<Option<HeaderMap>, String> {
        if self.trailer.len() <= 2 {
            return Ok(None);
        }
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let fields = match httparse::parse_headers(&self.trailer, &mut storage) {
            Ok(httparse::Status::Complete((_, fields))) => fields,
            Ok(httparse::Status::Partial) => return Err("incomplete trailer section".into()),
            Err(e) => return Err(format!("trailer section: {e}")),
        };
        let mut map = HeaderMap::new();
        for f in fields {
            let Ok(name) = HeaderName::from_bytes(f.name.as_bytes()) else {
                return Err(format!("invalid trailer field name {:?}", f.name));
            };
            if membrane_codec::http1::is_hop_by_hop(name.as_str())
                || [header::CONTENT_LENGTH, header::HOST, header::TRAILER].contains(&name)
            {
                continue;
            }
            let value = HeaderValue::from_bytes(f.value)
                .map_err(|_| format!("invalid value of trailer field {name}"))?;
            map.append(name, value);
        }
        Ok((!map.is_empty()).then_some(map))
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.done = true;
        self.upstream = None;
        Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, why))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        // Whether this poll's last read from the socket (nothing awaits in here) was short: it
        // left nothing in the kernel.
        let mut short_read_now = false;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if !this.buf.is_empty() {
                let step = match this.framing.decode(&this.buf) {
                    Ok(step) => step,
                    Err(e) => return this.fail(format!("upstream response body: {e}")),
                };
                let trailer = &this.buf[step.trailer.clone()];
                // Only a section with fields is kept (most are just the final CRLF).
                if !(this.trailer.is_empty() && step.finished && trailer == b"\r\n") {
                    this.trailer.extend_from_slice(trailer);
                }
                let payload = this
                    .buf
                    .split_to(step.consumed)
                    .freeze()
                    .slice(step.payload);
                if step.finished {
                    match this.parse_trailer() {
                        Ok(t) => this.trailers = t,
                        Err(e) => return this.fail(format!("upstream response: {e}")),
                    }
                    this.done = true;
                    this.reusable &= this.buf.is_empty();
                    this.release(short_read_now);
                }
                if !payload.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(payload))));
                }
                continue;
            }
            let Some(up) = this.upstream.as_mut() else {
                // Everything came with the head (see `settle_known_length`).
                this.done = true;
                continue;
            };
            if this.buf.capacity() < 4096 {
                this.buf.reserve(16 * 1024);
            }
            match up.stream.try_read_buf(&mut this.buf) {
                Ok(0) if matches!(this.framing, Framing::UntilClose) => {
                    this.done = true;
                    this.upstream = None;
                }
                Ok(0) => {
                    return this.fail("upstream closed in the middle of its response body".into());
                }
                Ok(_) => short_read_now = this.buf.len() < this.buf.capacity(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(up.stream.poll_read_ready(cx)) {
                        return this.fail(format!("upstream read: {e}"));
                    }
                }
                Err(e) => return this.fail(format!("upstream read: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.upstream.is_none() && self.buf.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::None => SizeHint::with_exact(0),
            // `n` counts what is still to decode, buffered or not.
            Framing::Length(n) => SizeHint::with_exact(n),
            _ if self.upstream.is_none() => SizeHint::with_exact(self.buf.len() as u64),
            _ => SizeHint::default(),
        }
    }
}
