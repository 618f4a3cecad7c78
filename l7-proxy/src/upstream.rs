//! Upstream connections: pooled HTTP/1.1 keep-alive connections and one multiplexed HTTP/2
//! connection per original destination.
//!
//! The pools are keyed by destination address, not by the request's authority: a transparent
//! proxy must connect where the client was going while sending the Host (or `:authority`) that
//! was judged. hyper's connection-level client is used directly; its pooled client dials by URI
//! authority and costs more per request.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::service::ProxyConfig;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a destination that answered the HTTP/2 preface as HTTP/1 is sent HTTP/1.1 without
/// asking again.
const H1_ONLY_FOR: Duration = Duration::from_secs(60);

/// Idle pooled HTTP/1.1 connections older than this are closed.
const H1_IDLE: Duration = Duration::from_secs(90);
/// At most this many idle HTTP/1.1 connections per destination stay pooled (memory stays bounded
/// when thousands of downstream connections go idle). Connections still streaming a response
/// body do not count: under load the pool holds one per request in flight, or every request
/// past the cap would open a connection and close it again.
const H1_MAX_POOLED: usize = 64;
/// How long a connection beyond [`H1_MAX_POOLED`] may sit unused before it is closed.
const H1_SURPLUS_IDLE: Duration = Duration::from_secs(1);

struct H1Conn {
    sender: http1::SendRequest<Incoming>,
    last_used: Instant,
}

/// An idle HTTP/1.1 connection of the direct path (`crate::direct`), which speaks HTTP/1.1 on
/// the socket itself.
struct RawConn {
    stream: TcpStream,
    last_used: Instant,
}

/// The pools.
pub struct Upstreams {
    connect_timeout: Duration,
    tcp_keepalive: Duration,
    h1: Arc<Mutex<HashMap<Key, Vec<H1Conn>>>>,
    raw: Arc<Mutex<HashMap<Key, Vec<RawConn>>>>,
    /// The task that closes stale and surplus idle connections runs.
    sweeping: AtomicBool,
    h2: Mutex<HashMap<Key, http2::SendRequest<Incoming>>>,
    /// Destinations that answered the HTTP/2 preface as HTTP/1 servers do, and since when.
    h1_only: Mutex<HashMap<SocketAddr, Instant>>,
}

