//! The `membrane` command line.

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
    }
}
