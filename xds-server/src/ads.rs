//! The ADS service (state of the world, and delta): resources by type URL, one version per type that moves on
//! every change, a nonce per response, ACK/NACK tracked per node and type, and completions that
//! wait until proxies have acknowledged a version.
//!
//! Protocol (Envoy's xDS, SotW): a stream's first request for a type gets the current resources
//! (those named, or all when it names none) at the current version. A request whose
//! `response_nonce` is the last one sent on the stream acknowledges that response, or rejects it
//! when it carries `error_detail` (a NACK): the rejection is logged with Envoy's detail, fails
//! the completions waiting for that version at once, and the version is not sent again (no NACK
//! loop); the next change sends a new one. A request with an older nonce is stale and ignored.
//!
//! The same streams are also served as Envoy's ECDS service, restricted to
//! `TypedExtensionConfig`, for filters that subscribe outside ADS.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use futures_core::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::translate::TYPED_EXTENSION_CONFIG_TYPE as ECDS;

/// One type's resources at one version.
#[derive(Clone, Debug, Default)]
struct TypeState {
    version: u64,
    /// Resource name -> encoded resource and its aliases.
    resources: BTreeMap<String, (Vec<u8>, Vec<String>)>,
    /// Resource name -> the type version at which it last changed (its delta xDS version).
    changed_at: BTreeMap<String, u64>,
}

impl TypeState {
    fn aliases(&self, resource: &str) -> &[String] {
        self.resources.get(resource).map_or(&[], |(_, a)| a)
    }
}

/// What a node last did with a type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// The newest version it acknowledged.
    pub acked: Option<u64>,
    /// The newest version it rejected, with Envoy's error detail.
    pub nacked: Option<(u64, String)>,
    /// The resource names it subscribed to (empty: all).
    pub subscribed: Vec<String>,
}

impl NodeStatus {
    /// Whether the stream subscribed to `resource` (by name or one of its `aliases`, or to every
    /// resource).
    pub fn wants(&self, resource: &str, aliases: &[String]) -> bool {
        selects(&self.subscribed, resource, aliases)
    }
}

/// Whether a subscription to `names` (empty: all) selects a resource.
fn selects(names: &[String], resource: &str, aliases: &[String]) -> bool {
    names.is_empty() || names.iter().any(|n| n == resource || aliases.contains(n))
}

/// Why a wait for acknowledgement ended without one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RealizeError {
    /// A proxy rejected the version.
    Nacked {
        /// The node that rejected it.
        node: String,
        /// Envoy's error detail.
        detail: String,
    },
    /// Not every proxy acknowledged in time.
    Timeout {
        /// Nodes still without an acknowledgement.
        pending: Vec<String>,
    },
}

impl std::fmt::Display for RealizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RealizeError::Nacked { node, detail } => write!(f, "{node} rejected it: {detail}"),
            RealizeError::Timeout { pending } => {
                write!(f, "not acknowledged in time by {}", pending.join(", "))
            }
        }
    }
}

impl std::error::Error for RealizeError {}

#[derive(Debug, Default)]
struct State {
    types: HashMap<String, TypeState>,
    /// (node, type) -> status.
    nodes: BTreeMap<(String, String), NodeStatus>,
}

/// The resources served and what each proxy made of them. Cheap to clone; shared by the agent
/// (which sets resources and waits for them to be realized) and the gRPC service.
#[derive(Clone, Debug)]
pub struct XdsCache {
    state: Arc<Mutex<State>>,
    streams: Arc<std::sync::atomic::AtomicU64>,
    /// Ticks on every change of resources or of a node's status.
    changed: watch::Sender<u64>,
    identifier: Arc<str>,
}

/// `membrane-xds/<pid>/<start time in ns>/<n>`: unique per cache on this node.
fn control_plane_identifier() -> String {
    static CACHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CACHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("membrane-xds/{}/{nanos}/{n}", std::process::id())
}

impl Default for XdsCache {
    fn default() -> XdsCache {
        XdsCache::new()
    }
}

