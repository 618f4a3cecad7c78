//! The agent end to end: `membrane-agent` started on a policy directory, endpoints created with
//! `membrane endpoint create`, real TCP between them, label changes, policy edits (a bad one
//! rejected with the last good policy kept), and `kill -9` plus restart without a gap. Needs root.
//!
//! Network rule: endpoint addresses come from 10.251.0.0/24 and fd00:251::/120, which the agent
//! covers with `unreachable` routes; the test removes those routes, the namespaces and the bpffs
//! on drop, and gives the machine back its forwarding settings.

mod common;

use membrane_tests::envoy;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

const RANGE: &str = "10.251.0.0/24";
const RANGE6: &str = "fd00:251::/120";
/// "The world": a namespace behind an external device of the node.
const WORLD: &str = "10.252.0.0/24";
const WORLD_IN: &str = "10.252.0.2";
const WORLD_EXCEPT: &str = "10.252.0.200";

struct Env {
    tag: u32,
    forwarding_before: String,
    forwarding6_before: String,
    dir: PathBuf,
    agent: Option<Child>,
    servers: Vec<Child>,
}

impl Env {
    fn new() -> Env {
        let tag = std::process::id() % 10000;
        let dir = std::env::temp_dir().join(format!("membrane-agent-e2e-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("policy")).unwrap();
        fs::create_dir_all(dir.join("bpf")).unwrap();
        let forwarding_before = fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap_or_default()
            .trim()
            .to_string();
        let forwarding6_before = fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
            .unwrap_or_default()
            .trim()
            .to_string();
        Env {
            tag,
            forwarding_before,
            forwarding6_before,
            dir,
            agent: None,
            servers: Vec::new(),
        }
    }

    /// The embedded proxy's admin endpoint.
    fn proxy_admin(&self) -> String {
        format!("127.0.0.1:{}", 20000 + self.tag % 1000)
    }

    /// An HTTP request with curl from an endpoint's namespace: (status, body); status 0 when no
    /// answer came.
    fn curl(&self, from: &str, args: &[&str]) -> (u16, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(from),
                "curl",
                "-s",
                "--max-time",
                "2",
            ])
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let body = body.strip_suffix('\n').unwrap_or(body);
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("state/membrane.sock")
    }

    /// `membrane monitor -o json` for `secs` seconds, its output piped.
    fn monitor(&self, secs: u32) -> Child {
        Command::new(env!("CARGO_BIN_EXE_membrane"))
            .args([
                "monitor",
                "-o",
                "json",
                "--timeout",
                &secs.to_string(),
                "--bpf-root",
            ])
            .arg(self.dir.join("bpf"))
            .arg("--api-socket")
            .arg(self.socket())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn xds_socket(&self) -> PathBuf {
        self.dir.join("state/xds.sock")
    }

    fn start_agent(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_membrane-agent"))
            .arg("--policy-dir")
            .arg(self.dir.join("policy"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--bpf-root")
            .arg(self.dir.join("bpf"))
            .arg("--api-socket")
            .arg(self.socket())
            .args(["--ipv4-range", RANGE, "--ipv6-range", RANGE6])
            .args(["--devices", &format!("mbw{}", self.tag)])
            .args([
                "--prometheus-serve-addr",
                &format!("127.0.0.1:{}", 19000 + self.tag % 1000),
            ])
            .args(["--proxy-admin-addr", &self.proxy_admin()])
            .arg("--xds-socket")
            .arg(self.xds_socket())
            // ECDS for a standalone Envoy: the path is served as is, never opened by the agent.
            .args(["--xds-wasm-module", XDS_WASM_MODULE])
            .stderr(
                fs::File::create(
                    self.dir
                        .join(format!("agent-{}.log", Instant::now().elapsed().as_nanos())),
                )
                .unwrap(),
            )
            .spawn()
            .expect("membrane-agent starts");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.membrane(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "the agent did not come up");
            sleep(Duration::from_millis(100));
        }
    }

    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill(); // SIGKILL: the agent gets no chance to clean up
            let _ = a.wait();
        }
    }

