//! The `membrane` command line.

mod agent;
mod bpf;
mod istio;
mod policy;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// membrane: identity-based network policy for workloads, Cilium-style.
#[derive(Debug, Parser)]
#[command(name = "membrane", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate, trace and resolve policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Inspect the datapath's pinned maps.
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
    /// Print drop and verdict events from the datapath as they happen.
    Monitor(bpf::MonitorArgs),
    /// Manage endpoints (through the running agent).
    #[command(subcommand)]
    Endpoint(agent::EndpointCommand),
    /// The agent's state: policy revision, rejected changes, endpoints, controllers.
    Status(agent::Api),
    /// Identities.
    #[command(subcommand)]
    Identity(agent::IdentityCommand),
    /// The agent's Prometheus metrics (datapath counters, endpoints, identities, policy, controllers).
    Metrics(agent::Api),
    /// Istio mode: the manifests that deliver membrane's filter to sidecars, and pod injection.
    #[command(subcommand)]
    Istio(istio::IstioCommand),
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Runs the CLI; the exit code follows each command's contract.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Bpf(cmd) => exit_code(bpf::run(cmd)),
        Command::Monitor(args) => exit_code(bpf::monitor(&args)),
        Command::Endpoint(cmd) => exit_code(agent::endpoint(cmd)),
        Command::Status(api) => exit_code(agent::status(api)),
        Command::Identity(cmd) => exit_code(agent::identity(cmd)),
        Command::Metrics(api) => exit_code(agent::metrics(api)),
        Command::Istio(cmd) => exit_code(istio::run(cmd)),
    }
}

fn exit_code(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membrane: {e:#}");
            ExitCode::from(2)
        }
    }
}
