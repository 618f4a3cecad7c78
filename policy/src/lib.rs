//! membrane's policy engine: pure, no I/O, no async runtime; builds for `wasm32-wasip1`.
//!
//! ```text
//!  YAML text ──> yaml::Node ──> parse ──> PolicySet (rules + namespace labels)
//!                                              │
//!  labels ──> identity (filter, allocator) ────┼──> resolve::Resolver ──> per-identity PolicyTable
//!                                              │        (incremental)        │
//!                                              └──> trace (explained verdict) └──> l7::{http,kafka}
//! ```
//!
//! What it deliberately does not do: read files, watch directories, talk to Kubernetes or etcd,
//! or touch the datapath. Callers hand it text and label sets and get values back.
#![deny(missing_docs)]

pub mod decode;
pub mod endpoints;
pub mod identity;
pub mod l7;
pub mod labels;
pub mod parse;
pub mod prefixes;
pub mod resolve;
pub mod rule;
pub mod selector;
pub mod trace;
pub mod yaml;

pub use decode::Diagnostic;
pub use parse::{PolicySet, parse_file};
