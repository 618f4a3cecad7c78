//! The direct HTTP/1.1 path against an upstream that answers byte for byte as scripted: every
//! response framing passes through intact, upstream connections are reused only when the
//! framing allows it, a response membrane cannot frame safely becomes a 502, and requests the
//! direct path hands to hyper keep their place on a pipelined connection.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Harness, Log, POLICY, h2_client, read_all, start, start_at, statuses};
use membrane_l7_proxy::service::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The scripted answer to a request for `target` (`HEAD` gets the head of the default answer).
fn script(method: &str, target: &str) -> (Vec<u8>, bool) {
    // Answers that end exactly where one of the proxy's reads fills its buffer, with a forged
    // answer behind them in the same write: those bytes are still in the kernel after that
    // read. `exact` fills the first 8 KiB read of the answer; `spanning` also fills the 16 KiB
    // read of the body that follows it (the direct path's body loop, and the decoded body an
    // HTTP/2 stream reads).
    let exact_size = match target {
        "/public/exact-then-forged" => Some(8192),
        "/public/spanning-exact-then-forged" => Some(8192 + 16384),
        _ => None,
    };
    if let Some(size) = exact_size {
        let head = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
        let n = size - head(size).len();
        let mut out = head(n).into_bytes();
        out.resize(size, b'x');
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged");
        return (out, false);
    }
    let canned: &[u8] = match target {
        "/public/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        "/public/until-close" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        "/public/interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim",
        "/public/bye" => b"HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nX-Private: 1\r\nContent-Length: 3\r\n\r\nbye",
        "/public/extra" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextraHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
        "/public/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/public/smuggle" => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "/public/bare-lf" => b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        "/public/bad-chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "/public/silent" => b"",
        // Look reusable, then close (after an unsolicited 408 for the second); answer the next
        // request with a 408 and close (a timeout crossing that request); send a forged answer
        // unasked and go on serving.
        "/public/then-close"
        | "/public/then-408"
        | "/public/then-408-crossing"
        | "/public/then-forged" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        _ => {
            let body = format!("saw {target}");
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let mut out = head.into_bytes();
            if method != "HEAD" {
                out.extend_from_slice(body.as_bytes());
            }
            return (out, false);
        }
    };
    let closes = matches!(
        target,
        "/public/until-close"
            | "/public/bye"
            | "/public/extra"
            | "/public/silent"
            | "/public/then-close"
            | "/public/then-408"
    );
    (canned.to_vec(), closes)
}

/// An upstream that logs `connN METHOD TARGET body=LEN` and answers as scripted.
async fn scripted_upstream() -> (SocketAddr, Log) {
    let (addr, log, _) = scripted_upstream_counting().await;
    (addr, log)
}

