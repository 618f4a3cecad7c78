//! Prometheus metrics, rendered on each scrape from the agent's state and the datapath's per-CPU
//! counters (the registry is built per scrape: the datapath, not this process, keeps the counts).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Agent;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

fn direction(d: u8) -> String {
    match d {
        membrane_bpf::abi::DIR_INGRESS => "ingress".into(),
        membrane_bpf::abi::DIR_EGRESS => "egress".into(),
        _ => "unknown".into(),
    }
}

/// The text exposition of every metric.
pub fn render(agent: &mut Agent) -> anyhow::Result<String> {
    let mut reg = Registry::with_prefix("membrane");
    let fwd_packets = Family::<DirLabels, Counter>::default();
    let fwd_bytes = Family::<DirLabels, Counter>::default();
    let drop_packets = Family::<DropLabels, Counter>::default();
    let drop_bytes = Family::<DropLabels, Counter>::default();
    reg.register(
        "forward_packets",
        "Packets forwarded by the datapath",
        fwd_packets.clone(),
    );
    reg.register(
        "forward_bytes",
        "Bytes forwarded by the datapath",
        fwd_bytes.clone(),
    );
    reg.register(
        "drop_packets",
        "Packets dropped by the datapath, by Cilium drop reason",
        drop_packets.clone(),
    );
    reg.register(
        "drop_bytes",
        "Bytes dropped by the datapath, by Cilium drop reason",
        drop_bytes.clone(),
    );
    for (k, v) in agent.datapath.metrics()? {
        if k.reason == 0 {
            let l = DirLabels {
                direction: direction(k.dir),
            };
            fwd_packets.get_or_create(&l).inc_by(v.packets);
            fwd_bytes.get_or_create(&l).inc_by(v.bytes);
        } else {
            let l = DropLabels {
                reason: format!("-{}", k.reason),
                direction: direction(k.dir),
            };
            drop_packets.get_or_create(&l).inc_by(v.packets);
            drop_bytes.get_or_create(&l).inc_by(v.bytes);
        }
    }
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        reg.register(name, help, g);
    };
    gauge(
        &mut reg,
        "endpoints",
        "Endpoints managed by this agent",
        agent.endpoints().count() as i64,
    );
    gauge(
        &mut reg,
        "identities",
        "Identities allocated",
        agent.identities().count() as i64,
    );
    gauge(
        &mut reg,
        "policy_revision",
        "Revision of the policy in force",
        agent.policy_status.revision as i64,
    );
    gauge(
        &mut reg,
        "policy_rules",
        "Rules in force",
        agent.policy_status.rules as i64,
    );
    gauge(
        &mut reg,
        "policy_change_rejected",
        "1 when the last policy change was rejected",
        i64::from(!agent.policy_status.rejected.is_empty()),
    );
    let failures = Family::<ControllerLabels, Counter>::default();
    let failing = Family::<ControllerLabels, Gauge>::default();
    reg.register(
        "controller_failures",
        "Failed controller runs",
        failures.clone(),
    );
    reg.register(
        "controller_failing",
        "Consecutive failures of a controller (0 = healthy)",
        failing.clone(),
    );
    for (name, c) in &agent.controllers {
        let l = ControllerLabels {
            controller: name.clone(),
        };
        failures.get_or_create(&l).inc_by(c.failures);
        failing.get_or_create(&l).set(c.consecutive_failures as i64);
    }
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}
