//! Generates the resource types from `proto/` (protoc: Debian's protobuf-compiler, which the
//! project's scripts install).
fn main() {
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .btree_map(["."])
        .compile_protos(&["proto/membrane/v1/policy.proto"], &["proto"])
        .unwrap_or_else(|e| {
            panic!("protoc failed on api/proto (apt install protobuf-compiler): {e}")
        });
}
