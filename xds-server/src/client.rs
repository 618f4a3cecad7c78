//! The ADS client the tests and tools use, re-exported: it lives in `membrane-source`, where
//! the standalone proxy subscribes to the agent with it too.

pub use membrane_source::ads_client::*;
