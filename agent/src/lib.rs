//! membrane agent: the node daemon and the `membrane` CLI.
//!
//! At this stage the crate holds the policy-directory source and the offline commands of the CLI
//! (`membrane policy validate|trace|resolve`). The daemon (`membrane-agent`), the datapath loader,
//! endpoints and the REST API arrive with the datapath issue.

pub mod cli;
pub mod client;
pub mod daemon;
pub mod datapath;
pub mod ipam;
pub mod istio_webhook;
pub mod netns;
pub mod offline;
pub use membrane_source::policy_dir;
pub mod trace_view;
