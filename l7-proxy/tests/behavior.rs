//! The proxy's behaviour with well-formed traffic: keep-alive across a policy change, upgrades
//! (and the h2c offers it drops),
//! `Expect: 100-continue`, HTTP/2 both ways, flow records and metrics, upstream failures,
//! L3/L4 refusals, idle connections and graceful drain, the configured 403 body, TCP keepalive.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{POLICY, h2_client, read_all, start, statuses};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use membrane_l7_proxy::guard::Upgrades;
use membrane_l7_proxy::service::{ProxyConfig, UpstreamProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const Q: Duration = Duration::from_millis(300);

async fn roundtrip(s: &mut TcpStream, req: &str) -> String {
    s.write_all(req.as_bytes()).await.unwrap();
    read_all(s, Q).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_applies_to_the_next_request_on_an_open_connection() {
    let h = start(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: svc\r\n\r\n");
    assert_eq!(statuses(&roundtrip(&mut s, &get("/public/a")).await), [200]);
    assert_eq!(statuses(&roundtrip(&mut s, &get("/other")).await), [403]);
    // Same connection, new policy: /other allowed, /public no longer.
    h.set_policy(&POLICY.replace("/public.*", "/other"));
    assert_eq!(statuses(&roundtrip(&mut s, &get("/other")).await), [200]);
    assert_eq!(statuses(&roundtrip(&mut s, &get("/public/a")).await), [403]);
    // A policy that denies the connection at L3/L4 (no world ingress): 403 and close.
    h.set_policy(&POLICY.replace("fromEntities: [world]", "fromEntities: [host]"));
    s.write_all(get("/other").as_bytes()).await.unwrap();
    let (text, closed) = read_all(&mut s, Q).await;
    assert_eq!(statuses(&text), [403]);
    assert!(closed);
    // New connections are now refused outright (reset, no HTTP answer).
    let (text, closed) = h.raw(get("/other").as_bytes(), Q).await;
    assert!(text.is_empty() && closed, "{text}");
    let m = h.metrics.encode();
    assert!(
        m.contains("membrane_proxy_connections_total{outcome=\"denied\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_tunnel_only_when_the_rule_allows_the_request() {
    let h = start(ProxyConfig {
        upgrades: Upgrades::new(["websocket", "echo"]).unwrap(),
        ..ProxyConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_all(&mut s, Q).await;
    assert_eq!(statuses(&text), [101], "{text}");
    s.write_all(b"raw bytes after the upgrade\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"raw bytes after the upgrade\n");
    // A denied upgrade: 403, and the connection closes.
    let (text, closed) = h
        .raw(
            b"GET /private HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            Q,
        )
        .await;
    assert_eq!(statuses(&text), [403]);
    assert!(closed);
    // Bytes pipelined behind a denied upgrade are never forwarded (hyper closes at once).
    let (text, closed) = h
        .raw(
            b"GET /private HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nGET /public/smuggled HTTP/1.1\r\nHost: svc\r\n\r\n",
            Q,
        )
        .await;
    assert!(!statuses(&text).iter().any(|s| *s < 300), "{text}");
    assert!(closed);
    assert!(!h.upstream_saw().iter().any(|s| s.contains("smuggled")));
}

/// By default only WebSocket is passed on: another offer is dropped, and the request is
/// forwarded as a plain one on a connection that stays HTTP/1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_to_protocols_not_allowed_are_dropped() {
    let h = start(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let offer = |p: &str| {
        format!("GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: {p}\r\n\r\n")
    };
    assert_eq!(statuses(&roundtrip(&mut s, &offer("echo")).await), [200]);
    assert_eq!(statuses(&roundtrip(&mut s, &offer("TLS/1.2")).await), [200]);
    assert_eq!(
        h.upstream_saw(),
        ["GET /ws host=svc body=0", "GET /ws host=svc body=0"]
    );
    let (text, _) = h.raw(offer("WebSocket, echo").as_bytes(), Q).await;
    assert_eq!(statuses(&text), [101], "{text}");
    assert_eq!(h.upstream_saw()[2], "GET /ws host=svc upgrade=WebSocket");
}

/// The h2c smuggling attack: a request the rules allow offers h2c, the upstream switches, and
/// the HTTP/2 requests that follow on that connection would reach it with no rule looking.
/// The upstream here speaks h2c as Go's h2c handler does; the proxy drops the offer (and
/// `HTTP2-Settings`), so the answer comes in HTTP/1.1 and later requests are judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_never_passed_on() {
    let h = start(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(
        b"GET /public/h2c HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(Duration::from_secs(2), s.read_u8())
            .await
            .expect("an answer")
            .expect("an open connection");
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 101") {
        // What the attack does next, for the failure message: GET /private over HTTP/2.
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        let private = Request::get("http://svc/private")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), send.send_request(private)).await;
        panic!(
            "the h2c offer was passed on ({head:?}); GET /private over HTTP/2 then got {:?}; \
             the upstream saw {:?}",
            got.map(|r| r.map(|r| r.status())),
            h.upstream_saw()
        );
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    read_all(&mut s, Q).await;
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: svc\r\n\r\n");
    assert_eq!(statuses(&roundtrip(&mut s, &get("/private")).await), [403]);
    assert_eq!(
        statuses(&roundtrip(&mut s, &get("/public/next")).await),
        [200]
    );
    assert_eq!(
        h.upstream_saw(),
        [
            "GET /public/h2c host=svc body=0",
            "GET /public/next host=svc body=0"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue() {
    let h = start(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let (text, _) = read_all(&mut s, Q).await;
    assert_eq!(statuses(&text), [100], "{text}");
    s.write_all(b"hello").await.unwrap();
    let (text, _) = read_all(&mut s, Q).await;
    assert_eq!(statuses(&text), [200], "{text}");
    assert!(
        h.upstream_saw()
            .iter()
            .any(|l| l == "POST /upload host=svc body=5")
    );
    // Denied: the final answer comes at once, without 100 Continue, and no body is forwarded.
    let (text, _) = h
        .raw(b"POST /private HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n", Q)
        .await;
    assert_eq!(statuses(&text), [403], "{text}");
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, String) {
    let req = Request::get(format!("http://svc{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn h2_through(config: ProxyConfig) {
    let h = start(config).await;
    let mut sender = h2_client(h.proxy).await;
    let (st, body) = h2_get(&mut sender, "/public/h2").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, "upstream saw /public/h2\n");
    let (st, body) = h2_get(&mut sender, "/private").await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(body, "Access denied\r\n");
    let (st, _) = h2_get(&mut sender, "/public/../private").await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut s = sender.clone();
        tasks.push(tokio::spawn(async move {
            h2_get(&mut s, &format!("/public/{i}")).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert!(
        h.upstream_saw()
            .iter()
            .any(|l| l.starts_with("GET /public/h2 host=svc")),
        "{:?}",
        h.upstream_saw()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_h1_upstream() {
    h2_through(ProxyConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_h2_upstream() {
    h2_through(ProxyConfig {
        upstream_protocol: UpstreamProtocol::Http2,
        ..ProxyConfig::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_records_and_metrics() {
    let h = start(ProxyConfig::default()).await;
    let mut rx = h.flows.subscribe();
    let (text, _) = h
        .raw(b"GET /public/f HTTP/1.1\r\nHost: svc\r\n\r\nGET /private HTTP/1.1\r\nHost: svc\r\n\r\nGET /public/..%2fprivate HTTP/1.1\r\nHost: svc\r\n\r\n", Q)
        .await;
    assert_eq!(statuses(&text), [200, 403, 403]);
    let a = rx.recv().await.unwrap();
    let b = rx.recv().await.unwrap();
    let c = rx.recv().await.unwrap();
    // A path denied only as a lenient upstream reads it says so.
    assert_eq!(
        (c.path.as_str(), c.verdict, c.reason.as_deref()),
        (
            "/public/..%2Fprivate",
            "denied",
            Some("no HTTP rule allows the path as a lenient upstream reads it: /private")
        )
    );
    assert_eq!(b.reason, None);
    assert_eq!(
        (a.method.as_str(), a.path.as_str(), a.verdict, a.status),
        ("GET", "/public/f", "forwarded", 200)
    );
    assert_eq!(a.direction, "ingress");
    assert!(a.policy.contains("default/web"), "{}", a.policy);
    assert_eq!(a.src_identity, 2, "the client is world");
    assert!(a.dst_identity >= 256);
    assert_eq!(
        (b.path.as_str(), b.verdict, b.status),
        ("/private", "denied", 403)
    );
    let m = h.metrics.encode();
    assert!(m.contains("membrane_proxy_l7_requests_total{direction=\"ingress\",verdict=\"denied\",policy=\"\"} 2"), "{m}");
    assert!(
        m.contains("verdict=\"forwarded\",policy=\"CiliumNetworkPolicy default/web"),
        "{m}"
    );
    assert!(
        m.contains("membrane_proxy_l7_request_duration_seconds_count{direction=\"ingress\"} 3"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_the_connection_survives() {
    // An upstream port where nothing listens.
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let mut builder = membrane_l7_proxy::policy::SnapshotBuilder::new(Default::default());
    let snap = common::snapshot(&mut builder, POLICY, dead.port());
    let policy = std::sync::Arc::new(membrane_l7_proxy::policy::PolicyHandle::new(snap));
    let shared = std::sync::Arc::new(membrane_l7_proxy::service::Shared::new(
        ProxyConfig {
            connect_timeout: Duration::from_millis(500),
            ..ProxyConfig::default()
        },
        policy,
        Default::default(),
        Default::default(),
    ));
    let proxy = membrane_l7_proxy::server::Proxy::new(shared);
    let mode = membrane_l7_proxy::server::Mode::Reverse { upstream: dead };
    let l = membrane_l7_proxy::server::bind("127.0.0.1:0".parse().unwrap(), mode).unwrap();
    let addr = l.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move { proxy.serve(l, mode, rx, Duration::from_secs(1)).await });
    let mut s = TcpStream::connect(addr).await.unwrap();
    let text = roundtrip(&mut s, "GET /public/x HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    assert_eq!(statuses(&text), [502], "{text}");
    let text = roundtrip(&mut s, "GET /private HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    assert_eq!(statuses(&text), [403], "{text}");
}

/// gRPC's shape over `--upstream-http2`: a POST carrying `te: trailers` (gRPC servers refuse a
/// call without it), answered with a body and trailers (`grpc-status`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_shaped_calls_keep_te_trailers_and_get_their_trailers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let log: common::Log = Default::default();
    let saw = log.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let saw = saw.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let saw = saw.clone();
                async move {
                    let te = req.headers().get("te").cloned();
                    saw.lock().unwrap().push(format!(
                        "{} {} te={te:?}",
                        req.method(),
                        req.uri().path()
                    ));
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut trailers = http::HeaderMap::new();
                    let status = if te.is_some_and(|v| v == "trailers") {
                        "0"
                    } else {
                        "13"
                    };
                    trailers.insert("grpc-status", status.parse().unwrap());
                    let body = http_body_util::Full::new(body)
                        .with_trailers(async move { Some(Ok(trailers)) });
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    // HTTP/2 always, and HTTP/2 because the call came as HTTP/2 (the agent's transparent
    // mode): the latter first asks the upstream with the preface, then keeps that connection.
    for upstream_protocol in [UpstreamProtocol::Http2, UpstreamProtocol::Downstream] {
        let config = ProxyConfig {
            upstream_protocol,
            ..ProxyConfig::default()
        };
        let h = common::start_at(config, POLICY, upstream, log.clone()).await;
        let mut sender = h2_client::<http_body_util::Full<Bytes>>(h.proxy).await;
        let message = Bytes::from_static(b"\0\0\0\0\x02hi");
        for _ in 0..2 {
            let req = Request::post("http://svc/upload")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::Full::new(message.clone()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{upstream_protocol:?}");
            let got = resp.into_body().collect().await.unwrap();
            let status = got.trailers().and_then(|t| t.get("grpc-status")).cloned();
            assert_eq!(got.to_bytes(), message);
            assert_eq!(status.as_ref().map(|v| v.to_str().unwrap()), Some("0"));
        }
        assert_eq!(
            std::mem::take(&mut *log.lock().unwrap()),
            ["POST /upload te=Some(\"trailers\")"; 2],
            "{upstream_protocol:?}"
        );
    }
}

/// An upstream that takes the request and never answers: 504 once `upstream_timeout` passes,
/// on the direct path (bounded by the connection's own timer) and through hyper alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_504() {
    let silent = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let upstream = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    for http1_direct in [true, false] {
        let config = ProxyConfig {
            upstream_timeout: Duration::from_millis(400),
            http1_direct,
            ..ProxyConfig::default()
        };
        let h = common::start_at(config, POLICY, upstream, Default::default()).await;
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        let asked = std::time::Instant::now();
        s.write_all(b"GET /public/slow HTTP/1.1\r\nHost: svc\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
        let waited = asked.elapsed();
        let text = String::from_utf8_lossy(&got);
        assert_eq!(statuses(&text), [504], "direct={http1_direct}: {text}");
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
            "direct={http1_direct}: answered after {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_busy_ones_do_not() {
    let h = start(ProxyConfig {
        idle_timeout: Duration::from_millis(400),
        ..ProxyConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        statuses(&roundtrip(&mut s, "GET /public/a HTTP/1.1\r\nHost: svc\r\n\r\n").await),
        [200]
    );
    let (_, closed) = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "an idle keep-alive connection must be closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_connections() {
    let h = start(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        statuses(&roundtrip(&mut s, "GET /public/a HTTP/1.1\r\nHost: svc\r\n\r\n").await),
        [200]
    );
    // A request whose body is still arriving when shutdown starts completes.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nab")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.shutdown.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"cd").await.unwrap();
    let (text, closed) = read_all(&mut s, Duration::from_secs(2)).await;
    assert_eq!(statuses(&text), [200], "{text}");
    assert!(closed, "after draining, the connection closes");
    tokio::time::timeout(Duration::from_secs(3), h.served)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(h.proxy).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_403_body_is_the_configured_one_on_every_path() {
    for http1_direct in [true, false] {
        let h = start(ProxyConfig {
            deny_body: Bytes::from_static(b"blocked by membrane\n"),
            http1_direct,
            ..ProxyConfig::default()
        })
        .await;
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        let text = roundtrip(&mut s, "GET /private HTTP/1.1\r\nHost: svc\r\n\r\n").await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 403"), "{text}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "{text}"
        );
        assert_eq!(body, "blocked by membrane\n", "direct={http1_direct}");
        // The connection stays usable after a deny.
        let text = roundtrip(&mut s, "GET /public/a HTTP/1.1\r\nHost: svc\r\n\r\n").await;
        assert_eq!(statuses(&text), [200], "direct={http1_direct}: {text}");
        // HTTP/2 answers a denied stream with the same body.
        let mut sender = h2_client(h.proxy).await;
        let (st, body) = h2_get(&mut sender, "/private").await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(body, "blocked by membrane\n", "h2, direct={http1_direct}");
    }
}

/// The keepalive timer `ss` shows for the established sockets matching `filter`.
fn keepalive_timers(filter: &str) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("ss (iproute2) is needed by this test");
    assert!(out.status.success(), "ss {filter}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split_once("timer:(keepalive,")
                .and_then(|(_, t)| t.split(',').next())
                .unwrap_or("none")
                .to_string()
        })
        .collect()
}

/// `ss` prints a keepalive timer due in under a minute as `6.9sec` or `850ms`.
fn seconds(timer: &str) -> Option<f64> {
    if let Some(ms) = timer.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    timer.strip_suffix("sec")?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_is_set_on_both_sides() {
    for http1_direct in [true, false] {
        let h = start(ProxyConfig {
            tcp_keepalive: Duration::from_secs(7),
            http1_direct,
            ..ProxyConfig::default()
        })
        .await;
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        let text = roundtrip(&mut s, "GET /public/a HTTP/1.1\r\nHost: svc\r\n\r\n").await;
        assert_eq!(statuses(&text), [200]);
        // The proxy's accepted socket and its (pooled) socket to the upstream; the kernel's
        // default would be due in two hours.
        let down = format!("( sport = :{} )", h.proxy.port());
        let up = format!("( dport = :{} )", h.upstream.port());
        for (side, filter) in [("client side", down), ("upstream side", up)] {
            let timers = keepalive_timers(&filter);
            assert!(
                !timers.is_empty(),
                "direct={http1_direct}: no {side} socket"
            );
            for t in timers {
                assert!(
                    seconds(&t).is_some_and(|v| v > 0.0 && v <= 7.0),
                    "direct={http1_direct}: {side} keepalive timer {t}, want at most 7 s"
                );
            }
        }
    }
}
