//! `membrane-agent`: the node daemon.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use membrane_agent::daemon::{Agent, Config, api, spawn_controllers};
use membrane_l7_proxy::guard::Upgrades;
use membrane_l7_proxy::policy::PolicyHandle;
use membrane_l7_proxy::server::{self, Mode, Proxy};
use membrane_l7_proxy::service::{ProxyConfig, Shared, UpstreamProtocol};
use membrane_l7_proxy::telemetry::{FlowSink, Metrics};
use membrane_xds_server::ads;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membrane-agent: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Runs the embedded L7 proxy on its own thread (its own event loop, so that API calls holding
/// the agent lock never stall requests), listening transparently on `port` for the connections
/// the datapath hands it. Returns once the listener is bound.
fn spawn_proxy(
    policy: Arc<PolicyHandle>,
    config: ProxyConfig,
    port: u16,
    admin: Option<std::net::SocketAddr>,
    flows: FlowSink,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("l7-proxy".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                // One dual-stack listener; an IPv4-only node falls back to 0.0.0.0.
                let listener = server::bind(([0u16; 8], port).into(), Mode::Transparent)
                    .or_else(|_| server::bind(([0u8; 4], port).into(), Mode::Transparent));
                let listener = match listener {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!(
                            "the L7 proxy's transparent listener on port {port}: {e}"
                        )));
                        return;
                    }
                };
                let metrics = Arc::new(Metrics::new());
                if let Some(addr) = admin {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => {
                            tokio::spawn(membrane_l7_proxy::admin::serve(
                                l,
                                metrics.clone(),
                                flows.clone(),
                            ));
                        }
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::anyhow!("--proxy-admin-addr {addr}: {e}")));
                            return;
                        }
                    }
                }
                let proxy = Proxy::new(Arc::new(Shared::new(config, policy, metrics, flows)));
                let _ = tx.send(Ok(()));
                // The proxy stops with the process; the datapath then drops what it would
                // redirect (no listener), so nothing bypasses L7 policy.
                let (_keep, stop) = tokio::sync::watch::channel(false);
                if let Err(e) = proxy
                    .serve(listener, Mode::Transparent, stop, Duration::from_secs(5))
                    .await
                {
                    eprintln!("membrane-agent: L7 proxy stopped: {e}");
                }
            });
        })
        .context("starting the L7 proxy thread")?;
    rx.recv().context("the L7 proxy thread ended")??;
    eprintln!("membrane-agent: L7 proxy listening on port {port}");
    Ok(())
}

fn run() -> Result<()> {
    let config = Config::load()?;
    let socket = config.api_socket.clone();
    let prometheus = config.prometheus_serve_addr;
    let policy_dir = config.policy_dir.clone();
    let (proxy_port, proxy_admin) = (config.proxy_port, config.proxy_admin_addr);
    let deny_body = config.proxy_deny_body.clone();
    let upgrades = Upgrades::new(&config.proxy_allow_upgrade)
        .map_err(|e| anyhow::anyhow!("--proxy-allow-upgrade: {e}"))?;
    let (xds_socket, xds_addr) = (config.xds_socket.clone(), config.xds_addr);
    let agent = Agent::start(config)?;
    let xds = agent.xds();
    let flows = FlowSink::new();
    if let Some(policy) = agent.proxy_policy() {
        let config = ProxyConfig {
            upstream_mark: Some(membrane_bpf::abi::proxy_mark),
            // Transparent: the client chose HTTP/2 for the server it addressed (gRPC).
            upstream_protocol: UpstreamProtocol::Downstream,
            deny_body: deny_body.into(),
            upgrades,
            ..ProxyConfig::default()
        };
        spawn_proxy(policy, config, proxy_port, proxy_admin, flows.clone())?;
    }
    eprintln!(
        "membrane-agent: policy revision {} ({} rules), {} endpoints restored; API on {}",
        agent.policy_status.revision,
        agent.policy_status.rules,
        agent.endpoints().count(),
        socket.display()
    );
    let agent = Arc::new(Mutex::new(agent));
    spawn_controllers(
        agent.clone(),
        policy_dir,
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        // xDS for membrane's wasm filters in Envoy sidecars (and a standalone Envoy on TCP).
        if !xds_socket.as_os_str().is_empty() {
            let (cache, path) = (xds.clone(), xds_socket.clone());
            tokio::spawn(async move {
                if let Err(e) = ads::serve_unix(&path, cache, std::future::pending()).await {
                    eprintln!("membrane-agent: xDS on {}: {e}", path.display());
                }
            });
            eprintln!("membrane-agent: xDS on {}", xds_socket.display());
        }
        if let Some(addr) = xds_addr {
            let cache = xds.clone();
            tokio::spawn(async move {
                if let Err(e) = ads::serve_tcp(addr, cache, std::future::pending()).await {
                    eprintln!("membrane-agent: xDS on {addr}: {e}");
                }
            });
        }
        if let Some(addr) = prometheus {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let router = api::metrics_router(agent.clone());
            tokio::spawn(async move { axum::serve(tcp, router).await });
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        // Stopping the agent leaves enforcement in place: links and maps are pinned.
        axum::serve(listener, api::router(agent).merge(api::flows_router(flows)))
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    })
}
