//! `membrane-proxy`: membrane's L7 proxy without the agent, for a gateway host or a VM.
//!
//! ```text
//! membrane-proxy --policy-dir DIR --listen ADDR --upstream HOST:PORT [--identities FILE]
//! membrane-proxy --policy-dir DIR --listen ADDR --transparent        [--identities FILE]
//! membrane-proxy --agent-xds /var/run/membrane/xds.sock --listen ADDR --upstream HOST:PORT
//! membrane-proxy redirect print|install|remove --proxy-port P --port 80 --interface eth1
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use membrane_l7_proxy::agent_feed::{self, FeedEvent};
use membrane_l7_proxy::guard::{Limits, Upgrades};
use membrane_l7_proxy::policy::{ConnectionProtocol, PolicyHandle, Snapshot, SnapshotBuilder};
use membrane_l7_proxy::redirect::{self, RedirectSpec};
use membrane_l7_proxy::server::{self, Mode, Proxy};
use membrane_l7_proxy::service::{ProxyConfig, Shared, UpstreamProtocol};
use membrane_l7_proxy::telemetry::{FlowSink, Metrics};
use membrane_policy::Diagnostic;
use membrane_policy::endpoints::EndpointSpec;
use membrane_policy::rule::EnforcementMode;
use membrane_source::policy_dir;

// Per-request allocations (headers, bodies' frames) are a measurable share of a request's CPU
// with the system allocator; mimalloc's thread-local free lists make them cheap.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives memory freed after a burst back to the OS while connections sit idle: mimalloc purges
/// lazily, when the thread allocates again, so a proxy holding 1,000 idle connections would keep
/// the burst's peak otherwise.
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and only walks mimalloc's own heaps; it is safe to
    // call from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// `--protocol` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum UnruledProtocol {
    Http,
    Kafka,
}

/// `--upstream-protocol` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum UpstreamProtocolArg {
    Http1,
    Http2,
    Downstream,
}

#[derive(Parser, Debug)]
#[command(
    name = "membrane-proxy",
    version,
    about = "membrane's L7 proxy, standalone: enforces CiliumNetworkPolicy HTTP and Kafka rules per request",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Redirect rules that feed a `--transparent` listener (nftables tproxy + policy routing).
    Redirect {
        #[command(subcommand)]
        action: RedirectAction,
    },
}

#[derive(Subcommand, Debug)]
enum RedirectAction {
    /// Print the rules as a shell script.
    Print(RedirectArgs),
    /// Install the rules (replaces an earlier install).
    Install(RedirectArgs),
    /// Remove the rules.
    Remove,
}

