//! `membrane policy validate|trace|resolve`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};
use membrane_policy::identity::Identity;
use membrane_policy::l7::kafka::api_key_from_name;
use membrane_policy::labels::{LabelSet, Source};
use membrane_policy::resolve::{DirectionTable, Verdict};
use membrane_policy::rule::{EnforcementMode, L7Rules, Proto};
use membrane_policy::trace::{Flow, L7Facts};
use membrane_policy::{Diagnostic, PolicySet};
use serde_json::json;

use super::Output;
use crate::offline::Offline;
use crate::policy_dir;

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Check policy files or directories. Exit 0 when all is valid; otherwise print one
    /// `FILE:LINE:COL: message` line per problem on stderr and exit 1.
    Validate {
        /// Files or directories (walked recursively for *.yaml and *.yml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Explain the verdict for one flow (and optionally one request).
    Trace(Box<TraceArgs>),
    /// Print the computed policy table of each endpoint listed in a file.
    Resolve(ResolveArgs),
}

#[derive(Debug, Args)]
pub(super) struct TraceArgs {
    /// Directory (or file) of policy YAML.
    #[arg(long, env = "MEMBRANE_POLICY_DIR", required_unless_present = "live")]
    policy_dir: Option<PathBuf>,
    /// Ask the running agent: its policy in force, its endpoints (--src/--dst may name them).
    #[arg(long)]
    live: bool,
    /// The agent's API socket (with --live).
    #[arg(
        long,
        env = "MEMBRANE_API_SOCKET",
        default_value = "/var/run/membrane/membrane.sock"
    )]
    api_socket: PathBuf,
    /// Source labels: comma-separated `[source:]key=value` (no source means k8s:).
    #[arg(long, required_unless_present = "src_ip", conflicts_with = "src_ip")]
    src: Option<String>,
    /// Source address (an address outside every endpoint is world with its CIDR labels).
    #[arg(long)]
    src_ip: Option<IpAddr>,
    /// Destination labels.
    #[arg(long, required_unless_present = "dst_ip", conflicts_with = "dst_ip")]
    dst: Option<String>,
    /// Destination address.
    #[arg(long)]
    dst_ip: Option<IpAddr>,
    /// Namespace of a --src workload whose labels name none.
    #[arg(long, default_value = "default")]
    src_namespace: String,
    /// Namespace of a --dst workload whose labels name none.
    #[arg(long, default_value = "default")]
    dst_namespace: String,
    /// Endpoints file (as for `resolve`): lets --src-ip/--dst-ip name endpoints.
    #[arg(long)]
    endpoints: Option<PathBuf>,
    /// Destination port, optionally with protocol: 80, 80/TCP, 53/UDP.
    #[arg(long)]
    dport: String,
    /// HTTP request method.
    #[arg(long)]
    http_method: Option<String>,
    /// HTTP request path (with query).
    #[arg(long)]
    http_path: Option<String>,
    /// HTTP authority.
    #[arg(long)]
    http_host: Option<String>,
    /// HTTP header, `Name: value` or `Name:value` (repeatable).
    #[arg(long)]
    http_header: Vec<String>,
    /// Kafka API key, by name or number.
    #[arg(long)]
    kafka_api_key: Option<String>,
    /// Kafka API version.
    #[arg(long)]
    kafka_api_version: Option<i16>,
    /// Kafka client id.
    #[arg(long)]
    kafka_client_id: Option<String>,
    /// Kafka topic (repeatable).
    #[arg(long)]
    kafka_topic: Vec<String>,
    /// Enforcement mode.
    #[arg(long, default_value = "default", env = "MEMBRANE_ENABLE_POLICY")]
    enable_policy: EnforcementMode,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub(super) struct ResolveArgs {
    /// Directory (or file) of policy YAML.
    #[arg(long, env = "MEMBRANE_POLICY_DIR")]
    policy_dir: PathBuf,
    /// YAML file listing endpoints: `endpoints: [{name, namespace, labels, serviceAccount, ips}]`.
    #[arg(long)]
    endpoints: PathBuf,
    /// Enforcement mode.
    #[arg(long, default_value = "default", env = "MEMBRANE_ENABLE_POLICY")]
    enable_policy: EnforcementMode,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Output,
}

