//! Protocol framing shared by membrane's enforcement points, pure (no I/O) so that it is unit
//! tested, fuzzed and compiled to wasm unchanged:
//!
//! - [`http1`]: a strict HTTP/1 request-stream framer that refuses what could be parsed two ways
//!   (request smuggling) before any lenient parser sees it;
//! - [`path`]: request-path normalization applied before matching and forwarding;
//! - [`kafka`]: Kafka request framing and decoding, the topics a request names, synthetic
//!   authorization-failure answers, the response rewrites policy needs, and the per-connection
//!   session ([`kafka::session`]) that the proxy and the wasm filter both drive.

pub mod http1;
pub mod kafka;
pub mod path;