impl XdsCache {
    /// An empty cache.
    pub fn new() -> XdsCache {
        XdsCache {
            state: Arc::default(),
            streams: Arc::default(),
            changed: watch::channel(0).0,
            identifier: Arc::from(control_plane_identifier()),
        }
    }

    /// This cache's control-plane identifier (in every response): versions restart at 1 with a
    /// new cache, so a proxy compares versions only under the same identifier.
    pub fn identifier(&self) -> &str {
        &self.identifier
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tick(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Replaces every resource of a type; returns the new version (unchanged when nothing
    /// changed, so that proxies are not woken for nothing).
    pub fn set_resources(&self, type_url: &str, resources: BTreeMap<String, Vec<u8>>) -> u64 {
        self.set_aliased_resources(
            type_url,
            resources
                .into_iter()
                .map(|(name, bytes)| (name, (bytes, Vec::new())))
                .collect(),
        )
    }

    /// Like [`set_resources`](Self::set_resources), each resource with the aliases under which
    /// a subscription selects it too.
    pub fn set_aliased_resources(
        &self,
        type_url: &str,
        resources: BTreeMap<String, (Vec<u8>, Vec<String>)>,
    ) -> u64 {
        let version = {
            let mut st = self.lock();
            let ts = st.types.entry(type_url.to_string()).or_default();
            if ts.resources == resources && ts.version > 0 {
                return ts.version;
            }
            let version = ts.version + 1;
            ts.changed_at = resources
                .iter()
                .map(|(name, served)| {
                    let same = ts.resources.get(name) == Some(served);
                    let at = match ts.changed_at.get(name) {
                        Some(at) if same => *at,
                        _ => version,
                    };
                    (name.clone(), at)
                })
                .collect();
            ts.resources = resources;
            ts.version = version;
            version
        };
        self.tick();
        version
    }

    /// The current version of a type (0: never set).
    pub fn version(&self, type_url: &str) -> u64 {
        self.lock().types.get(type_url).map_or(0, |t| t.version)
    }

    /// Every subscriber's status for a type, keyed `NODE#STREAM` (each wasm VM of one Envoy holds
    /// its own stream, and each must have the policy).
    pub fn statuses(&self, type_url: &str) -> BTreeMap<String, NodeStatus> {
        self.lock()
            .nodes
            .iter()
            .filter(|((_, t), _)| t == type_url)
            .map(|((n, _), s)| (n.clone(), s.clone()))
            .collect()
    }

    /// The statuses of the streams subscribed to `resource` of `type_url` (by name, or to all):
    /// the ones [`wait_realized`](Self::wait_realized) waits for.
    pub fn subscribers(&self, type_url: &str, resource: &str) -> BTreeMap<String, NodeStatus> {
        let aliases = self.aliases(type_url, resource);
        let mut all = self.statuses(type_url);
        all.retain(|_, s| s.wants(resource, &aliases));
        all
    }

    fn aliases(&self, type_url: &str, resource: &str) -> Vec<String> {
        self.lock()
            .types
            .get(type_url)
            .map_or_else(Vec::new, |t| t.aliases(resource).to_vec())
    }

    /// Waits until every stream subscribed to `resource` of `type_url` (by name, or to all) has
    /// acknowledged `version` or a later one. Fails at once when one of them rejects it, and with
    /// the nodes still pending after `timeout`. With no subscribed node it succeeds at once.
    pub async fn wait_realized(
        &self,
        type_url: &str,
        resource: &str,
        version: u64,
        timeout: Duration,
    ) -> Result<(), RealizeError> {
        self.wait_acked(type_url, Some(resource), version, timeout)
            .await
    }

    /// Waits until every stream subscribed to `type_url`, whatever it selected, has acknowledged
    /// `version` or a later one (a version moves for every stream, even one whose resources did
    /// not change); fails as [`wait_realized`](Self::wait_realized) does.
    pub async fn wait_all_acked(
        &self,
        type_url: &str,
        version: u64,
        timeout: Duration,
    ) -> Result<(), RealizeError> {
        self.wait_acked(type_url, None, version, timeout).await
    }

    async fn wait_acked(
        &self,
        type_url: &str,
        resource: Option<&str>,
        version: u64,
        timeout: Duration,
    ) -> Result<(), RealizeError> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending = {
                let st = self.lock();
                let ts = st.types.get(type_url);
                let mut pending = Vec::new();
                for ((node, t), s) in &st.nodes {
                    if t != type_url {
                        continue;
                    }
                    if let Some(r) = resource
                        && !s.wants(r, ts.map_or(&[][..], |t| t.aliases(r)))
                    {
                        continue;
                    }
                    if let Some((v, detail)) = &s.nacked
                        && *v >= version
                        && s.acked.is_none_or(|a| a < *v)
                    {
                        return Err(RealizeError::Nacked {
                            node: node.clone(),
                            detail: detail.clone(),
                        });
                    }
                    if s.acked.is_none_or(|a| a < version) {
                        pending.push(node.clone());
                    }
                }
                pending
            };
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(RealizeError::Timeout { pending });
            }
        }
    }