#[derive(Args, Debug)]
struct RedirectArgs {
    /// The transparent listener's port.
    #[arg(long, default_value_t = 15001)]
    proxy_port: u16,
    /// A destination port to intercept (repeatable).
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// An interface whose arriving traffic is intercepted (repeatable; `veth+` matches a prefix).
    #[arg(long = "interface", required = true)]
    interfaces: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyMode {
    Default,
    Always,
    Never,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Directory (or file) of CiliumNetworkPolicy / NetworkPolicy YAML; watched for changes.
    #[arg(long, env = "MEMBRANE_PROXY_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Take policy and identities from a membrane agent on this host instead: its xDS unix
    /// socket (`/var/run/membrane/xds.sock`). Endpoints' policies arrive resolved, with the
    /// agent's identity numbers (the ones its datapath uses).
    #[arg(long, env = "MEMBRANE_PROXY_AGENT_XDS", conflicts_with_all = ["policy_dir", "identities", "enable_policy"])]
    agent_xds: Option<PathBuf>,
    /// With --agent-xds: seconds to wait for the agent's first policy before giving up (no
    /// connection is accepted before it: there is no policy to judge by).
    #[arg(long, default_value_t = 30.0)]
    agent_wait: f64,
    /// Address to accept connections on (`[::]:15001` accepts IPv4 too).
    #[arg(long, env = "MEMBRANE_PROXY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Accept redirected connections (IP_TRANSPARENT) and forward each to its original destination.
    #[arg(long, conflicts_with = "upstream")]
    transparent: bool,
    /// Reverse mode: forward every connection to this HOST:PORT.
    #[arg(long, env = "MEMBRANE_PROXY_UPSTREAM")]
    upstream: Option<String>,
    /// Workloads by address or prefix, with labels (the endpoints-file format, `cidrs:` allowed).
    /// Addresses not listed are world, or the most specific CIDR a policy names.
    #[arg(long, env = "MEMBRANE_PROXY_IDENTITIES")]
    identities: Option<PathBuf>,
    /// Reverse mode: the workload of --identities that the upstream is (default: the one holding
    /// the upstream's address).
    #[arg(long)]
    endpoint: Option<String>,
    /// Policy enforcement: default (selected workloads only), always, never.
    #[arg(long, value_enum, default_value = "default")]
    enable_policy: PolicyMode,
    /// Admin endpoint (/metrics, /healthz, /flows), e.g. 127.0.0.1:9964.
    #[arg(long, env = "MEMBRANE_PROXY_ADMIN")]
    admin: Option<SocketAddr>,
    /// Write every flow record as a JSON line to this file (`-` for standard output).
    #[arg(long)]
    access_log: Option<String>,
    /// Body of the 403 answer to a denied request.
    #[arg(long, default_value = "Access denied\r\n")]
    deny_body: String,
    /// Normalize request paths (dot segments, duplicate slashes, percent-encoded unreserved
    /// characters) before matching and forwarding; a request must then also be allowed as a
    /// lenient upstream reads its path (%2F, %5C and \ as slashes, ;parameters cut).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    normalize_path: bool,
    /// Protocols an allowed request may switch its connection to (`Upgrade`), comma-separated;
    /// other offers are dropped and the request is forwarded as a plain one. h2c, h2, HTTP and
    /// TLS can never be allowed (their requests would pass unjudged); `--allow-upgrade ''`
    /// allows none.
    #[arg(long, value_delimiter = ',', default_value = "websocket")]
    allow_upgrade: Vec<String>,
    /// Most header fields in a request.
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Most bytes in a request head.
    #[arg(long, default_value_t = 16 * 1024)]
    max_header_bytes: usize,
    /// Most bytes in a request target.
    #[arg(long, default_value_t = 8 * 1024)]
    max_uri_bytes: usize,
    /// Seconds allowed for a request head to arrive.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a connection may sit idle.
    #[arg(long, default_value_t = 300.0)]
    idle_timeout: f64,
    /// Seconds allowed to connect upstream.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Seconds allowed for upstream response headers (0: no limit).
    #[arg(long, default_value_t = 60.0)]
    upstream_timeout: f64,
    /// Seconds of TCP idle before keepalive probes, both sides.
    #[arg(long, default_value_t = 60.0)]
    tcp_keepalive: f64,
    /// What to speak to upstreams: http1, http2 (prior knowledge), or downstream (HTTP/2 for
    /// requests that came as HTTP/2, unless the destination answers the HTTP/2 preface as an
    /// HTTP/1 server; HTTP/1.1 otherwise). Default: downstream with --transparent (the client
    /// chose its protocol for the server it addressed), http1 with --upstream.
    #[arg(long, value_enum)]
    upstream_protocol: Option<UpstreamProtocolArg>,
    /// Same as --upstream-protocol http2.
    #[arg(long, conflicts_with = "upstream_protocol")]
    upstream_http2: bool,
    /// Serve every request through hyper's server and client, not only those the direct path
    /// hands over (chunked or large bodies, upgrades, `Expect`, ...): for comparison and as a
    /// fallback.
    #[arg(long)]
    hyper_only: bool,
    /// Most bytes in one Kafka request (a larger one closes the connection, nothing forwarded).
    #[arg(long, default_value_t = membrane_codec::kafka::DEFAULT_MAX_REQUEST)]
    kafka_max_request_bytes: usize,
    /// What connections that no L7 rule governs are parsed as: `http`, or `kafka` in front of a
    /// broker (ports with rules are parsed as their rules' protocol).
    #[arg(long, value_enum, default_value_t = UnruledProtocol::Http)]
    protocol: UnruledProtocol,
    /// Seconds open connections get to finish on SIGTERM/SIGINT.
    #[arg(long, default_value_t = 15.0)]
    drain_timeout: f64,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds between checks of the policy files for changes.
    #[arg(long, default_value_t = 0.5)]
    reload_interval: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Redirect { action }) => redirect_cmd(action),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membrane-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn redirect_cmd(action: RedirectAction) -> Result<()> {
    let spec = |a: RedirectArgs| RedirectSpec {
        proxy_port: a.proxy_port,
        ports: a.ports,
        interfaces: a.interfaces,
    };
    match action {
        RedirectAction::Print(a) => print!("{}", redirect::script(&spec(a))?),
        RedirectAction::Install(a) => redirect::install(&spec(a))?,
        RedirectAction::Remove => redirect::remove()?,
    }
    Ok(())
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow!("--{flag}: {v} is not a duration in seconds"))
}

fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("membrane-proxy: {d}");
    }
}

/// A snapshot and the workloads it was built from.
type Loaded = (Snapshot, Vec<EndpointSpec>);

/// Policy and workloads as read from disk now.
struct Sources {
    policy_dir: PathBuf,
    identities: Option<PathBuf>,
    cache: policy_dir::PolicyCache,
}

impl Sources {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.policy_dir.clone()];
        p.extend(self.identities.clone());
        p
    }

    fn fingerprint(&self) -> Result<String> {
        Ok(policy_dir::fingerprint(&self.paths())?)
    }

    /// Builds a snapshot, or returns the problems (each naming file, line and field).
    fn snapshot(
        &mut self,
        builder: &mut SnapshotBuilder,
    ) -> Result<Result<Loaded, Vec<Diagnostic>>> {
        let set = match self.cache.load(std::slice::from_ref(&self.policy_dir))? {
            Ok(set) => set,
            Err(d) => return Ok(Err(d)),
        };
        let workloads = match &self.identities {
            Some(path) => match policy_dir::load_endpoints(path)? {
                Ok(w) => w,
                Err(d) => return Ok(Err(d)),
            },
            None => Vec::new(),
        };
        Ok(Ok((builder.build(&set, &workloads)?, workloads)))
    }
}

