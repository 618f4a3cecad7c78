//! `membrane-proxy --agent-xds`: the standalone proxy takes its policy and identities from the
//! agent's xDS server (the real ADS service of membrane-xds-server on a unix socket, as the agent
//! embeds it), ACKs what compiles, NACKs what does not while keeping the last good policy, and
//! keeps enforcing when the agent goes away.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{read_all, start_upstream, statuses};
use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, v1};
use membrane_xds_server::ads::{RealizeError, XdsCache, serve_unix};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

const WEB: u32 = 300;
const CLIENT: u32 = 301;

/// The agent's view: endpoint `web` at 127.0.0.3 admits `CLIENT` (127.0.0.2) on `port` for
/// GET on `paths`; nobody else.
fn web_policy(port: u16, path: &str) -> v1::NetworkPolicy {
    v1::NetworkPolicy {
        endpoint: "web".into(),
        identity: WEB,
        addresses: vec!["127.0.0.3".into()],
        ingress: Some(v1::DirectionPolicy {
            enforced: true,
            entries: vec![v1::PolicyEntry {
                remote_identity: CLIENT,
                port: u32::from(port),
                protocol: 6,
                l7: vec![v1::L7RuleSet {
                    policy: "default/web".into(),
                    rules: Some(v1::l7_rule_set::Rules::Http(v1::HttpRules {
                        rules: vec![v1::HttpRule {
                            method: "GET".into(),
                            path: path.into(),
                            ..Default::default()
                        }],
                    })),
                }],
            }],
        }),
        egress: Some(v1::DirectionPolicy::default()),
    }
}

fn publish_policy(cache: &XdsCache, np: &v1::NetworkPolicy) -> u64 {
    cache.set_resources(
        NETWORK_POLICY_TYPE,
        BTreeMap::from([(np.endpoint.clone(), np.encode_to_vec())]),
    )
}

fn publish_hosts(cache: &XdsCache) -> u64 {
    let client = v1::NetworkPolicyHosts {
        identity: CLIENT,
        host_addresses: vec!["127.0.0.2/32".into()],
    };
    cache.set_resources(
        NETWORK_POLICY_HOSTS_TYPE,
        BTreeMap::from([(CLIENT.to_string(), client.encode_to_vec())]),
    )
}

/// An HTTP/1.1 GET from `source` through the proxy: the status, or `None` when the connection
/// was refused or closed without an answer (an L3/L4 deny).
async fn get(source: &str, proxy: SocketAddr, path: &str) -> Option<u16> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(proxy).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let (text, _) = read_all(&mut s, Duration::from_secs(5)).await;
    statuses(&text).first().copied()
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proxy_cmd(socket: &std::path::Path, listen: SocketAddr, upstream: SocketAddr) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_membrane-proxy"));
    c.arg("--agent-xds")
        .arg(socket)
        .args(["--listen", &listen.to_string()])
        .args(["--upstream", &upstream.to_string()]);
    c
}

async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_proxy_enforces_the_agents_policy() {
    let (upstream, _log) = start_upstream(false).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xds.sock");

    // Without an agent the proxy refuses to start, naming the socket and the problem.
    let out = proxy_cmd(&socket, "127.0.0.1:1".parse().unwrap(), upstream)
        .args(["--agent-wait", "0.5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no policy from the agent") && err.contains("xds.sock"),
        "{err}"
    );

    // The "agent": the ADS service on its own runtime, so that dropping the runtime ends it the
    // way a crash would (a graceful stop waits for the proxy's stream, which never ends).
    let cache = XdsCache::new();
    let agent = tokio::runtime::Runtime::new().unwrap();
    let (c, s) = (cache.clone(), socket.clone());
    agent.spawn(async move { serve_unix(&s, c, std::future::pending()).await });
    publish_policy(&cache, &web_policy(upstream.port(), "/public.*"));
    let hosts_version = publish_hosts(&cache);

    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _proxy = Proxy(
        proxy_cmd(&socket, listen, upstream)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_until("the proxy listens", async || {
        tokio::net::TcpStream::connect(listen).await.is_ok()
    })
    .await;
    cache
        .wait_all_acked(
            NETWORK_POLICY_HOSTS_TYPE,
            hosts_version,
            Duration::from_secs(5),
        )
        .await
        .expect("the proxy ACKs the hosts");

    // The client's identity comes from the agent's hosts map; its rule is the agent's.
    assert_eq!(get("127.0.0.2", listen, "/public/a").await, Some(200));
    assert_eq!(get("127.0.0.2", listen, "/private").await, Some(403));
    // Anyone else is world, which web's ingress does not admit at all.
    assert_eq!(get("127.0.0.4", listen, "/public/a").await, None);

    // A policy change is ACKed and applied to the next request.
    let v = publish_policy(&cache, &web_policy(upstream.port(), "/p.*"));
    cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v, Duration::from_secs(5))
        .await
        .expect("the proxy ACKs the change");
    assert_eq!(get("127.0.0.2", listen, "/private").await, Some(200));

    // A policy that does not compile is NACKed with the reason; the last good one stays.
    let v = publish_policy(&cache, &web_policy(upstream.port(), "(unclosed"));
    match cache
        .wait_realized(NETWORK_POLICY_TYPE, "web", v, Duration::from_secs(5))
        .await
    {
        Err(RealizeError::Nacked { detail, .. }) => {
            assert!(detail.contains("web ingress"), "{detail}")
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    assert_eq!(get("127.0.0.2", listen, "/private").await, Some(200));
    assert_eq!(get("127.0.0.2", listen, "/other").await, Some(403));

    // The agent goes away: the last good policy keeps being enforced.
    agent.shutdown_background();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get("127.0.0.2", listen, "/private").await, Some(200));
    assert_eq!(get("127.0.0.2", listen, "/other").await, Some(403));
    assert_eq!(get("127.0.0.4", listen, "/private").await, None);
}