pub(super) fn run(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Validate { paths } => validate(&paths),
        PolicyCommand::Trace(args) => bad_input_is_2(trace_cmd(&args)),
        PolicyCommand::Resolve(args) => bad_input_is_2(resolve_cmd(&args)),
    }
}

fn bad_input_is_2(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membrane: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    match policy_dir::load(paths) {
        Err(e) => {
            eprintln!("membrane: {e}");
            ExitCode::from(2)
        }
        Ok(Err(diags)) => {
            // Exactly one line per problem: editors and CI tools parse stderr line by line.
            print_diagnostics(&diags);
            ExitCode::from(1)
        }
        Ok(Ok(set)) => {
            println!(
                "{} rule(s) in {} policy object(s): valid",
                set.rules.len(),
                set.policy_names().len()
            );
            ExitCode::SUCCESS
        }
    }
}

fn load_policy(dir: &PathBuf) -> Result<PolicySet> {
    match policy_dir::load(std::slice::from_ref(dir))? {
        Ok(set) => Ok(set),
        Err(diags) => {
            print_diagnostics(&diags);
            bail!(
                "the policy in {} is invalid ({} problem(s))",
                dir.display(),
                diags.len()
            )
        }
    }
}

fn load_endpoints(path: &std::path::Path) -> Result<Vec<membrane_policy::endpoints::EndpointSpec>> {
    policy_dir::load_endpoints(path)?.map_err(|diags| {
        print_diagnostics(&diags);
        anyhow!("{} is invalid ({} problem(s))", path.display(), diags.len())
    })
}

fn parse_dport(s: &str) -> Result<(u16, Proto)> {
    let (port, proto) = match s.split_once('/') {
        Some((p, pr)) => (
            p,
            Proto::parse(pr).ok_or_else(|| anyhow!("unknown protocol {pr:?} in --dport"))?,
        ),
        None => (s, Proto::Tcp),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("invalid port {port:?} in --dport (expected 0-65535)"))?;
    if port == 0 && matches!(proto, Proto::Tcp | Proto::Udp | Proto::Sctp) {
        bail!("--dport 0 is not a valid {proto} port");
    }
    Ok((port, proto))
}

