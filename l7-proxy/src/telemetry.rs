//! What the proxy tells its operator: Prometheus counters and latency histograms, and a flow
//! record per request for live monitoring.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;

/// Labels of the request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `ingress` (the destination's policy) or `egress` (the source's); `none` when no L7 policy
    /// applied (an L3/L4 allow through a reverse proxy).
    pub direction: &'static str,
    /// `forwarded`, `denied` or `error` (refused as malformed, or the upstream failed).
    pub verdict: &'static str,
    /// The policy whose rule allowed the request (`Kind ns/name`); empty when none did. Shared
    /// with the policy snapshot, so labelling a request allocates nothing.
    pub policy: Arc<str>,
}

/// The empty policy name ("no L7 policy applied"), shared rather than allocated per request.
pub fn no_policy() -> Arc<str> {
    static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// Labels of the Kafka request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KafkaLabels {
    /// As in [`RequestLabels::direction`].
    pub direction: &'static str,
    /// `forwarded`, `denied` or `error` (malformed, unsupported, or the broker failed).
    pub verdict: &'static str,
    /// The API key's name (`produce`, `fetch`, ...; `other` for a key without one).
    pub api_key: &'static str,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// As in [`RequestLabels::direction`].
    pub direction: &'static str,
}

/// Labels of the connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `accepted` or `denied` (L3/L4 policy refused the connection).
    pub outcome: &'static str,
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// L7 requests by direction, verdict and policy.
    pub requests: Family<RequestLabels, Counter>,
    /// Kafka requests by direction, verdict and API key.
    pub kafka_requests: Family<KafkaLabels, Counter>,
    /// Seconds from request headers to upstream response headers (or to the local answer).
    pub latency: Family<DirectionLabel, Histogram>,
    /// Downstream connections by outcome.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Open downstream connections.
    pub open_connections: Gauge,
    /// Policy versions put in force.
    pub policy_generation: Gauge,
    /// Policy changes refused as invalid (the last good policy stayed).
    pub policy_rejected: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under `membrane_proxy_`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("membrane_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "l7_requests",
            "L7 requests by direction, verdict and allowing policy",
            requests.clone(),
        );
        let kafka_requests = Family::<KafkaLabels, Counter>::default();
        registry.register(
            "kafka_requests",
            "Kafka requests by direction, verdict and API key",
            kafka_requests.clone(),
        );
        let latency = Family::<DirectionLabel, Histogram>::new_with_constructor(|| {
            // 25 us .. ~3.3 s
            Histogram::new(exponential_buckets(25e-6, 2.0, 18))
        });
        registry.register(
            "l7_request_duration_seconds",
            "Time from request headers to response headers",
            latency.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Downstream connections by outcome",
            connections.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open downstream connections",
            open_connections.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "Policy versions put in force",
            policy_generation.clone(),
        );
        let policy_rejected = Counter::default();
        registry.register(
            "policy_rejected",
            "Policy changes refused as invalid",
            policy_rejected.clone(),
        );
        Metrics {
            requests,
            kafka_requests,
            latency,
            connections,
            open_connections,
            policy_generation,
            policy_rejected,
            registry,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The Kafka facts of a flow record.
#[derive(Clone, Debug, Serialize)]
pub struct KafkaFlow {
    /// API key number.
    pub api_key: i16,
    /// Its name as the protocol spells it (`Produce`, `Fetch`, ...).
    pub api: String,
    /// API version (-1 when the frame did not get that far).
    pub api_version: i16,
    /// Correlation id.
    pub correlation_id: i32,
    /// Client id from the request header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Topics the request names (empty when none, or when they are unknown).
    pub topics: Vec<String>,
    /// Topics refused by policy (a Metadata request may be forwarded for the others).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub denied_topics: Vec<String>,
    /// The error code of the synthetic answer to a denied request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i16>,
}

/// One request as seen by the proxy.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// `http` or `kafka`.
    pub protocol: &'static str,
    /// When the request headers arrived (RFC 3339, UTC).
    pub time: String,
    /// Downstream peer.
    pub src: SocketAddr,
    /// Where the request goes (the original destination, or the reverse-mode upstream).
    pub dst: SocketAddr,
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Request method.
    pub method: String,
    /// Path and query, as forwarded (normalized when normalization is on).
    pub path: String,
    /// Host or `:authority`.
    pub host: String,
    /// `forwarded`, `denied` or `error`.
    pub verdict: &'static str,
    /// The direction whose L7 policy decided (`none` without L7 policy).
    pub direction: &'static str,
    /// The allowing policy, if any.
    pub policy: String,
    /// Status returned downstream.
    pub status: u16,
    /// Microseconds from request headers to response headers.
    pub latency_us: u64,
    /// Why the request was refused or failed, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Kafka requests: what the request was (HTTP fields are then empty and status 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaFlow>,
}

/// Fans flow records out to whoever listens; costs nothing when nobody does. Records travel as
/// `Arc`s: the channel preallocates its 4096 slots, which hold a pointer each rather than a
/// whole record (1.7 MB of RSS before).
#[derive(Clone, Debug)]
pub struct FlowSink {
    tx: broadcast::Sender<Arc<FlowRecord>>,
}

impl Default for FlowSink {
    fn default() -> FlowSink {
        FlowSink::new()
    }
}

impl FlowSink {
    /// A sink buffering up to 4096 records per slow listener (older ones are dropped for it).
    pub fn new() -> FlowSink {
        FlowSink {
            tx: broadcast::channel(4096).0,
        }
    }

    /// Whether anybody listens (records are only built then).
    pub fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publishes a record.
    pub fn publish(&self, record: FlowRecord) {
        let _ = self.tx.send(Arc::new(record));
    }

    /// A new listener.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.tx.subscribe()
    }
}

/// RFC 3339 UTC time with microseconds, without a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_823_754_123_456);
        assert_eq!(rfc3339(t), "2026-11-27T23:55:54.123456Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339(leap).starts_with("2000-02-29T00:00:00"));
    }

    #[test]
    fn metrics_are_exposed() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                direction: "ingress",
                verdict: "denied",
                policy: no_policy(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                "membrane_proxy_l7_requests_total{direction=\"ingress\",verdict=\"denied\",policy=\"\"} 1"
            ),
            "{text}"
        );
    }
}
