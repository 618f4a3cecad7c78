//! Policy from the agent (`membrane-proxy --agent-xds SOCKET`): the proxy subscribes to the
//! agent's ADS server, as the Envoy sidecar filter does, for every endpoint's
//! `membrane.v1.NetworkPolicy` and the identity-to-addresses map (`NetworkPolicyHosts`). The
//! policy arrives resolved, with the agent's identity numbers, so the proxy and the datapath
//! judge by the same identities. An update that does not compile is NACKed with the reason and
//! the last good snapshot stays; a lost stream is reconnected with backoff, the last good
//! snapshot staying in force meanwhile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, v1};
use membrane_source::ads_client::{AdsClient, DiscoveryResponse};
use prost::Message;

use crate::policy::{Snapshot, SnapshotBuilder};

/// What the feed reports to the proxy.
#[derive(Debug)]
pub enum FeedEvent {
    /// A snapshot built from an accepted update (both resource types have arrived).
    Snapshot(Snapshot),
    /// An update was rejected (NACKed): why. The last good snapshot stays.
    Rejected(String),
    /// The stream to the agent is down (or could not be opened): why. Retried with backoff.
    Disconnected(String),
}

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the agent's policy until the process ends, reporting through `report`.
pub async fn follow(
    socket: PathBuf,
    node: String,
    mut builder: SnapshotBuilder,
    mut report: impl FnMut(FeedEvent),
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        match AdsClient::connect_unix(&socket, &node).await {
            Ok(client) => {
                backoff = BACKOFF_FIRST;
                let why = stream(client, &mut builder, &mut report).await;
                report(FeedEvent::Disconnected(why));
            }
            Err(e) => report(FeedEvent::Disconnected(e.message().to_string())),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream: subscribes to both types (wildcard) and answers every response. Returns why it
/// ended.
async fn stream(
    mut client: AdsClient,
    builder: &mut SnapshotBuilder,
    report: &mut impl FnMut(FeedEvent),
) -> String {
    for type_url in [NETWORK_POLICY_TYPE, NETWORK_POLICY_HOSTS_TYPE] {
        if let Err(e) = client.send(type_url, &[], "", "", None).await {
            return e.message().to_string();
        }
    }
    let mut policies: Option<Vec<v1::NetworkPolicy>> = None;
    let mut hosts: Option<Vec<v1::NetworkPolicyHosts>> = None;
    // The version last accepted per type: what a NACK reports as still in force.
    let mut accepted: HashMap<String, String> = HashMap::new();
    loop {
        // A long wait: quiet hours are normal; `None` is the stream's end.
        let resp = match client.next(Duration::from_secs(24 * 3600)).await {
            Ok(Some(resp)) => resp,
            Ok(None) => return "the agent closed the stream".into(),
            Err(e) => return e.message().to_string(),
        };
        let outcome = match resp.type_url.as_str() {
            NETWORK_POLICY_TYPE => decode::<v1::NetworkPolicy>(&resp).and_then(|new| {
                let snap = builder.snapshot_received(&new, hosts.as_deref().unwrap_or(&[]))?;
                policies = Some(new);
                Ok(snap)
            }),
            NETWORK_POLICY_HOSTS_TYPE => decode::<v1::NetworkPolicyHosts>(&resp).and_then(|new| {
                let snap = builder.snapshot_received(policies.as_deref().unwrap_or(&[]), &new)?;
                hosts = Some(new);
                Ok(snap)
            }),
            other => Err(format!("unexpected resource type {other}")),
        };
        let answered = match outcome {
            Ok(snap) => {
                accepted.insert(resp.type_url.clone(), resp.version_info.clone());
                // Until both types have arrived, peers would all look like world: hold back.
                if policies.is_some() && hosts.is_some() {
                    report(FeedEvent::Snapshot(snap));
                }
                client.ack(&resp, &[]).await
            }
            Err(why) => {
                let in_force = accepted.get(&resp.type_url).map_or("", String::as_str);
                report(FeedEvent::Rejected(format!(
                    "{} version {}: {why}",
                    resp.type_url, resp.version_info
                )));
                client
                    .send(&resp.type_url, &[], &resp.nonce, in_force, Some(&why))
                    .await
            }
        };
        if let Err(e) = answered {
            return e.message().to_string();
        }
    }
}

fn decode<M: Message + Default>(resp: &DiscoveryResponse) -> Result<Vec<M>, String> {
    resp.resources
        .iter()
        .enumerate()
        .map(|(i, any)| M::decode(any.value.as_slice()).map_err(|e| format!("resource {i}: {e}")))
        .collect()
}