fn l7_facts(a: &TraceArgs) -> Result<L7Facts> {
    let http = a.http_method.is_some()
        || a.http_path.is_some()
        || a.http_host.is_some()
        || !a.http_header.is_empty();
    let kafka = a.kafka_api_key.is_some()
        || a.kafka_api_version.is_some()
        || a.kafka_client_id.is_some()
        || !a.kafka_topic.is_empty();
    match (http, kafka) {
        (true, true) => bail!("give either --http-* or --kafka-* options, not both"),
        (true, false) => {
            let mut headers = Vec::new();
            for h in &a.http_header {
                let (name, value) = h.split_once(':').ok_or_else(|| {
                    anyhow!("invalid --http-header {h:?} (expected 'Name: value')")
                })?;
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            Ok(L7Facts::Http {
                method: a.http_method.clone().unwrap_or_else(|| "GET".into()),
                path: a.http_path.clone().unwrap_or_else(|| "/".into()),
                host: a.http_host.clone().unwrap_or_default(),
                headers,
            })
        }
        (false, true) => {
            let key = a.kafka_api_key.as_deref().ok_or_else(|| {
                anyhow!("--kafka-api-key is required with other --kafka-* options")
            })?;
            let api_key =
                api_key_from_name(key).ok_or_else(|| anyhow!("unknown Kafka API key {key:?}"))?;
            Ok(L7Facts::Kafka {
                api_key,
                api_version: a.kafka_api_version.unwrap_or(0),
                client_id: a.kafka_client_id.clone(),
                topics: a.kafka_topic.clone(),
            })
        }
        (false, false) => Ok(L7Facts::None),
    }
}

fn party(
    offline: &mut Offline,
    labels: &Option<String>,
    ip: Option<IpAddr>,
    namespace: &str,
    flag: &str,
) -> Result<(Identity, Option<String>)> {
    if let Some(ip) = ip {
        return offline.identity_for_ip(ip);
    }
    let text = labels.as_deref().unwrap_or_default();
    let set = LabelSet::parse_list(text, Source::K8s).map_err(|e| anyhow!("--{flag}: {e}"))?;
    if set.is_empty() {
        bail!("--{flag} needs at least one label (reserved:init for an endpoint without labels)");
    }
    Ok((offline.identity_for_labels(&set, namespace)?, None))
}

fn trace_live(a: &TraceArgs) -> Result<()> {
    let (port, proto) = parse_dport(&a.dport)?;
    let side = |labels: &Option<String>, ip: Option<IpAddr>| {
        labels
            .clone()
            .or(ip.map(|i| i.to_string()))
            .unwrap_or_default()
    };
    let req = crate::trace_view::TraceRequest {
        src: side(&a.src, a.src_ip),
        dst: side(&a.dst, a.dst_ip),
        src_namespace: Some(a.src_namespace.clone()),
        dst_namespace: Some(a.dst_namespace.clone()),
        dport: port,
        proto: proto.to_string(),
        http: match l7_facts(a)? {
            L7Facts::Http {
                method,
                path,
                host,
                headers,
            } => Some(crate::trace_view::HttpFacts {
                method,
                path,
                host,
                headers,
            }),
            _ => None,
        },
        kafka: a
            .kafka_api_key
            .clone()
            .map(|api_key| crate::trace_view::KafkaFacts {
                api_key,
                api_version: a.kafka_api_version.unwrap_or(0),
                client_id: a.kafka_client_id.clone(),
                topics: a.kafka_topic.clone(),
            }),
    };
    let v = crate::client::expect_ok(
        &a.api_socket,
        hyper::Method::POST,
        "/v1/trace",
        Some(serde_json::to_value(&req)?),
    )?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v["trace"])?),
        Output::Text => print!("{}", v["text"].as_str().unwrap_or_default()),
    }
    Ok(())
}

fn trace_cmd(a: &TraceArgs) -> Result<()> {
    if a.live {
        return trace_live(a);
    }
    let dir = a
        .policy_dir
        .as_ref()
        .ok_or_else(|| anyhow!("--policy-dir is required without --live"))?;
    let set = load_policy(dir)?;
    let specs = match &a.endpoints {
        Some(p) => load_endpoints(p)?,
        None => Vec::new(),
    };
    let (port, proto) = parse_dport(&a.dport)?;
    let l7 = l7_facts(a)?;
    let mut offline = Offline::new(set, a.enable_policy, specs)?;
    let (src, src_name) = party(&mut offline, &a.src, a.src_ip, &a.src_namespace, "src")?;
    let (dst, dst_name) = party(&mut offline, &a.dst, a.dst_ip, &a.dst_namespace, "dst")?;
    let flow = Flow {
        src: &src,
        dst: &dst,
        port,
        proto,
        l7,
    };
    let (result, judged) =
        crate::trace_view::trace_as_proxy(&offline.set.rules, a.enable_policy, &flow)?;
    match a.output {
        Output::Json => {
            let mut v = serde_json::to_value(&result)?;
            v["src"]["endpoint"] = json!(src_name);
            v["dst"]["endpoint"] = json!(dst_name);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => print!("{}", crate::trace_view::render(&result, &judged)),
    }
    Ok(())
}

fn resolve_cmd(a: &ResolveArgs) -> Result<()> {
    let set = load_policy(&a.policy_dir)?;
    let specs = load_endpoints(&a.endpoints)?;
    let offline = Offline::new(set, a.enable_policy, specs)?;
    let mut out = Vec::new();
    for (spec, identity) in &offline.endpoints {
        let table = offline
            .resolver
            .table(identity.id)
            .ok_or_else(|| anyhow!("no table for endpoint {}", spec.name))?;
        out.push(json!({
            "name": spec.name,
            "namespace": spec.namespace,
            "identity": identity.id.0,
            "labels": identity.labels,
            "ingress": direction_json(&offline, &table.ingress),
            "egress": direction_json(&offline, &table.egress),
        }));
    }
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "mode": a.enable_policy, "endpoints": out }))?
        ),
        Output::Text => print!("{}", render_resolve(&out)),
    }
    Ok(())
}

