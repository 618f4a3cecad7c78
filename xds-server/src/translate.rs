//! Resolved policy -> xDS resources. Pure: the service only streams what this computes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use membrane_api::{direction_policy, v1};
use membrane_policy::identity::{Identity, NumericIdentity};
use membrane_policy::labels::Source;
use membrane_policy::resolve::PolicyTable;
use membrane_policy::selector::{NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL};
use prost::Message;

/// One endpoint's resource: its addresses, identity and both directions' tables.
pub fn network_policy(
    endpoint: &str,
    identity: NumericIdentity,
    addresses: &[IpAddr],
    table: &PolicyTable,
) -> v1::NetworkPolicy {
    v1::NetworkPolicy {
        endpoint: endpoint.to_string(),
        identity: identity.0,
        addresses: addresses.iter().map(IpAddr::to_string).collect(),
        ingress: Some(direction_policy(&table.ingress)),
        egress: Some(direction_policy(&table.egress)),
    }
}

/// The init identity's table as the NetworkPolicy [`INIT_POLICY`](membrane_api::INIT_POLICY):
/// no addresses; a sidecar enforces what it explicitly allows for a pod whose own policy has
/// not arrived.
pub fn init_policy(table: &PolicyTable) -> v1::NetworkPolicy {
    network_policy(membrane_api::INIT_POLICY, NumericIdentity::INIT, &[], table)
}

/// A NetworkPolicy as served: encoded, aliased by its endpoint's addresses (so a sidecar that
/// knows only its pod's addresses subscribes to its own policy).
pub fn aliased(np: &v1::NetworkPolicy) -> (Vec<u8>, Vec<String>) {
    (np.encode_to_vec(), np.addresses.clone())
}

/// The identity -> addresses map (the ipcache) as one resource per identity, in identity order,
/// each identity's prefixes sorted.
pub fn network_policy_hosts(
    prefixes: impl IntoIterator<Item = (IpNet, NumericIdentity)>,
) -> Vec<v1::NetworkPolicyHosts> {
    let mut by_identity: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
    for (net, id) in prefixes {
        by_identity.entry(id.0).or_default().push(net);
    }
    by_identity
        .into_iter()
        .map(|(identity, mut nets)| {
            nets.sort();
            nets.dedup();
            v1::NetworkPolicyHosts {
                identity,
                host_addresses: nets.iter().map(IpNet::to_string).collect(),
            }
        })
        .collect()
}

/// The SPIFFE ID of each identity that has a namespace and a service account
/// (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`, as Istio issues them). A service account shared by
/// identities with different labels maps to none of them: the filter then identifies such a peer
/// by its address, never by a guess.
pub fn spiffe_identities<'i>(
    trust_domain: &str,
    identities: impl IntoIterator<Item = &'i Identity>,
) -> v1::SpiffeIdentities {
    let mut seen: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for identity in identities {
        // CIDR and reserved identities never carry a service account; skipping them by number
        // spares reading 10,000 CIDR label sets on every change.
        if !identity.is_endpoint() {
            continue;
        }
        let labels = &identity.labels;
        let (Some(ns), Some(sa)) = (
            labels.value(Source::K8s, NAMESPACE_LABEL),
            labels.value(Source::K8s, SERVICE_ACCOUNT_LABEL),
        ) else {
            continue;
        };
        let id = format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
        seen.entry(id)
            .and_modify(|v| {
                if *v != Some(identity.id.0) {
                    *v = None;
                }
            })
            .or_insert(Some(identity.id.0));
    }
    v1::SpiffeIdentities {
        identities: seen
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
    }
}

/// Type URL of ECDS resources.
pub const TYPED_EXTENSION_CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// Type URL of Envoy's wasm HTTP filter configuration.
pub const HTTP_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// Type URL of Envoy's wasm network filter configuration.
pub const NETWORK_WASM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";

