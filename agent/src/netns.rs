//! Endpoint plumbing at the edge: a network namespace, a veth pair joined to the host, addresses,
//! routes and MTU, made with iproute2. Every step checks what exists first, so calling it again
//! (after an agent restart) reuses devices and routes instead of recreating them.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The plumbing of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointNet {
    /// Network namespace name.
    pub netns: String,
    /// Host-side veth.
    pub host_if: String,
    /// Addresses inside the namespace.
    pub addresses: Vec<IpAddr>,
    /// MTU of both ends.
    pub mtu: u32,
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mac> {
        let mut out = [0u8; 6];
        let mut parts = s.trim().split(':');
        for b in &mut out {
            let part = parts
                .next()
                .with_context(|| format!("Ethernet address {s:?}: too short"))?;
            *b = u8::from_str_radix(part, 16)
                .with_context(|| format!("Ethernet address {s:?}: {part:?}"))?;
        }
        if parts.next().is_some() {
            bail!("Ethernet address {s:?}: too long");
        }
        Ok(Mac(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The Ethernet address of an interface: in the host's namespace, or in `netns`.
pub fn mac(netns: Option<&str>, ifname: &str) -> Result<Mac> {
    let text = match netns {
        None => std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
            .with_context(|| format!("no interface {ifname}"))?,
        Some(ns) => {
            let out = ip(&["-n", ns, "-j", "link", "show", "dev", ifname])?;
            let links: Vec<serde_json::Value> = serde_json::from_str(&out)
                .with_context(|| format!("parsing `ip -j link` of {ns}/{ifname}"))?;
            links
                .first()
                .and_then(|l| l["address"].as_str())
                .map(str::to_string)
                .with_context(|| format!("{ns}/{ifname} has no Ethernet address"))?
        }
    };
    text.parse()
}

/// What the datapath needs to know of an endpoint's plumbing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plumbed {
    /// The host veth's ifindex.
    pub ifindex: u32,
    /// The endpoint's interface's Ethernet address.
    pub mac: Mac,
    /// The host veth's.
    pub host_mac: Mac,
}

/// The interface name inside the namespace.
pub const POD_IF: &str = "eth0";
/// The host side's IPv6 link-local address, the endpoints' IPv6 gateway.
const HOST_LL6: &str = "fe80::1";

/// A stable host-side interface name for an endpoint (at most 15 characters).
pub fn host_if_name(endpoint: &str) -> String {
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in endpoint.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mbr{:011x}", h & 0xfff_ffff_ffff)
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("setting {key}"))
}

fn exists_netns(name: &str) -> bool {
    ip(&["netns", "list"])
        .is_ok_and(|o| o.lines().any(|l| l.split_whitespace().next() == Some(name)))
}

fn exists_link(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}")).exists()
}

/// The host-side ifindex of an interface.
pub fn ifindex(name: &str) -> Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .with_context(|| format!("no interface {name}"))?;
    Ok(s.trim().parse()?)
}

/// Creates (or completes) the plumbing.
pub fn ensure(ep: &EndpointNet) -> Result<Plumbed> {
    let ns = ep.netns.as_str();
    if !exists_netns(ns) {
        ip(&["netns", "add", ns])?;
    }
    if !exists_link(&ep.host_if) {
        ip(&[
            "link",
            "add",
            &ep.host_if,
            "mtu",
            &ep.mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            POD_IF,
            "mtu",
            &ep.mtu.to_string(),
            "netns",
            ns,
        ])?;
    }
    let host = ep.host_if.as_str();
    ip(&["link", "set", host, "up"])?;
    // The host answers the endpoint's ARP for every destination and routes for it.
    sysctl(&format!("net.ipv4.conf.{host}.proxy_arp"), "1")?;
    sysctl(&format!("net.ipv4.neigh.{host}.proxy_delay"), "0")?;
    sysctl(&format!("net.ipv4.conf.{host}.rp_filter"), "0")?;
    if ep.addresses.iter().any(IpAddr::is_ipv6) {
        sysctl(&format!("net.ipv6.conf.{host}.disable_ipv6"), "0")?;
        let have = ip(&["-6", "addr", "show", "dev", host])?;
        if !have.contains(HOST_LL6) {
            ip(&[
                "-6",
                "addr",
                "add",
                &format!("{HOST_LL6}/64"),
                "dev",
                host,
                "nodad",
            ])?;
        }
    }
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "set", POD_IF, "up"])?;
    let have_addrs = ip(&["-n", ns, "addr", "show", "dev", POD_IF])?;
    let host_routes =
        ip(&["route", "show", "table", "main"])? + &ip(&["-6", "route", "show", "table", "main"])?;
    for a in &ep.addresses {
        let (plen, fam) = if a.is_ipv4() { (32, "-4") } else { (128, "-6") };
        let cidr = format!("{a}/{plen}");
        if !have_addrs.contains(&cidr) {
            let mut args = vec![fam, "-n", ns, "addr", "add", cidr.as_str(), "dev", POD_IF];
            if a.is_ipv6() {
                args.push("nodad");
            }
            ip(&args)?;
        }
        let host_route = if a.is_ipv4() {
            a.to_string()
        } else {
            cidr.clone()
        };
        if !host_routes
            .lines()
            .any(|l| l.starts_with(&format!("{host_route} ")) && l.contains(host))
        {
            ip(&[fam, "route", "replace", &cidr, "dev", host])?;
        }
    }
    let ns_routes = ip(&["-n", ns, "route", "show"])? + &ip(&["-n", ns, "-6", "route", "show"])?;
    if ep.addresses.iter().any(IpAddr::is_ipv4)
        && !ns_routes.lines().any(|l| l.starts_with("default"))
    {
        ip(&["-n", ns, "route", "add", "default", "dev", POD_IF])?;
    }
    if ep.addresses.iter().any(IpAddr::is_ipv6)
        && !ns_routes
            .lines()
            .any(|l| l.starts_with("default via fe80::1"))
    {
        ip(&[
            "-n", ns, "-6", "route", "add", "default", "via", HOST_LL6, "dev", POD_IF,
        ])?;
    }
    Ok(Plumbed {
        ifindex: ifindex(&ep.host_if)?,
        mac: mac(Some(ns), POD_IF)?,
        host_mac: mac(None, host)?,
    })
}

/// Removes the namespace (and with it the veth pair) and the host routes.
pub fn remove(ep: &EndpointNet) -> Result<()> {
    for a in &ep.addresses {
        let (plen, fam) = if a.is_ipv4() { (32, "-4") } else { (128, "-6") };
        let _ = ip(&[
            fam,
            "route",
            "del",
            &format!("{a}/{plen}"),
            "dev",
            &ep.host_if,
        ]);
    }
    if exists_link(&ep.host_if) {
        let _ = ip(&["link", "del", &ep.host_if]);
    }
    if exists_netns(&ep.netns) {
        ip(&["netns", "del", &ep.netns])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethernet_addresses_parse_and_print() {
        let m: Mac = "02:0a:ff:00:01:9c".parse().unwrap();
        assert_eq!(m, Mac([2, 0x0a, 0xff, 0, 1, 0x9c]));
        assert_eq!(m.to_string(), "02:0a:ff:00:01:9c");
        for bad in [
            "02:0a:ff:00:01",
            "02:0a:ff:00:01:9c:00",
            "02:0a:zz:00:01:9c",
            "",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_names_are_stable_and_short() {
        let a = host_if_name("deathstar");
        assert_eq!(a, host_if_name("deathstar"));
        assert_ne!(a, host_if_name("tiefighter"));
        assert!(a.len() <= 15 && a.starts_with("mbr"), "{a}");
    }
}
