//! From resolved policy tables to datapath map entries (pure).

use membrane_bpf::abi::{
    DIR_EGRESS, DIR_INGRESS, EP_ENFORCE_EGRESS, EP_ENFORCE_INGRESS, POLICY_ALLOW, POLICY_REDIRECT,
    PolicyKey, PolicyValue,
};
use membrane_policy::resolve::{PolicyTable, Verdict};
use membrane_policy::rule::Direction;

/// The `EP_ENFORCE_*` flags of an endpoint's table.
pub fn enforcement_flags(table: &PolicyTable) -> u32 {
    let mut flags = 0;
    if table.ingress.enforced {
        flags |= EP_ENFORCE_INGRESS;
    }
    if table.egress.enforced {
        flags |= EP_ENFORCE_EGRESS;
    }
    flags
}

/// Who enforces an endpoint's L7 rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L7Enforcer {
    /// The node's L7 proxy: the datapath redirects L7-governed connections to it.
    Proxy,
    /// The endpoint's own sidecar (Istio with membrane's wasm filters: HTTP, and the network
    /// filter for Kafka): its L7 ports are only checked at L3/L4 here, since under mutual TLS
    /// the node's proxy could not read them.
    Sidecar,
}

/// The policy-map entries of one endpoint. Each table key becomes one map key whose value is
/// the key's effective verdict (the union over the keys that cover it), so the datapath's
/// first-hit probe gives the table's answer. `proxy_port` gives the listener for L7 redirects.
pub fn policy_entries(
    endpoint_id: u32,
    table: &PolicyTable,
    l7: L7Enforcer,
    proxy_port: impl Fn(Direction) -> u16,
) -> Vec<(PolicyKey, PolicyValue)> {
    let mut out = Vec::new();
    for (dir, code) in [
        (Direction::Ingress, DIR_INGRESS),
        (Direction::Egress, DIR_EGRESS),
    ] {
        let t = table.direction(dir);
        if !t.enforced {
            continue;
        }
        for (key, _) in t.raw() {
            let Some(effective) = t.effective(key) else {
                continue;
            };
            let (action, port) = match effective.verdict {
                Verdict::Allow => (POLICY_ALLOW, 0),
                Verdict::Redirect(_) if l7 == L7Enforcer::Sidecar => (POLICY_ALLOW, 0),
                Verdict::Redirect(_) => (POLICY_REDIRECT, proxy_port(dir)),
            };
            out.push((
                PolicyKey {
                    endpoint_id,
                    identity: key.identity,
                    dport: key.port,
                    proto: key.proto,
                    dir: code,
                },
                PolicyValue {
                    action,
                    pad: 0,
                    proxy_port: port,
                    pad2: 0,
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_policy::PolicySet;
    use membrane_policy::identity::{Identity, NumericIdentity};
    use membrane_policy::resolve::Resolver;
    use membrane_policy::rule::EnforcementMode;

    #[test]
    fn tables_become_map_entries() {
        let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{method: GET}]}\n  - toPorts: [{ports: [{port: \"5432\"}]}]\n";
        let set = PolicySet::from_sources([("p.yaml", yaml)]).unwrap();
        let mut r = Resolver::new(EnforcementMode::Default);
        r.set_rules(&set.rules);
        for (id, l) in [
            (256, "app=web,io.kubernetes.pod.namespace=default"),
            (257, "app=db,io.kubernetes.pod.namespace=default"),
        ] {
            r.add_identity(Identity {
                id: NumericIdentity(id),
                labels: std::sync::Arc::new(l.parse().unwrap()),
            });
        }
        r.add_endpoint(NumericIdentity(257));
        let table = r.table(NumericIdentity(257)).unwrap();
        assert_eq!(enforcement_flags(table), EP_ENFORCE_INGRESS);
        let entries = |l7| {
            let mut e = policy_entries(9, table, l7, |_| 15001);
            e.sort_by_key(|(k, _)| (k.identity, k.dport, k.proto));
            e
        };
        let e = entries(L7Enforcer::Proxy);
        let got: Vec<(u32, u16, u8, u8, u16)> = e
            .iter()
            .map(|(k, v)| (k.identity, k.dport, k.proto, v.action, v.proxy_port))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 5432, 6, POLICY_ALLOW, 0),
                (0, 5432, 17, POLICY_ALLOW, 0),
                (256, 80, 6, POLICY_REDIRECT, 15001)
            ]
        );
        // A sidecar endpoint's HTTP port is left to its sidecar: L3/L4 only.
        let sidecar: Vec<(u32, u16, u8)> = entries(L7Enforcer::Sidecar)
            .iter()
            .map(|(k, v)| (k.identity, k.dport, v.action))
            .collect();
        assert_eq!(
            sidecar,
            vec![
                (0, 5432, POLICY_ALLOW),
                (0, 5432, POLICY_ALLOW),
                (256, 80, POLICY_ALLOW)
            ]
        );
        assert!(
            e.iter()
                .all(|(k, _)| k.endpoint_id == 9 && k.dir == DIR_INGRESS)
        );
    }
}
