//! `membrane-agent`: the node daemon.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use membrane_agent::daemon::{Agent, Config, api, spawn_controllers};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membrane-agent: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run() -> Result<()> {
    let config = Config::load()?;
    let socket = config.api_socket.clone();
    let prometheus = config.prometheus_serve_addr;
    let policy_dir = config.policy_dir.clone();
    let agent = Agent::start(config)?;
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
        Duration::from_millis(500),
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
        axum::serve(listener, api::router(agent))
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    })
}
