//! Commands that talk to the running agent: `endpoint ...`, `status`, `identity list`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use super::Output;
use crate::client::expect_ok;

/// How to reach the agent.
#[derive(Debug, Args)]
pub(super) struct Api {
    /// The agent's API socket.
    #[arg(
        long,
        env = "MEMBRANE_API_SOCKET",
        default_value = "/var/run/membrane/membrane.sock"
    )]
    api_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Subcommand)]
pub(super) enum EndpointCommand {
    /// Create an endpoint: network namespace NAME, veth pair, addresses, routes, identity.
    Create {
        /// Name (also the network namespace's).
        name: String,
        /// Labels, `[source:]key=value,...` (no source means k8s:); none means reserved:init.
        #[arg(long, default_value = "")]
        labels: String,
        /// Kubernetes-style namespace the endpoint belongs to.
        #[arg(long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        api: Api,
    },
    /// List endpoints.
    List(Api),
    /// Show one endpoint.
    Get {
        /// Name.
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Wait until every sidecar proxy subscribed to the endpoint's policy has acknowledged a
    /// revision (exit 0), or fail when one rejects it or the timeout passes.
    Wait {
        /// Name.
        name: String,
        /// The xDS revision (default: the current one, as `endpoint get` shows it).
        #[arg(long)]
        revision: Option<u64>,
        /// Seconds to wait.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        #[command(flatten)]
        api: Api,
    },
    /// Delete an endpoint and its namespace.
    Delete {
        /// Name.
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Change an endpoint's labels.
    Labels {
        /// Name.
        name: String,
        /// Labels to add or change (repeatable, `k=v`).
        #[arg(long)]
        set: Vec<String>,
        /// Label keys to remove (repeatable).
        #[arg(long)]
        unset: Vec<String>,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum IdentityCommand {
    /// List identities in use.
    List(Api),
}

fn show(api: &Api, v: &Value, text: impl Fn(&Value) -> String) {
    match api.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Text => print!("{}", text(v)),
    }
}

/// The strings of a JSON array (empty when it is not one).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn endpoint_line(e: &Value) -> String {
    let addrs: Vec<String> = strings(&e["addresses"]);
    let labels: Vec<String> = strings(&e["labels"]);
    format!(
        "{:<16} {:<12} id {:<4} identity {:<8} {:<32} {}\n",
        e["name"].as_str().unwrap_or_default(),
        e["namespace"].as_str().unwrap_or_default(),
        e["id"],
        e["identity"],
        addrs.join(","),
        labels.join(",")
    )
}

pub(super) fn endpoint(cmd: EndpointCommand) -> Result<()> {
    match cmd {
        EndpointCommand::Create {
            name,
            labels,
            namespace,
            api,
        } => {
            let list: Vec<&str> = labels
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let v = expect_ok(
                &api.api_socket,
                Method::PUT,
                &format!("/v1/endpoints/{name}"),
                Some(json!({"namespace": namespace, "labels": list})),
            )?;
            show(&api, &v, endpoint_line);
        }
        EndpointCommand::List(api) => {
            let v = expect_ok(&api.api_socket, Method::GET, "/v1/endpoints", None)?;
            show(&api, &v, |v| {
                v.as_array()
                    .map(|a| a.iter().map(endpoint_line).collect())
                    .unwrap_or_default()
            });
        }
        EndpointCommand::Get { name, api } => {
            let v = expect_ok(
                &api.api_socket,
                Method::GET,
                &format!("/v1/endpoints/{name}"),
                None,
            )?;
            show(&api, &v, |v| {
                serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
            });
        }
        EndpointCommand::Wait {
            name,
            revision,
            timeout,
            api,
        } => {
            if !(timeout.is_finite() && timeout >= 0.0) {
                anyhow::bail!("--timeout {timeout}: a number of seconds expected");
            }
            let mut path = format!(
                "/v1/endpoints/{name}/realized?timeout_ms={}",
                (timeout * 1000.0) as u64
            );
            if let Some(r) = revision {
                path += &format!("&revision={r}");
            }
            let v = expect_ok(&api.api_socket, Method::GET, &path, None)?;
            show(&api, &v, |v| {
                format!(
                    "endpoint {name}: revision {} realized by {} proxies\n",
                    v["revision"],
                    v["acked"].as_object().map_or(0, |m| m.len())
                )
            });
        }
        EndpointCommand::Delete { name, api } => {
            expect_ok(
                &api.api_socket,
                Method::DELETE,
                &format!("/v1/endpoints/{name}"),
                None,
            )?;
            show(&api, &json!({"deleted": name}), |_| {
                format!("endpoint {name} deleted\n")
            });
        }
        EndpointCommand::Labels {
            name,
            set,
            unset,
            api,
        } => {
            let v = expect_ok(
                &api.api_socket,
                Method::PATCH,
                &format!("/v1/endpoints/{name}/labels"),
                Some(json!({"set": set, "unset": unset})),
            )?;
            show(&api, &v, endpoint_line);
        }
    }
    Ok(())
}

pub(super) fn status(api: Api) -> Result<()> {
    let v = expect_ok(&api.api_socket, Method::GET, "/v1/status", None)?;
    show(&api, &v, |v| {
        let mut s = format!(
            "Policy:      revision {}, {} rules from {}\nEndpoints:   {}\nIdentities:  {}\nEnforcement: {}\n",
            v["policy"]["revision"],
            v["policy"]["rules"],
            v["policy"]["directory"].as_str().unwrap_or_default(),
            v["endpoints"],
            v["identities"],
            v["enforcement"].as_str().unwrap_or_default()
        );
        if let Some(rejected) = v["policy"]["rejected"].as_array().filter(|r| !r.is_empty()) {
            s.push_str("Last policy change REJECTED (the previous policy stays in force):\n");
            for d in rejected {
                s.push_str(&format!(
                    "  {}:{}:{}: {} {}\n",
                    d["file"].as_str().unwrap_or_default(),
                    d["line"],
                    d["column"],
                    d["field"].as_str().unwrap_or_default(),
                    d["message"].as_str().unwrap_or_default()
                ));
            }
        }
        if let Some(c) = v["controllers"].as_object() {
            s.push_str("Controllers:\n");
            for (name, st) in c {
                s.push_str(&format!(
                    "  {name:<14} ok {:<6} failed {:<4}{}\n",
                    st["successes"],
                    st["failures"],
                    st["last_error"]
                        .as_str()
                        .map(|e| format!(" last error: {e}"))
                        .unwrap_or_default()
                ));
            }
        }
        s
    });
    Ok(())
}

pub(super) fn metrics(api: Api) -> Result<()> {
    print!("{}", crate::client::text(&api.api_socket, "/v1/metrics")?);
    Ok(())
}

pub(super) fn identity(cmd: IdentityCommand) -> Result<()> {
    let IdentityCommand::List(api) = cmd;
    let v = expect_ok(&api.api_socket, Method::GET, "/v1/identities", None)?;
    show(&api, &v, |v| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        let labels = strings(&i["labels"]);
                        format!("{:<10} {}\n", i["identity"], labels.join(","))
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    Ok(())
}
