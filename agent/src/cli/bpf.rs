//! `membrane bpf ...` and `membrane monitor`: read the pinned datapath maps directly, as
//! `cilium bpf` does, so they work whether or not the agent is running.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData, RingBuf};
use clap::{Args, Subcommand};
use membrane_bpf::abi::{
    self, CtKey, CtValue, Event, IpcacheValue, LocalEndpoint, LocalKey, PolicyKey, PolicyValue,
};
use membrane_bpf::maps;
use serde_json::{Value, json};

use super::Output;

/// Where the datapath's maps are pinned.
#[derive(Debug, Args)]
pub(super) struct BpfRoot {
    /// bpffs directory holding membrane's pinned maps and links.
    #[arg(
        long,
        env = "MEMBRANE_BPF_ROOT",
        default_value = "/sys/fs/bpf/membrane"
    )]
    bpf_root: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Subcommand)]
pub(super) enum BpfCommand {
    /// The ipcache: address prefixes and their identities.
    #[command(subcommand)]
    Ipcache(ListOnly),
    /// Policy map entries.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Connection tracking entries.
    #[command(subcommand)]
    Ct(ListOnly),
    /// Local endpoints by address: what the datapath delivers to directly.
    #[command(subcommand)]
    Endpoint(ListOnly),
}

#[derive(Debug, Subcommand)]
pub(super) enum ListOnly {
    /// List every entry.
    List(BpfRoot),
}

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCmd {
    /// The entries of one endpoint.
    Get {
        /// Endpoint name (looked up through the agent) or numeric endpoint id.
        endpoint: String,
        /// The agent's API socket, to look names up.
        #[arg(
            long,
            env = "MEMBRANE_API_SOCKET",
            default_value = "/var/run/membrane/membrane.sock"
        )]
        api_socket: PathBuf,
        #[command(flatten)]
        root: BpfRoot,
    },
}

/// `membrane monitor` options.
#[derive(Debug, Args)]
pub(super) struct MonitorArgs {
    #[command(flatten)]
    root: BpfRoot,
    /// Stop after this many events.
    #[arg(long)]
    max_events: Option<usize>,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// The agent's API socket, for the L7 proxy's flow records (shown when the agent runs).
    #[arg(
        long,
        env = "MEMBRANE_API_SOCKET",
        default_value = "/var/run/membrane/membrane.sock"
    )]
    api_socket: PathBuf,
}

pub(super) fn run(cmd: BpfCommand) -> Result<()> {
    match cmd {
        BpfCommand::Ipcache(ListOnly::List(root)) => ipcache(&root),
        BpfCommand::Policy(PolicyCmd::Get {
            endpoint,
            api_socket,
            root,
        }) => {
            let id = match endpoint.parse::<u32>() {
                Ok(id) => id,
                Err(_) => {
                    let e = crate::client::expect_ok(
                        &api_socket,
                        hyper::Method::GET,
                        &format!("/v1/endpoints/{endpoint}"),
                        None,
                    )?;
                    e["id"]
                        .as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .context("the agent returned no endpoint id")?
                }
            };
            policy(&root, id)
        }
        BpfCommand::Ct(ListOnly::List(root)) => ct(&root),
        BpfCommand::Endpoint(ListOnly::List(root)) => local_endpoints(&root),
    }
}

fn pinned(root: &Path, name: &str) -> Result<Map> {
    let path = root.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening {} (is the datapath loaded?)", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn print(root: &BpfRoot, rows: Vec<Value>, text: impl Fn(&Value) -> String) {
    match root.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        ),
        Output::Text => {
            let mut s = String::new();
            for r in &rows {
                let _ = writeln!(s, "{}", text(r));
            }
            print!("{s}");
        }
    }
}

