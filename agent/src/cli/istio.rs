//! `membrane istio`: the manifests that wire membrane's filter into Istio, and pod injection.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use membrane_istio::Settings;

/// `membrane istio ...`
#[derive(Debug, Subcommand)]
pub enum IstioCommand {
    /// Print the WasmPlugins (HTTP, and Kafka as a network filter), the EnvoyFilter and the init policy (apply them in Istio's root namespace).
    Manifests(SettingsArgs),
    /// Print the init policy alone (a CiliumNetworkPolicy for reserved:init), for an agent that reads policy from a directory.
    InitPolicy(SettingsArgs),
    /// Prepare a Pod or workload (YAML or JSON) for membrane's Istio mode; prints it as JSON.
    Inject {
        /// The object's file; `-` reads standard input.
        #[arg(short = 'f', long = "filename", default_value = "-")]
        file: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

/// What the manifests and the injection depend on.
#[derive(Debug, Args)]
pub struct SettingsArgs {
    /// Where sidecars fetch the filter from (oci://, https:// or file://).
    #[arg(long, default_value_t = Settings::default().wasm_url)]
    wasm_url: String,
    /// The module's SHA-256 (hex).
    #[arg(long)]
    sha256: Option<String>,
    /// Namespace of the WasmPlugin, the EnvoyFilter and the init policy (Istio's root namespace, where istiod runs).
    #[arg(long, default_value_t = Settings::default().namespace)]
    namespace: String,
    /// The agent's xDS socket on the node.
    #[arg(long, default_value_t = Settings::default().xds_socket)]
    xds_socket: String,
    /// Envoy worker threads per sidecar.
    #[arg(long, default_value_t = Settings::default().concurrency)]
    concurrency: u32,
}

impl From<SettingsArgs> for Settings {
    fn from(a: SettingsArgs) -> Settings {
        Settings {
            wasm_url: a.wasm_url,
            sha256: a.sha256,
            namespace: a.namespace,
            xds_socket: a.xds_socket,
            concurrency: a.concurrency,
        }
    }
}

/// Runs an istio command.
pub fn run(cmd: IstioCommand) -> anyhow::Result<()> {
    match cmd {
        IstioCommand::Manifests(args) => match membrane_istio::manifests(&args.into()) {
            Ok(text) => print!("{text}"),
            Err(e) => bail!("{e}"),
        },
        IstioCommand::InitPolicy(args) => {
            match membrane_istio::init_policy_document(&args.into()) {
                Ok(text) => print!("{text}"),
                Err(e) => bail!("{e}"),
            }
        }
        IstioCommand::Inject { file, settings } => {
            let (name, text) = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading standard input")?;
                ("<stdin>".to_string(), text)
            } else {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                (file.display().to_string(), text)
            };
            match membrane_istio::inject_document(&name, &text, &settings.into()) {
                Ok(out) => println!("{out}"),
                Err(e) => bail!("{e}"),
            }
        }
    }
    Ok(())
}