    /// The gRPC service over this cache.
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService {
            cache: self.clone(),
        })
    }

    /// The ECDS service (`StreamExtensionConfigs`, `DeltaExtensionConfigs`): the same streams
    /// restricted to `TypedExtensionConfig`, for an Envoy whose filter subscribes with an
    /// `api_config_source` of its own rather than over ADS (upstream filters of a static
    /// cluster must: with `ads: {}` there Envoy 1.40 crashes at start-up).
    pub fn ecds_service(&self) -> ExtensionConfigDiscoveryServiceServer<EcdsService> {
        ExtensionConfigDiscoveryServiceServer::new(EcdsService {
            cache: self.clone(),
        })
    }

    /// Starts a stream's task, `run(responses, stream id)`, and returns what it sends.
    fn open<R, F>(
        &self,
        run: impl FnOnce(mpsc::Sender<Result<R, Status>>, u64) -> F,
    ) -> Response<Responses<R>>
    where
        R: Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Result<R, Status>>(16);
        let stream_id = self
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(run(tx, stream_id));
        Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    fn response(&self, type_url: &str, names: &[String], nonce: u64) -> Option<DiscoveryResponse> {
        let st = self.lock();
        let ts = st.types.get(type_url)?;
        let resources = ts
            .resources
            .iter()
            .filter(|(name, (_, aliases))| selects(names, name, aliases))
            .map(|(_, (bytes, _))| Any {
                type_url: type_url.to_string(),
                value: bytes.clone(),
            })
            .collect();
        Some(DiscoveryResponse {
            version_info: ts.version.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.to_string(),
            control_plane: Some(ControlPlane {
                identifier: self.identifier.to_string(),
            }),
            ..Default::default()
        })
    }

    fn update_node(&self, node: &str, type_url: &str, f: impl FnOnce(&mut NodeStatus)) {
        {
            let mut st = self.lock();
            f(st.nodes
                .entry((node.to_string(), type_url.to_string()))
                .or_default());
        }
        self.tick();
    }

    /// Records a stream's answer to the `version` it was sent: an ACK, or a NACK carrying
    /// Envoy's error detail (logged, and kept until a later ACK), with the names it subscribes
    /// to now. `node` names the proxy in the log; `key` is its stream.
    fn record_answer(
        &self,
        (node, key): (&str, &str),
        type_url: &str,
        version: u64,
        rejection: Option<&str>,
        subscribed: Vec<String>,
    ) {
        match rejection {
            Some(detail) => {
                eprintln!("membrane-xds: {node} rejected {type_url} version {version}: {detail}");
                let detail = detail.to_string();
                self.update_node(key, type_url, |s| {
                    s.nacked = Some((version, detail));
                    s.subscribed = subscribed;
                });
            }
            None => self.update_node(key, type_url, |s| {
                s.acked = Some(s.acked.map_or(version, |a| a.max(version)));
                s.subscribed = subscribed;
            }),
        }
    }

    fn forget_node(&self, node: &str, types: &HashSet<String>) {
        {
            let mut st = self.lock();
            for t in types {
                st.nodes.remove(&(node.to_string(), t.clone()));
            }
        }
        self.tick();
    }
}