fn ipcache(root: &BpfRoot) -> Result<()> {
    let mut rows = Vec::new();
    let v4: LpmTrie<MapData, [u8; 4], IpcacheValue> =
        pinned(&root.bpf_root, maps::IPCACHE4)?.try_into()?;
    for entry in v4.iter() {
        let (k, v) = entry?;
        rows.push(json!({"prefix": format!("{}/{}", Ipv4Addr::from(k.data()), k.prefix_len()), "identity": v.identity}));
    }
    let v6: LpmTrie<MapData, [u8; 16], IpcacheValue> =
        pinned(&root.bpf_root, maps::IPCACHE6)?.try_into()?;
    for entry in v6.iter() {
        let (k, v) = entry?;
        rows.push(json!({"prefix": format!("{}/{}", Ipv6Addr::from(k.data()), k.prefix_len()), "identity": v.identity}));
    }
    print(root, rows, |r| {
        format!(
            "{:<45} {}",
            r["prefix"].as_str().unwrap_or_default(),
            r["identity"]
        )
    });
    Ok(())
}

fn local_endpoints(root: &BpfRoot) -> Result<()> {
    let m: HashMap<MapData, LocalKey, LocalEndpoint> =
        pinned(&root.bpf_root, maps::LOCAL)?.try_into()?;
    let mut rows = Vec::new();
    for entry in m.iter() {
        let (k, v) = entry?;
        let a = Ipv6Addr::from(k.addr);
        let address = a
            .to_ipv4_mapped()
            .map_or(IpAddr::V6(a), IpAddr::V4)
            .to_string();
        let mut enforced = Vec::new();
        if v.flags & abi::EP_ENFORCE_INGRESS != 0 {
            enforced.push("ingress");
        }
        if v.flags & abi::EP_ENFORCE_EGRESS != 0 {
            enforced.push("egress");
        }
        rows.push(json!({
            "address": address,
            "endpoint_id": v.endpoint_id,
            "identity": v.identity,
            "ifindex": v.ifindex,
            "mac": crate::netns::Mac(v.mac),
            "host_mac": crate::netns::Mac(v.host_mac),
            "enforced": enforced,
        }));
    }
    // Hash order is arbitrary: by endpoint, then address.
    rows.sort_by_key(|r| {
        (
            r["endpoint_id"].as_u64(),
            r["address"].as_str().unwrap_or_default().to_string(),
        )
    });
    print(root, rows, |r| {
        format!(
            "{:<40} id={} identity={} ifindex={} mac={} host_mac={}",
            r["address"].as_str().unwrap_or_default(),
            r["endpoint_id"],
            r["identity"],
            r["ifindex"],
            r["mac"].as_str().unwrap_or_default(),
            r["host_mac"].as_str().unwrap_or_default()
        )
    });
    Ok(())
}

fn star(v: u64) -> Value {
    if v == 0 { json!("*") } else { json!(v) }
}

fn dir_name(d: u8) -> &'static str {
    match d {
        abi::DIR_INGRESS => "ingress",
        abi::DIR_EGRESS => "egress",
        _ => "?",
    }
}

fn policy(root: &BpfRoot, endpoint: u32) -> Result<()> {
    let m: HashMap<MapData, PolicyKey, PolicyValue> =
        pinned(&root.bpf_root, maps::POLICY)?.try_into()?;
    let mut entries: Vec<(PolicyKey, PolicyValue)> = m
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.endpoint_id == endpoint)
        .collect();
    entries.sort_by_key(|(k, _)| (k.dir, k.identity, k.dport, k.proto));
    let rows = entries
        .iter()
        .map(|(k, v)| {
            json!({
                "direction": dir_name(k.dir),
                "identity": star(k.identity.into()),
                "port": star(k.dport.into()),
                "protocol": star(k.proto.into()),
                "action": if v.action == abi::POLICY_REDIRECT { "redirect" } else { "allow" },
                "proxy_port": v.proxy_port,
            })
        })
        .collect();
    print(root, rows, |r| {
        format!(
            "{:<8} identity {:>8}  port {:>5}  proto {:>3}  {}",
            r["direction"].as_str().unwrap_or_default(),
            r["identity"].to_string().trim_matches('"'),
            r["port"].to_string().trim_matches('"'),
            r["protocol"].to_string().trim_matches('"'),
            r["action"].as_str().unwrap_or_default()
        )
    });
    Ok(())
}

