//! A small ADS client over the agent's unix socket: how the standalone proxy subscribes to the
//! agent's policy (`membrane-proxy --agent-xds`), and what the tests (and tools that check what a
//! proxy would receive) use to subscribe, acknowledge and reject like Envoy does.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
pub use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
pub use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel over the agent's unix socket.
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::Status> {
    let path = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{}: {e}", socket.display())))
}

/// The stream's next message, or `None` when none comes within `wait`.
async fn next_within<T>(
    rx: &mut tonic::Streaming<T>,
    wait: Duration,
) -> Result<Option<T>, tonic::Status> {
    match tokio::time::timeout(wait, rx.message()).await {
        Err(_) => Ok(None),
        Ok(r) => r,
    }
}

/// One ADS stream.
#[derive(Debug)]
pub struct AdsClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    node: String,
}

impl AdsClient {
    /// Opens a stream on a unix socket as node `node`.
    pub async fn connect_unix(socket: &Path, node: &str) -> Result<AdsClient, tonic::Status> {
        let channel = unix_channel(socket).await?;
        let (tx, rx) = mpsc::channel(16);
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(AdsClient {
            tx,
            rx,
            node: node.to_string(),
        })
    }

    /// Sends a request: a subscription (empty nonce), an ACK (the response's nonce and version)
    /// or a NACK (with `error`).
    pub async fn send(
        &self,
        type_url: &str,
        names: &[&str],
        nonce: &str,
        version: &str,
        error: Option<&str>,
    ) -> Result<(), tonic::Status> {
        self.tx
            .send(DiscoveryRequest {
                node: Some(Node {
                    id: self.node.clone(),
                    ..Default::default()
                }),
                type_url: type_url.into(),
                resource_names: names.iter().map(|n| n.to_string()).collect(),
                response_nonce: nonce.into(),
                version_info: version.into(),
                error_detail: error.map(|m| RpcStatus {
                    code: 3,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .map_err(|_| tonic::Status::unavailable("the stream is closed"))
    }

    /// Acknowledges a response.
    pub async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) -> Result<(), tonic::Status> {
        self.send(&resp.type_url, names, &resp.nonce, &resp.version_info, None)
            .await
    }

    /// The next response, or `None` when none comes within `wait`.
    pub async fn next(
        &mut self,
        wait: Duration,
    ) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        next_within(&mut self.rx, wait).await
    }
}

/// One delta (incremental) ADS stream.
#[derive(Debug)]
pub struct DeltaAdsClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
    node: String,
}

impl DeltaAdsClient {
    /// Opens a delta stream on a unix socket as node `node`.
    pub async fn connect_unix(socket: &Path, node: &str) -> Result<DeltaAdsClient, tonic::Status> {
        let channel = unix_channel(socket).await?;
        let (tx, rx) = mpsc::channel(16);
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(DeltaAdsClient {
            tx,
            rx,
            node: node.to_string(),
        })
    }

    /// Sends a request: subscription changes, and the nonce of the response it answers (an
    /// ACK, or a NACK with `error`).
    pub async fn send(
        &self,
        type_url: &str,
        subscribe: &[&str],
        unsubscribe: &[&str],
        nonce: &str,
        error: Option<&str>,
    ) -> Result<(), tonic::Status> {
        let names = |n: &[&str]| n.iter().map(|n| n.to_string()).collect();
        self.tx
            .send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: self.node.clone(),
                    ..Default::default()
                }),
                type_url: type_url.into(),
                resource_names_subscribe: names(subscribe),
                resource_names_unsubscribe: names(unsubscribe),
                response_nonce: nonce.into(),
                error_detail: error.map(|m| RpcStatus {
                    code: 3,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .map_err(|_| tonic::Status::unavailable("the stream is closed"))
    }

    /// The next response, or `None` when none comes within `wait`.
    pub async fn next(
        &mut self,
        wait: Duration,
    ) -> Result<Option<DeltaDiscoveryResponse>, tonic::Status> {
        next_within(&mut self.rx, wait).await
    }
}