/// The ADS gRPC service.
#[derive(Debug)]
pub struct AdsService {
    cache: XdsCache,
}

/// One type on one stream.
#[derive(Debug, Default)]
struct Subscription {
    names: Vec<String>,
    /// Version and nonce of the last response sent.
    sent: Option<(u64, u64)>,
}

/// What a stream sends its client.
type Responses<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;
type ResponseStream = Responses<DiscoveryResponse>;
type DeltaStream = Responses<DeltaDiscoveryResponse>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let cache = self.cache.clone();
        Ok(self
            .cache
            .open(|tx, id| sotw_stream(cache, request.into_inner(), tx, id, None)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let cache = self.cache.clone();
        Ok(self
            .cache
            .open(|tx, id| delta_stream(cache, request.into_inner(), tx, id, None)))
    }
}

/// The ECDS service: ADS's streams for `TypedExtensionConfig` alone.
#[derive(Debug)]
pub struct EcdsService {
    cache: XdsCache,
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for EcdsService {
    type StreamExtensionConfigsStream = ResponseStream;
    type DeltaExtensionConfigsStream = DeltaStream;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let cache = self.cache.clone();
        Ok(self
            .cache
            .open(|tx, id| sotw_stream(cache, request.into_inner(), tx, id, Some(ECDS))))
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let cache = self.cache.clone();
        Ok(self
            .cache
            .open(|tx, id| delta_stream(cache, request.into_inner(), tx, id, Some(ECDS))))
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "membrane serves extension configurations over streams only",
        ))
    }
}

/// Checks a request against its stream: the first must name its node (which names the stream,
/// `NODE#ID`, in the statuses); the type is any on ADS, and on a single-type service its own,
/// which requests may leave out. Returns the type the request is about.
fn admit(
    (node, key): (&mut String, &mut String),
    stream_id: u64,
    from: Option<&Node>,
    only_type: Option<&'static str>,
    requested: &str,
) -> Result<String, Status> {
    if let Some(n) = from
        && !n.id.is_empty()
        && node.is_empty()
    {
        *node = n.id.clone();
        *key = format!("{node}#{stream_id}");
    }
    if node.is_empty() {
        return Err(Status::invalid_argument(
            "the first request must name its node",
        ));
    }
    match only_type {
        None => Ok(requested.to_string()),
        Some(t) if requested.is_empty() || requested == t => Ok(t.to_string()),
        Some(t) => Err(Status::invalid_argument(format!(
            "this stream serves {t}, not {requested}"
        ))),
    }
}

