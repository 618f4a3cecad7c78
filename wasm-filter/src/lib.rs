//! membrane wasm filter (skeleton).
//!
//! A proxy-wasm HTTP and network filter, built for `wasm32-wasip1`, that will judge requests
//! inside an Istio sidecar with `membrane_policy::l7`, the same matchers the L7 proxy uses. For now
//! the crate only proves that the policy engine links into a wasm module; it enforces nothing.