/// A pool key: the destination and the socket mark (connections acting for different
/// workloads are never shared).
type Key = (SocketAddr, Option<u32>);

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Empty pools with the connection settings of `cfg`.
    pub fn new(cfg: &ProxyConfig) -> Upstreams {
        Upstreams {
            connect_timeout: cfg.connect_timeout,
            tcp_keepalive: cfg.tcp_keepalive,
            h1: Arc::default(),
            raw: Arc::default(),
            sweeping: AtomicBool::new(false),
            h2: Mutex::default(),
            h1_only: Mutex::default(),
        }
    }

    /// An idle pooled connection to `dst` for the direct path, the most recently used first (its
    /// lines are the likeliest to be in cache). Connections the upstream closed, or that sent
    /// bytes nobody asked for, are dropped as far as the runtime has seen it happen (no syscall
    /// unless it has: see [`drained`]). `ask_kernel` reads each socket as well, for a request
    /// that cannot be sent again should the connection turn out closed (one syscall).
    pub(crate) fn checkout_raw(
        &self,
        dst: SocketAddr,
        mark: Option<u32>,
        ask_kernel: bool,
    ) -> Option<TcpStream> {
        let mut pool = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.get_mut(&(dst, mark))?;
        let now = Instant::now();
        while let Some(c) = conns.pop() {
            if now.duration_since(c.last_used) >= H1_IDLE {
                // Older ones lie below it: all are stale.
                conns.clear();
                return None;
            }
            if quiet(&c.stream) && (!ask_kernel || kernel_quiet(&c.stream)) {
                return Some(c.stream);
            }
        }
        None
    }

    /// Returns a connection whose last response is complete to the pool. Under load the pool
    /// holds one per request in flight; the sweep closes those beyond [`H1_MAX_POOLED`] once
    /// they go unused.
    pub(crate) fn checkin_raw(&self, dst: SocketAddr, mark: Option<u32>, stream: TcpStream) {
        let mut pool = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        pool.entry((dst, mark)).or_default().push(RawConn {
            stream,
            last_used: Instant::now(),
        });
    }

    /// A new connection for the direct path.
    pub(crate) async fn connect_raw(
        &self,
        dst: SocketAddr,
        mark: Option<u32>,
    ) -> Result<TcpStream, String> {
        self.start_sweeping();
        connect(dst, mark, self.connect_timeout, self.tcp_keepalive).await
    }

    async fn connect(
        &self,
        dst: SocketAddr,
        mark: Option<u32>,
    ) -> Result<TokioIo<TcpStream>, String> {
        connect(dst, mark, self.connect_timeout, self.tcp_keepalive)
            .await
            .map(TokioIo::new)
    }

    /// Sends an origin-form HTTP/1.1 request to `dst` on an idle pooled connection, or a new
    /// one. The connection returns to the pool with the response headers; it is reused once
    /// hyper reports it ready (its response body done).
    pub async fn send_h1(
        &self,
        dst: SocketAddr,
        mark: Option<u32>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, String> {
        let key = (dst, mark);
        let pooled = {
            let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
            let conns = pool.entry(key).or_default();
            // One clock read per checkout, not one per pooled connection.
            let now = Instant::now();
            conns.retain(|c| !c.sender.is_closed() && now.duration_since(c.last_used) < H1_IDLE);
            let found = conns
                .iter()
                .rposition(|c| c.sender.is_ready())
                .map(|i| conns.swap_remove(i).sender);
            trim(conns, now, |c| c.last_used, |c| c.sender.is_ready());
            found
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => {
                self.start_sweeping();
                let io = self.connect(dst, mark).await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {}", error_chain(&e)))?;
                // Upgrades (WebSocket) need the connection back after a 101.
                tokio::spawn(conn.with_upgrades());
                sender
            }
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| error_chain(&e))?;
        if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            // Pooled while its body streams: it is reused once hyper reports it ready.
            let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry(key).or_default().push(H1Conn {
                sender,
                last_used: Instant::now(),
            });
        }
        Ok(resp)
    }

    /// Starts, once, the task that closes idle connections when no request comes to do it: hyper's
    /// surplus after a burst, and the direct path's stale ones (a second apart; it ends with the
    /// pools).
    fn start_sweeping(&self) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let (h1, raw) = (Arc::downgrade(&self.h1), Arc::downgrade(&self.raw));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(H1_SURPLUS_IDLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(h1), Some(raw)) = (h1.upgrade(), raw.upgrade()) else {
                    break;
                };
                sweep(&h1, &raw, Instant::now());
            }
        });
    }

    /// Whether `dst` speaks HTTP/2 with prior knowledge: it has a live HTTP/2 connection, or a
    /// new connection's preface is answered with the server's SETTINGS (that connection then
    /// joins the pool). A server that answers as HTTP/1 does (or closes, or stays silent for
    /// the connect timeout) is remembered as HTTP/1-only for a minute (`H1_ONLY_FOR`). Connect
    /// errors are not answers: they are left to the request that follows.
    pub async fn speaks_h2(&self, dst: SocketAddr, mark: Option<u32>) -> bool {
        let key = (dst, mark);
        if self
            .h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|s| !s.is_closed())
        {
            return true;
        }
        let now = Instant::now();
        {
            let mut h1_only = self.h1_only.lock().unwrap_or_else(|e| e.into_inner());
            match h1_only.get(&dst) {
                Some(since) if now.duration_since(*since) < H1_ONLY_FOR => return false,
                Some(_) => {
                    h1_only.remove(&dst);
                }
                None => {}
            }
        }
        let Ok(mut stream) = connect(dst, mark, self.connect_timeout, self.tcp_keepalive).await
        else {
            return false;
        };
        let answer = tokio::time::timeout(self.connect_timeout, async {
            stream.write_all(H2_PREFACE).await?;
            let mut first = Vec::with_capacity(1024);
            while first.len() < 9 && stream.read_buf(&mut first).await? > 0 {}
            io::Result::Ok(first)
        })
        .await;
        match answer {
            Ok(Ok(first)) if starts_with_settings(&first) => {
                let io = PrefaceSent {
                    stream,
                    to_skip: H2_PREFACE.len(),
                    replay: first,
                    replayed: 0,
                };
                self.h2_handshake(key, TokioIo::new(io)).await.is_ok()
            }
            _ => {
                let mut h1_only = self.h1_only.lock().unwrap_or_else(|e| e.into_inner());
                // Expired entries go when a new one comes, so the map stays bounded.
                h1_only.retain(|_, since| now.duration_since(*since) < H1_ONLY_FOR);
                h1_only.insert(dst, now);
                false
            }
        }
    }

    async fn h2_handshake<T>(&self, key: Key, io: T) -> Result<http2::SendRequest<Incoming>, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {}", error_chain(&e)))?;
        tokio::spawn(conn);
        self.h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, sender.clone());
        Ok(sender)
    }

    /// Sends an HTTP/2 request (absolute URI: its authority becomes `:authority`) to `dst` on the
    /// destination's multiplexed connection.
    pub async fn send_h2(
        &self,
        dst: SocketAddr,
        mark: Option<u32>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, String> {
        let key = (dst, mark);
        let existing = {
            let pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            pool.get(&key).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(s) => s,
            None => {
                self.h2_handshake(key, self.connect(dst, mark).await?)
                    .await?
            }
        };
        sender.send_request(req).await.map_err(|e| error_chain(&e))
    }
}

