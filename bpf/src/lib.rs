//! membrane datapath: the C programs in `bpf_lxc.c` (compiled by `build.rs` with clang), the map
//! ABI they share with the agent, and that ABI's Rust mirror.
//!
//! ```text
//!  host veth of an endpoint
//!    TC ingress: from_endpoint ── egress policy of the endpoint; for a local destination also
//!                                 its ingress policy, then straight into it (bpf_redirect_peer)
//!    TC egress:  to_endpoint   ── ingress policy of the endpoint (traffic from elsewhere)
//!  maps: ipcache (LPM, v4 + v6) -> identity; endpoints (ifindex -> endpoint);
//!        local (address -> local endpoint, its interface and Ethernet addresses);
//!        policy (endpoint, identity, port, proto, dir; 6 probes); conntrack (LRU);
//!        metrics (per-CPU); events (ring buffer); revision (policy revision, one entry)
//! ```
//!
//! Attaching (TCX links, pinning) and filling the maps is the agent's job (`agent/src/datapath`).

pub mod abi;

/// The compiled datapath object (empty when the crate was built without clang).
pub const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/membrane.bpf.o"));

/// Names of the programs in [`OBJECT`].
pub mod programs {
    /// TC ingress of the host veth: traffic leaving the endpoint (its egress policy).
    pub const FROM_ENDPOINT: &str = "from_endpoint";
    /// TC egress of the host veth: traffic arriving at the endpoint (its ingress policy).
    pub const TO_ENDPOINT: &str = "to_endpoint";
}

/// Names of the maps in [`OBJECT`]; the `_v3` suffix is [`abi::ABI_VERSION`].
pub mod maps {
    /// IPv4 ipcache.
    pub const IPCACHE4: &str = "mbr_ipcache4_v3";
    /// IPv6 ipcache.
    pub const IPCACHE6: &str = "mbr_ipcache6_v3";
    /// External devices by ifindex.
    pub const DEVICES: &str = "mbr_devices_v3";
    /// Endpoints by host veth ifindex.
    pub const ENDPOINTS: &str = "mbr_endpoints_v3";
    /// Local endpoints by address, for delivery between endpoints.
    pub const LOCAL: &str = "mbr_local_v3";
    /// Policy.
    pub const POLICY: &str = "mbr_policy_v3";
    /// Connection tracking.
    pub const CT: &str = "mbr_ct_v3";
    /// Per-CPU metrics.
    pub const METRICS: &str = "mbr_metrics_v3";
    /// Ring buffer of drop and verdict events.
    pub const EVENTS: &str = "mbr_events_v3";
    /// The policy revision (one entry).
    pub const REVISION: &str = "mbr_revision_v3";
}
