//! The proxy-wasm side: each VM's root context keeps its own ADS stream to the agent (an Envoy
//! cluster named in the configuration), reconnects from `on_tick`, ACKs what compiles and NACKs
//! what does not (keeping the last good state); HTTP contexts judge each request with
//! [`PolicyState::judge`] and answer a deny with `403 Access denied`.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use membrane_api::discovery::{DiscoveryRequest, DiscoveryResponse, Node, Status};
use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, SPIFFE_IDENTITIES_TYPE};
use membrane_policy::l7::http::{HeaderLookup, HttpRequest};
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

use crate::state::{
    Direction, PolicyState, RequestFacts, Verdict, compile_hosts, compile_policies, compile_spiffe,
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The plugin configuration (JSON).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The Envoy cluster (HTTP/2) that reaches the agent's xDS socket.
    xds_cluster: String,
    /// The node id this filter subscribes as.
    #[serde(default)]
    node: String,
}

const TYPES: [&str; 3] = [
    NETWORK_POLICY_TYPE,
    NETWORK_POLICY_HOSTS_TYPE,
    SPIFFE_IDENTITIES_TYPE,
];

#[derive(Default)]
struct Root {
    config: Config,
    state: Rc<RefCell<PolicyState>>,
    stream: Option<u32>,
    ticks: u64,
    reconnect_at: u64,
}

impl Root {
    fn open_stream(&mut self) {
        match self.open_grpc_stream(
            &self.config.xds_cluster,
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "StreamAggregatedResources",
            vec![],
        ) {
            Ok(token) => {
                self.stream = Some(token);
                for t in TYPES {
                    self.send(t, "", "", None);
                }
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(
                    LogLevel::Warn,
                    &format!("membrane: cannot open the xDS stream: {e:?}"),
                )
                .ok();
                self.reconnect_at = self.ticks + 2;
            }
        }
    }

    fn send(&self, type_url: &str, version: &str, nonce: &str, error: Option<String>) {
        let Some(token) = self.stream else { return };
        let req = DiscoveryRequest {
            version_info: version.to_string(),
            node: Some(Node {
                id: self.config.node.clone(),
            }),
            resource_names: vec![],
            type_url: type_url.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(|message| Status { code: 3, message }),
        };
        self.send_grpc_stream_message(token, Some(&req.encode_to_vec()), false);
    }

    fn apply(&self, resp: &DiscoveryResponse) -> Result<(), String> {
        let mut st = self.state.borrow_mut();
        match resp.type_url.as_str() {
            NETWORK_POLICY_TYPE => st.endpoints = compile_policies(&resp.resources)?,
            NETWORK_POLICY_HOSTS_TYPE => st.hosts = compile_hosts(&resp.resources)?,
            SPIFFE_IDENTITIES_TYPE => st.spiffe = compile_spiffe(&resp.resources)?,
            other => return Err(format!("unexpected type {other}")),
        }
        st.versions
            .insert(resp.type_url.clone(), resp.version_info.clone());
        Ok(())
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let body = self.get_grpc_stream_message(0, size).unwrap_or_default();
        let resp = match DiscoveryResponse::decode(body.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                hostcalls::log(LogLevel::Error, &format!("membrane: bad xDS message: {e}")).ok();
                return;
            }
        };
        let last_good = self
            .state
            .borrow()
            .versions
            .get(&resp.type_url)
            .cloned()
            .unwrap_or_default();
        match self.apply(&resp) {
            Ok(()) => {
                hostcalls::log(
                    LogLevel::Info,
                    &format!(
                        "membrane: {} version {} in force",
                        resp.type_url, resp.version_info
                    ),
                )
                .ok();
                self.send(&resp.type_url, &resp.version_info, &resp.nonce, None);
            }
            Err(e) => {
                hostcalls::log(
                    LogLevel::Error,
                    &format!(
                        "membrane: rejected {} version {}: {e}",
                        resp.type_url, resp.version_info
                    ),
                )
                .ok();
                self.send(&resp.type_url, &last_good, &resp.nonce, Some(e));
            }
        }
    }

    fn on_grpc_stream_close(&mut self, _token: u32, _status: u32) {
        // Keep enforcing the last good policy; try again shortly.
        self.stream = None;
        self.reconnect_at = self.ticks + 2;
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let _ = size;
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) if !c.xds_cluster.is_empty() => self.config = c,
            Ok(_) => {
                hostcalls::log(LogLevel::Error, "membrane: xds_cluster is required").ok();
                return false;
            }
            Err(e) => {
                hostcalls::log(LogLevel::Error, &format!("membrane: configuration: {e}")).ok();
                return false;
            }
        }
        self.open_stream();
        self.set_tick_period(Duration::from_millis(500));
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.stream.is_none() && self.ticks >= self.reconnect_at {
            self.open_stream();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            state: self.state.clone(),
        }))
    }
}

struct Http {
    state: Rc<RefCell<PolicyState>>,
}

impl Context for Http {}

/// A property as bytes; errors (which the SDK's own call would panic on) are treated as absent.
fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

fn address(path: &[&str]) -> Option<(IpAddr, u16)> {
    let text = String::from_utf8(property(path)?).ok()?;
    text.parse::<SocketAddr>().ok().map(|a| (a.ip(), a.port()))
}

struct Headers;

impl HeaderLookup for Headers {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
            .is_some_and(|v| f(&v))
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _eos: bool) -> Action {
        let direction = match property(&["xds", "listener_direction"]).as_deref() {
            Some([2, ..]) => Direction::Outbound,
            _ => Direction::Inbound,
        };
        let (Some((source, _)), Some((destination, port))) = (
            address(&["source", "address"]),
            address(&["destination", "address"]),
        ) else {
            return self.deny("no source or destination address");
        };
        let mtls = property(&["connection", "mtls"]).is_some_and(|v| v.first() == Some(&1));
        let peer = if mtls {
            property(&["connection", "uri_san_peer_certificate"])
                .and_then(|v| String::from_utf8(v).ok())
        } else {
            None
        };
        let header = |name: &str| self.get_http_request_header(name).unwrap_or_default();
        let (method, path, host) = (header(":method"), header(":path"), header(":authority"));
        let facts = RequestFacts {
            direction,
            source,
            destination,
            port,
            peer_spiffe: peer.as_deref(),
            http: HttpRequest {
                method: &method,
                path: &path,
                host: &host,
                headers: &Headers,
            },
        };
        let verdict = self.state.borrow().judge(&facts);
        match verdict {
            Verdict::Allow(_) => Action::Continue,
            Verdict::Deny(why) => self.deny(&why),
        }
    }
}

impl Http {
    fn deny(&self, why: &str) -> Action {
        hostcalls::log(LogLevel::Info, &format!("membrane: denied: {why}")).ok();
        self.send_http_response(
            403,
            vec![("content-type", "text/plain")],
            Some(b"Access denied\r\n"),
        );
        Action::Pause
    }
}
