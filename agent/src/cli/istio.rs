//! `membrane istio`: the manifests that wire membrane's filter into Istio, and pod injection.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use membrane_istio::Settings;

/// `membrane istio ...`
#[derive(Debug, Subcommand)]
pub enum IstioCommand {
    /// Print the WasmPlugins (HTTP, and Kafka as a network filter) and the EnvoyFilter (apply them in Istio's root namespace).
    Manifests(SettingsArgs),
    /// Print the init policy (a CiliumNetworkPolicy for reserved:init: istiod and DNS) for the agent's policy directory.
    InitPolicy(SettingsArgs),
    /// Prepare a Pod or workload (YAML or JSON) for membrane's Istio mode; prints it as JSON.
    Inject {
        /// The object's file; `-` reads standard input.
        #[arg(short = 'f', long = "filename", default_value = "-")]
        file: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Serve the mutating admission webhook (HTTPS; POST /inject, GET /healthz): every Pod the API server creates for Istio's injector is prepared as `inject` prepares it.
    Webhook {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// The server's certificate chain (PEM, leaf first), valid for the Service's DNS name; read again when it changes.
        #[arg(long)]
        tls_cert: PathBuf,
        /// Its private key (PEM); read again when it changes.
        #[arg(long)]
        tls_key: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Print the MutatingWebhookConfiguration that sends new Pods to the webhook behind a Service (port 443).
    WebhookConfig {
        /// The webhook's Service, NAMESPACE/NAME.
        #[arg(long)]
        service: String,
        /// The CA certificate (PEM) the API server verifies the webhook's certificate with.
        #[arg(
            long,
            required_unless_present = "cert_manager",
            conflicts_with = "cert_manager"
        )]
        ca_file: Option<PathBuf>,
        /// Let cert-manager's CA injector fill and renew the CA from the webhook's Certificate (webhook-manifests --cert-manager-issuer makes it, named as the Service).
        #[arg(long)]
        cert_manager: bool,
    },
    /// Print the webhook's workload (a List: its Service on port 443, the Deployment running `membrane istio webhook` with these settings, a PodDisruptionBudget) for `kubectl apply`.
    WebhookManifests {
        /// The webhook's Service, NAMESPACE/NAME (the Deployment gets the same name).
        #[arg(long)]
        service: String,
        /// A container image with the `membrane` binary on its PATH.
        #[arg(long)]
        image: String,
        /// The kubernetes.io/tls Secret (in the Service's namespace) with the certificate for NAME.NAMESPACE.svc.
        #[arg(long)]
        tls_secret: String,
        /// Webhook replicas; with more than one, a PodDisruptionBudget keeps one through node drains.
        #[arg(long, default_value_t = 2)]
        replicas: u32,
        /// Add a cert-manager Certificate that keeps --tls-secret filled, from Issuer/NAME (in the Service's namespace) or ClusterIssuer/NAME.
        #[arg(long)]
        cert_manager_issuer: Option<String>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

/// `--service NAMESPACE/NAME`.
fn service_ref(service: &str) -> anyhow::Result<(&str, &str)> {
    match service.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok((namespace, name))
        }
        _ => bail!("--service {service:?}: NAMESPACE/NAME expected"),
    }
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
    /// Istio's root namespace, where istiod runs: the WasmPlugins, the EnvoyFilter and the init policy's peers live there.
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
        IstioCommand::Webhook {
            listen,
            tls_cert,
            tls_key,
            settings,
        } => {
            let files = crate::istio_webhook::CertFiles {
                cert: tls_cert,
                key: tls_key,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(crate::istio_webhook::serve(listen, files, settings.into()))?;
        }
        IstioCommand::WebhookConfig {
            service,
            ca_file,
            cert_manager: _,
        } => {
            use membrane_istio::admission::{Trust, configuration};
            let (namespace, name) = service_ref(&service)?;
            // clap lets exactly one of --ca-file and --cert-manager through.
            let config = match ca_file {
                Some(file) => {
                    let ca = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    if !ca.contains("-----BEGIN CERTIFICATE-----") {
                        bail!("{}: no PEM certificate in it", file.display());
                    }
                    configuration(namespace, name, Trust::CaBundle(&ca))
                }
                None => configuration(namespace, name, Trust::CertManager),
            };
            println!("{}", serde_json::to_string_pretty(&config)?);
        }
        IstioCommand::WebhookManifests {
            service,
            image,
            tls_secret,
            replicas,
            cert_manager_issuer,
            settings,
        } => {
            use membrane_istio::admission::{Issuer, WebhookWorkload};
            let (namespace, name) = service_ref(&service)?;
            let issuer = match cert_manager_issuer {
                Some(text) => Some(Issuer::parse(&text).map_err(anyhow::Error::msg)?),
                None => None,
            };
            let workload = WebhookWorkload {
                namespace: namespace.into(),
                name: name.into(),
                image,
                tls_secret,
                replicas,
                issuer,
            };
            match membrane_istio::admission::workload(&workload, &settings.into()) {
                Ok(list) => println!("{}", serde_json::to_string_pretty(&list)?),
                Err(e) => bail!("{e}"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct WithSettings {
        #[command(flatten)]
        settings: SettingsArgs,
    }

    /// The webhook's Deployment passes `Settings::args()` to this CLI: each setting must come
    /// back as it was given.
    #[test]
    fn settings_survive_their_flags() {
        let given = Settings {
            wasm_url: "oci://ghcr.io/example/membrane-filter:0.1.0".into(),
            sha256: Some("0123456789abcdef".repeat(4)),
            namespace: "mesh-root".into(),
            xds_socket: "/run/membrane/xds.sock".into(),
            concurrency: 4,
        };
        for s in [Settings::default(), given] {
            let parsed = WithSettings::try_parse_from(
                std::iter::once("membrane".to_string()).chain(s.args()),
            )
            .unwrap();
            assert_eq!(Settings::from(parsed.settings), s);
        }
    }
}