/// The same, with a count of the connections open now.
async fn scripted_upstream_counting() -> (SocketAddr, Log, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let open = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (l, o) = (log.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let n = conns.fetch_add(1, Ordering::Relaxed);
            let (l, o) = (l.clone(), o.clone());
            o.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                serve_scripted(s, n, l).await;
                o.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    (addr, log, open)
}

async fn serve_scripted(mut s: TcpStream, conn: usize, log: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut timed_out = false;
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut words = head.split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + 4 + length {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let hop = if head.to_ascii_lowercase().contains("\r\nx-hop:") {
            " x-hop"
        } else {
            ""
        };
        log.lock()
            .unwrap()
            .push(format!("conn{conn} {method} {target} body={length}{hop}"));
        buf.drain(..end + 4 + length);
        if timed_out {
            let _ = s
                .write_all(
                    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nX-Stale: 1\r\n\r\n",
                )
                .await;
            return;
        }
        timed_out = target == "/public/then-408-crossing";
        let (answer, closes) = script(method, target);
        if s.write_all(&answer).await.is_err() || closes {
            if target == "/public/then-408" {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = s
                    .write_all(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
            return;
        }
        if target == "/public/then-forged" {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged";
            if s.write_all(forged).await.is_err() {
                return;
            }
        }
    }
}

/// Sends one request on an open connection and reads until `quiet` passes.
async fn exchange(s: &mut TcpStream, req: &str) -> (String, bool) {
    s.write_all(req.as_bytes()).await.unwrap();
    read_all(s, Duration::from_millis(300)).await
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n")
}

/// The proxy in front of the scripted upstream, with HEAD allowed on /public too.
async fn start_scripted_with_head() -> Harness {
    let (upstream, log) = scripted_upstream().await;
    let policy = POLICY.replace(
        r#"- {method: POST, path: "/upload"}"#,
        r#"- {method: POST, path: "/upload"}
        - {method: HEAD, path: "/public.*"}"#,
    );
    start_at(ProxyConfig::default(), &policy, upstream, log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_pass_through_as_framed_and_upstreams_are_reused_when_they_can_be() {
    let h = start_scripted_with_head().await;
    let mut c = TcpStream::connect(h.proxy).await.unwrap();

    let (t, closed) = exchange(&mut c, &get("/public/a")).await;
    assert!(
        t.starts_with("HTTP/1.1 200 OK\r\n") && t.ends_with("\r\n\r\nsaw /public/a"),
        "{t}"
    );
    assert!(!closed);
    let (t, _) = exchange(
        &mut c,
        "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\nhello",
    )
    .await;
    assert!(t.ends_with("saw /upload"), "{t}");
    let (t, _) = exchange(&mut c, &get("/public/chunked")).await;
    assert!(
        t.contains("transfer-encoding: chunked\r\n")
            || t.contains("Transfer-Encoding: chunked\r\n"),
        "{t}"
    );
    assert!(
        t.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
        "{t}"
    );
    let (t, _) = exchange(&mut c, &get("/public/interim")).await;
    assert_eq!(statuses(&t), [200], "interim responses stay behind: {t}");
    assert!(t.ends_with("\r\n\r\ninterim"), "{t}");
    let (t, _) = exchange(&mut c, &get("/public/no-content")).await;
    assert_eq!(statuses(&t), [204], "{t}");
    let (t, _) = exchange(&mut c, "HEAD /public/h HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    assert!(
        t.contains("Content-Length: 13\r\n") && t.ends_with("\r\n\r\n"),
        "{t}"
    );
    let (t, closed) = exchange(&mut c, &get("/public/bye")).await;
    assert!(t.ends_with("\r\n\r\nbye"), "{t}");
    assert!(
        !t.contains("X-Private") && !t.contains("Connection: close"),
        "{t}"
    );
    assert!(!closed, "the upstream's Connection: close is its own hop");
    let (t, closed) = exchange(&mut c, &get("/public/extra")).await;
    assert!(t.ends_with("\r\n\r\nextra") && !t.contains("forged"), "{t}");
    assert!(!closed);
    let (t, _) = exchange(&mut c, &get("/public/b")).await;
    assert!(t.ends_with("saw /public/b"), "{t}");
    let (t, closed) = exchange(&mut c, &get("/public/until-close")).await;
    assert!(
        t.contains("connection: close\r\n") && t.ends_with("\r\n\r\nuntil the end"),
        "{t}"
    );
    assert!(
        closed,
        "a body that ends with the upstream's close ends the client's connection"
    );

    let saw = h.upstream_saw();
    assert_eq!(
        saw,
        [
            "conn0 GET /public/a body=0",
            "conn0 POST /upload body=5",
            "conn0 GET /public/chunked body=0",
            "conn0 GET /public/interim body=0",
            "conn0 GET /public/no-content body=0",
            "conn0 HEAD /public/h body=0",
            "conn0 GET /public/bye body=0",
            "conn1 GET /public/extra body=0",
            "conn2 GET /public/b body=0",
            "conn2 GET /public/until-close body=0",
        ],
        "one upstream connection until one closes or sends more than its response; \
         Connection-named fields are not forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_that_cannot_be_framed_safely_are_502() {
    let (upstream, log) = scripted_upstream().await;
    let h = start_at(ProxyConfig::default(), POLICY, upstream, log).await;
    for path in ["/public/smuggle", "/public/bare-lf", "/public/silent"] {
        let mut c = TcpStream::connect(h.proxy).await.unwrap();
        let (t, _) = exchange(&mut c, &get(path)).await;
        assert_eq!(statuses(&t), [502], "{path}: {t}");
        // The client connection is still good.
        let (t, _) = exchange(&mut c, &get("/public/after")).await;
        assert_eq!(statuses(&t), [200], "{path}: {t}");
    }
    // A chunked body that breaks its framing midway: the client sees the connection end
    // without a complete response, never a forged one.
    let mut c = TcpStream::connect(h.proxy).await.unwrap();
    let (t, closed) = exchange(&mut c, &get("/public/bad-chunk")).await;
    assert!(closed, "{t}");
    assert!(!t.contains("hello"), "{t}");
}

/// What an HTTP/2 client got: status, fields, the body or the error that ended it, trailers.
type H2Answer = (
    u16,
    http::HeaderMap,
    Result<Vec<u8>, String>,
    Option<http::HeaderMap>,
);

async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    method: &str,
    path: &str,
) -> H2Answer {
    use http_body_util::BodyExt;
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://svc{path}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    // A stream reset right after its head may come out as either error.
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(e) => return (0, http::HeaderMap::new(), Err(e.to_string()), None),
    };
    let (parts, body) = resp.into_parts();
    let (body, trailers) = match body.collect().await {
        Ok(b) => {
            let trailers = b.trailers().cloned();
            (Ok(b.to_bytes().to_vec()), trailers)
        }
        Err(e) => (Err(e.to_string()), None),
    };
    (parts.status.as_u16(), parts.headers, body, trailers)
}

/// Bodyless HTTP/2 requests (and HTTP/1.0 ones, which hyper serves) go upstream on the direct
/// path's sockets: every response framing reaches the client as a plain payload, hop-by-hop
/// and framing fields stay behind, connections are reused exactly when the framing allows, and
/// a response that cannot be framed safely is a 502 (or, past its head, a broken stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_requests_hyper_serves_are_decoded_from_the_direct_sockets() {
    let h = start_scripted_with_head().await;
    let mut s = h2_client(h.proxy).await;
    let ok = |a: &H2Answer, body: &[u8]| {
        assert_eq!((a.0, a.2.as_deref()), (200, Ok(body)), "{a:?}");
        for f in ["transfer-encoding", "connection", "x-private", "keep-alive"] {
            assert!(!a.1.contains_key(f), "{f} reached the client: {a:?}");
        }
    };
    let a = h2_send(&mut s, "GET", "/public/a").await;
    ok(&a, b"saw /public/a");
    assert!(a.3.is_none(), "{a:?}");
    let a = h2_send(&mut s, "GET", "/public/chunked").await;
    ok(&a, b"hello world");
    let trailers =
        a.3.expect("the chunked body's trailer reaches an HTTP/2 client");
    assert_eq!(trailers.get("x-trailer").unwrap(), "t");
    ok(&h2_send(&mut s, "GET", "/public/interim").await, b"interim");
    let a = h2_send(&mut s, "GET", "/public/no-content").await;
    assert_eq!((a.0, a.2.as_deref()), (204, Ok(&b""[..])), "{a:?}");
    let a = h2_send(&mut s, "HEAD", "/public/h").await;
    assert_eq!((a.0, a.2.as_deref()), (200, Ok(&b""[..])), "{a:?}");
    assert_eq!(a.1.get("content-length").unwrap(), "13");
    ok(&h2_send(&mut s, "GET", "/public/bye").await, b"bye");
    ok(&h2_send(&mut s, "GET", "/public/extra").await, b"extra");
    ok(&h2_send(&mut s, "GET", "/public/b").await, b"saw /public/b");
    ok(
        &h2_send(&mut s, "GET", "/public/until-close").await,
        b"until the end",
    );
    for path in ["/public/smuggle", "/public/bare-lf", "/public/silent"] {
        let a = h2_send(&mut s, "GET", path).await;
        assert_eq!(a.0, 502, "{path}: {a:?}");
    }
    let a = h2_send(&mut s, "GET", "/public/bad-chunk").await;
    assert!(
        a.2.is_err(),
        "a broken chunked body must not end cleanly: {a:?}"
    );
    ok(&h2_send(&mut s, "GET", "/public/c").await, b"saw /public/c");

    // HTTP/1.0: hyper frames the decoded payload for its client and closes.
    let mut c = TcpStream::connect(h.proxy).await.unwrap();
    let (t, closed) = exchange(&mut c, "GET /public/chunked HTTP/1.0\r\nHost: svc\r\n\r\n").await;
    assert!(
        t.starts_with("HTTP/1.0 200 OK\r\n") && t.ends_with("\r\n\r\nhello world"),
        "{t}"
    );
    assert!(closed, "{t}");
    assert!(!t.to_ascii_lowercase().contains("transfer-encoding"), "{t}");

    // A pooled connection that answers 408 to a request it timed out on leaves none of that
    // answer's fields behind when the request goes again.
    ok(
        &h2_send(&mut s, "GET", "/public/then-408-crossing").await,
        b"ok",
    );
    let a = h2_send(&mut s, "GET", "/public/after-408").await;
    ok(&a, b"saw /public/after-408");
    assert_eq!(a.1.get_all("content-length").iter().count(), 1, "{a:?}");
    assert!(!a.1.contains_key("x-stale"), "{a:?}");
    // An answer the upstream sent unasked while its connection sat in the pool is nobody's.
    ok(&h2_send(&mut s, "GET", "/public/then-forged").await, b"ok");
    tokio::time::sleep(Duration::from_millis(80)).await;
    ok(
        &h2_send(&mut s, "GET", "/public/after-forged").await,
        b"saw /public/after-forged",
    );
    // Answers ending exactly where a read fills its buffer (body length = size - head length).
    for (path, body_len, after) in [
        (
            "/public/exact-then-forged",
            8192 - 41,
            "/public/after-exact",
        ),
        (
            "/public/spanning-exact-then-forged",
            8192 + 16384 - 42,
            "/public/after-spanning",
        ),
    ] {
        let a = h2_send(&mut s, "GET", path).await;
        assert_eq!(
            (a.0, a.2.as_ref().map(Vec::len)),
            (200, Ok(body_len)),
            "{a:?}"
        );
        let want = format!("saw {after}");
        ok(&h2_send(&mut s, "GET", after).await, want.as_bytes());
    }

    assert_eq!(
        h.upstream_saw(),
        [
            "conn0 GET /public/a body=0",
            "conn0 GET /public/chunked body=0",
            "conn0 GET /public/interim body=0",
            "conn0 GET /public/no-content body=0",
            "conn0 HEAD /public/h body=0",
            "conn0 GET /public/bye body=0",
            "conn1 GET /public/extra body=0",
            "conn2 GET /public/b body=0",
            "conn2 GET /public/until-close body=0",
            "conn3 GET /public/smuggle body=0",
            "conn4 GET /public/bare-lf body=0",
            "conn5 GET /public/silent body=0",
            "conn6 GET /public/bad-chunk body=0",
            "conn7 GET /public/c body=0",
            "conn7 GET /public/chunked body=0",
            "conn7 GET /public/then-408-crossing body=0",
            "conn7 GET /public/after-408 body=0",
            "conn8 GET /public/after-408 body=0",
            "conn8 GET /public/then-forged body=0",
            "conn9 GET /public/after-forged body=0",
            "conn9 GET /public/exact-then-forged body=0",
            "conn10 GET /public/after-exact body=0",
            "conn10 GET /public/spanning-exact-then-forged body=0",
            "conn11 GET /public/after-spanning body=0",
        ],
        "one upstream connection until one closes, sends more than its response, or fails"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_handed_to_hyper_keep_their_place_in_the_pipeline() {
    let h = start(ProxyConfig::default()).await;
    // direct, hyper (chunked body), direct, denied on the direct path, hyper (Expect), direct.
    let (t, closed) = h
        .raw(
            b"GET /public/1 HTTP/1.1\r\nHost: svc\r\n\r\n\
              POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
              GET /public/2 HTTP/1.1\r\nHost: svc\r\n\r\n\
              GET /private HTTP/1.1\r\nHost: svc\r\n\r\n\
              GET /public/3 HTTP/1.1\r\nHost: svc\r\n\r\n",
            Duration::from_millis(400),
        )
        .await;
    assert_eq!(statuses(&t), [200, 200, 200, 403, 200], "{t}");
    assert!(!closed);
    let order: Vec<usize> = [
        "saw /public/1",
        "saw /upload",
        "saw /public/2",
        "Access denied",
        "saw /public/3",
    ]
    .iter()
    .map(|m| t.find(m).unwrap_or_else(|| panic!("{m} missing: {t}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order: {t}");
    assert_eq!(
        h.upstream_saw(),
        [
            "GET /public/1 host=svc body=0",
            "POST /upload host=svc body=3",
            "GET /public/2 host=svc body=0",
            "GET /public/3 host=svc body=0",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_with_a_body_leaves_the_connection_in_step() {
    let h = start(ProxyConfig::default()).await;
    let (t, closed) = h
        .raw(
            b"POST /private HTTP/1.1\r\nHost: svc\r\nContent-Length: 29\r\n\r\n\
              GET /public/hidden HTTP/1.1\r\n\
              GET /public/next HTTP/1.1\r\nHost: svc\r\n\r\n\
              HEAD /private HTTP/1.1\r\nHost: svc\r\n\r\n",
            Duration::from_millis(400),
        )
        .await;
    assert_eq!(statuses(&t), [403, 200, 403], "{t}");
    assert!(!closed);
    // The answer to HEAD has the deny body's length and no body.
    assert!(t.ends_with("\r\n\r\n"), "{t}");
    assert_eq!(h.upstream_saw(), ["GET /public/next host=svc body=0"]);
}

/// HTTP/2 requests go upstream on the direct path's sockets when they have no body, through
/// hyper's HTTP/1.1 pool when they have one. With more requests in flight than the idle cap (64),
/// either pool must keep one connection per request in flight rather than open and close one
/// for every request past the cap, and close the surplus once the burst is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_with_more_requests_in_flight_than_the_idle_cap() {
    burst_reuses_upstream_connections(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_of_requests_with_bodies_are_reused_the_same_way() {
    burst_reuses_upstream_connections(true).await;
}

async fn burst_reuses_upstream_connections(with_body: bool) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    let (upstream, log, open) = scripted_upstream_counting().await;
    let h = start_at(ProxyConfig::default(), POLICY, upstream, log).await;
    let sender = h2_client(h.proxy).await;
    const IN_FLIGHT: usize = 100;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..IN_FLIGHT {
            let mut s = sender.clone();
            tasks.push(tokio::spawn(async move {
                let req = if with_body {
                    http::Request::post("http://svc/upload").body(Full::new(Bytes::from("x")))
                } else {
                    http::Request::get(format!("http://svc/public/{round}/{i}"))
                        .body(Full::new(Bytes::new()))
                }
                .unwrap();
                let resp = s.send_request(req).await.unwrap();
                let status = resp.status();
                resp.into_body().collect().await.unwrap();
                status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), http::StatusCode::OK);
        }
    }
    let saw = h.upstream_saw();
    assert_eq!(saw.len(), 3 * IN_FLIGHT);
    let conns: std::collections::HashSet<&str> =
        saw.iter().filter_map(|l| l.split(' ').next()).collect();
    assert!(
        conns.len() <= IN_FLIGHT,
        "{} upstream connections for {IN_FLIGHT} requests in flight",
        conns.len()
    );
    // Nothing comes after the burst: the pool's own sweep (every second, for connections unused
    // for a second) brings it back to the cap.
    let mut left = open.load(Ordering::Relaxed);
    for _ in 0..50 {
        if left <= 64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = open.load(Ordering::Relaxed);
    }
    assert!(
        left <= 64,
        "{left} idle upstream connections 5 s after the burst"
    );
}

/// A pooled connection the upstream closed, timed out with a 408, or sent an answer nobody asked
/// for while it sat idle carries no further request. One the upstream times out just as a
/// request crosses it (its 408 answers that request) makes an idempotent request go again on a
/// new connection; any other request is sent only on a connection the kernel has nothing on.
/// The client never sees the stale connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pooled_connections_never_reach_the_client() {
    let (upstream, log) = scripted_upstream().await;
    let h = start_at(ProxyConfig::default(), POLICY, upstream, log).await;
    let mut c = TcpStream::connect(h.proxy).await.unwrap();
    for (first, then) in [
        ("/public/then-close", get("/public/retried")),
        (
            "/public/then-close",
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi".to_string(),
        ),
        ("/public/then-408", get("/public/after-408")),
        ("/public/then-408-crossing", get("/public/after-crossing")),
        ("/public/then-forged", get("/public/after-forged")),
        ("/public/exact-then-forged", get("/public/after-exact")),
        (
            "/public/spanning-exact-then-forged",
            get("/public/after-spanning"),
        ),
    ] {
        let (t, _) = exchange(&mut c, &get(first)).await;
        assert_eq!(statuses(&t), [200], "{first}: {t}");
        assert!(!t.contains("forged"), "{first}: {t}");
        // The upstream's FIN (and 408) arrive while the connection sits in the pool.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (t, closed) = exchange(&mut c, &then).await;
        assert_eq!(statuses(&t), [200], "after {first}: {t}");
        assert!(t.contains("saw /"), "after {first}: {t}");
        assert!(!closed);
    }
    assert_eq!(
        h.upstream_saw(),
        [
            "conn0 GET /public/then-close body=0",
            "conn1 GET /public/retried body=0",
            "conn1 GET /public/then-close body=0",
            "conn2 POST /upload body=2",
            "conn2 GET /public/then-408 body=0",
            "conn3 GET /public/after-408 body=0",
            "conn3 GET /public/then-408-crossing body=0",
            "conn3 GET /public/after-crossing body=0",
            "conn4 GET /public/after-crossing body=0",
            "conn4 GET /public/then-forged body=0",
            "conn5 GET /public/after-forged body=0",
            "conn5 GET /public/exact-then-forged body=0",
            "conn6 GET /public/after-exact body=0",
            "conn6 GET /public/spanning-exact-then-forged body=0",
            "conn7 GET /public/after-spanning body=0",
        ]
    );
}
