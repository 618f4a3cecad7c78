//! The admin endpoint: `/metrics` (Prometheus text), `/healthz`, and `/flows`, a live stream of
//! flow records as JSON lines.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

use crate::telemetry::{FlowSink, Metrics};

type Body = BoxBody<Bytes, Infallible>;

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, flows: FlowSink) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let metrics = metrics.clone();
                let flows = flows.clone();
                async move { Ok::<_, Infallible>(route(&req, &metrics, &flows)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    resp
}

fn route(req: &Request<Incoming>, metrics: &Metrics, flows: &FlowSink) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => full(StatusCode::OK, "text/plain", "ok\n"),
        "/flows" => {
            let stream =
                futures_util::StreamExt::map(flow_lines(flows), |line| line.map(Frame::data));
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/x-ndjson".parse().expect("static"),
            );
            resp
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Flow records as JSON lines, from now on; a listener that falls behind is told how many
/// records it missed (`{"lost":N}`). The admin endpoint and the agent's `/v1/flows` serve this.
pub fn flow_lines(
    flows: &FlowSink,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(flows.subscribe(), |mut rx| async move {
        let line = match rx.recv().await {
            Ok(record) => {
                let mut s = serde_json::to_string(&record).unwrap_or_default();
                s.push('\n');
                s
            }
            Err(RecvError::Lagged(n)) => format!("{{\"lost\":{n}}}\n"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(Bytes::from(line)), rx))
    })
}