fn direction_json(offline: &Offline, t: &DirectionTable) -> serde_json::Value {
    let mut entries = Vec::new();
    for (key, _) in t.raw() {
        let Some(eff) = t.effective(key) else {
            continue;
        };
        let remote = if key.identity == 0 {
            json!("*")
        } else {
            json!(key.identity)
        };
        let remote_labels = offline
            .resolver
            .identity(membrane_policy::identity::NumericIdentity(key.identity))
            .map(|i| i.labels.to_string());
        let (verdict, l7) = match &eff.verdict {
            Verdict::Allow => ("allow", serde_json::Value::Null),
            Verdict::Redirect(p) => {
                let rules: Vec<serde_json::Value> = p
                    .rules
                    .iter()
                    .map(|r| match r {
                        L7Rules::Http(h) => json!({ "http": h }),
                        L7Rules::Kafka(k) => json!({ "kafka": k }),
                    })
                    .collect();
                ("redirect", json!({ "kind": p.kind, "rules": rules }))
            }
        };
        entries.push(json!({
            "remote_identity": remote,
            "remote_labels": remote_labels,
            "port": if key.port == 0 { json!("*") } else { json!(key.port) },
            "protocol": match key.proto { 0 => json!("*"), 6 => json!("TCP"), 17 => json!("UDP"), n => json!(n) },
            "verdict": verdict,
            "l7": l7,
            "derived_from": eff.derived_from.iter().map(|c| c.describe()).collect::<Vec<_>>(),
        }));
    }
    json!({ "enforced": t.enforced, "entries": entries })
}

fn render_resolve(endpoints: &[serde_json::Value]) -> String {
    let mut s = String::new();
    for e in endpoints {
        let _ = writeln!(
            s,
            "Endpoint {} (namespace {}, identity {})\n  labels: {}",
            e["name"].as_str().unwrap_or_default(),
            e["namespace"].as_str().unwrap_or_default(),
            e["identity"],
            e["labels"]
                .as_array()
                .map(|l| l
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default()
        );
        for dir in ["ingress", "egress"] {
            let d = &e[dir];
            if d["enforced"] != json!(true) {
                let _ = writeln!(s, "  {dir}: not enforced (everything allowed)");
                continue;
            }
            let entries = d["entries"].as_array().cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "  {dir}: enforced, {} entr{} (anything else is denied)",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for en in entries {
                let remote = match &en["remote_identity"] {
                    serde_json::Value::String(x) => x.clone(),
                    other => format!("{other}"),
                };
                let labels = en["remote_labels"]
                    .as_str()
                    .map(|l| format!(" [{l}]"))
                    .unwrap_or_default();
                let l7 = match en["l7"]["kind"].as_str() {
                    Some(k) => format!(" -> proxy ({k})"),
                    None if en["verdict"] == json!("redirect") => {
                        " -> proxy (conflicting L7 protocols: deny)".to_string()
                    }
                    None => String::new(),
                };
                let port = match &en["port"] {
                    serde_json::Value::String(x) => x.clone(),
                    other => format!("{other}"),
                };
                let proto = match &en["protocol"] {
                    serde_json::Value::String(x) => x.clone(),
                    other => format!("{other}"),
                };
                let _ = writeln!(
                    s,
                    "    {remote:>8} {port:>5}/{proto:<3} {}{l7}{labels}",
                    en["verdict"].as_str().unwrap_or_default()
                );
                for d in en["derived_from"].as_array().cloned().unwrap_or_default() {
                    let _ = writeln!(s, "             from {}", d.as_str().unwrap_or_default());
                }
            }
        }
        s.push('\n');
    }
    s
}
