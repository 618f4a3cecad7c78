//! membrane datapath (skeleton).
//!
//! This crate will hold the C programs (TC on endpoint veths and external devices), the map
//! layouts defined once in a C header with their `#[repr(C)]` Rust mirrors, and the build step that
//! compiles the C with clang. It is empty until the datapath issue lands: nothing here enforces
//! anything yet. The policy tables it will load come from `membrane_policy::resolve`.
