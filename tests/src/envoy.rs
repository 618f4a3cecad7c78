//! Envoy configuration pieces that the end-to-end tests with a real Envoy share (YAML text, at
//! the indentation of a bootstrap's `static_resources`).

/// membrane's wasm filter as an `http_filters` entry (V8, FAIL_RELOAD), with its JSON
/// `configuration`.
pub fn membrane_filter(wasm: &str, configuration: &str) -> String {
    format!(
        r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: membrane
                root_id: membrane
                failure_policy: FAIL_RELOAD
                configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: '{configuration}'}}
                vm_config: {{vm_id: membrane, runtime: envoy.wasm.runtime.v8, code: {{local: {{filename: "{wasm}"}}}}}}
"#
    )
}

/// What istiod makes of a `WasmPlugin` for a sidecar (an `http_filters` entry, as
/// [`membrane_filter`]): Envoy's Wasm filter named `NAMESPACE.NAME`, the plugin's `pluginConfig`
/// as its configuration string, `pluginName` as root id, `failStrategy` as failure policy, no
/// `vm_id`, and the module its `file://` URL names (istio-agent fetches other URLs to a local
/// file first).
pub fn istio_wasm_filter(plugin: &serde_json::Value) -> String {
    let spec = &plugin["spec"];
    let filename = spec["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("a file:// module URL");
    let failure_policy = match spec["failStrategy"].as_str() {
        Some("FAIL_CLOSE") | None => "FAIL_CLOSED",
        Some(other) => other,
    };
    let entry = serde_json::json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": format!(
                    "{}.{}",
                    plugin["metadata"]["namespace"].as_str().unwrap(),
                    plugin["metadata"]["name"].as_str().unwrap()
                ),
                "root_id": spec["pluginName"],
                "failure_policy": failure_policy,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": spec["pluginConfig"].to_string(),
                },
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": filename}},
                },
            },
        },
    });
    format!("          - {entry}\n")
}

/// The cluster an `EnvoyFilter` adds (a `clusters` entry, as [`cluster`]): its one patch's
/// value, as istiod passes it to Envoy.
pub fn istio_added_cluster(filter: &serde_json::Value) -> String {
    let patch = &filter["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "CLUSTER", "{filter}");
    assert_eq!(patch["patch"]["operation"], "ADD", "{filter}");
    format!("  - {}\n", patch["patch"]["value"])
}

/// An HTTP listener (a `listeners` entry): one filter chain with an HTTP connection manager
/// whose single route does `route` (`route: {cluster: app}`, `direct_response: ...`), running
/// `filters` (entries such as [`membrane_filter`]) and then the router.
#[derive(Clone, Copy, Debug)]
pub struct Listener<'a> {
    /// Listener name.
    pub name: &'a str,
    /// Address to bind.
    pub address: &'a str,
    /// Port to bind.
    pub port: u16,
    /// `INBOUND` or `OUTBOUND` (the filter reads it as `xds.listener_direction`).
    pub direction: &'a str,
    /// A `transport_socket:` block at the filter chain's indentation, or empty.
    pub transport: &'a str,
    /// What the route does.
    pub route: &'a str,
    /// The HTTP filters before the router.
    pub filters: &'a str,
}

impl Listener<'_> {
    /// The YAML.
    pub fn yaml(&self) -> String {
        let Listener {
            name,
            address,
            port,
            direction,
            transport,
            route,
            filters,
        } = self;
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: {address}, port_value: {port}}}}}
    traffic_direction: {direction}
    filter_chains:
    - {transport}filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, {route}}}]}}]
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
        )
    }
}

/// A static cluster (a `clusters` entry) with one endpoint at `address` (`{socket_address:
/// {...}}` or `{pipe: {path: ...}}`); `http2` for gRPC, as the agent's xDS needs. `extra` is
/// inserted as is (a `transport_socket:` block, say).
pub fn cluster(name: &str, address: &str, http2: bool, extra: &str) -> String {
    let protocol = if http2 {
        r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"#
    } else {
        ""
    };
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
{protocol}{extra}    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {address}}}}}]}}]
"#
    )
}

/// `{socket_address: {address: A, port_value: P}}`.
pub fn socket(address: &str, port: u16) -> String {
    format!("{{socket_address: {{address: {address}, port_value: {port}}}}}")
}

/// A TCP listener (a `listeners` entry) for Kafka: membrane's filter as a network filter
/// (`"mode":"kafka"` in `configuration`, V8, FAIL_RELOAD), then `tcp_proxy` to `cluster`.
/// `transport` as for [`Listener`].
pub fn kafka_listener(
    name: &str,
    (address, port): (&str, u16),
    direction: &str,
    transport: &str,
    (wasm, configuration): (&str, &str),
    cluster: &str,
) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: {address}, port_value: {port}}}}}
    traffic_direction: {direction}
    filter_chains:
    - {transport}filters:
      - name: envoy.filters.network.wasm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: membrane_kafka
            root_id: membrane
            failure_policy: FAIL_RELOAD
            configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: '{configuration}'}}
            vm_config: {{vm_id: membrane_kafka, runtime: envoy.wasm.runtime.v8, code: {{local: {{filename: "{wasm}"}}}}}}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#
    )
}
