//! `membrane-proxy --transparent` end to end, as on a gateway host: a client namespace routed
//! through the host to a server namespace, `membrane-proxy redirect install` sending the client's
//! port-8080 connections to the proxy (nftables tproxy + policy routing), real curl requests
//! judged by HTTP rules. Needs root (namespaces, nftables, IP_TRANSPARENT).
//!
//! Network rule: addresses in 10.247.0.0/24, covered by an `unreachable` route; namespaces,
//! links, routes, the nftables table and the policy routing are removed on drop.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const PREFIX: &str = "10.247.0.0/24";
const SERVER: &str = "10.247.0.1";
const CLIENT: &str = "10.247.0.2";
const PROXY_PORT: &str = "15301";

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Lab {
    tag: u32,
    dir: PathBuf,
    forwarding: String,
    children: Vec<Child>,
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("mp{n}{}", self.tag)
    }

    fn new() -> Lab {
        let root = fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
        assert!(
            root,
            "this test creates namespaces and nftables rules: run it as root"
        );
        assert!(
            sh(&["nft", "--version"]),
            "nftables (nft) is required: scripts/test.sh installs it"
        );
        let tag = std::process::id() % 10000;
        let dir = std::env::temp_dir().join(format!("membrane-proxy-e2e-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("policy")).unwrap();
        let forwarding = fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap_or_default()
            .trim()
            .to_string();
        let lab = Lab {
            tag,
            dir,
            forwarding,
            children: Vec::new(),
        };
        must(&["ip", "route", "add", "unreachable", PREFIX]);
        must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (n, addr) in [("s", SERVER), ("c", CLIENT)] {
            let (ns, host) = (lab.ns(n), format!("{}h", lab.ns(n)));
            must(&["ip", "netns", "add", &ns]);
            must(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            must(&["ip", "link", "set", &host, "up"]);
            must(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{host}.proxy_arp=1"),
            ]);
            must(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.neigh.{host}.proxy_delay=0"),
            ]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "eth0",
            ]);
            must(&["ip", "-n", &ns, "route", "add", "default", "dev", "eth0"]);
            must(&["ip", "route", "add", &format!("{addr}/32"), "dev", &host]);
        }
        lab
    }

    fn curl(&self, path: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("c"),
                "curl",
                "-s",
                "--max-time",
                "3",
            ])
            .args(["--path-as-is", "-w", "\n%{http_code}"])
            .arg(format!("http://{SERVER}:8080{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            body.trim_end().to_string(),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_membrane-proxy"))
            .args(["redirect", "remove"])
            .output();
        for n in ["s", "c"] {
            sh(&["ip", "netns", "del", &self.ns(n)]);
            sh(&["ip", "link", "del", &format!("{}h", self.ns(n))]);
        }
        for a in [SERVER, CLIENT] {
            sh(&["ip", "route", "del", &format!("{a}/32")]);
        }
        sh(&["ip", "route", "del", "unreachable", PREFIX]);
        sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_forward={}", self.forwarding),
        ]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn transparent_proxy_enforces_http_rules_for_redirected_connections() {
    let mut lab = Lab::new();
    fs::write(
        lab.dir.join("policy/server.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: server}\nspec:\n  \
         endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  \
         - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    \
         - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        \
         http: [{method: GET, path: \"/public.*\"}]\n",
    )
    .unwrap();
    fs::write(
        lab.dir.join("identities.yaml"),
        format!(
            "endpoints:\n  - name: server\n    labels: {{app: server}}\n    ips: [{SERVER}]\n  \
             - name: client\n    labels: {{app: client}}\n    ips: [{CLIENT}]\n"
        ),
    )
    .unwrap();
    let server = format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n  protocol_version='HTTP/1.1'\n  \
         def do_GET(self):\n    b=('saw '+self.path+' from '+self.client_address[0]).encode()\n    \
         self.send_response(200); self.send_header('Content-Length',str(len(b))); self.end_headers(); self.wfile.write(b)\n  \
         def log_message(self,*a): pass\n\
         http.server.ThreadingHTTPServer(('{SERVER}',8080),H).serve_forever()\n"
    );
    let srv = Command::new("ip")
        .args(["netns", "exec", &lab.ns("s"), "python3", "-c", &server])
        .spawn()
        .unwrap();
    lab.children.push(srv);
    let proxy = Command::new(env!("CARGO_BIN_EXE_membrane-proxy"))
        .arg("--policy-dir")
        .arg(lab.dir.join("policy"))
        .arg("--identities")
        .arg(lab.dir.join("identities.yaml"))
        .args(["--listen", &format!("[::]:{PROXY_PORT}"), "--transparent"])
        .stderr(fs::File::create(lab.dir.join("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    lab.children.push(proxy);
    let client_if = format!("{}h", lab.ns("c"));
    must(&[
        env!("CARGO_BIN_EXE_membrane-proxy"),
        "redirect",
        "install",
        "--proxy-port",
        PROXY_PORT,
        "--port",
        "8080",
        "--interface",
        &client_if,
    ]);

    // Wait for the server and the proxy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = lab.curl("/public/ready");
        if got.0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer through the proxy: {got:?}; proxy log: {}",
            fs::read_to_string(lab.dir.join("proxy.log")).unwrap_or_default()
        );
        sleep(Duration::from_millis(200));
    }
    // Allowed: forwarded to the original destination (the server sees the proxy's connection).
    let (code, body) = lab.curl("/public/a");
    assert_eq!(code, 200);
    assert!(body.starts_with("saw /public/a from "), "{body}");
    assert!(
        !body.ends_with(CLIENT),
        "the server must see the proxy, not the client: {body}"
    );
    // Denied by the HTTP rules, also with a dot-segment escape.
    assert_eq!(lab.curl("/private"), (403, "Access denied".to_string()));
    assert_eq!(lab.curl("/public/../private").0, 403);
    // Without the redirect the client reaches the server directly: the rules are what the
    // redirect adds (this proves the 403s above came from the proxy).
    must(&[env!("CARGO_BIN_EXE_membrane-proxy"), "redirect", "remove"]);
    assert_eq!(lab.curl("/private").0, 200);
}
