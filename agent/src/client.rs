//! The CLI's client for the agent's REST API on its unix socket.

use std::path::Path;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// An HTTP/1.1 connection to the agent's socket (call inside a runtime).
async fn connect(socket: &Path) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent at {} (is membrane-agent running?)",
                socket.display()
            )
        })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The CLI is synchronous; each call to the agent runs on a small runtime of its own.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// One request over the socket: the status and the raw body.
fn send(socket: &Path, method: Method, path: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes)> {
    runtime()?.block_on(async {
        let mut sender = connect(socket).await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "membrane")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    })
}

/// Sends one request and returns the status and JSON body (Null when empty).
pub fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let (status, bytes) = send(
        socket,
        method,
        path,
        body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
    )?;
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok((status, value))
}

/// Fetches a text resource (the metrics).
pub fn text(socket: &Path, path: &str) -> Result<String> {
    let (status, bytes) = send(socket, Method::GET, path, Vec::new())?;
    let body = String::from_utf8(bytes.to_vec())?;
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

/// Like [`call`], but an error status becomes an error carrying the agent's message.
pub fn expect_ok(socket: &Path, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
    let (status, value) = call(socket, method, path, body)?;
    if !status.is_success() {
        bail!("{}", value["error"].as_str().unwrap_or(status.as_str()));
    }
    Ok(value)
}

/// Streams a JSON-lines resource (the proxy's flows), sending each line to `tx` until the agent
/// closes it or the receiver goes away. Blocks: run it on its own thread.
pub fn stream_lines(socket: &Path, path: &str, tx: std::sync::mpsc::Sender<String>) -> Result<()> {
    runtime()?.block_on(async {
        let mut sender = connect(socket).await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", "membrane")
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        if !resp.status().is_success() {
            bail!("{path}: {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                if tx
                    .send(String::from_utf8_lossy(&line[..nl]).into_owned())
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    })
}
