//! Helpers shared by the root end-to-end tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs a command quietly; true when it succeeded.
pub fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Panics, with a message that says why, unless the test runs as root.
pub fn require_root() {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(
        root,
        "this test creates network namespaces and loads BPF programs: run it as root"
    );
}

/// Python for a TCP server that answers "ok" on each port of `addr`.
pub fn server_code(addr: &str, ports: &[u16]) -> String {
    let ports = ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "import socket,threading\n\
         def run(p):\n  s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('{addr}',p)); s.listen(16)\n  \
         while True:\n    c,_=s.accept(); c.sendall(b'ok'); c.close()\n\
         for p in [{ports}]: threading.Thread(target=run,args=(p,),daemon=True).start()\n\
         threading.Event().wait()\n"
    )
}

/// Python that exits 0 when a TCP connection gets the server's "ok" within a second.
pub fn client_code(addr: &str, port: u16) -> String {
    format!(
        "import socket,sys\ns=socket.create_connection(('{addr}',{port}),timeout=1)\nsys.exit(0 if s.recv(2)==b'ok' else 1)\n"
    )
}

/// Removes pinned links and maps from a test's private bpffs and unmounts it.
pub fn remove_bpffs(dir: &Path) {
    let _ = fs::remove_dir_all(dir.join("links"));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    sh(&["umount", &dir.display().to_string()]);
}
