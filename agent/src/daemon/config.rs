//! `membrane-agent` configuration: flags, each with an environment twin and a config-file key
//! (the flag's name). Precedence: flag, then environment, then file, then default.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use ipnet::IpNet;
use membrane_policy::rule::EnforcementMode;

/// membrane-agent: the node daemon (standalone mode: a policy directory, local identities).
#[derive(Clone, Debug, Parser)]
#[command(name = "membrane-agent", version)]
pub struct Config {
    /// Configuration file (YAML); keys are the long flag names.
    #[arg(long, env = "MEMBRANE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of policy YAML, watched for changes.
    #[arg(
        long,
        env = "MEMBRANE_POLICY_DIR",
        default_value = "/etc/membrane/policy"
    )]
    pub policy_dir: PathBuf,
    /// Where endpoint state is kept across restarts.
    #[arg(long, env = "MEMBRANE_STATE_DIR", default_value = "/var/run/membrane")]
    pub state_dir: PathBuf,
    /// bpffs directory for pinned maps and links (a bpffs is mounted there when none is).
    #[arg(
        long,
        env = "MEMBRANE_BPF_ROOT",
        default_value = "/sys/fs/bpf/membrane"
    )]
    pub bpf_root: PathBuf,
    /// External devices: traffic arriving through them is world (or host, see below).
    #[arg(long, env = "MEMBRANE_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// IPv4 range endpoint addresses come from.
    #[arg(long, env = "MEMBRANE_IPV4_RANGE", default_value = "10.200.0.0/16")]
    pub ipv4_range: Option<IpNet>,
    /// IPv6 range endpoint addresses come from.
    #[arg(long, env = "MEMBRANE_IPV6_RANGE")]
    pub ipv6_range: Option<IpNet>,
    /// Policy enforcement: default, always or never.
    #[arg(long, env = "MEMBRANE_ENABLE_POLICY", default_value = "default")]
    pub enable_policy: EnforcementMode,
    /// Treat traffic from external devices as host rather than world.
    #[arg(long, env = "MEMBRANE_K8S_LEGACY_HOST_ALLOWS_WORLD")]
    pub k8s_legacy_host_allows_world: bool,
    /// Remove all pinned state and endpoints of an earlier run first.
    #[arg(long, env = "MEMBRANE_CLEAN_STATE")]
    pub clean_state: bool,
    /// The REST API's unix socket.
    #[arg(
        long,
        env = "MEMBRANE_API_SOCKET",
        default_value = "/var/run/membrane/membrane.sock"
    )]
    pub api_socket: PathBuf,
    /// Address to serve Prometheus metrics on (`/metrics`), e.g. 127.0.0.1:9962.
    #[arg(long, env = "MEMBRANE_PROMETHEUS_SERVE_ADDR")]
    pub prometheus_serve_addr: Option<SocketAddr>,
    /// Port of the embedded L7 proxy's transparent listener, to which the datapath hands
    /// connections that HTTP rules govern; 0 runs no proxy (such connections are then dropped).
    #[arg(long, env = "MEMBRANE_PROXY_PORT", default_value_t = 15001)]
    pub proxy_port: u16,
    /// Address for the proxy's Prometheus metrics and live flow records (`/metrics`, `/flows`).
    #[arg(long, env = "MEMBRANE_PROXY_ADMIN_ADDR")]
    pub proxy_admin_addr: Option<SocketAddr>,
    /// Body of the proxy's 403 answer to a request the HTTP rules deny.
    #[arg(
        long,
        env = "MEMBRANE_PROXY_DENY_BODY",
        default_value = "Access denied\r\n"
    )]
    pub proxy_deny_body: String,
    /// Protocols a request that the HTTP rules allow may switch its connection to
    /// (`Upgrade`); other offers are dropped (h2c, h2, HTTP and TLS can never be allowed).
    #[arg(
        long,
        env = "MEMBRANE_PROXY_ALLOW_UPGRADE",
        value_delimiter = ',',
        default_value = "websocket"
    )]
    pub proxy_allow_upgrade: Vec<String>,
    /// Unix socket of the xDS (ADS) server that feeds membrane's wasm filter in Envoy sidecars;
    /// an empty path serves none.
    #[arg(
        long,
        env = "MEMBRANE_XDS_SOCKET",
        default_value = "/var/run/membrane/xds.sock"
    )]
    pub xds_socket: PathBuf,
    /// Also serve xDS on this TCP address (loopback, for a standalone Envoy).
    #[arg(long, env = "MEMBRANE_XDS_ADDR")]
    pub xds_addr: Option<SocketAddr>,
    /// Trust domain of the SPIFFE IDs mapped to identities (`spiffe://DOMAIN/ns/NS/sa/SA`).
    #[arg(
        long,
        env = "MEMBRANE_XDS_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub xds_trust_domain: String,
    /// For a standalone (non-Istio) Envoy: serve ECDS (`TypedExtensionConfig`s `membrane`, the
    /// HTTP filter, `membrane_upstream`, the same among a cluster's upstream HTTP filters, and
    /// `membrane_kafka`, the Kafka network filter) configuring membrane's wasm filter from this
    /// module file on Envoy's host.
    #[arg(long, env = "MEMBRANE_XDS_WASM_MODULE")]
    pub xds_wasm_module: Option<PathBuf>,
    /// The Envoy cluster through which that filter reaches the agent's xDS.
    #[arg(
        long,
        env = "MEMBRANE_XDS_WASM_CLUSTER",
        default_value = "membrane_xds"
    )]
    pub xds_wasm_cluster: String,
}

