//! membrane Istio integration (skeleton).
//!
//! Sidecar injection and the manifests that wire the wasm filter and the agent into Istio will
//! live here. Nothing in this crate runs yet.