/// Whether an answer to the HTTP/2 preface begins with a SETTINGS frame on stream 0, as a
/// server's connection preface must (RFC 9113 §3.4).
fn starts_with_settings(first: &[u8]) -> bool {
    first.len() >= 9 && first[3] == 0x4 && first[5..9] == [0, 0, 0, 0]
}

/// A connection whose preface the probe in [`Upstreams::speaks_h2`] already sent and whose
/// first answer bytes it already read: hyper's own preface is swallowed and those bytes are
/// read again, so hyper's client runs the connection as if it had opened it.
struct PrefaceSent {
    stream: TcpStream,
    to_skip: usize,
    replay: Vec<u8>,
    replayed: usize,
}

impl AsyncRead for PrefaceSent {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PrefaceSent {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.to_skip > 0 {
            let sent = H2_PREFACE.len() - this.to_skip;
            let n = this.to_skip.min(buf.len());
            if buf[..n] != H2_PREFACE[sent..sent + n] {
                return Poll::Ready(Err(io::Error::other(
                    "HTTP/2 client did not open with the preface",
                )));
            }
            this.to_skip -= n;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One sweep of both HTTP/1.1 pools at `now`: closes what the upstream closed (or sent unasked
/// bytes on), what sat idle longer than [`H1_IDLE`], and the surplus after a burst. Without it a direct-path
/// connection the upstream closed would hold its socket (in CLOSE_WAIT) until the next request
/// to that destination.
fn sweep(
    h1: &Mutex<HashMap<Key, Vec<H1Conn>>>,
    raw: &Mutex<HashMap<Key, Vec<RawConn>>>,
    now: Instant,
) {
    h1.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, conns| {
            conns.retain(|c| !c.sender.is_closed() && now.duration_since(c.last_used) < H1_IDLE);
            trim(conns, now, |c| c.last_used, |c| c.sender.is_ready());
            !conns.is_empty()
        });
    raw.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, conns| {
            conns.retain(|c| now.duration_since(c.last_used) < H1_IDLE && quiet(&c.stream));
            trim(conns, now, |c| c.last_used, |_| true);
            !conns.is_empty()
        });
}

/// Whether an idle connection is still open with nothing unread, as far as the runtime knows:
/// a non-blocking read only if an event said the socket became readable since it was
/// [`drained`] (a byte read here is lost, but a connection that sent one unasked is dropped
/// anyway).
fn quiet(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Whether the kernel holds nothing to read on the socket and no FIN (one `recv` with
/// `MSG_PEEK`, whatever the runtime has seen): a FIN that arrived a moment ago may not have
/// reached the runtime's event loop yet.
fn kernel_quiet(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    matches!(SockRef::from(stream).peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Marks a connection whose response was read to its exact end as having nothing more to read,
/// without a syscall, so that [`quiet`] reads it again only once the upstream sends something
/// (or closes). Call it right after the read that brought the response's last byte, only if
/// that read did not fill its buffer (bytes left in the kernel would get no new event), and with
/// no `.await` in between: an event the runtime handles in between is forgotten with the rest.
pub(crate) fn drained(stream: &TcpStream) {
    let _ = stream.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Closes pooled connections beyond [`H1_MAX_POOLED`] that sat unused for a while (under load
/// every pooled connection is reused within milliseconds); `idle`: not busy with a response.
fn trim<C>(
    conns: &mut Vec<C>,
    now: Instant,
    last_used: impl Fn(&C) -> Instant,
    idle: impl Fn(&C) -> bool,
) {
    let Some(mut extra) = conns.len().checked_sub(H1_MAX_POOLED) else {
        return;
    };
    conns.retain(|c| {
        let drop = extra > 0 && now.duration_since(last_used(c)) > H1_SURPLUS_IDLE && idle(c);
        extra -= usize::from(drop);
        !drop
    });
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A TCP connection to `dst` acting for a source workload (`mark` is its SO_MARK), with
/// `TCP_NODELAY` and keepalive.
pub async fn connect(
    dst: SocketAddr,
    mark: Option<u32>,
    connect_timeout: Duration,
    tcp_keepalive: Duration,
) -> Result<TcpStream, String> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(mark) = mark {
        SockRef::from(&socket)
            .set_mark(mark)
            .map_err(|e| format!("SO_MARK {mark:#x}: {e}"))?;
    }
    let stream = tokio::time::timeout(connect_timeout, socket.connect(dst))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = SockRef::from(&stream).set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(tcp_keepalive)
            .with_interval(Duration::from_secs(10)),
    );
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn a_server_preface_starts_with_settings() {
        assert!(starts_with_settings(
            b"\0\0\x06\x04\0\0\0\0\0\0\x03\0\0\0\x64"
        ));
        assert!(starts_with_settings(b"\0\0\0\x04\0\0\0\0\0"));
        assert!(!starts_with_settings(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(!starts_with_settings(b"\0\0\0\x04\0\0\0\0"), "short");
        assert!(!starts_with_settings(b"\0\0\0\x04\0\0\0\0\x01"), "stream 1");
    }

    /// An HTTP/1 server answers the preface with an error: the destination is then remembered
    /// as HTTP/1-only, without a new connection per request.
    #[tokio::test]
    async fn an_http1_answer_to_the_preface_is_remembered() {
        let up = Upstreams::new(&ProxyConfig::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        assert!(!up.speaks_h2(dst, None).await);
        assert!(!up.speaks_h2(dst, None).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Another mark is another pool key, but the same server: still remembered.
        assert!(!up.speaks_h2(dst, Some(7)).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    fn raw_count(up: &Upstreams) -> usize {
        up.raw.lock().unwrap().values().map(Vec::len).sum()
    }

    /// Direct-path connections the upstream closed, or that sent bytes unasked, or that idled
    /// past `H1_IDLE`, leave the pool at the next sweep without a request to that destination.
    #[tokio::test]
    async fn sweep_closes_stale_raw_connections() {
        let up = Upstreams::new(&ProxyConfig::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let mut peers = Vec::new();
        for _ in 0..4 {
            let conn = up.connect_raw(dst, None).await.unwrap();
            peers.push(listener.accept().await.unwrap().0);
            up.checkin_raw(dst, None, conn);
        }
        let never_used_again = Instant::now();
        let (h1, raw) = (up.h1.clone(), up.raw.clone());
        sweep(&h1, &raw, Instant::now());
        assert_eq!(raw_count(&up), 4, "quiet, fresh connections stay");

        drop(peers.remove(0)); // closed by the upstream
        peers[0].write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap(); // unasked bytes
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweep(&h1, &raw, Instant::now());
        assert_eq!(
            raw_count(&up),
            2,
            "closed and chatty connections are dropped"
        );

        sweep(&h1, &raw, never_used_again + H1_IDLE);
        assert_eq!(
            raw_count(&up),
            0,
            "connections idle past H1_IDLE are dropped"
        );
    }
}