impl Config {
    /// Parses flags and environment, then fills what neither set from the config file.
    pub fn load() -> Result<Config> {
        let matches = Config::command().get_matches();
        let mut config = Config::from_arg_matches(&matches)?;
        if let Some(path) = config.config.clone() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file: serde_json::Map<String, serde_json::Value> = serde_saphyr::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut args = vec!["membrane-agent".to_string()];
            for (key, value) in &file {
                let id = key.replace('-', "_");
                if Config::command()
                    .get_arguments()
                    .all(|a| a.get_id().as_str() != id)
                {
                    bail!("{}: unknown key {key:?}", path.display());
                }
                // Flags and environment variables win over the file.
                if matches!(
                    matches.value_source(&id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                ) {
                    continue;
                }
                match value {
                    serde_json::Value::Bool(true) => args.push(format!("--{key}")),
                    serde_json::Value::Bool(false) => {}
                    serde_json::Value::Array(items) => {
                        for i in items {
                            args.push(format!(
                                "--{key}={}",
                                i.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| i.to_string())
                            ));
                        }
                    }
                    v => args.push(format!(
                        "--{key}={}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    )),
                }
            }
            let from_file =
                Config::try_parse_from(&args).with_context(|| format!("in {}", path.display()))?;
            for key in file.keys() {
                let id = key.replace('-', "_");
                if matches!(
                    matches.value_source(&id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                ) {
                    continue;
                }
                config.take_from(&from_file, &id);
            }
        }
        Ok(config)
    }

    fn take_from(&mut self, other: &Config, id: &str) {
        match id {
            "policy_dir" => self.policy_dir = other.policy_dir.clone(),
            "state_dir" => self.state_dir = other.state_dir.clone(),
            "bpf_root" => self.bpf_root = other.bpf_root.clone(),
            "devices" => self.devices = other.devices.clone(),
            "ipv4_range" => self.ipv4_range = other.ipv4_range,
            "ipv6_range" => self.ipv6_range = other.ipv6_range,
            "enable_policy" => self.enable_policy = other.enable_policy,
            "k8s_legacy_host_allows_world" => {
                self.k8s_legacy_host_allows_world = other.k8s_legacy_host_allows_world
            }
            "clean_state" => self.clean_state = other.clean_state,
            "api_socket" => self.api_socket = other.api_socket.clone(),
            "prometheus_serve_addr" => self.prometheus_serve_addr = other.prometheus_serve_addr,
            "proxy_port" => self.proxy_port = other.proxy_port,
            "proxy_admin_addr" => self.proxy_admin_addr = other.proxy_admin_addr,
            "proxy_deny_body" => self.proxy_deny_body = other.proxy_deny_body.clone(),
            "proxy_allow_upgrade" => self.proxy_allow_upgrade = other.proxy_allow_upgrade.clone(),
            "xds_socket" => self.xds_socket = other.xds_socket.clone(),
            "xds_addr" => self.xds_addr = other.xds_addr,
            "xds_trust_domain" => self.xds_trust_domain = other.xds_trust_domain.clone(),
            "xds_wasm_module" => self.xds_wasm_module = other.xds_wasm_module.clone(),
            "xds_wasm_cluster" => self.xds_wasm_cluster = other.xds_wasm_cluster.clone(),
            _ => {}
        }
    }
}
