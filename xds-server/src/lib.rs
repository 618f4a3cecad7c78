//! membrane xDS server (skeleton).
//!
//! A tonic ADS server that will serve per-endpoint policy (NetworkPolicy) and the identity to
//! address map (NetworkPolicyHosts) computed by `membrane_policy`. Nothing in this crate runs yet.
