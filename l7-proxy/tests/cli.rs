//! `membrane-proxy` refuses bad flags with an error naming the flag, before it serves anything.

use std::process::Command;

#[test]
fn an_upgrade_that_would_carry_unjudged_requests_is_refused() {
    let dir = std::env::temp_dir();
    for (value, says) in [
        ("websocket,h2c", "cannot be allowed"),
        ("TLS", "cannot be allowed"),
        ("websocket/13", "not a protocol name"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_membrane-proxy"))
            .arg("--policy-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
            .args(["--allow-upgrade", value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{value}: {stderr}");
        assert!(
            stderr.contains("--allow-upgrade: upgrade protocol") && stderr.contains(says),
            "{value}: {stderr}"
        );
    }
}