fn run(args: RunArgs) -> Result<()> {
    let source = match (&args.policy_dir, &args.agent_xds) {
        (Some(dir), None) => PolicySource::Files(dir.clone()),
        (None, Some(socket)) => PolicySource::Agent(socket.clone()),
        _ => bail!("give either --policy-dir DIR or --agent-xds SOCKET"),
    };
    let listen = args.listen.context("--listen is required")?;
    let mode = match (&args.upstream, args.transparent) {
        (Some(u), false) => {
            let upstream = u
                .to_socket_addrs()
                .with_context(|| format!("--upstream {u}"))?
                .next()
                .with_context(|| format!("--upstream {u}: no address"))?;
            Mode::Reverse { upstream }
        }
        (None, true) => Mode::Transparent,
        _ => bail!("give either --upstream HOST:PORT (reverse mode) or --transparent"),
    };
    let upgrades =
        Upgrades::new(&args.allow_upgrade).map_err(|e| anyhow!("--allow-upgrade: {e}"))?;
    // One worker: a current-thread runtime (no work-stealing bookkeeping, no cross-thread
    // wakeups), which is what a proxy pinned to one core wants.
    let mut runtime = match args.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(w) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(w.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(serve(args, source, listen, mode, upgrades))
}

/// Where policy comes from.
enum PolicySource {
    /// A policy directory (and --identities), read and resolved here.
    Files(PathBuf),
    /// The agent's xDS server on this unix socket.
    Agent(PathBuf),
}

async fn serve(
    args: RunArgs,
    source: PolicySource,
    listen: SocketAddr,
    mode: Mode,
    upgrades: Upgrades,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let policy = match source {
        PolicySource::Files(dir) => follow_files(&args, dir, mode, &metrics)?,
        PolicySource::Agent(socket) => follow_agent(&args, socket, mode, &metrics).await?,
    };
    let flows = FlowSink::new();
    let config = ProxyConfig {
        limits: Limits {
            max_head_bytes: args.max_header_bytes,
            max_headers: args.max_headers,
            max_uri_bytes: args.max_uri_bytes,
        },
        normalize_paths: args.normalize_path,
        upgrades,
        deny_body: Bytes::from(args.deny_body.clone()),
        header_timeout: secs(args.header_timeout, "header-timeout")?,
        idle_timeout: secs(args.idle_timeout, "idle-timeout")?,
        connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
        upstream_timeout: secs(args.upstream_timeout, "upstream-timeout")?,
        tcp_keepalive: secs(args.tcp_keepalive, "tcp-keepalive")?,
        upstream_protocol: match (args.upstream_protocol, args.upstream_http2, mode) {
            (Some(UpstreamProtocolArg::Http1), ..) => UpstreamProtocol::Http1,
            (Some(UpstreamProtocolArg::Http2), ..) | (None, true, _) => UpstreamProtocol::Http2,
            (Some(UpstreamProtocolArg::Downstream), ..) => UpstreamProtocol::Downstream,
            (None, false, Mode::Transparent) => UpstreamProtocol::Downstream,
            (None, false, Mode::Reverse { .. }) => UpstreamProtocol::Http1,
        },
        http1_direct: !args.hyper_only,
        kafka_max_frame: args.kafka_max_request_bytes,
        unruled_protocol: match args.protocol {
            UnruledProtocol::Http => ConnectionProtocol::Http,
            UnruledProtocol::Kafka => ConnectionProtocol::Kafka,
        },
        ..ProxyConfig::default()
    };
    let drain = secs(args.drain_timeout, "drain-timeout")?;
    let shared = Arc::new(Shared::new(
        config,
        policy.clone(),
        metrics.clone(),
        flows.clone(),
    ));
    let proxy = Proxy::new(shared);
    let listener = server::bind(listen, mode).with_context(|| format!("listening on {listen}"))?;
    if let Some(addr) = args.admin {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin endpoint {addr}"))?;
        tokio::spawn(membrane_l7_proxy::admin::serve(
            l,
            metrics.clone(),
            flows.clone(),
        ));
    }
    if let Some(target) = &args.access_log {
        spawn_access_log(target, &flows)?;
    }
    eprintln!(
        "membrane-proxy: listening on {} ({})",
        listener.local_addr()?,
        match mode {
            Mode::Reverse { upstream } => format!("reverse to {upstream}"),
            Mode::Transparent => "transparent".into(),
        }
    );

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("membrane-proxy: draining");
        let _ = shutdown_tx.send(true);
    });
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            release_free_memory();
        }
    });
    proxy.serve(listener, mode, shutdown_rx, drain).await?;
    eprintln!("membrane-proxy: stopped");
    Ok(())
}

