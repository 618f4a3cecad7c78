//! L7 matchers: pure functions from request facts to a verdict.
//!
//! These are the only implementation of HTTP and Kafka rule semantics. The L7 proxy and the wasm
//! filter both call them; rules are compiled (regexes built) once, when policy is parsed, never per
//! request.

pub mod http;
pub mod kafka;