    fn membrane(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_membrane"))
            .args(args)
            .arg("--api-socket")
            .arg(self.socket())
            .args(["-o", "json"])
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.membrane(args);
        assert!(
            out.status.success(),
            "membrane {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The world namespace and its veth, the node's "external device".
    fn world(&self) {
        let (ns, dev) = (self.ns("world"), format!("mbw{}", self.tag));
        let ip = |args: &[&str]| assert!(common::sh(&[&["ip"], args].concat()), "ip {args:?}");
        ip(&["route", "add", "unreachable", WORLD]);
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &dev, "up"]);
        common::sh(&["sysctl", "-qw", &format!("net.ipv4.conf.{dev}.proxy_arp=1")]);
        common::sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.neigh.{dev}.proxy_delay=0"),
        ]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        for a in [WORLD_IN, WORLD_EXCEPT] {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/32"), "dev", "eth0"]);
            ip(&["route", "add", &format!("{a}/32"), "dev", &dev]);
        }
        ip(&["-n", &ns, "route", "add", RANGE, "dev", "eth0"]);
    }

    /// A TCP connection from the world namespace, from a given source address.
    fn world_connects(&self, src: &str, addr: &str, port: u16) -> bool {
        let code = format!(
            "import socket,sys\ns=socket.create_connection(('{addr}',{port}),timeout=1,source_address=('{src}',0))\nsys.exit(0 if s.recv(2)==b'ok' else 1)\n"
        );
        common::sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns("world"),
            "python3",
            "-c",
            &code,
        ])
    }

    fn ns(&self, name: &str) -> String {
        format!("{name}{}", self.tag)
    }

    fn serve(&mut self, ep: &str, addr: &str, ports: &[u16], udp: &[u16]) {
        let code = common::server_code(addr, ports, udp);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ep), "python3", "-c", &code])
            .spawn()
            .unwrap();
        self.servers.push(child);
        sleep(Duration::from_millis(500));
    }

    /// Runs Python in an endpoint's namespace; true when it exits 0.
    fn python(&self, from: &str, code: &str) -> bool {
        common::sh(&["ip", "netns", "exec", &self.ns(from), "python3", "-c", code])
    }

    /// Runs a command in an endpoint's namespace: (success, stdout).
    fn run_in(&self, ns: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e} (scripts/test.sh installs the tools)"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn connects(&self, from: &str, addr: &str, port: u16) -> bool {
        let code = common::client_code(addr, port);
        self.python(from, &code)
    }

    fn udp(&self, from: &str, addr: &str, port: u16) -> bool {
        let code = common::udp_client_code(addr, port);
        self.python(from, &code)
    }

    /// Waits up to `secs` for a connection check to give `want`.
    fn eventually(&self, from: &str, addr: &str, port: u16, want: bool, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.connects(from, addr, port) == want {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        if self.agent.is_some() {
            for ep in [
                "web", "client", "init", "l7c", "kafka", "hq", "outpost", "mesh",
            ] {
                let _ = self.membrane(&["endpoint", "delete", &self.ns(ep)]);
            }
        }
        self.kill_agent();
        for ep in [
            "web", "client", "world", "init", "l7c", "kafka", "hq", "outpost", "mesh",
        ] {
            common::sh(&["ip", "netns", "del", &self.ns(ep)]);
        }
        common::sh(&["ip", "link", "del", &format!("mbw{}", self.tag)]);
        for a in [WORLD_IN, WORLD_EXCEPT] {
            common::sh(&["ip", "route", "del", &format!("{a}/32")]);
        }
        common::sh(&["ip", "route", "del", "unreachable", WORLD]);
        common::sh(&["ip", "route", "del", "unreachable", RANGE]);
        common::sh(&["ip", "-6", "route", "del", "unreachable", RANGE6]);
        common::sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.all.forwarding={}", self.forwarding6_before),
        ]);
        // The agent turns forwarding on, as a node agent must; the machine gets back what it had.
        common::sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_forward={}", self.forwarding_before),
        ]);
        // The agent's policy routing for the L7 proxy (marked packets only).
        for fam in ["-4", "-6"] {
            common::sh(&[
                "ip",
                fam,
                "rule",
                "del",
                "fwmark",
                "0x200/0xf00",
                "lookup",
                "100",
            ]);
            common::sh(&["ip", fam, "route", "flush", "table", "100"]);
        }
        common::remove_bpffs(&self.dir.join("bpf"));
        if std::env::var_os("MEMBRANE_KEEP_TEST_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

const L7_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-http}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8090", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public.*"}]
  - fromEndpoints: [{matchLabels: {app: l7c}}]
    toPorts: [{ports: [{port: "8091", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7c-out}
spec:
  endpointSelector: {matchLabels: {app: l7c}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8091", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/out.*"}]
"#;

/// HTTP rules enforced by the agent's embedded proxy on redirected connections: ingress
/// (client -> web:8090, the destination's rules) and egress (l7c -> web:8091, the source's),
/// IPv4 and IPv6, a policy change under an open keep-alive connection, and the proxy's metrics.
fn l7_checks(env: &mut Env, web_ip: &str, web_ip6: &str) {
    let policy_dir = env.dir.join("policy");
    write_policy(&policy_dir, "web-http.yaml", L7_POLICY);
    for (addr, port) in [(web_ip, 8090), (web_ip6, 8090), (web_ip, 8091)] {
        let code = common::http_server_code(addr, port);
        let log = fs::File::create(env.dir.join(format!("http-{addr}-{port}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &env.ns("web"), "python3", "-c", &code])
            .stderr(log)
            .spawn()
            .unwrap();
        env.servers.push(child);
    }
    // Python's start-up can take seconds on a loaded machine: wait until the servers listen.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ss = Command::new("ip")
            .args(["netns", "exec", &env.ns("web"), "ss", "-Htln"])
            .output()
            .unwrap();
        let ss = String::from_utf8_lossy(&ss.stdout);
        if ss.matches(":8090 ").count() == 2 && ss.contains(":8091 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the HTTP servers did not start: {ss}"
        );
        sleep(Duration::from_millis(100));
    }
    let l7c = env.ns("l7c");
    env.json(&["endpoint", "create", &l7c, "--labels", "app=l7c"]);
    let url = |ip: &str, port: u16, path: &str| {
        if ip.contains(':') {
            format!("http://[{ip}]:{port}{path}")
        } else {
            format!("http://{ip}:{port}{path}")
        }
    };
    // Wait for the policy (and the servers) to be in place.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = env.curl("client", &[&url(web_ip, 8090, "/public/a")]);
        if got.0 == 200 {
            break;
        }
        if Instant::now() > deadline {
            let m = Command::new("curl")
                .args(["-s", &format!("http://{}/metrics", env.proxy_admin())])
                .output()
                .unwrap();
            let ss = Command::new("ip")
                .args(["netns", "exec", &env.ns("web"), "ss", "-tln"])
                .output()
                .unwrap();
            panic!(
                "GET /public through the proxy never succeeded: {got:?}\n{}\n{}\n{}",
                String::from_utf8_lossy(&m.stdout),
                String::from_utf8_lossy(&ss.stdout),
                fs::read_to_string(env.dir.join(format!("http-{web_ip}-8090.log")))
                    .unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(200));
    }
    let (code, body) = env.curl("client", &[&url(web_ip, 8090, "/public/a")]);
    assert_eq!((code, body.as_str()), (200, "saw GET /public/a"));
    let (code, body) = env.curl("client", &[&url(web_ip, 8090, "/private")]);
    assert_eq!(
        (code, body.as_str()),
        (403, "Access denied\r"),
        "ingress L7 deny"
    );
    assert_eq!(
        env.curl(
            "client",
            &["-X", "POST", "-d", "x", &url(web_ip, 8090, "/public/a")]
        )
        .0,
        403
    );
    assert_eq!(
        env.curl("client", &[&url(web_ip6, 8090, "/public/six")]),
        (200, "saw GET /public/six".into()),
        "IPv6"
    );
    assert_eq!(
        env.curl("client", &[&url(web_ip6, 8090, "/private")]).0,
        403,
        "IPv6 deny"
    );
    // Path normalization: no way around the rule with dot segments.
    assert_eq!(
        env.curl(
            "client",
            &["--path-as-is", &url(web_ip, 8090, "/public/../private")]
        )
        .0,
        403
    );
    // L3/L4 still applies under L7: l7c may not reach 8090 at all.
    assert_eq!(
        env.curl("l7c", &[&url(web_ip, 8090, "/public/a")]).0,
        0,
        "L3/L4 deny"
    );
    // Egress rules of the source: judged by the proxy, then the destination's ingress policy
    // admits the proxy's upstream connection as l7c (its mark carries l7c's identity).
    assert_eq!(
        env.curl("l7c", &[&url(web_ip, 8091, "/out/x")]),
        (200, "saw GET /out/x".into()),
        "egress L7 allow"
    );
    assert_eq!(
        env.curl("l7c", &[&url(web_ip, 8091, "/in")]).0,
        403,
        "egress L7 deny"
    );
    assert_eq!(
        env.curl("client", &[&url(web_ip, 8091, "/out/x")]).0,
        0,
        "8091 is l7c's only"
    );

    // HTTP/2 (h2c prior knowledge) from the client; the upstream speaks only HTTP/1.1, which the
    // proxy learns from its answer to the HTTP/2 preface, and then sends it HTTP/1.1.
    assert_eq!(
        env.curl(
            "client",
            &["--http2-prior-knowledge", &url(web_ip, 8090, "/public/h2")]
        ),
        (200, "saw GET /public/h2".into())
    );
    assert_eq!(
        env.curl(
            "client",
            &["--http2-prior-knowledge", &url(web_ip, 8090, "/private")]
        )
        .0,
        403
    );

    // `membrane monitor` shows the proxy's flow records next to the datapath's events.
    let monitor = env.monitor(4);
    sleep(Duration::from_millis(1000));
    env.curl("client", &[&url(web_ip, 8090, "/public/mon")]);
    env.curl("client", &[&url(web_ip, 8090, "/private/mon")]);
    let out = monitor.wait_with_output().unwrap();
    let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "l7")
        .map(|v| v["flow"].clone())
        .collect();
    let find = |path: &str| flows.iter().find(|f| f["path"] == path).cloned();
    let ok = find("/public/mon").unwrap_or_else(|| panic!("no L7 flow in monitor: {flows:?}"));
    assert_eq!(
        (ok["verdict"].as_str(), ok["status"].as_u64()),
        (Some("forwarded"), Some(200))
    );
    assert_eq!(ok["direction"], "ingress");
    let denied = find("/private/mon").unwrap_or_else(|| panic!("no L7 flow in monitor: {flows:?}"));
    assert_eq!(
        (denied["verdict"].as_str(), denied["status"].as_u64()),
        (Some("denied"), Some(403))
    );

    // A keep-alive connection across a policy change: the next request meets the new rules.
    let script = format!(
        "import http.client,time,sys,json\n\
         c=http.client.HTTPConnection('{web_ip}',8090,timeout=2)\n\
         def get(p):\n  c.request('GET',p); r=c.getresponse(); r.read(); return r.status\n\
         first=get('/public/k'); sock=c.sock\n\
         print('ready',flush=True); sys.stdin.readline()\n\
         end=time.time()+10; after=200\n\
         while time.time()<end and after==200:\n  after=get('/public/k'); time.sleep(0.2)\n\
         other=get('/other')\n\
         print(json.dumps(dict(first=first,after=after,other=other,same=c.sock is sock)),flush=True)\n"
    );
    let mut keep = Command::new("ip")
        .args(["netns", "exec", &env.ns("client"), "python3", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, BufReader, Write};
        let mut out = BufReader::new(keep.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        write_policy(
            &policy_dir,
            "web-http.yaml",
            &L7_POLICY.replace("/public.*", "/other"),
        );
        writeln!(keep.stdin.take().unwrap()).unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        let r: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            r,
            serde_json::json!({"first": 200, "after": 403, "other": 200, "same": true})
        );
    }
    let _ = keep.wait();
    write_policy(&policy_dir, "web-http.yaml", L7_POLICY);

    // The proxy's metrics: requests by direction and verdict.
    let m = Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", env.proxy_admin())])
        .output()
        .unwrap();
    let m = String::from_utf8_lossy(&m.stdout);
    assert!(
        m.contains("membrane_proxy_l7_requests_total{direction=\"ingress\",verdict=\"denied\""),
        "{m}"
    );
    assert!(
        m.contains("membrane_proxy_l7_requests_total{direction=\"egress\",verdict=\"forwarded\""),
        "{m}"
    );
    env.json(&["endpoint", "delete", &l7c]);
}

const KAFKA_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: empire-kafka, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: empire-hq}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: empire-announce}
  - fromEndpoints: [{matchLabels: {app: outpost}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: consume, topic: empire-announce}
"#;

fn peer(name: &str) -> String {
    let v = std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run scripts/test.sh (it installs the peers and builds the filter)"
        )
    });
    assert!(Path::new(&v).exists(), "{name}={v} does not exist");
    v
}

