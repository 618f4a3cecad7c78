//! Sources shared by the processes at the edge (the agent, the standalone proxy, the tests): the
//! pure policy crate never touches the filesystem or the network, so reading a directory of YAML
//! ([`policy_dir`]) and subscribing to the agent's xDS server ([`ads_client`]) live here, once.

pub mod ads_client;
pub mod policy_dir;
