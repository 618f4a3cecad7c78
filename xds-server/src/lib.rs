//! membrane's xDS server.
//!
//! - [`translate`]: the pure translation from resolved policy to the resources served
//!   (`membrane.v1.NetworkPolicy` per endpoint, `membrane.v1.NetworkPolicyHosts` per identity,
//!   the SPIFFE ID table), golden-tested;
//! - [`ads`]: the tonic ADS service (state of the world) with versions, nonces, ACK/NACK per
//!   stream and "policy realized" completions, on a unix socket or loopback TCP;
//! - [`client`]: an ADS client over the unix socket, as tests and tools use it (from
//!   `membrane-source`).

pub mod ads;
pub mod client;
pub mod translate;
