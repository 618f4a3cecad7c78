//! membrane's proxy-wasm filter: enforces membrane policy inside an Envoy sidecar, fed by the
//! agent's xDS (`membrane.v1.NetworkPolicy`, `NetworkPolicyHosts`, `SpiffeIdentities`). Requests
//! are judged with the policy crate's HTTP matcher, the same code as membrane's L7 proxy.
//!
//! `state` is pure and tested natively; `glue` (wasm32 only) is the proxy-wasm side.

pub mod state;

#[cfg(target_arch = "wasm32")]
mod glue;
