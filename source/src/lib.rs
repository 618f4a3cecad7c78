//! File-backed sources shared by the processes at the edge (the agent and the standalone proxy):
//! the pure policy crate never touches the filesystem, so reading a directory of YAML lives here,
//! once.

pub mod policy_dir;