/// Every ECDS resource the agent serves a standalone Envoy (`--xds-wasm-module`), by name:
/// `membrane` ([`wasm_filter_extension`]), `membrane_upstream` ([`upstream_filter_extension`])
/// and `membrane_kafka` ([`kafka_filter_extension`]), encoded.
pub fn standalone_extensions(module_path: &str, xds_cluster: &str) -> BTreeMap<String, Vec<u8>> {
    [
        wasm_filter_extension("membrane", module_path, xds_cluster),
        upstream_filter_extension("membrane_upstream", module_path, xds_cluster),
        kafka_filter_extension("membrane_kafka", module_path, xds_cluster),
    ]
    .into_iter()
    .map(|e| (e.name.clone(), e.encode_to_vec()))
    .collect()
}

/// The ECDS resource (`TypedExtensionConfig`) that configures membrane's wasm HTTP filter in a
/// standalone Envoy (outside Istio, where istiod delivers it): the module from a local file,
/// V8, FAIL_RELOAD, and the filter's JSON configuration (`xds_cluster` naming Envoy's cluster
/// for the agent). `name` is the filter name the listener's `config_discovery` asks for.
pub fn wasm_filter_extension(
    name: &str,
    module_path: &str,
    xds_cluster: &str,
) -> envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
    let configuration = format!("{{\"xds_cluster\":{xds_cluster:?}}}");
    http_filter_extension(name, module_path, configuration)
}

/// The same filter for a cluster's upstream HTTP filters (`upstream: true`), where an outbound
/// request is judged against the backend Envoy picked for it rather than the address the app
/// dialled (a front address or a virtual IP in front of several endpoints).
pub fn upstream_filter_extension(
    name: &str,
    module_path: &str,
    xds_cluster: &str,
) -> envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
    let configuration = format!("{{\"xds_cluster\":{xds_cluster:?},\"upstream\":true}}");
    http_filter_extension(name, module_path, configuration)
}

fn http_filter_extension(
    name: &str,
    module_path: &str,
    configuration: String,
) -> envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    let wasm = Wasm {
        config: Some(plugin_config(name, module_path, configuration)),
    };
    extension(name, HTTP_WASM_TYPE, wasm.encode_to_vec())
}

/// The same for membrane's Kafka filter: the module as a network filter (before `tcp_proxy`) in
/// Kafka mode.
pub fn kafka_filter_extension(
    name: &str,
    module_path: &str,
    xds_cluster: &str,
) -> envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
    use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm;
    let configuration = format!("{{\"mode\":\"kafka\",\"xds_cluster\":{xds_cluster:?}}}");
    let wasm = Wasm {
        config: Some(plugin_config(name, module_path, configuration)),
    };
    extension(name, NETWORK_WASM_TYPE, wasm.encode_to_vec())
}

fn extension(
    name: &str,
    type_url: &str,
    value: Vec<u8>,
) -> envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
    envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
        name: name.to_string(),
        typed_config: Some(envoy_types::pb::google::protobuf::Any {
            type_url: type_url.into(),
            value,
        }),
    }
}

/// The module from a local file, V8, FAIL_RELOAD (a panicking VM is rebuilt and seeds itself
/// from shared data), and `configuration` as the plugin's JSON.
fn plugin_config(
    name: &str,
    module_path: &str,
    configuration: String,
) -> envoy_types::pb::envoy::extensions::wasm::v3::PluginConfig {
    use envoy_types::pb::envoy::config::core::v3::{
        AsyncDataSource, DataSource, async_data_source, data_source,
    };
    use envoy_types::pb::envoy::extensions::wasm::v3::{
        FailurePolicy, PluginConfig, VmConfig, plugin_config,
    };
    use envoy_types::pb::google::protobuf::{Any, StringValue};
    PluginConfig {
        name: name.to_string(),
        root_id: name.to_string(),
        configuration: Some(Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: StringValue {
                value: configuration,
            }
            .encode_to_vec(),
        }),
        failure_policy: FailurePolicy::FailReload as i32,
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: name.to_string(),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(module_path.to_string())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}
