//! Compiles the C datapath with clang. Without clang (a machine that only runs `cargo check` or
//! clippy) it writes an empty object and says so; loading that object then fails loudly.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("membrane.bpf.o");
    println!("cargo:rerun-if-changed=bpf_lxc.c");
    println!("cargo:rerun-if-changed=lib");
    println!("cargo:rerun-if-changed=include");
    println!("cargo:rerun-if-env-changed=MEMBRANE_CLANG");
    let clang = env::var("MEMBRANE_CLANG").ok().or_else(|| {
        ["clang-19", "clang"]
            .into_iter()
            .find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(str::to_string)
    });
    let Some(clang) = clang else {
        println!(
            "cargo:warning=clang not found: membrane-bpf is built with an empty datapath object (stub mode)"
        );
        std::fs::write(&out, b"").expect("write stub object");
        return;
    };
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        // Debian puts asm/types.h here; /usr/include/asm exists only with gcc-multilib.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .args(["-c", "bpf_lxc.c", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {clang}: {e}"));
    assert!(status.success(), "{clang} failed to compile bpf_lxc.c");
}
