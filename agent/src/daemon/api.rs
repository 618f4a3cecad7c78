//! The REST API on the agent's unix socket (`/v1/...`, JSON bodies). The CLI is its client.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use membrane_policy::labels::{LabelSet, Source};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Agent, Endpoint};

type Shared = Arc<Mutex<Agent>>;

/// The routes.
pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/metrics", get(metrics_text))
        .route("/v1/trace", axum::routing::post(trace))
        .route("/v1/identities", get(identities))
        .route("/v1/endpoints", get(list))
        .route(
            "/v1/endpoints/{name}",
            get(get_one).put(create).delete(delete),
        )
        .route("/v1/endpoints/{name}/labels", patch(relabel))
        .route("/v1/endpoints/{name}/realized", get(realized))
        .with_state(agent)
}

/// An endpoint as the API shows it.
pub fn endpoint_json(e: &Endpoint) -> Value {
    json!({
        "name": e.name,
        "namespace": e.namespace,
        "id": e.id,
        "identity": e.identity.id.0,
        "identity_labels": e.identity.labels,
        "labels": e.labels,
        "addresses": e.net.addresses,
        "interface": e.net.host_if,
        "ifindex": e.ifindex,
        "mac": e.mac,
        "host_mac": e.host_mac,
        "netns": e.net.netns,
    })
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

/// Runs an agent operation off the async threads (it runs ip commands and BPF syscalls).
async fn with_agent<T: Send + 'static>(
    agent: Shared,
    f: impl FnOnce(&mut Agent) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut a = agent.lock().map_err(|_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "agent state poisoned".into(),
            )
        })?;
        f(&mut a)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn status(State(agent): State<Shared>) -> Result<Json<Value>, ApiError> {
    with_agent(agent, |a| {
        Ok(Json(json!({
            "policy": {
                "directory": a.config().policy_dir,
                "revision": a.policy_status.revision,
                "rules": a.policy_status.rules,
                "rejected": a.policy_status.rejected,
            },
            "endpoints": a.endpoints().count(),
            "identities": a.identities().count(),
            "enforcement": a.config().enable_policy,
            "controllers": a.controllers,
        })))
    })
    .await
}

async fn trace(
    State(agent): State<Shared>,
    Json(req): Json<crate::trace_view::TraceRequest>,
) -> Result<Json<Value>, ApiError> {
    with_agent(agent, move |a| {
        a.trace(&req).map(Json).map_err(|e| bad(format!("{e:#}")))
    })
    .await
}