/// The Kafka scenario: a real broker (tansu) in endpoint `kafka`, a producer endpoint that may
/// only produce to empire-announce and a consumer endpoint that may only consume it, each using
/// real clients. Every connection to 9092 is redirected to the agent's proxy by the datapath.
fn kafka_checks(env: &mut Env) {
    let tansu = peer("MEMBRANE_TANSU");
    let python = peer("KAFKA_PYTHON");
    let client_py = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../l7-proxy/tests/kafka/client.py"
    );
    write_policy(&env.dir.join("policy"), "kafka.yaml", KAFKA_POLICY);
    let (kafka, hq, outpost) = (env.ns("kafka"), env.ns("hq"), env.ns("outpost"));
    let k = env.json(&["endpoint", "create", &kafka, "--labels", "app=kafka"]);
    env.json(&["endpoint", "create", &hq, "--labels", "app=empire-hq"]);
    env.json(&["endpoint", "create", &outpost, "--labels", "app=outpost"]);
    let kafka_ip = k["addresses"][0].as_str().unwrap().to_string();
    let url = format!("tcp://{kafka_ip}:9092");
    let broker = Command::new("ip")
        .args([
            "netns",
            "exec",
            &kafka,
            &tansu,
            "broker",
            "--listener-url",
            &url,
        ])
        .args([
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tansu starts");
    env.servers.push(broker);
    let broker_index = env.servers.len() - 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let created = ["empire-announce", "deathstar-plans"].iter().all(|t| {
            common::sh(&[
                "ip",
                "netns",
                "exec",
                &kafka,
                &tansu,
                "topic",
                "create",
                "--broker",
                &url,
                "--partitions",
                "1",
                t,
            ])
        });
        if created {
            break;
        }
        assert!(Instant::now() < deadline, "tansu did not come up");
        sleep(Duration::from_millis(200));
    }
    let bootstrap = format!("{kafka_ip}:9092");
    let run = |from: &str, lib: &str, action: &str, topic: &str| -> serde_json::Value {
        let out = Command::new("ip")
            .args([
                "netns", "exec", from, &python, client_py, lib, action, &bootstrap, topic,
            ])
            .arg(format!("{from}-{lib}"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
            panic!(
                "{lib} {action} {topic} from {from}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let monitor = env.monitor(120);
    sleep(Duration::from_millis(1000));
    for lib in ["confluent-kafka", "kafka-python"] {
        let ok = run(&hq, lib, "produce", "empire-announce");
        assert_eq!(ok["ok"], true, "the producer may produce: {ok}");
        let got = run(&outpost, lib, "consume", "empire-announce");
        assert_eq!(got["ok"], true, "the consumer may consume: {got}");
        for (from, action, topic, why) in [
            (&hq, "produce", "deathstar-plans", "another topic"),
            (
                &outpost,
                "produce",
                "empire-announce",
                "the consumer may not produce",
            ),
            (
                &hq,
                "consume",
                "empire-announce",
                "the producer may not consume",
            ),
            (&outpost, "consume", "deathstar-plans", "another topic"),
        ] {
            let r = run(from, lib, action, topic);
            let error = r["error"].as_str().unwrap_or_default();
            assert!(
                r["ok"] == false
                    && (error.ends_with("AuthorizationFailedError")
                        || error.ends_with("_AUTHORIZATION_FAILED")),
                "{lib}: {why}: the client reports an authorization error: {r}"
            );
            assert!(
                r["seconds"].as_f64().unwrap() < 1.0,
                "{lib}: {why}: reported within a second: {r}"
            );
        }
        let md = run(&outpost, lib, "metadata", "");
        let topics = md["topics"].as_object().unwrap();
        assert!(
            topics.contains_key("empire-announce") && !topics.contains_key("deathstar-plans"),
            "{lib}: metadata shows only what the client may see: {md}"
        );
    }
    let named = run(&outpost, "confluent-kafka", "metadata", "deathstar-plans");
    assert_eq!(
        named["topics"]["deathstar-plans"], "TOPIC_AUTHORIZATION_FAILED",
        "{named}"
    );
    // `membrane monitor` shows the Kafka flow records with both identities.
    sleep(Duration::from_millis(500));
    let mut monitor = monitor;
    let _ = monitor.kill();
    let out = monitor.wait_with_output().unwrap();
    let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "l7" && v["flow"]["protocol"] == "kafka")
        .map(|v| v["flow"].clone())
        .collect();
    // The consumer endpoint's Produce, refused with a synthetic answer; the producer's request
    // for deathstar-plans was already refused at its Metadata.
    let denied = flows
        .iter()
        .find(|f| f["verdict"] == "denied" && f["kafka"]["api"] == "Produce")
        .unwrap_or_else(|| panic!("no denied Produce among {} Kafka flows", flows.len()));
    assert_eq!(denied["kafka"]["error_code"], 29, "{denied}");
    assert_eq!(denied["kafka"]["topics"][0], "empire-announce", "{denied}");
    assert_eq!(denied["dst_identity"], k["identity"], "{denied}");
    assert!(
        flows.iter().any(|f| f["verdict"] == "denied"
            && f["kafka"]["api"] == "Metadata"
            && f["kafka"]["denied_topics"][0] == "deathstar-plans"),
        "a refused Metadata for deathstar-plans in monitor"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["verdict"] == "forwarded" && f["kafka"]["api"] == "Fetch"),
        "a forwarded Fetch in monitor"
    );
    let mut broker = env.servers.remove(broker_index);
    let _ = broker.kill();
    let _ = broker.wait();
    for ep in [&kafka, &hq, &outpost] {
        env.json(&["endpoint", "delete", ep]);
    }
    fs::remove_file(env.dir.join("policy/kafka.yaml")).unwrap();
}

/// The agent's xDS: a stream subscribed to an endpoint's NetworkPolicy gets it (and the hosts
/// map), its ACK shows in `membrane endpoint get`, a policy change reaches it within a second,
/// and a NACK shows with its error.
const MESH_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mesh}
spec:
  endpointSelector: {matchLabels: {app: mesh}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public/.*"}]
  egress:
  - toEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#;

/// Istio mode: endpoint `mesh` carries Istio's sidecar label and runs a real Envoy with
/// membrane's wasm filter in its namespace, fed by the agent's xDS socket. The datapath leaves
/// its HTTP port to the sidecar (L3/L4 only, no redirect to the agent's proxy), the sidecar
/// judges the HTTP rules, and everything Istio does not capture (UDP, ICMP, IPv6) is still
/// enforced by the datapath: the sidecar endpoint reaches the client's DNS port and nothing else.
fn sidecar_checks(env: &mut Env, client_ip: &str, client_identity: u64) {
    let envoy = peer("MEMBRANE_ENVOY");
    let wasm = peer("MEMBRANE_WASM_FILTER");
    write_policy(&env.dir.join("policy"), "mesh.yaml", MESH_POLICY);
    let mesh = env.ns("mesh");
    let m = env.json(&[
        "endpoint",
        "create",
        &mesh,
        "--labels",
        "app=mesh,security.istio.io/tlsMode=istio",
    ]);
    let mesh_ip = m["addresses"][0].as_str().unwrap().to_string();
    let mesh_identity = m["identity"].as_u64().unwrap();
    let www = env.dir.join("mesh-www");
    fs::create_dir_all(www.join("public")).unwrap();
    fs::write(www.join("public/a"), "public\n").unwrap();
    fs::write(www.join("private"), "private\n").unwrap();
    let app = Command::new("ip")
        .args([
            "netns",
            "exec",
            &mesh,
            "python3",
            "-m",
            "http.server",
            "8080",
        ])
        .args(["--bind", "127.0.0.1"])
        .current_dir(&www)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    env.servers.push(app);
    // The sidecar is configured as istiod would configure it from `membrane istio manifests`:
    // the WasmPlugin's filter and the EnvoyFilter's cluster, so those manifests are what runs.
    let istio = membrane_istio::Settings {
        wasm_url: format!("file://{wasm}"),
        xds_socket: env.xds_socket().display().to_string(),
        ..Default::default()
    };
    let filter = envoy::istio_wasm_filter(&membrane_istio::wasm_plugin(&istio));
    let inbound = envoy::Listener {
        name: "inbound_80",
        address: &mesh_ip,
        port: 80,
        direction: "INBOUND",
        transport: "",
        route: "route: {cluster: app}",
        filters: &filter,
    };
    let config = format!(
        "node: {{id: sidecar-mesh, cluster: mesh, metadata: {{INSTANCE_IPS: \"{mesh_ip}\"}}}}\nadmin: {{address: {}}}\nstatic_resources:\n  listeners:\n{}  clusters:\n{}{}",
        envoy::socket("127.0.0.1", 15000),
        inbound.yaml(),
        envoy::cluster("app", &envoy::socket("127.0.0.1", 8080), false, ""),
        envoy::istio_added_cluster(&membrane_istio::envoy_filter(&istio)),
    );
    fs::write(env.dir.join("mesh-envoy.yaml"), config).unwrap();
    let log_path = env.dir.join("mesh-envoy.log");
    let sidecar = Command::new("ip")
        .args(["netns", "exec", &mesh, &envoy, "-c"])
        .arg(env.dir.join("mesh-envoy.yaml"))
        .args(["--concurrency", "1", "--disable-hot-restart"])
        .args(["--base-id", &(30000 + env.tag).to_string()])
        .args(["--log-level", "info"])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    env.servers.push(sidecar);
    let envoy_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let url = |path: &str| format!("http://{mesh_ip}/{path}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.curl("client", &[&url("public/a")]).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the sidecar never served:\n{}",
            envoy_log()
        );
        sleep(Duration::from_millis(300));
    }
    let (code, body) = env.curl("client", &[&url("private")]);
    assert_eq!(
        (code, body.as_str()),
        (403, "Access denied\r"),
        "the sidecar's deny"
    );
    assert!(
        envoy_log().contains(&format!(
            "membrane: denied inbound GET /private from {client_ip} identity {client_identity} \
             to {mesh} identity {mesh_identity} port 80: no HTTP rule of CiliumNetworkPolicy \
             default/mesh spec[0] allows it"
        )),
        "judged in the sidecar with the agent's identities:\n{}",
        envoy_log()
    );
    // The sidecar's policy streams (main thread and worker) acknowledged the endpoint's policy.
    let x = env.json(&["endpoint", "get", &mesh])["xds"].clone();
    let acked = x["proxies"]
        .as_object()
        .map(|p| {
            p.iter()
                .filter(|(k, v)| k.starts_with("sidecar-mesh#") && v["acked"] == x["revision"])
                .count()
        })
        .unwrap_or(0);
    assert_eq!(acked, 2, "{x}");
    // It subscribed by its pod's address (Istio's INSTANCE_IPS): no other endpoint's policy
    // waits for it.
    let client = env.ns("client");
    let other = env.json(&["endpoint", "get", &client])["xds"].clone();
    assert!(
        other["proxies"]
            .as_object()
            .is_none_or(|p| p.keys().all(|k| !k.starts_with("sidecar-mesh#"))),
        "{other}"
    );
    let waited = env.json(&["endpoint", "wait", &mesh]);
    assert_eq!(waited["realized"], true, "{waited}");
    // A policy change: once `endpoint wait` returns, both sidecar VMs enforce it.
    write_policy(
        &env.dir.join("policy"),
        "mesh.yaml",
        &MESH_POLICY.replace("\"/public/.*\"", "\"/public/.*|/private\""),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.json(&["endpoint", "get", &mesh])["xds"]["revision"] == x["revision"] {
        assert!(Instant::now() < deadline, "the edit was not published");
        sleep(Duration::from_millis(50));
    }
    let waited = env.json(&["endpoint", "wait", &mesh, "--timeout", "5"]);
    assert_eq!(
        waited["acked"].as_object().map(|m| m.len()),
        Some(2),
        "{waited}"
    );
    assert_eq!(
        env.curl("client", &[&url("private")]).0,
        200,
        "realized means enforced"
    );
    // L3/L4 still in the datapath: an identity the policy does not name never reaches Envoy.
    assert_eq!(
        env.curl("web", &[&url("public/a")]).0,
        0,
        "web is not allowed"
    );
    // UDP, which Istio does not capture: DNS to the client passes, anything else is dropped.
    env.serve("client", client_ip, &[], &[53, 5353]);
    assert!(env.udp("mesh", client_ip, 53), "DNS is allowed");
    assert!(!env.udp("mesh", client_ip, 5353), "a UDP leak is dropped");
    // ICMP and IPv6, which Istio does not capture either: an echo to the (unselected) client is
    // dropped at mesh's egress, and over IPv6 DNS passes and the leak does not.
    assert!(
        !env.python("mesh", &common::icmp_echo_code(client_ip)),
        "ICMP is not in mesh's egress"
    );
    let client6 = env.json(&["endpoint", "get", &env.ns("client")])["addresses"][1]
        .as_str()
        .expect("the client's IPv6 address")
        .to_string();
    env.serve("client", &client6, &[], &[53, 5353]);
    assert!(env.udp("mesh", &client6, 53), "DNS over IPv6 is allowed");
    assert!(
        !env.udp("mesh", &client6, 5353),
        "a UDP leak over IPv6 is dropped"
    );
    // Leave the agent as the later steps expect it: the sidecar, its app, the client's UDP
    // servers and the endpoint gone.
    for mut p in env.servers.drain(env.servers.len() - 4..) {
        let _ = p.kill();
        let _ = p.wait();
    }
    let revision = env.json(&["status"])["policy"]["revision"].clone();
    fs::remove_file(env.dir.join("policy/mesh.yaml")).unwrap();
    env.json(&["endpoint", "delete", &mesh]);
    // Later steps tamper with the maps: the removal must be applied before they start.
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.json(&["status"])["policy"]["revision"] == revision {
        assert!(
            Instant::now() < deadline,
            "the policy removal was not applied"
        );
        sleep(Duration::from_millis(50));
    }
}

/// The module path the agent is started with (`--xds-wasm-module`).
const XDS_WASM_MODULE: &str = "/var/lib/membrane/membrane_wasm_filter.wasm";

fn xds_checks(env: &Env, web: &str, web_identity: u64, web_ip: &str) {
    use membrane_api::{INIT_POLICY, NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, v1};
    use membrane_xds_server::client::AdsClient;
    use prost::Message;
    // A worker thread keeps the client's connection moving between the test's steps.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxies = |env: &Env| env.json(&["endpoint", "get", web])["xds"].clone();
    let mut c = rt
        .block_on(AdsClient::connect_unix(&env.xds_socket(), "sidecar-web"))
        .expect("the agent serves xDS on its socket");
    let next = |c: &mut AdsClient, rt: &tokio::runtime::Runtime| {
        rt.block_on(c.next(Duration::from_secs(1)))
            .unwrap()
            .expect("a response within a second")
    };
    // The newest response once the agent is quiet (it may push while endpoints settle; a reply
    // to an older response is stale, as in Envoy's protocol).
    let latest = |c: &mut AdsClient, rt: &tokio::runtime::Runtime| {
        let mut last = next(c, rt);
        while let Some(newer) = rt.block_on(c.next(Duration::from_millis(300))).unwrap() {
            last = newer;
        }
        last
    };
    rt.block_on(c.send(NETWORK_POLICY_TYPE, &[web], "", "", None))
        .unwrap();
    let first = latest(&mut c, &rt);
    assert_eq!(first.resources.len(), 1, "only the subscribed endpoint");
    let np = v1::NetworkPolicy::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(np.endpoint, web);
    assert_eq!(u64::from(np.identity), web_identity);
    assert!(np.addresses.iter().any(|a| a == web_ip), "{np:?}");
    let ingress = np.ingress.clone().unwrap();
    assert!(
        ingress.enforced && !ingress.entries.is_empty(),
        "{ingress:?}"
    );
    assert!(
        ingress
            .entries
            .iter()
            .any(|e| e.port == 8090 && !e.l7.is_empty()),
        "the L7 port carries its HTTP rules: {ingress:?}"
    );
    // Not acknowledged yet: waiting for the revision to be realized times out, naming the stream.
    let out = env.membrane(&["endpoint", "wait", web, "--timeout", "0.3"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("not acknowledged in time by sidecar-web#"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(c.ack(&first, &[web])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let x = proxies(env);
        let acked = x["proxies"]
            .as_object()
            .and_then(|p| p.iter().find(|(k, _)| k.starts_with("sidecar-web#")))
            .map(|(_, v)| v["acked"].clone());
        if acked == Some(x["revision"].clone()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ACK shows in endpoint get: {x}"
        );
        sleep(Duration::from_millis(50));
    }
    // The hosts map has the endpoint's address under its identity.
    let mut h = rt
        .block_on(AdsClient::connect_unix(&env.xds_socket(), "sidecar-web"))
        .unwrap();
    rt.block_on(h.send(NETWORK_POLICY_HOSTS_TYPE, &[], "", "", None))
        .unwrap();
    let hosts = next(&mut h, &rt);
    let mine = hosts
        .resources
        .iter()
        .map(|r| v1::NetworkPolicyHosts::decode(r.value.as_slice()).unwrap())
        .find(|x| u64::from(x.identity) == web_identity)
        .expect("the endpoint's identity in the hosts map");
    assert!(
        mine.host_addresses.contains(&format!("{web_ip}/32")),
        "{mine:?}"
    );
    // With --xds-wasm-module, the filter's configurations for a standalone Envoy: the HTTP
    // filter, its upstream-filter form and the Kafka network filter, all naming the module.
    let mut e = rt
        .block_on(AdsClient::connect_unix(&env.xds_socket(), "standalone"))
        .unwrap();
    let ecds = membrane_xds_server::translate::TYPED_EXTENSION_CONFIG_TYPE;
    rt.block_on(e.send(ecds, &[], "", "", None)).unwrap();
    let extensions = next(&mut e, &rt);
    let served: Vec<_> = extensions
        .resources
        .iter()
        .map(|r| {
            let ext = envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig::decode(
                r.value.as_slice(),
            )
            .unwrap();
            let config = ext.typed_config.unwrap().value;
            let names_module = config
                .windows(XDS_WASM_MODULE.len())
                .any(|w| w == XDS_WASM_MODULE.as_bytes());
            (ext.name, names_module)
        })
        .collect();
    assert_eq!(
        served,
        [
            ("membrane".to_string(), true),
            ("membrane_kafka".to_string(), true),
            ("membrane_upstream".to_string(), true),
        ]
    );
    // The init policy (init.yaml: egress to the client on 7070) is served by name for sidecars
    // whose pod has no policy yet, with no init endpoint left on the node.
    let mut i = rt
        .block_on(AdsClient::connect_unix(&env.xds_socket(), "sidecar-new"))
        .unwrap();
    rt.block_on(i.send(NETWORK_POLICY_TYPE, &[INIT_POLICY], "", "", None))
        .unwrap();
    let served = next(&mut i, &rt);
    assert_eq!(served.resources.len(), 1, "only the init policy");
    let init = v1::NetworkPolicy::decode(served.resources[0].value.as_slice()).unwrap();
    assert_eq!((init.endpoint.as_str(), init.identity), (INIT_POLICY, 5));
    assert!(init.addresses.is_empty(), "{init:?}");
    let client_identity = env.json(&["endpoint", "get", &env.ns("client")])["identity"].clone();
    let egress = init.egress.clone().unwrap();
    assert!(
        egress.enforced
            && egress.entries.iter().any(|e| e.port == 7070
                && e.protocol == 6
                && serde_json::json!(e.remote_identity) == client_identity),
        "{init:?}"
    );
    // A policy change reaches the stream within a second.
    let t0 = Instant::now();
    write_policy(
        &env.dir.join("policy"),
        "xds.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: xds-extra}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"9999\", protocol: TCP}]}]\n",
    );
    let has_9999 = |r: &membrane_xds_server::client::DiscoveryResponse| {
        v1::NetworkPolicy::decode(r.resources[0].value.as_slice())
            .unwrap()
            .ingress
            .unwrap()
            .entries
            .iter()
            .any(|e| e.port == 9999)
    };
    let second = loop {
        let r = rt
            .block_on(c.next(Duration::from_secs(3)))
            .unwrap()
            .expect("the change is pushed");
        if has_9999(&r) {
            break r;
        }
    };
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "pushed {:?} after the file changed",
        t0.elapsed()
    );
    // Rejecting it shows as such, with the proxy's error.
    rt.block_on(c.send(
        NETWORK_POLICY_TYPE,
        &[web],
        &second.nonce,
        &first.version_info,
        Some("test rejects it"),
    ))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let x = proxies(env);
        let nacked = x["proxies"]
            .as_object()
            .and_then(|p| p.iter().find(|(k, _)| k.starts_with("sidecar-web#")))
            .map(|(_, v)| v["nacked"]["error"].clone());
        if nacked == Some(serde_json::json!("test rejects it")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the NACK shows in endpoint get: {x}"
        );
        sleep(Duration::from_millis(50));
    }
    fs::remove_file(env.dir.join("policy/xds.yaml")).unwrap();
}

/// Connects from `client` to web:8080 (allowed) every 50 ms for `secs` seconds, and to web:8082
/// (denied, no server: a packet that got through would come back refused).
fn start_load(client: &str, web_ip: &str, secs: u32) -> Child {
    let code = format!(
        "import socket,time,json\nok=fail=passed=0\nend=time.time()+{secs}\n\
         while time.time()<end:\n  \
           try:\n    s=socket.create_connection(('{web_ip}',8080),timeout=1); ok+=s.recv(2)==b'ok'; s.close()\n  \
           except OSError: fail+=1\n  \
           try:\n    socket.create_connection(('{web_ip}',8082),timeout=0.2); passed+=1\n  \
           except ConnectionRefusedError: passed+=1\n  \
           except OSError: pass\n  \
           time.sleep(0.05)\n\
         print(json.dumps(dict(ok=ok,fail=fail,passed=passed)))\n"
    );
    Command::new("ip")
        .args(["netns", "exec", client, "python3", "-c", &code])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The load's counts: allowed requests that succeeded (`ok`) and failed, denied ones that passed.
fn finish_load(load: Child) -> serde_json::Value {
    serde_json::from_slice(&load.wait_with_output().unwrap().stdout).unwrap()
}

fn write_policy(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(tmp, dir.join(name)).unwrap();
}

fn web_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| format!("{{port: \"{p}\", protocol: TCP}}"))
        .collect();
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: web}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{}]}}]\n",
        ports.join(", ")
    )
}

