//! Redirect rules for the standalone transparent proxy (a gateway host or a VM without the
//! agent's datapath): nftables `tproxy` sends new TCP connections arriving on chosen interfaces
//! for chosen ports to the proxy's `IP_TRANSPARENT` listener, and a policy-routing rule delivers
//! marked packets locally. The original destination stays the socket's local address.
//!
//! ```text
//! table inet membrane_proxy {
//!   chain prerouting {
//!     type filter hook prerouting priority mangle; policy accept;
//!     iifname { "eth1" } meta nfproto ipv4 tcp dport { 80 } tproxy ip to :15001 meta mark set 0x200 accept
//!     iifname { "eth1" } meta nfproto ipv6 tcp dport { 80 } tproxy ip6 to :15001 meta mark set 0x200 accept
//!   }
//! }
//! ip rule add fwmark 0x200/0xf00 lookup 100        (and ip -6 rule ...)
//! ip route add local 0.0.0.0/0 dev lo table 100    (and ::/0)
//! ```
//!
//! The proxy's own upstream connections leave through OUTPUT, not PREROUTING, so they are not
//! redirected again.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// nftables table name (removing it removes every rule this module installed).
pub const TABLE: &str = "membrane_proxy";
/// The routing table for marked packets.
pub const ROUTE_TABLE: u32 = 100;
/// The mark (and its mask) redirected packets carry.
pub const MARK: u32 = 0x200;
/// Mask of [`MARK`].
pub const MARK_MASK: u32 = 0xf00;

/// What to redirect.
#[derive(Clone, Debug)]
pub struct RedirectSpec {
    /// The proxy's transparent listener port.
    pub proxy_port: u16,
    /// Destination ports to intercept.
    pub ports: Vec<u16>,
    /// Interfaces whose arriving traffic is intercepted.
    pub interfaces: Vec<String>,
}

fn set<T: ToString>(items: &[T], quote: bool) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|i| {
            if quote {
                format!("\"{}\"", i.to_string())
            } else {
                i.to_string()
            }
        })
        .collect();
    format!("{{ {} }}", parts.join(", "))
}

/// The nftables ruleset (for `nft -f`).
pub fn nft_ruleset(spec: &RedirectSpec) -> Result<String> {
    if spec.ports.is_empty() || spec.interfaces.is_empty() {
        bail!("redirect needs at least one --port and one --interface");
    }
    for i in &spec.interfaces {
        if i.is_empty()
            || i.len() > 15
            || !i
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            bail!("invalid interface name {i:?}");
        }
    }
    let ifs = set(&spec.interfaces, true);
    let ports = set(&spec.ports, false);
    let p = spec.proxy_port;
    Ok(format!(
        "table inet {TABLE} {{\n  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
         iifname {ifs} meta nfproto ipv4 tcp dport {ports} tproxy ip to :{p} meta mark set {MARK:#x} accept\n    \
         iifname {ifs} meta nfproto ipv6 tcp dport {ports} tproxy ip6 to :{p} meta mark set {MARK:#x} accept\n  }}\n}}\n"
    ))
}

/// The `ip` commands that route marked packets to the local stack.
pub fn ip_commands() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (family, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        out.push(
            format!("{family} rule add fwmark {MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} pref {ROUTE_TABLE}")
                .split(' ')
                .map(String::from)
                .collect(),
        );
        out.push(
            format!("{family} route replace local {any} dev lo table {ROUTE_TABLE}")
                .split(' ')
                .map(String::from)
                .collect(),
        );
    }
    out
}

/// Everything, as a shell script (what `membrane-proxy redirect print` shows).
pub fn script(spec: &RedirectSpec) -> Result<String> {
    let mut s = format!(
        "nft delete table inet {TABLE} 2>/dev/null\nnft -f - <<'EOF'\n{}EOF\n",
        nft_ruleset(spec)?
    );
    for c in ip_commands() {
        s.push_str(&format!("ip {}\n", c.join(" ")));
    }
    Ok(s)
}

fn run(cmd: &str, args: &[String]) -> Result<std::process::Output> {
    Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))
}

/// Installs the rules (idempotent: an existing table is replaced, routes are replaced, the ip
/// rules are added only when missing).
pub fn install(spec: &RedirectSpec) -> Result<()> {
    let ruleset = nft_ruleset(spec)?;
    let _ = run(
        "nft",
        &["delete".into(), "table".into(), "inet".into(), TABLE.into()],
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft refused the ruleset: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    install_routing()
}

/// The policy routing alone (what the agent's datapath redirect needs): marked packets go to the
/// local stack. Idempotent.
pub fn install_routing() -> Result<()> {
    for c in ip_commands() {
        if c[1] == "rule" {
            let show = run("ip", &[c[0].clone(), "rule".into(), "show".into()])?;
            let wanted = format!("fwmark {MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}");
            if String::from_utf8_lossy(&show.stdout).contains(&wanted) {
                continue;
            }
        }
        let out = run("ip", &c)?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                c.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Removes what [`install`] added (missing pieces are not an error).
pub fn remove() -> Result<()> {
    let _ = run(
        "nft",
        &["delete".into(), "table".into(), "inet".into(), TABLE.into()],
    )?;
    for (family, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        let rule: Vec<String> =
            format!("{family} rule del fwmark {MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}")
                .split(' ')
                .map(String::from)
                .collect();
        let _ = run("ip", &rule)?;
        let route: Vec<String> =
            format!("{family} route del local {any} dev lo table {ROUTE_TABLE}")
                .split(' ')
                .map(String::from)
                .collect();
        let _ = run("ip", &route)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_interfaces_ports_and_listener() {
        let spec = RedirectSpec {
            proxy_port: 15001,
            ports: vec![80, 8080],
            interfaces: vec!["eth1".into(), "veth+".into()],
        };
        let r = nft_ruleset(&spec).unwrap();
        assert!(r.contains("iifname { \"eth1\", \"veth+\" } meta nfproto ipv4 tcp dport { 80, 8080 } tproxy ip to :15001 meta mark set 0x200 accept"), "{r}");
        assert!(r.contains("tproxy ip6 to :15001"));
        let bad = RedirectSpec {
            interfaces: vec!["eth1\"; flush ruleset".into()],
            ..spec
        };
        assert!(nft_ruleset(&bad).is_err());
    }
}