/// Prometheus text exposition (served on the API socket and on `--prometheus-serve-addr`).
async fn metrics_text(State(agent): State<Shared>) -> Result<Response, ApiError> {
    let text = with_agent(agent, |a| {
        super::metrics::render(a)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
    })
    .await?;
    Ok((
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response())
}

/// `/v1/flows`: the embedded L7 proxy's flow records, live, as JSON lines (what `membrane
/// monitor` shows next to the datapath's events).
pub fn flows_router(flows: membrane_l7_proxy::telemetry::FlowSink) -> Router {
    Router::new().route(
        "/v1/flows",
        get(move || {
            let flows = flows.clone();
            async move {
                (
                    [("content-type", "application/x-ndjson")],
                    axum::body::Body::from_stream(membrane_l7_proxy::admin::flow_lines(&flows)),
                )
            }
        }),
    )
}

/// The routes of the metrics listener.
pub fn metrics_router(agent: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(agent)
}

async fn identities(State(agent): State<Shared>) -> Result<Json<Value>, ApiError> {
    with_agent(agent, |a| {
        let users = a.identity_users();
        Ok(Json(Value::Array(
            a.identities()
                .map(|i| json!({"identity": i.id.0, "labels": i.labels, "endpoints": users.get(&i.id)}))
                .collect(),
        )))
    })
    .await
}

async fn list(State(agent): State<Shared>) -> Result<Json<Value>, ApiError> {
    with_agent(agent, |a| {
        Ok(Json(Value::Array(
            a.endpoints().map(endpoint_json).collect(),
        )))
    })
    .await
}

async fn get_one(
    State(agent): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_agent(agent, move |a| {
        let mut json = a
            .endpoint(&name)
            .map(endpoint_json)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no endpoint {name:?}")))?;
        json["xds"] = a.xds_status(&name);
        Ok(Json(json))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct RealizedQuery {
    /// The NetworkPolicy revision to wait for (default: the current one).
    revision: Option<u64>,
    /// How long to wait, in milliseconds (default 5000).
    timeout_ms: Option<u64>,
}

/// Waits until every proxy subscribed to the endpoint's policy has acknowledged `revision`:
/// 200 when it has (also when no proxy is subscribed: nothing is pending), 409 as soon as one
/// rejects it (with Envoy's error), 504 when the timeout passes first (naming who is pending).
async fn realized(
    State(agent): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<RealizedQuery>,
) -> Result<Json<Value>, ApiError> {
    let (xds, current) = with_agent(agent, {
        let name = name.clone();
        move |a| {
            a.endpoint(&name)
                .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no endpoint {name:?}")))?;
            let xds = a.xds();
            let current = xds.version(membrane_api::NETWORK_POLICY_TYPE);
            Ok((xds, current))
        }
    })
    .await?;
    let revision = q.revision.unwrap_or(current);
    if revision > current {
        return Err(bad(format!(
            "revision {revision} does not exist yet (current: {current})"
        )));
    }
    let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(5000));
    let waited = xds
        .wait_realized(membrane_api::NETWORK_POLICY_TYPE, &name, revision, timeout)
        .await;
    let status = xds
        .subscribers(membrane_api::NETWORK_POLICY_TYPE, &name)
        .into_iter()
        .map(|(node, s)| (node, json!(s.acked)))
        .collect::<serde_json::Map<_, _>>();
    match waited {
        Ok(()) => Ok(Json(json!({
            "endpoint": name,
            "revision": revision,
            "realized": true,
            "acked": status,
        }))),
        Err(e @ membrane_xds_server::ads::RealizeError::Nacked { .. }) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("{name} revision {revision}: {e}"),
        )),
        Err(e) => Err(ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{name} revision {revision}: {e}"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
}

fn parse_labels(list: &[String]) -> Result<LabelSet, ApiError> {
    LabelSet::parse_list(&list.join(","), Source::K8s).map_err(bad)
}

async fn create(
    State(agent): State<Shared>,
    Path(name): Path<String>,
    Json(body): Json<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let labels = parse_labels(&body.labels)?;
    let namespace = body.namespace.unwrap_or_else(|| "default".into());
    with_agent(agent, move |a| {
        if a.endpoint(&name).is_some() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("endpoint {name:?} exists"),
            ));
        }
        let e = a
            .create_endpoint(&name, &namespace, labels)
            .map_err(|e| bad(format!("{e:#}")))?;
        Ok((StatusCode::CREATED, Json(endpoint_json(&e))))
    })
    .await
}

async fn delete(
    State(agent): State<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    with_agent(agent, move |a| {
        if a.endpoint(&name).is_none() {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no endpoint {name:?}"),
            ));
        }
        a.delete_endpoint(&name)
            .map_err(|e| bad(format!("{e:#}")))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct LabelsBody {
    #[serde(default)]
    set: Vec<String>,
    #[serde(default)]
    unset: Vec<String>,
}

async fn relabel(
    State(agent): State<Shared>,
    Path(name): Path<String>,
    Json(body): Json<LabelsBody>,
) -> Result<Json<Value>, ApiError> {
    let set = parse_labels(&body.set)?;
    with_agent(agent, move |a| {
        if a.endpoint(&name).is_none() {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no endpoint {name:?}"),
            ));
        }
        let e = a
            .relabel(&name, &set, &body.unset)
            .map_err(|e| bad(format!("{e:#}")))?;
        Ok(Json(endpoint_json(&e)))
    })
    .await
}