#[test]
fn agent_enforces_policy_between_endpoints() {
    common::require_root();
    let mut env = Env::new();
    let policy_dir = env.dir.join("policy");
    write_policy(&policy_dir, "web.yaml", &web_policy(&[8080]));
    // Endpoints whose labels are not known yet get reserved:init and the init policy.
    write_policy(
        &policy_dir,
        "init.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: init}\nspec:\n  endpointSelector: {matchLabels: {reserved:init: \"\"}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"7070\", protocol: TCP}]}]\n",
    );
    write_policy(
        &policy_dir,
        "iperf.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: iperf}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"5201\", protocol: TCP}]}]\n",
    );
    write_policy(
        &policy_dir,
        "world.yaml",
        &format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: from-world}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromCIDRSet: [{{cidr: {WORLD}, except: [10.252.0.128/25]}}]\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n"
        ),
    );
    env.world();
    env.start_agent();

    let (web, client) = (env.ns("web"), env.ns("client"));
    let w = env.json(&["endpoint", "create", &web, "--labels", "app=web"]);
    let c = env.json(&["endpoint", "create", &client, "--labels", "app=client"]);
    let web_ip = w["addresses"][0].as_str().unwrap().to_string();
    let web_ip6 = w["addresses"][1].as_str().unwrap().to_string();
    assert!(web_ip6.starts_with("fd00:251::"), "{w}");
    assert!(web_ip.starts_with("10.251.0."), "{w}");
    assert_ne!(w["identity"], c["identity"]);
    assert_eq!(env.json(&["endpoint", "list"]).as_array().unwrap().len(), 2);
    assert!(
        env.json(&["identity", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["identity"] == w["identity"])
    );

    env.serve("web", &web_ip, &[8080, 8081], &[5353]);
    env.serve("web", &web_ip6, &[8080, 8081], &[]);

    // An endpoint without labels has the init identity (5) and the init policy's egress.
    let init = env.ns("init");
    let i = env.json(&["endpoint", "create", &init]);
    assert_eq!(i["identity"], 5, "{i}");
    let client_ip = c["addresses"][0].as_str().unwrap().to_string();
    env.serve("client", &client_ip, &[7070, 7071], &[]);
    assert!(
        env.connects("init", &client_ip, 7070),
        "the init policy allows 7070"
    );
    assert!(
        !env.connects("init", &client_ip, 7071),
        "init egress is default-deny elsewhere"
    );
    env.json(&["endpoint", "delete", &init]);
    assert!(
        env.connects("client", &web_ip, 8080),
        "allowed by the policy"
    );
    assert!(!env.connects("client", &web_ip, 8081), "not in the policy");
    assert!(
        env.connects("client", &web_ip6, 8080),
        "IPv6: allowed by the policy"
    );
    assert!(
        !env.connects("client", &web_ip6, 8081),
        "IPv6: not in the policy"
    );
    assert!(
        !env.udp("client", &web_ip, 5353),
        "UDP is not in the policy"
    );
    // Bulk TCP through the datapath with iperf3: allowed on 5201 (iperf.yaml), denied on 5202
    // (where a server listens too, so only policy can make it fail).
    for port in ["5201", "5202"] {
        let iperf = Command::new("ip")
            .args([
                "netns", "exec", &web, "iperf3", "-s", "-1", "-B", &web_ip, "-p", port,
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 (scripts/test.sh installs it)");
        env.servers.push(iperf);
    }
    sleep(Duration::from_millis(500));
    let run = Command::new("ip")
        .args([
            "netns", "exec", &client, "iperf3", "-J", "-t", "1", "-c", &web_ip, "-p", "5201",
        ])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        run.status.success() && bps > 1e8,
        "iperf3 through the datapath: {bps} bit/s, {}",
        String::from_utf8_lossy(&run.stdout)
    );
    let denied = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client,
            "iperf3",
            "-t",
            "1",
            "--connect-timeout",
            "1000",
        ])
        .args(["-c", &web_ip, "-p", "5202"])
        .output()
        .unwrap();
    assert!(
        !denied.status.success(),
        "iperf3 on a port the policy does not allow"
    );
    // ICMP echo: web's L4 rules do not allow it; from web to the unselected client it passes,
    // and the reply comes back through conntrack.
    assert!(
        !env.python("client", &common::icmp_echo_code(&web_ip)),
        "ICMP is not in web's policy"
    );
    assert!(
        env.python("web", &common::icmp_echo_code(&client_ip)),
        "ICMP echo to an unselected endpoint, and its reply"
    );
    // The same with the everyday tools: ping over IPv4 and ICMPv6, nc over TCP and UDP. Between
    // two endpoints a packet is one hop older (the datapath delivers it as the host's forwarding
    // would have).
    let client_ip6 = c["addresses"][1].as_str().unwrap().to_string();
    env.serve("client", &client_ip, &[], &[5300]);
    for (family, to_client, to_web) in [("-4", &client_ip, &web_ip), ("-6", &client_ip6, &web_ip6)]
    {
        let (ok, out) = env.run_in("web", &["ping", family, "-c", "2", "-W", "1", to_client]);
        assert!(
            ok && out.contains("ttl=63"),
            "ping {family} web -> client: {out}"
        );
        let (ok, out) = env.run_in("client", &["ping", family, "-c", "2", "-W", "1", to_web]);
        assert!(!ok, "ping {family} is not in web's policy: {out}");
    }
    let nc = |from: &str, args: &[&str]| {
        let mut cmd = vec!["sh", "-c", r#"printf hi | nc "$@""#, "nc"];
        cmd.extend_from_slice(args);
        env.run_in(from, &cmd)
    };
    assert!(
        nc("client", &["-z", "-w", "1", &web_ip, "8080"]).0,
        "nc TCP: allowed"
    );
    assert!(
        !nc("client", &["-z", "-w", "1", &web_ip, "8081"]).0,
        "nc TCP: not in the policy"
    );
    assert!(
        nc("client", &["-z", "-w", "1", &web_ip6, "8080"]).0,
        "nc TCP over IPv6: allowed"
    );
    assert_eq!(
        nc("web", &["-u", "-w", "1", &client_ip, "5300"]).1,
        "ok",
        "nc UDP and its reply"
    );
    assert_eq!(
        nc("client", &["-u", "-w", "1", &web_ip, "5353"]).1,
        "",
        "nc UDP: not in the policy"
    );
    // From the world, through the external device: the CIDR rule with its exception.
    assert!(
        env.world_connects(WORLD_IN, &web_ip, 8080),
        "world inside the CIDR"
    );
    assert!(
        !env.world_connects(WORLD_EXCEPT, &web_ip, 8080),
        "world inside the except"
    );
    assert!(
        !env.world_connects(WORLD_IN, &web_ip, 8081),
        "world on another port"
    );
    // A spoofed source: the world namespace claims the client's address (which the policy
    // allows on 8080). Arriving through the external device it is world, and the datapath drops
    // it as such (the monitor shows the drop with the world identity, so it is not the host's
    // reverse-path filter that stopped it).
    // With reverse-path filtering off, so that only the datapath can be what stops it.
    let rp_before = fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
        .unwrap_or_default()
        .trim()
        .to_string();
    common::sh(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
    common::sh(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.mbw{}.rp_filter=0", env.tag),
    ]);
    common::sh(&[
        "ip",
        "-n",
        &env.ns("world"),
        "addr",
        "add",
        &format!("{client_ip}/32"),
        "dev",
        "eth0",
    ]);
    let monitor = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["monitor", "-o", "json", "--timeout", "3", "--bpf-root"])
        .arg(env.dir.join("bpf"))
        .arg("--api-socket")
        .arg(env.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(500));
    assert!(
        !env.world_connects(&client_ip, &web_ip, 8080),
        "a spoofed client address from the world got through"
    );
    let out = monitor.wait_with_output().unwrap();
    let spoofed_drop = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|e| {
            e["verdict"] == "dropped"
                && e["src"] == client_ip.as_str()
                && e["dport"] == 8080
                && e["src_identity"] == 2
        });
    assert!(
        spoofed_drop,
        "no world-identity drop of the spoofed packet: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::sh(&[
        "ip",
        "-n",
        &env.ns("world"),
        "addr",
        "del",
        &format!("{client_ip}/32"),
        "dev",
        "eth0",
    ]);
    common::sh(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.all.rp_filter={rp_before}"),
    ]);

    // The live trace explains what the datapath just did, with endpoints by name.
    let t = env.json(&[
        "policy", "trace", "--live", "--src", &client, "--dst", &web, "--dport", "8081",
    ]);
    assert_eq!(t["verdict"], "denied", "{t}");
    assert_eq!(t["src"]["endpoint"], client.as_str());
    let t = env.json(&[
        "policy", "trace", "--live", "--src", &client, "--dst", &web, "--dport", "8080",
    ]);
    assert_eq!(t["verdict"], "allowed", "{t}");
    assert_eq!(t["directions"][1]["matches"][0]["rule"]["name"], "web");

    // The datapath's view of web, by name.
    let bpf = env.dir.join("bpf").display().to_string();
    let entries = env.json(&["bpf", "policy", "get", &web, "--bpf-root", &bpf]);
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["port"] == 8080 && e["identity"] == c["identity"]),
        "{entries}"
    );

    // Metrics: datapath counters by reason and direction, on the API and on the Prometheus port.
    let metrics = String::from_utf8(env.membrane(&["metrics"]).stdout).unwrap();
    assert!(
        metrics.contains("membrane_drop_packets_total{reason=\"-133\",direction=\"ingress\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("membrane_endpoints 2"), "{metrics}");
    let scraped = Command::new("curl")
        .args([
            "-sf",
            &format!("http://127.0.0.1:{}/metrics", 19000 + env.tag % 1000),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&scraped.stdout).contains("membrane_forward_packets_total"),
        "Prometheus endpoint"
    );

    l7_checks(&mut env, &web_ip, &web_ip6);
    kafka_checks(&mut env);
    xds_checks(&env, &web, w["identity"].as_u64().unwrap(), &web_ip);
    sidecar_checks(&mut env, &client_ip, c["identity"].as_u64().unwrap());

    // A label change gives the client a new identity that the policy does not allow.
    let relabeled = env.json(&["endpoint", "labels", &client, "--set", "app=intruder"]);
    assert_ne!(relabeled["identity"], c["identity"]);
    assert!(
        !env.connects("client", &web_ip, 8080),
        "the new identity is not allowed"
    );
    env.json(&["endpoint", "labels", &client, "--set", "app=client"]);
    assert!(env.connects("client", &web_ip, 8080), "allowed again");

    // A bad edit is rejected and reported; the last good policy stays enforced.
    write_policy(
        &policy_dir,
        "web.yaml",
        &web_policy(&[8080]).replace("toPorts", "toPortz"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.json(&["status"])["policy"]["rejected"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the bad edit was not noticed");
        sleep(Duration::from_millis(100));
    }
    let status = env.json(&["status"]);
    assert!(
        status["policy"]["rejected"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `toPortz`"),
        "{status}"
    );
    assert!(
        env.connects("client", &web_ip, 8080) && !env.connects("client", &web_ip, 8081),
        "last good policy kept"
    );

    // A good edit applies within seconds, under traffic: no allowed request fails while it
    // lands, and nothing denied gets through.
    let load = start_load(&client, &web_ip, 3);
    sleep(Duration::from_millis(500));
    write_policy(&policy_dir, "web.yaml", &web_policy(&[8080, 8081]));
    assert!(
        env.eventually("client", &web_ip, 8081, true, 5),
        "the new policy was not applied"
    );
    let counts = finish_load(load);
    assert_eq!(
        (counts["fail"].as_u64(), counts["passed"].as_u64()),
        (Some(0), Some(0)),
        "{counts}"
    );
    assert!(counts["ok"].as_u64().unwrap() > 5, "{counts}");

    // Something else deletes web's policy entries: the reconcile controller puts them back.
    // It runs every 10 s: tamper right after one run, so that the check below cannot race it.
    let reconciled = |env: &Env| {
        env.json(&["status"])["controllers"]["reconcile"]["successes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = reconciled(&env);
    let deadline = Instant::now() + Duration::from_secs(15);
    while reconciled(&env) == before {
        assert!(Instant::now() < deadline, "no reconcile run in 15 s");
        sleep(Duration::from_millis(50));
    }
    {
        use aya::maps::{HashMap, Map, MapData};
        use membrane_bpf::abi::{PolicyKey, PolicyValue};
        let pin = env.dir.join("bpf").join(membrane_bpf::maps::POLICY);
        let mut m: HashMap<MapData, PolicyKey, PolicyValue> =
            Map::from_map_data(MapData::from_pin(&pin).unwrap())
                .unwrap()
                .try_into()
                .unwrap();
        let web_id = w["id"].as_u64().unwrap() as u32;
        let keys: Vec<PolicyKey> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.endpoint_id == web_id)
            .collect();
        assert!(!keys.is_empty());
        for k in keys {
            m.remove(&k).unwrap();
        }
    }
    assert!(
        !env.connects("client", &web_ip, 8080),
        "tampered: the allow entry is gone"
    );
    assert!(
        env.eventually("client", &web_ip, 8080, true, 15),
        "the reconcile controller did not repair the map"
    );
    assert!(reconciled(&env) > before);

    // kill -9 and restart under load: every allowed request succeeds and nothing denied passes,
    // all along (8082 has no server: a packet that got through would come back refused).
    let load = start_load(&client, &web_ip, 6);
    sleep(Duration::from_millis(500));
    env.kill_agent();
    assert!(
        env.connects("client", &web_ip, 8080),
        "allowed while the agent is down"
    );
    // The proxy died with the agent: L7-governed connections are refused, never let through.
    let (code, body) = env.curl("client", &[&format!("http://{web_ip}:8090/public/down")]);
    assert_eq!(code, 0, "an L7 request passed with no proxy: {body}");
    write_policy(&policy_dir, "web.yaml", &web_policy(&[8080]));
    sleep(Duration::from_millis(500));
    env.start_agent();
    let counts = finish_load(load);
    assert_eq!(
        (counts["fail"].as_u64(), counts["passed"].as_u64()),
        (Some(0), Some(0)),
        "{counts}"
    );
    assert!(counts["ok"].as_u64().unwrap() > 10, "{counts}");
    assert_eq!(
        env.json(&["endpoint", "list"]).as_array().unwrap().len(),
        2,
        "endpoints restored"
    );
    assert!(
        env.eventually("client", &web_ip, 8081, false, 5),
        "the policy written while down applies after restart"
    );
    // The restarted agent's proxy takes L7-governed connections again.
    let l7_url = format!("http://{web_ip}:8090/public/back");
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.curl("client", &[&l7_url]).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "L7 did not come back after the restart"
        );
        sleep(Duration::from_millis(200));
    }
    assert_eq!(
        env.curl("client", &[&format!("http://{web_ip}:8090/private")])
            .0,
        403
    );
    assert!(env.connects("client", &web_ip, 8080));

    env.json(&["endpoint", "delete", &client]);
    assert!(
        !common::sh(&["ip", "netns", "exec", &client, "true"]),
        "the namespace is gone"
    );
}