/// Reads and resolves the policy directory (refusing to start when it is invalid), then keeps
/// following it: a poll of the files' fingerprint, and a reload at once on SIGHUP.
fn follow_files(
    args: &RunArgs,
    policy_dir: PathBuf,
    mode: Mode,
    metrics: &Arc<Metrics>,
) -> Result<Arc<PolicyHandle>> {
    let enforcement = match args.enable_policy {
        PolicyMode::Default => EnforcementMode::Default,
        PolicyMode::Always => EnforcementMode::Always,
        PolicyMode::Never => EnforcementMode::Never,
    };
    let mut builder = SnapshotBuilder::new(enforcement);
    let mut sources = Sources {
        policy_dir,
        identities: args.identities.clone(),
        cache: policy_dir::PolicyCache::default(),
    };
    let mut fingerprint = sources.fingerprint()?;
    let (snapshot, workloads) = match sources.snapshot(&mut builder)? {
        Ok(s) => s,
        Err(diags) => {
            print_diagnostics(&diags);
            bail!(
                "refusing to start: the policy or identities are invalid ({} problem(s))",
                diags.len()
            );
        }
    };
    if let Mode::Reverse { upstream } = mode {
        check_reverse_endpoint(&snapshot, &workloads, args.endpoint.as_deref(), upstream)?;
    }
    metrics.policy_generation.set(snapshot.generation as i64);
    let policy = Arc::new(PolicyHandle::new(snapshot));
    let reload_every =
        secs(args.reload_interval, "reload-interval")?.max(Duration::from_millis(50));
    let reload_metrics = metrics.clone();
    let endpoint = args.endpoint.clone();
    let handle = policy.clone();
    tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let forced = tokio::select! {
                _ = tokio::time::sleep(reload_every) => false,
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            };
            let fp = match sources.fingerprint() {
                Ok(fp) => fp,
                Err(e) => {
                    eprintln!("membrane-proxy: reading policy: {e:#}");
                    continue;
                }
            };
            if fp == fingerprint && !forced {
                continue;
            }
            fingerprint = fp;
            match sources.snapshot(&mut builder) {
                Ok(Ok((snap, workloads))) => {
                    if let Mode::Reverse { upstream } = mode
                        && let Err(e) =
                            check_reverse_endpoint(&snap, &workloads, endpoint.as_deref(), upstream)
                    {
                        eprintln!(
                            "membrane-proxy: policy change rejected, last good policy kept: {e:#}"
                        );
                        reload_metrics.policy_rejected.inc();
                        continue;
                    }
                    reload_metrics.policy_generation.set(snap.generation as i64);
                    eprintln!(
                        "membrane-proxy: policy generation {} in force",
                        snap.generation
                    );
                    handle.store(snap);
                }
                Ok(Err(diags)) => {
                    print_diagnostics(&diags);
                    eprintln!(
                        "membrane-proxy: policy change rejected ({} problem(s)); last good policy kept",
                        diags.len()
                    );
                    reload_metrics.policy_rejected.inc();
                }
                Err(e) => {
                    eprintln!(
                        "membrane-proxy: policy change rejected, last good policy kept: {e:#}"
                    );
                    reload_metrics.policy_rejected.inc();
                }
            }
        }
    });
    Ok(policy)
}

/// Subscribes to the agent's policy and waits for the first snapshot (no connection is accepted
/// before it), then keeps following: each accepted update is swapped in; a rejected one, or a
/// lost agent, leaves the last good snapshot in force.
async fn follow_agent(
    args: &RunArgs,
    socket: PathBuf,
    mode: Mode,
    metrics: &Arc<Metrics>,
) -> Result<Arc<PolicyHandle>> {
    let wait = secs(args.agent_wait, "agent-wait")?;
    let node = format!("membrane-proxy/{}", std::process::id());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(agent_feed::follow(
        socket.clone(),
        node,
        SnapshotBuilder::new(EnforcementMode::Default),
        move |event| {
            let _ = tx.send(event);
        },
    ));
    let deadline = tokio::time::Instant::now() + wait;
    let mut last_problem = String::from("no answer");
    let first = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(FeedEvent::Snapshot(snap))) => break snap,
            Ok(Some(FeedEvent::Rejected(why) | FeedEvent::Disconnected(why))) => {
                last_problem = why;
            }
            Ok(None) | Err(_) => bail!(
                "no policy from the agent at {} within {} s (last problem: {last_problem})",
                socket.display(),
                wait.as_secs_f64()
            ),
        }
    };
    if let Mode::Reverse { upstream } = mode {
        check_agent_endpoint(&first, args.endpoint.as_deref(), upstream)?;
    }
    eprintln!(
        "membrane-proxy: policy from the agent at {} in force",
        socket.display()
    );
    metrics.policy_generation.set(first.generation as i64);
    let policy = Arc::new(PolicyHandle::new(first));
    let handle = policy.clone();
    let feed_metrics = metrics.clone();
    tokio::spawn(async move {
        let mut connected = true;
        while let Some(event) = rx.recv().await {
            match event {
                FeedEvent::Snapshot(snap) => {
                    if !connected {
                        eprintln!("membrane-proxy: the agent is back");
                        connected = true;
                    }
                    feed_metrics.policy_generation.set(snap.generation as i64);
                    handle.store(snap);
                }
                FeedEvent::Rejected(why) => {
                    eprintln!(
                        "membrane-proxy: policy update rejected, last good policy kept: {why}"
                    );
                    feed_metrics.policy_rejected.inc();
                }
                FeedEvent::Disconnected(why) => {
                    // Logged once per outage: reconnection attempts repeat with backoff.
                    if connected {
                        eprintln!(
                            "membrane-proxy: lost the agent ({why}); last good policy kept, reconnecting"
                        );
                        connected = false;
                    }
                }
            }
        }
    });
    Ok(policy)
}