fn addr(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

fn ct(root: &BpfRoot) -> Result<()> {
    let m: HashMap<MapData, CtKey, CtValue> = pinned(&root.bpf_root, maps::CT)?.try_into()?;
    let rows = m
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            // The key orders the two ends; show the flow as its initiator sent it.
            let (src, sport, dst, dport) = k.initiated(&v);
            json!({
                "src": addr(src, k.family).to_string(),
                "dst": addr(dst, k.family).to_string(),
                "sport": sport,
                "dport": dport,
                "proto": k.proto,
                "direction": dir_name(v.dir),
                "endpoint": v.endpoint_id,
                "remote_identity": v.remote_identity,
                "packets": v.packets,
                "bytes": v.bytes,
                "replied": v.flags & abi::CT_SEEN_REPLY != 0,
                "closing": v.flags & abi::CT_CLOSING != 0,
                // The revision its verdict was judged under (0: judged on every packet).
                "policy_revision": v.policy_rev,
            })
        })
        .collect();
    print(root, rows, |r| {
        format!(
            "{} {}:{} -> {}:{} {} ep {} remote {} pkts {}{}",
            r["proto"],
            r["src"].as_str().unwrap_or_default(),
            r["sport"],
            r["dst"].as_str().unwrap_or_default(),
            r["dport"],
            r["direction"].as_str().unwrap_or_default(),
            r["endpoint"],
            r["remote_identity"],
            r["packets"],
            if r["closing"] == json!(true) {
                " closing"
            } else {
                ""
            }
        )
    });
    Ok(())
}

fn drop_reason(reason: u8) -> &'static str {
    match reason {
        abi::drop::INVALID_SIP => "Invalid source ip",
        abi::drop::POLICY => "Policy denied",
        abi::drop::INVALID => "Invalid packet",
        abi::drop::CT_INVALID_HDR => "Invalid L4 header",
        abi::drop::INVALID_EXTHDR => "Unsupported IPv6 extension header",
        abi::drop::FRAG_NOSUPPORT => "Fragments not supported",
        abi::drop::PROXY_LOOKUP_FAILED => "No proxy for L7 redirect",
        abi::drop::WRITE_ERROR => "Failed to write to packet",
        _ => "Unknown",
    }
}

