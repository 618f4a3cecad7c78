//! membrane L7 proxy (skeleton).
//!
//! The transparent hyper-based HTTP proxy and the Kafka proxy will live here. They will judge
//! requests with the matchers in `membrane_policy::l7`, the same code the wasm filter uses. Nothing
//! in this crate runs yet.
