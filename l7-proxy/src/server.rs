//! Listeners and connections: accept, decide at L3/L4, serve HTTP/1.1 and HTTP/2 through the
//! guard, close idle connections, and drain gracefully on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::direct::Exit;
use crate::guard::{Guard, GuardState};
use crate::kafka::KafkaConnection;
use crate::policy::{ConnectionProtocol, Decision, canonical};
use crate::service::{Connection, Shared};
use crate::telemetry::ConnectionLabels;

/// Where a listener's connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every connection goes to one upstream (reverse proxy).
    Reverse {
        /// The upstream.
        upstream: SocketAddr,
    },
    /// Each connection goes to its original destination: the listener is `IP_TRANSPARENT` and
    /// redirected connections arrive with their original destination as the local address.
    Transparent,
}

/// Binds a listener. A transparent one sets `IP_TRANSPARENT`/`IPV6_TRANSPARENT` (needs
/// CAP_NET_ADMIN), and a `[::]` address accepts IPv4 too.
pub fn bind(addr: SocketAddr, mode: Mode) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    if mode == Mode::Transparent {
        if addr.is_ipv6() {
            socket.set_ip_transparent_v6(true)?;
        }
        socket.set_ip_transparent_v4(true).or_else(|e| {
            // An IPv6-only socket may refuse the IPv4 option; IPV6_TRANSPARENT then covers it.
            if addr.is_ipv6() { Ok(()) } else { Err(e) }
        })?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// A running proxy: shared state plus the HTTP server settings.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
    open: Arc<AtomicUsize>,
}

