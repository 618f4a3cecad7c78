//! Hostile requests against the real proxy (loopback, a real hyper upstream that records what
//! reaches it). Each case states what the client must get back, whether the connection must
//! close, and what the upstream may and may not have seen.

mod common;

use std::time::Duration;

use common::{start, statuses};
use membrane_l7_proxy::service::ProxyConfig;

struct Case {
    name: &'static str,
    send: &'static [u8],
    /// Status codes, in order.
    want: &'static [u16],
    /// The proxy must close the connection afterwards (`Some(false)`: must keep it open).
    closes: Option<bool>,
    /// Requests the upstream must have received (`METHOD TARGET` prefixes), in order.
    upstream: &'static [&'static str],
}

macro_rules! req {
    ($($part:expr),* $(,)?) => { concat!($($part),*).as_bytes() };
}

const CASES: &[Case] = &[
    // --- smuggling: framing disagreements ---
    Case {
        name: "CL then TE",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE then CL",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "duplicate differing CL",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "CL list with differing values",
        send: req!("POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 3, 4\r\n\r\nabcd"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "CL with sign",
        send: req!("POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: +4\r\n\r\nabcd"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "negative CL",
        send: req!("POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: -1\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "CL overflow",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 99999999999999999999999\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "CL hex",
        send: req!("POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 0x4\r\n\r\nabcd"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE chunked then identity",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
        ),
        want: &[501],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE identity",
        send: req!("POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: identity\r\n\r\n"),
        want: &[501],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE xchunked",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
        ),
        want: &[501],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE twice",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE in HTTP/1.0",
        send: req!(
            "POST /upload HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "TE with line folding",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    // --- malformed heads ---
    Case {
        name: "obsolete line folding",
        send: req!("GET /public HTTP/1.1\r\nHost: svc\r\nX-A: a\r\n b\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "bare LF line ends",
        send: req!("GET /public HTTP/1.1\nHost: svc\n\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "bare LF in one header line",
        send: req!("GET /public HTTP/1.1\r\nHost: svc\nX-A: 1\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "bare CR in a header",
        send: req!("GET /public HTTP/1.1\r\nHost: svc\rX-A: 1\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "NUL in a header value",
        send: b"GET /public HTTP/1.1\r\nHost: svc\r\nX-A: a\x00b\r\n\r\n",
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "DEL in a header value",
        send: b"GET /public HTTP/1.1\r\nHost: svc\r\nX-A: a\x7fb\r\n\r\n",
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "space before colon",
        send: req!("GET /public HTTP/1.1\r\nHost : svc\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "invalid header name",
        send: req!("GET /public HTTP/1.1\r\nHost: svc\r\nX(A): 1\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "no Host in HTTP/1.1",
        send: req!("GET /public HTTP/1.1\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "two Host fields",
        send: req!("GET /public HTTP/1.1\r\nHost: svc\r\nHost: evil\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "space inside the target",
        send: req!("GET /public /x HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "unknown HTTP version",
        send: req!("GET /public HTTP/1.7\r\nHost: svc\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "garbage request line",
        send: req!("\x16\x03\x01 hello\r\n\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "malformed percent-encoding",
        send: req!("GET /public/%zz HTTP/1.1\r\n", "Host: svc\r\n", "\r\n"),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    // --- paths: matching happens on what is forwarded ---
    Case {
        name: "dot-dot escape",
        send: req!(
            "GET /public/../private HTTP/1.1\r\n",
            "Host: svc\r\n",
            "\r\n"
        ),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "encoded dot-dot",
        send: req!("GET /public/%2e%2e/private HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "upper-case encoded dot-dot",
        send: req!("GET /public/%2E%2E/private HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "mixed dot segments",
        send: req!("GET /public/./x/../../private HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "dot segments that stay inside",
        send: req!("GET /public/./a/../b HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /public/b host=svc"],
    },
    Case {
        name: "duplicate slashes",
        send: req!("GET //public//x HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /public/x host=svc"],
    },
    Case {
        name: "encoded unreserved letters",
        send: req!("GET /%70ublic/%7Ex HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /public/~x host=svc"],
    },
    // Escaped slashes stay encoded in what is forwarded, but a request must also be allowed as
    // an upstream that decodes them (nginx does), takes backslashes for slashes or cuts
    // `;parameters` from segments (Tomcat) would read it.
    Case {
        name: "encoded slash inside a segment stays encoded",
        send: req!("GET /public/a%2fb HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /public/a%2Fb host=svc"],
    },
    Case {
        name: "encoded slashes around dot-dot",
        send: req!("GET /public%2F..%2Fprivate HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "dot-dot then encoded slash",
        send: req!("GET /public/..%2fprivate HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "encoded dot-dot and encoded slash",
        send: req!("GET /public/%2e%2e%2fprivate HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "dot-dot then encoded backslash",
        send: req!("GET /public/..%5Cprivate HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "backslash dot-dot",
        send: req!("GET /public\\..\\private HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "dot-dot with a segment parameter",
        send: req!("GET /public/..;x=1/private HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "segment parameter on an allowed path",
        send: req!("GET /public/x;v=1 HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /public/x;v=1 host=svc"],
    },
    Case {
        name: "absolute-form names a denied path",
        send: req!("GET http://svc/private HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "absolute-form authority wins over Host",
        send: req!("GET http://real/public HTTP/1.1\r\nHost: decoy\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /public host=real"],
    },
    Case {
        name: "lower-case method",
        send: req!("get /public HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "header rule without the header",
        send: req!("GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "header rule with a wrong value",
        send: req!("GET /admin HTTP/1.1\r\nHost: svc\r\nX-Token: guess\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "header rule satisfied",
        send: req!("GET /admin HTTP/1.1\r\nHost: svc\r\nX-Token: s3cret\r\n\r\n"),
        want: &[200],
        closes: Some(false),
        upstream: &["GET /admin host=svc"],
    },
    // A repeated header is judged by its values joined with ',' (as Envoy and Cilium judge it):
    // no copy of a security header passes on its own.
    Case {
        name: "header rule with a second, wrong copy",
        send: req!("GET /admin HTTP/1.1\r\nHost: svc\r\nX-Token: s3cret\r\nX-Token: guess\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    Case {
        name: "header rule with a wrong copy first",
        send: req!("GET /admin HTTP/1.1\r\nHost: svc\r\nX-Token: guess\r\nX-Token: s3cret\r\n\r\n"),
        want: &[403],
        closes: Some(false),
        upstream: &[],
    },
    // --- pipelining and bodies ---
    Case {
        name: "pipelined allow, deny, allow answered in order",
        send: req!(
            "GET /public/1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /private HTTP/1.1\r\nHost: svc\r\n\r\nGET /public/3 HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[200, 403, 200],
        closes: Some(false),
        upstream: &["GET /public/1", "GET /public/3"],
    },
    Case {
        name: "request hidden in a zero-length body",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\nGET /private HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[200, 403],
        closes: Some(false),
        upstream: &["POST /upload host=svc body=0"],
    },
    Case {
        name: "body longer than its length is the next request",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nabGET /private HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[200, 403],
        closes: Some(false),
        upstream: &["POST /upload host=svc body=2"],
    },
    Case {
        name: "Connection naming Content-Length cannot turn a body into a request",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 36\r\nConnection: Content-Length, Host\r\n\r\nGET /private HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[200],
        closes: Some(false),
        upstream: &["POST /upload host=svc body=36"],
    },
    Case {
        name: "denied POST with a body keeps the connection usable",
        send: req!(
            "POST /private HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhelloGET /public/next HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[403, 200],
        closes: Some(false),
        upstream: &["GET /public/next"],
    },
    Case {
        name: "chunked body with extensions and trailers",
        send: req!(
            "POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: Chunked\r\n\r\n5;name=v\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"
        ),
        want: &[200],
        closes: Some(false),
        upstream: &["POST /upload host=svc body=5"],
    },
    Case {
        name: "request after a refused one is never read",
        send: req!(
            "GET /public HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /public/smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[400],
        closes: Some(true),
        upstream: &[],
    },
    Case {
        name: "refusal after good pipelined requests comes last",
        send: req!(
            "GET /public/a HTTP/1.1\r\nHost: svc\r\n\r\nGET /public/b HTTP/1.1\nHost: svc\n\n"
        ),
        want: &[200, 400],
        closes: Some(true),
        upstream: &["GET /public/a"],
    },
    Case {
        name: "HTTP/1.0 without Host is fine",
        send: req!("GET /public/old HTTP/1.0\r\n\r\n"),
        want: &[200],
        closes: Some(true),
        upstream: &["GET /public/old"],
    },
    // --- h2c smuggling: HTTP/2 behind an upgrade would pass unjudged ---
    Case {
        name: "an h2c offer is dropped and the connection stays judged HTTP/1",
        send: req!(
            "GET /public/h2c HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            "GET /private HTTP/1.1\r\nHost: svc\r\n\r\n"
        ),
        want: &[200, 403],
        closes: Some(false),
        upstream: &["GET /public/h2c host=svc body=0"],
    },
    Case {
        name: "framing is still checked after an h2c offer",
        send: req!(
            "GET /public/h2c HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        want: &[200, 400],
        closes: Some(true),
        upstream: &["GET /public/h2c host=svc body=0"],
    },
    Case {
        name: "h2c offered beside websocket: only websocket is passed on",
        send: req!(
            "GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n"
        ),
        want: &[101],
        closes: None,
        upstream: &["GET /ws host=svc upgrade=websocket"],
    },
    Case {
        name: "CONNECT is refused",
        send: req!("CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n"),
        want: &[403],
        closes: None,
        upstream: &[],
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests() {
    hostile_requests_through(ProxyConfig::default()).await;
}

/// The same corpus with every HTTP/1 request served by hyper (`--hyper-only`): both paths
/// must refuse alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_hyper_only() {
    hostile_requests_through(ProxyConfig {
        http1_direct: false,
        ..ProxyConfig::default()
    })
    .await;
}

async fn hostile_requests_through(config: ProxyConfig) {
    assert!(CASES.len() >= 40, "the suite promises at least 40 cases");
    let h = start(config).await;
    let mut failures = Vec::new();
    for case in CASES {
        let before = h.upstream_saw().len();
        let (text, closed) = h.raw(case.send, Duration::from_millis(400)).await;
        let got = statuses(&text);
        let saw: Vec<String> = h.upstream_saw()[before..].to_vec();
        let mut problems = Vec::new();
        if got != case.want {
            problems.push(format!("statuses {got:?}, want {:?}", case.want));
        }
        if let Some(c) = case.closes
            && c != closed
        {
            problems.push(format!("closed={closed}, want {c}"));
        }
        if saw.len() != case.upstream.len()
            || !saw.iter().zip(case.upstream).all(|(s, w)| s.starts_with(w))
        {
            problems.push(format!("upstream saw {saw:?}, want {:?}", case.upstream));
        }
        if case.want.contains(&403) && !text.contains("Access denied\r\n") {
            problems.push("403 without the deny body".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n---\n{text}---",
                case.name,
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_framing_errors_never_complete_a_request() {
    let h = start(ProxyConfig::default()).await;
    for body in [
        &b"5\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"5 ;x\r\nhello\r\n0\r\n\r\n",
        b"10000000000000000\r\nhello\r\n",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        b"0\r\nX: a\nb\r\n\r\n",
    ] {
        let mut req =
            b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        req.extend_from_slice(b"GET /public/after HTTP/1.1\r\nHost: svc\r\n\r\n");
        let before = h.upstream_saw().len();
        let (text, closed) = h.raw(&req, Duration::from_millis(400)).await;
        assert!(
            closed,
            "{:?}: connection left open: {text}",
            String::from_utf8_lossy(body)
        );
        assert!(
            !statuses(&text).contains(&200),
            "{:?}: {text}",
            String::from_utf8_lossy(body)
        );
        let saw = &h.upstream_saw()[before..];
        assert!(
            saw.iter()
                .all(|s| s.ends_with("body=aborted") || !s.contains("after")),
            "{:?}: upstream saw {saw:?}",
            String::from_utf8_lossy(body)
        );
        assert!(!saw.iter().any(|s| s.contains("/public/after")), "{saw:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_414_and_431() {
    let h = start(ProxyConfig::default()).await;
    let long_uri = format!(
        "GET /public/{} HTTP/1.1\r\nHost: svc\r\n\r\n",
        "a".repeat(9000)
    );
    let (t, closed) = h.raw(long_uri.as_bytes(), Duration::from_millis(400)).await;
    assert_eq!(statuses(&t), [414]);
    assert!(closed);
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let (t, _) = h
        .raw(
            format!("GET /public HTTP/1.1\r\nHost: svc\r\n{many}\r\n").as_bytes(),
            Duration::from_millis(400),
        )
        .await;
    assert_eq!(statuses(&t), [431]);
    let big = format!(
        "GET /public HTTP/1.1\r\nHost: svc\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let (t, _) = h.raw(big.as_bytes(), Duration::from_millis(400)).await;
    assert_eq!(statuses(&t), [431]);
    assert!(h.upstream_saw().is_empty(), "{:?}", h.upstream_saw());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_time_out() {
    let config = ProxyConfig {
        header_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let h = start(config).await;
    let started = std::time::Instant::now();
    let (_, closed) = h
        .raw(b"GET /public HTTP/1.1\r\nHost: s", Duration::from_secs(3))
        .await;
    assert!(
        closed,
        "a head that never completes must not hold the connection"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