/// One state-of-the-world stream: ADS (`only_type` None, every type on one stream) or a
/// single-type discovery service (`only_type`: its type URL; requests may leave it out).
async fn sotw_stream(
    cache: XdsCache,
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    stream_id: u64,
    only_type: Option<&'static str>,
) {
    let mut node = String::new();
    let mut key = String::new();
    let mut subs: BTreeMap<String, Subscription> = BTreeMap::new();
    let mut nonce = 0u64;
    let mut changed = cache.changed.subscribe();
    loop {
        tokio::select! {
            req = requests.message() => {
                let req = match req {
                    Ok(Some(r)) => r,
                    _ => break,
                };
                let type_url = match admit((&mut node, &mut key), stream_id, req.node.as_ref(), only_type, &req.type_url) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                let sub = subs.entry(type_url.clone()).or_default();
                let names_changed = sub.names != req.resource_names;
                sub.names = req.resource_names.clone();
                match sub.sent {
                    // A reply to our last response: ACK or NACK.
                    Some((version, sent_nonce)) if req.response_nonce == sent_nonce.to_string() => {
                        let rejection = req.error_detail.as_ref().map(|e| e.message.as_str());
                        cache.record_answer((&node, &key), &type_url, version, rejection, sub.names.clone());
                        if !names_changed {
                            continue;
                        }
                    }
                    // Stale: an answer to an older response.
                    Some(_) if !req.response_nonce.is_empty() => continue,
                    _ => {
                        let names = sub.names.clone();
                        cache.update_node(&key, &type_url, |s| s.subscribed = names);
                    }
                }
                nonce += 1;
                if let Some(resp) = cache.response(&type_url, &sub.names, nonce) {
                    sub.sent = Some((cache.version(&type_url), nonce));
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
            }
            r = changed.changed() => {
                if r.is_err() {
                    break;
                }
                // Send every subscribed type whose version moved past what was sent.
                for (type_url, sub) in subs.iter_mut() {
                    let current = cache.version(type_url);
                    if current == 0 || sub.sent.is_some_and(|(v, _)| v >= current) {
                        continue;
                    }
                    nonce += 1;
                    if let Some(resp) = cache.response(type_url, &sub.names, nonce) {
                        sub.sent = Some((current, nonce));
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
    if !key.is_empty() {
        cache.forget_node(&key, &subs.keys().cloned().collect());
    }
}

/// One type on a delta stream.
#[derive(Debug, Default)]
struct DeltaSubscription {
    /// Subscribed to every resource (no names in the first request, or `*`).
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds: resource -> version.
    held: BTreeMap<String, String>,
    /// Type version and nonce of the response not yet answered.
    pending: Option<(u64, String)>,
    /// The newest type version the client is known to be in sync with.
    in_sync: Option<u64>,
    /// It rejected its last response and has accepted none since: it holds something older
    /// than what was sent, so later versions are not in sync for it either.
    rejected: bool,
}

impl DeltaSubscription {
    fn names(&self) -> Vec<String> {
        if self.wildcard {
            Vec::new()
        } else {
            self.names.iter().cloned().collect()
        }
    }
}

/// Delta xDS (incremental): per-resource versions (the type version at which each last
/// changed), subscriptions by name, alias or wildcard, removals, and the same ACK/NACK and
/// completion tracking as state of the world. A stream is told only what changed for it; when a
/// change does not concern it, it is in sync with the new version without a response.
async fn delta_stream(
    cache: XdsCache,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    stream_id: u64,
    only_type: Option<&'static str>,
) {
    let mut node = String::new();
    let mut key = String::new();
    let mut subs: BTreeMap<String, DeltaSubscription> = BTreeMap::new();
    let mut nonce = 0u64;
    let mut changed = cache.changed.subscribe();
    loop {
        let (type_url, first) = tokio::select! {
            req = requests.message() => {
                let req = match req {
                    Ok(Some(r)) => r,
                    _ => break,
                };
                let type_url = match admit((&mut node, &mut key), stream_id, req.node.as_ref(), only_type, &req.type_url) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                let first = !subs.contains_key(&type_url);
                let sub = subs.entry(type_url.clone()).or_default();
                if first {
                    sub.wildcard = req.resource_names_subscribe.is_empty();
                    sub.held = req.initial_resource_versions.clone().into_iter().collect();
                }
                for name in &req.resource_names_subscribe {
                    if name == "*" {
                        sub.wildcard = true;
                    } else {
                        sub.names.insert(name.clone());
                    }
                }
                for name in &req.resource_names_unsubscribe {
                    if name == "*" {
                        sub.wildcard = false;
                    } else {
                        sub.names.remove(name);
                    }
                }
                let answered = sub
                    .pending
                    .as_ref()
                    .filter(|(_, n)| !req.response_nonce.is_empty() && *n == req.response_nonce)
                    .map(|(v, _)| *v);
                let names = sub.names();
                match answered {
                    Some(version) => {
                        let rejection = req.error_detail.as_ref().map(|e| e.message.as_str());
                        sub.pending = None;
                        sub.rejected = rejection.is_some();
                        if rejection.is_none() {
                            sub.in_sync = Some(version);
                        }
                        cache.record_answer((&node, &key), &type_url, version, rejection, names);
                    }
                    None => cache.update_node(&key, &type_url, |s| s.subscribed = names),
                }
                (Some(type_url), first)
            }
            r = changed.changed() => {
                if r.is_err() {
                    break;
                }
                (None, false)
            }
        };
        // Tell each subscription (or the one just asked about) what changed for it.
        let types: Vec<String> = match type_url {
            Some(t) => vec![t],
            None => subs.keys().cloned().collect(),
        };
        for type_url in types {
            let Some(sub) = subs.get_mut(&type_url) else {
                continue;
            };
            let (version, resources, removed) = delta_for(&cache, &type_url, sub);
            if resources.is_empty() && removed.is_empty() && !first {
                // Nothing new for it: once its last response is answered, it holds this version.
                if sub.pending.is_none()
                    && !sub.rejected
                    && version > 0
                    && sub.in_sync.is_none_or(|v| v < version)
                {
                    sub.in_sync = Some(version);
                    let names = sub.names();
                    cache.update_node(&key, &type_url, |s| {
                        s.acked = Some(s.acked.map_or(version, |a| a.max(version)));
                        s.subscribed = names;
                    });
                }
                continue;
            }
            nonce += 1;
            for r in &resources {
                sub.held.insert(r.name.clone(), r.version.clone());
            }
            for name in &removed {
                sub.held.remove(name);
            }
            sub.pending = Some((version, nonce.to_string()));
            let resp = DeltaDiscoveryResponse {
                system_version_info: version.to_string(),
                resources,
                type_url: type_url.clone(),
                removed_resources: removed,
                nonce: nonce.to_string(),
                control_plane: Some(ControlPlane {
                    identifier: cache.identifier.to_string(),
                }),
                ..Default::default()
            };
            if tx.send(Ok(resp)).await.is_err() {
                break;
            }
        }
    }
    if !key.is_empty() {
        cache.forget_node(&key, &subs.keys().cloned().collect());
    }
}

/// What a delta subscription lacks: the type's version, the selected resources whose version
/// differs from what the client holds, and the held ones no longer selected or served.
fn delta_for(
    cache: &XdsCache,
    type_url: &str,
    sub: &DeltaSubscription,
) -> (u64, Vec<Resource>, Vec<String>) {
    let st = cache.lock();
    let Some(ts) = st.types.get(type_url) else {
        return (0, Vec::new(), Vec::new());
    };
    let names = sub.names();
    let mut resources = Vec::new();
    let mut selected = BTreeSet::new();
    for (name, (bytes, aliases)) in &ts.resources {
        if !selects(&names, name, aliases) {
            continue;
        }
        selected.insert(name.as_str());
        let version = ts
            .changed_at
            .get(name)
            .copied()
            .unwrap_or(ts.version)
            .to_string();
        if sub.held.get(name) == Some(&version) {
            continue;
        }
        resources.push(Resource {
            name: name.clone(),
            version,
            aliases: aliases
                .iter()
                .filter(|a| names.contains(a))
                .cloned()
                .collect(),
            resource: Some(Any {
                type_url: type_url.to_string(),
                value: bytes.clone(),
            }),
            ..Default::default()
        });
    }
    let removed = sub
        .held
        .keys()
        .filter(|n| !selected.contains(n.as_str()))
        .cloned()
        .collect();
    (ts.version, resources, removed)
}

/// Serves ADS on a unix socket (replacing a stale socket file) until `shutdown` resolves.
pub async fn serve_unix(
    path: &std::path::Path,
    cache: XdsCache,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(cache.service())
        .add_service(cache.ecds_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}

/// Serves ADS on TCP (loopback, for a standalone Envoy) until `shutdown` resolves.
pub async fn serve_tcp(
    addr: std::net::SocketAddr,
    cache: XdsCache,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tonic::transport::Server::builder()
        .add_service(cache.service())
        .add_service(cache.ecds_service())
        .serve_with_shutdown(addr, shutdown)
        .await
        .map_err(std::io::Error::other)
}
