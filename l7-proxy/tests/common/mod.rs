//! A real proxy on loopback in front of a recording upstream (hyper), and a raw-socket client.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use membrane_l7_proxy::policy::{PolicyHandle, Snapshot, SnapshotBuilder};
use membrane_l7_proxy::server::{Mode, Proxy};
use membrane_l7_proxy::service::{ProxyConfig, Shared, UpstreamProtocol};
use membrane_l7_proxy::telemetry::{FlowSink, Metrics};
use membrane_policy::PolicySet;
use membrane_policy::endpoints::parse_endpoints;
use membrane_policy::rule::EnforcementMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The policy the suites use: GET /public.* and POST /upload from anyone (world), with a header
/// rule on /admin; the upstream at 127.0.0.3 is workload `web`.
pub const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public.*"}
        - {method: POST, path: "/upload"}
        - {method: GET, path: "/ws"}
        - {method: GET, path: "/admin", headers: ["X-Token: s3cret"]}
"#;

pub const WORKLOADS: &str =
    "endpoints:\n  - name: web\n    labels: {app: web}\n    ips: [127.0.0.3]\n";

/// What the upstream received: `METHOD TARGET host=HOST body=N`, or `... upgrade=OFFERS`.
pub type Log = Arc<Mutex<Vec<String>>>;

pub struct Harness {
    pub proxy: SocketAddr,
    pub upstream: SocketAddr,
    pub log: Log,
    pub policy: Arc<PolicyHandle>,
    pub builder: Mutex<SnapshotBuilder>,
    pub metrics: Arc<Metrics>,
    pub flows: FlowSink,
    pub shutdown: watch::Sender<bool>,
    pub served: tokio::task::JoinHandle<()>,
}

pub fn snapshot(builder: &mut SnapshotBuilder, policy: &str, port: u16) -> Snapshot {
    let text = policy.replace("PORT", &port.to_string());
    let set = PolicySet::from_sources([("policy.yaml", text.as_str())]).expect("valid policy");
    let workloads = parse_endpoints("ids.yaml", WORKLOADS).expect("valid workloads");
    builder.build(&set, &workloads).expect("snapshot")
}

type BoxedAnswer = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>,
>;

/// Boxed: an h2c connection serves its requests with this same function.
fn upstream_service(log: Log, req: Request<Incoming>) -> BoxedAnswer {
    Box::pin(upstream_answer(log, req))
}

async fn upstream_answer(
    log: Log,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    // Version-neutral: HTTP/2 requests carry an absolute URI (authority = :authority).
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(String::new, |p| p.to_string());
    let host = req
        .headers()
        .get("host")
        .map(|h| h.to_str().unwrap_or("?").to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if let Some(offers) = req.headers().get("upgrade") {
        let offers = offers.to_str().unwrap_or("?").to_string();
        log.lock()
            .unwrap()
            .push(format!("{method} {target} host={host} upgrade={offers}"));
        // Switches to the first protocol offered. h2c is served as Go's h2c handler, Jetty or
        // Tomcat serve it: HTTP/2 on the switched connection (less the answer to the upgrade
        // request on stream 1). Anything else echoes.
        let chosen = offers
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let h2c = chosen.eq_ignore_ascii_case("h2c");
        let on = hyper::upgrade::on(&mut req);
        let l = log.clone();
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            if h2c {
                let svc = service_fn(move |req| upstream_service(l.clone(), req));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(up, svc)
                    .await;
                return;
            }
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("upgrade", chosen.parse().unwrap());
        resp.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(resp);
    }
    // h2c's settings field: a proxy that drops the h2c offer must drop it too.
    let settings = if req.headers().contains_key("http2-settings") {
        " http2-settings"
    } else {
        ""
    };
    let body = match req.into_body().collect().await {
        Ok(b) => {
            // Trailers the upstream received, by name (`body=N trailers=a,b`).
            let trailers = b.trailers().map(|t| {
                let names: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
                format!(" trailers={}", names.join(","))
            });
            format!("{}{}", b.to_bytes().len(), trailers.unwrap_or_default())
        }
        Err(_) => "aborted".into(),
    };
    log.lock().unwrap().push(format!(
        "{method} {target} host={host}{settings} body={body}"
    ));
    Ok(Response::new(Full::new(Bytes::from(format!(
        "upstream saw {target}\n"
    )))))
}

pub async fn start_upstream(h2: bool) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let l = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let l = l.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| upstream_service(l.clone(), req));
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    (addr, log)
}

pub async fn start(config: ProxyConfig) -> Harness {
    start_with(config, POLICY).await
}

pub async fn start_with(config: ProxyConfig, policy_text: &str) -> Harness {
    let (upstream, log) = start_upstream(config.upstream_protocol == UpstreamProtocol::Http2).await;
    start_at(config, policy_text, upstream, log).await
}

/// A proxy in front of an upstream the test runs itself.
pub async fn start_at(
    config: ProxyConfig,
    policy_text: &str,
    upstream: SocketAddr,
    log: Log,
) -> Harness {
    let mut builder = SnapshotBuilder::new(EnforcementMode::Default);
    let snap = snapshot(&mut builder, policy_text, upstream.port());
    let policy = Arc::new(PolicyHandle::new(snap));
    let metrics = Arc::new(Metrics::new());
    let flows = FlowSink::new();
    let shared = Arc::new(Shared::new(
        config,
        policy.clone(),
        metrics.clone(),
        flows.clone(),
    ));
    let proxy = Proxy::new(shared);
    let listener =
        membrane_l7_proxy::server::bind("127.0.0.1:0".parse().unwrap(), Mode::Reverse { upstream })
            .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let served = tokio::spawn(async move {
        proxy
            .serve(
                listener,
                Mode::Reverse { upstream },
                rx,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    });
    Harness {
        proxy: addr,
        upstream,
        log,
        policy,
        builder: Mutex::new(builder),
        metrics,
        flows,
        shutdown: tx,
        served,
    }
}

impl Harness {
    /// Sends raw bytes on a new connection; returns everything received until the proxy closes
    /// or `quiet` passes without a byte, and whether the proxy closed.
    pub async fn raw(&self, bytes: &[u8], quiet: Duration) -> (String, bool) {
        // On loopback an L3/L4 refusal (RST right after accept) can surface in connect itself.
        let Ok(mut s) = TcpStream::connect(self.proxy).await else {
            return (String::new(), true);
        };
        if s.write_all(bytes).await.is_err() {
            // Refused before the request was written (an L3/L4 deny resets at once).
            return (String::new(), true);
        }
        read_all(&mut s, quiet).await
    }

    pub fn upstream_saw(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn set_policy(&self, text: &str) {
        let snap = snapshot(
            &mut self.builder.lock().unwrap(),
            text,
            self.upstream.port(),
        );
        self.policy.store(snap);
    }
}

pub async fn read_all(s: &mut TcpStream, quiet: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// The status codes of the HTTP/1 responses in `text`, in order.
pub fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, driven by a spawned task.
pub async fn h2_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}
