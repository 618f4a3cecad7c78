//! membrane's L7 proxy.
//!
//! Connections that policy sends to the proxy (redirected by the datapath, by the redirect rules
//! of `membrane-proxy redirect`, or addressed to a reverse-mode listener) are decided at L3/L4
//! when accepted and then judged request by request with the HTTP matcher of `membrane_policy`
//! (the same code the wasm filter runs). Allowed requests go to the original destination over a
//! pooled upstream connection; denied ones get `403 Access denied` on a connection that stays
//! usable. HTTP/1 heads pass a strict framing guard before hyper sees them ([`guard`]), and paths
//! are normalized before matching and forwarding (`membrane_codec::path`). Connections to a port
//! with Kafka rules are parsed frame by frame instead and judged per request ([`kafka`]).
//!
//! ```text
//!  accept ─> identities (src, dst) ─> L3/L4 decision ─deny─> RST
//!                                        │allow
//!  HTTP/1 framing (guard) ─> plain HTTP/1.1: direct path  |  the rest: hyper (h1 / h2c)
//!        ─> per request: policy snapshot ─> judge
//!        ─> 403 locally  |  pooled upstream connection ─> response streamed back
//! ```

pub mod admin;
pub mod agent_feed;
mod direct;
pub mod guard;
mod h1_upstream;
pub mod kafka;
pub mod policy;
pub mod redirect;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod upstream;