impl Proxy {
    /// A proxy over `shared`.
    pub fn new(shared: Arc<Shared>) -> Proxy {
        let cfg = &shared.config;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            // The guard times heads out (GuardState::head_age, checked by the connection
            // task): hyper's own timeout would arm a timer for every request.
            .header_read_timeout(None)
            .max_headers(cfg.limits.max_headers)
            .max_buf_size((cfg.limits.max_head_bytes * 2).max(64 * 1024))
            .keep_alive(true)
            .pipeline_flush(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .max_header_list_size(cfg.limits.max_head_bytes as u32)
            .keep_alive_interval(Some(cfg.tcp_keepalive));
        Proxy {
            shared,
            builder,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Accepts and serves until `shutdown` turns true, then lets open connections finish their
    /// requests for up to `drain` before returning.
    pub async fn serve(
        &self,
        listener: TcpListener,
        mode: Mode,
        mut shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) -> io::Result<()> {
        let local = listener.local_addr()?;
        let per_connection = shutdown.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        // Out of descriptors and the like: back off instead of spinning.
                        Err(e) => {
                            eprintln!("membrane-proxy: accept on {local}: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    self.spawn_connection(stream, peer, local, mode, per_connection.clone(), drain);
                }
                _ = stopped(&mut shutdown) => break,
            }
        }
        drop(listener);
        let deadline = Instant::now() + drain;
        while self.open.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn spawn_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        mode: Mode,
        mut shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let shared = self.shared.clone();
        let src = SocketAddr::new(canonical(peer.ip()), peer.port());
        let dst = match mode {
            Mode::Reverse { upstream } => upstream,
            Mode::Transparent => match stream.local_addr() {
                Ok(a) => SocketAddr::new(canonical(a.ip()), a.port()),
                Err(_) => return,
            },
        };
        // Connecting to the transparent listener itself would loop back into the proxy.
        if mode == Mode::Transparent && dst.port() == local.port() {
            reset(stream);
            return;
        }
        let snap = shared.policy.load();
        let peers = snap.peers(src, dst);
        let decision = snap.decide(peers, dst.port());
        let protocol = decision.protocol_or(shared.config.unruled_protocol);
        // Refused at L3/L4, or ingress wants one protocol and egress another (no request can
        // satisfy both).
        if matches!(decision, Decision::Deny { .. }) || protocol == ConnectionProtocol::Conflict {
            shared
                .metrics
                .connections
                .get_or_create(&ConnectionLabels { outcome: "denied" })
                .inc();
            reset(stream);
            return;
        }
        shared
            .metrics
            .connections
            .get_or_create(&ConnectionLabels {
                outcome: "accepted",
            })
            .inc();
        let _ = stream.set_nodelay(true);
        let _ = SockRef::from(&stream).set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(shared.config.tcp_keepalive)
                .with_interval(Duration::from_secs(10)),
        );
        if protocol == ConnectionProtocol::Kafka {
            let conn = Arc::new(KafkaConnection::new(
                shared.clone(),
                src,
                dst,
                &snap,
                peers,
                decision,
            ));
            drop(snap);
            let open = self.open.clone();
            open.fetch_add(1, Ordering::AcqRel);
            shared.metrics.open_connections.inc();
            tokio::spawn(async move {
                conn.serve(stream, shutdown, drain).await;
                shared.metrics.open_connections.dec();
                open.fetch_sub(1, Ordering::AcqRel);
            });
            return;
        }
        let guard_state = Arc::new(GuardState::default());
        let conn = Arc::new(Connection::new(
            shared.clone(),
            src,
            dst,
            guard_state.clone(),
            &snap,
            peers,
            decision,
        ));
        drop(snap);
        let builder = self.builder.clone();
        let open = self.open.clone();
        open.fetch_add(1, Ordering::AcqRel);
        shared.metrics.open_connections.inc();
        // Upstream HTTP/2 needs hyper's client: the direct path speaks HTTP/1.1 upstream.
        let direct = shared.config.http1_direct
            && shared.config.upstream_protocol != crate::service::UpstreamProtocol::Http2;
        tokio::spawn(async move {
            let handed = if direct {
                match crate::direct::serve(&conn, stream, &mut shutdown).await {
                    Exit::Closed => None,
                    Exit::Handoff {
                        stream,
                        framer,
                        pending,
                    } => Some(Guard::resume(stream, framer, pending, guard_state.clone())),
                }
            } else {
                Some(Guard::new(
                    stream,
                    shared.config.limits,
                    shared.config.upgrades.clone(),
                    guard_state.clone(),
                ))
            };
            if let Some(guard) = handed {
                serve_hyper(builder, conn, guard, guard_state, shutdown).await;
            }
            shared.metrics.open_connections.dec();
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Serves a connection with hyper (HTTP/2, and the HTTP/1 requests the direct path hands over):
/// closes it when idle, when a head takes too long, or on shutdown once its requests are done.
async fn serve_hyper(
    builder: auto::Builder<TokioExecutor>,
    conn: Arc<Connection>,
    guard: Guard<TcpStream>,
    guard_state: Arc<GuardState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = &conn.shared().config;
    let (idle, header_timeout) = (cfg.idle_timeout, cfg.header_timeout);
    let svc_conn = conn.clone();
    // hyper keeps a box the size of the service's future for the whole life of an
    // HTTP/1 connection; the request future is ~3 KB, so boxing it here makes an idle
    // keep-alive connection hold 8 bytes instead (one allocation per request instead).
    let svc = service_fn(move |req| Box::pin(svc_conn.clone().handle(req)));
    let served = builder.serve_connection_with_upgrades(TokioIo::new(guard), svc);
    tokio::pin!(served);
    let mut closing = false;
    let mut last_activity = guard_state.activity();
    let mut idle_since = Instant::now();
    let tick = cfg.timeout_check_interval();
    // One timer for the connection's life, re-armed when it fires: a new one per
    // wake-up (every request wakes this task) was a timer-wheel insert and removal
    // per request.
    let checks = tokio::time::sleep(tick);
    tokio::pin!(checks);
    loop {
        tokio::select! {
            _ = served.as_mut() => break,
            _ = stopped(&mut shutdown), if !closing => {
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            _ = checks.as_mut() => {
                checks.as_mut().reset(tokio::time::Instant::now() + tick);
                if guard_state.head_age().is_some_and(|age| age >= header_timeout) {
                    // A head that does not complete in time: drop the connection.
                    break;
                }
                if closing {
                    continue;
                }
                let now = guard_state.activity();
                if now != last_activity || conn.busy() {
                    last_activity = now;
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= idle {
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Resolves once shutdown is requested (the watch's guard never lives across an await, which
/// keeps connection tasks `Send`).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Closes with RST so that a refused peer learns at once (and no FIN handshake lingers).
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