/// One L7 flow record as a line: who, what (HTTP request or Kafka API and topics), verdict.
fn l7_line(r: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let what = match r.get("kafka").filter(|k| k.is_object()) {
        Some(k) => {
            let topics: Vec<String> = k["topics"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            format!(
                "kafka {} v{} client={} topics=[{}]{}",
                s(&k["api"]),
                k["api_version"],
                k["client_id"].as_str().unwrap_or("-"),
                topics.join(","),
                k["error_code"]
                    .as_i64()
                    .map(|c| format!(" error={c}"))
                    .unwrap_or_default()
            )
        }
        None => format!(
            "{} {}{} {}",
            s(&r["method"]),
            s(&r["host"]),
            s(&r["path"]),
            r["status"]
        ),
    };
    format!(
        "l7 {:<9} {} {} (id {}) -> {} (id {}) {what}{} {}us{}",
        r["verdict"].as_str().unwrap_or("?"),
        r["direction"].as_str().unwrap_or("?"),
        r["src"].as_str().unwrap_or("?"),
        r["src_identity"],
        r["dst"].as_str().unwrap_or("?"),
        r["dst_identity"],
        r["reason"]
            .as_str()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default(),
        r["latency_us"],
        r["policy"]
            .as_str()
            .filter(|p| !p.is_empty())
            .map(|p| format!(" [{p}]"))
            .unwrap_or_default()
    )
}

pub(super) fn monitor(args: &MonitorArgs) -> Result<()> {
    let map = pinned(&args.root.bpf_root, maps::EVENTS)?;
    let mut rb: RingBuf<MapData> = map.try_into()?;
    let deadline = args
        .timeout
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut seen = 0;
    // L7 flow records come from the agent's embedded proxy; without a running agent only the
    // datapath's events are shown.
    let (l7_tx, l7_rx) = std::sync::mpsc::channel::<String>();
    let socket = args.api_socket.clone();
    std::thread::spawn(move || {
        if let Err(e) = crate::client::stream_lines(&socket, "/v1/flows", l7_tx) {
            eprintln!("membrane monitor: no L7 flow records ({e:#})");
        }
    });
    loop {
        while let Ok(line) = l7_rx.try_recv() {
            let Ok(r) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match args.root.output {
                Output::Json => println!("{}", json!({"type": "l7", "flow": r})),
                Output::Text => println!("{}", l7_line(&r)),
            }
            seen += 1;
            if args.max_events.is_some_and(|m| seen >= m) {
                return Ok(());
            }
        }
        while let Some(item) = rb.next() {
            let Some(e) = Event::from_bytes(&item) else {
                continue;
            };
            let verdict = if e.kind == abi::EVENT_DROP {
                "dropped"
            } else {
                "forwarded"
            };
            let v = json!({
                "verdict": verdict,
                "reason": if e.kind == abi::EVENT_DROP { Some(drop_reason(e.reason)) } else { None },
                "drop_code": if e.kind == abi::EVENT_DROP { Some(-i32::from(e.reason)) } else { None },
                "direction": dir_name(e.dir),
                "endpoint": e.endpoint_id,
                "src_identity": e.src_identity,
                "dst_identity": e.dst_identity,
                "src": addr(e.saddr, e.family).to_string(),
                "dst": addr(e.daddr, e.family).to_string(),
                "sport": e.sport,
                "dport": e.dport,
                "proto": e.proto,
                "len": e.len,
            });
            match args.root.output {
                Output::Json => println!("{v}"),
                Output::Text => println!(
                    "{verdict:<9} {} {}:{} (id {}) -> {}:{} (id {}) proto {} {}{}",
                    dir_name(e.dir),
                    v["src"].as_str().unwrap_or_default(),
                    e.sport,
                    e.src_identity,
                    v["dst"].as_str().unwrap_or_default(),
                    e.dport,
                    e.dst_identity,
                    e.proto,
                    e.len,
                    v["reason"]
                        .as_str()
                        .map(|r| format!(" ({r}, {})", v["drop_code"]))
                        .unwrap_or_default()
                ),
            }
            seen += 1;
            if args.max_events.is_some_and(|m| seen >= m) {
                return Ok(());
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod l7_line_tests {
    use serde_json::json;

    #[test]
    fn http_and_kafka_records_read_as_lines() {
        let http = json!({"verdict": "denied", "direction": "ingress", "src": "10.0.0.2:4000",
            "src_identity": 257, "dst": "10.0.0.1:80", "dst_identity": 256, "method": "GET",
            "host": "web", "path": "/private", "status": 403, "latency_us": 12, "policy": ""});
        assert_eq!(
            super::l7_line(&http),
            "l7 denied    ingress 10.0.0.2:4000 (id 257) -> 10.0.0.1:80 (id 256) GET web/private 403 12us"
        );
        let kafka = json!({"verdict": "denied", "direction": "ingress", "src": "10.0.0.5:5000",
            "src_identity": 260, "dst": "10.0.0.3:9092", "dst_identity": 258, "latency_us": 40,
            "policy": "", "kafka": {"api": "Produce", "api_version": 9, "client_id": "c1",
            "topics": ["empire-announce"], "error_code": 29}});
        assert_eq!(
            super::l7_line(&kafka),
            "l7 denied    ingress 10.0.0.5:5000 (id 260) -> 10.0.0.3:9092 (id 258) kafka Produce v9 client=c1 topics=[empire-announce] error=29 40us"
        );
    }
}