/// With the agent's policy, reverse mode protects the agent's endpoint that holds the
/// upstream's address (named by --endpoint when given).
fn check_agent_endpoint(snap: &Snapshot, name: Option<&str>, upstream: SocketAddr) -> Result<()> {
    let id = snap.identity_of(upstream.ip());
    match (snap.name_of(id), name) {
        (Some(found), Some(name)) if found != name => bail!(
            "--endpoint {name}: the upstream {} is the agent's endpoint {found}",
            upstream.ip()
        ),
        (None, Some(name)) => bail!(
            "--endpoint {name}: the upstream {} is none of the agent's endpoints",
            upstream.ip()
        ),
        (None, None) => eprintln!(
            "membrane-proxy: warning: the upstream {} is none of the agent's endpoints, so no policy selects it and every request is forwarded",
            upstream.ip()
        ),
        _ => {}
    }
    Ok(())
}

/// In reverse mode the upstream is the protected workload: it must be a listed workload
/// (named by --endpoint, or holding the upstream's address) for its policy to apply.
fn check_reverse_endpoint(
    snap: &Snapshot,
    workloads: &[EndpointSpec],
    name: Option<&str>,
    upstream: SocketAddr,
) -> Result<()> {
    let id = snap.identity_of(upstream.ip());
    match name {
        Some(name) => {
            let w = workloads
                .iter()
                .find(|w| w.name == name)
                .with_context(|| format!("--endpoint {name}: no such workload in --identities"))?;
            let holds = w.ips.contains(&upstream.ip())
                || w.cidrs.iter().any(|c| c.contains(&upstream.ip()));
            if !holds {
                bail!(
                    "--endpoint {name}: the upstream {} is not among its ips or cidrs; add it there",
                    upstream.ip()
                );
            }
        }
        None => {
            if snap.name_of(id).is_none() {
                eprintln!(
                    "membrane-proxy: warning: the upstream {} is not a workload of --identities, so no policy selects it and every request is forwarded",
                    upstream.ip()
                );
                return Ok(());
            }
        }
    }
    if !snap.enforces(id) {
        eprintln!(
            "membrane-proxy: warning: no policy selects the upstream's workload; every request is forwarded"
        );
    }
    Ok(())
}

fn spawn_access_log(target: &str, flows: &FlowSink) -> Result<()> {
    use std::io::Write;
    let mut out: Box<dyn Write + Send> = if target == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .with_context(|| format!("--access-log {target}"))?,
        )
    };
    let mut rx = flows.subscribe();
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            loop {
                match rx.blocking_recv() {
                    Ok(r) => {
                        let line = serde_json::to_string(&r).unwrap_or_default();
                        let _ = writeln!(out, "{line}");
                        let _ = out.flush();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = writeln!(out, "{{\"lost\":{n}}}");
                    }
                    Err(_) => return,
                }
            }
        })?;
    Ok(())
}
