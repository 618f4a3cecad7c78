//! The `membrane policy` and `membrane istio` commands, and `membrane-agent`'s refusal of a bad
//! configuration, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn membrane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(args)
        .output()
        .expect("membrane runs")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/starwars")
}

fn policy_dir() -> String {
    example().join("policy").display().to_string()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn validate_accepts_the_example() {
    let out = membrane(&["policy", "validate", &policy_dir()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_reports_file_line_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"99999\"}]\n  - toEntities: [world]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("good.yml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n",
    )
    .unwrap();
    let out = membrane(&["policy", "validate", &dir.path().display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bad = dir.path().join("bad.yaml").display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one line per problem and nothing else: {stderr}"
    );
    assert!(
        lines[0].starts_with(&format!(
            "{bad}:8:22: spec.ingress[0].toPorts[0].ports[0].port: port 99999 is out of range"
        )),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{bad}:9:5: spec.ingress[1].toEntities: unknown field"
        )),
        "{stderr}"
    );
}

#[test]
fn validate_missing_path_is_usage_error() {
    let out = membrane(&["policy", "validate", "/nonexistent/membrane"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `membrane policy trace` from a tiefighter to the deathstar on port 80, offline.
fn tiefighter_to_deathstar(policy_dir: &str) -> [&str; 14] {
    [
        "policy",
        "trace",
        "--policy-dir",
        policy_dir,
        "--src",
        "org=empire,class=tiefighter",
        "--src-namespace",
        "empire",
        "--dst",
        "org=empire,class=deathstar",
        "--dst-namespace",
        "empire",
        "--dport",
        "80/TCP",
    ]
}

#[test]
fn trace_allows_and_denies_with_reasons() {
    let pd = policy_dir();
    let base = tiefighter_to_deathstar(&pd);
    let mut allowed = base.to_vec();
    allowed.extend([
        "--http-method",
        "POST",
        "--http-path",
        "/v1/request-landing",
        "-o",
        "json",
    ]);
    let out = membrane(&allowed);
    assert!(out.status.success());
    let v = json(&out);
    assert_eq!(v["verdict"], "allowed");
    let ingress = &v["directions"][1];
    assert_eq!(ingress["stage"], "L7");
    assert_eq!(
        ingress["l7"]["allowed_by"][0]["rule"]["name"],
        "deathstar-landing"
    );
    assert_eq!(ingress["l7"]["allowed_by"][0]["l7_rule"], "rules.http[0]");

    let mut denied = base.to_vec();
    denied.extend([
        "--http-method",
        "PUT",
        "--http-path",
        "/v1/exhaust-port",
        "-o",
        "json",
    ]);
    let out = membrane(&denied);
    assert!(out.status.success(), "a denied verdict still exits 0");
    let v = json(&out);
    assert_eq!(v["verdict"], "denied");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("no HTTP rule matches PUT /v1/exhaust-port"),
        "{v}"
    );

    let mut header = base.to_vec();
    header.extend([
        "--http-path",
        "/v1/status",
        "--http-header",
        "X-Empire-Clearance:top-secret",
        "-o",
        "json",
    ]);
    assert_eq!(
        json(&membrane(&header))["verdict"],
        "allowed",
        "curl-style header without a space"
    );

    let mut text = base.to_vec();
    text.extend(["--http-method", "PUT", "--http-path", "/v1/exhaust-port"]);
    let out = membrane(&text);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("Verdict: denied")
            && s.contains("CiliumNetworkPolicy empire/deathstar-landing spec[0]"),
        "{s}"
    );
}

/// The trace judges a request as the proxy does: its path normalized, and allowed only if the
/// rules allow it as a lenient upstream reads it too; a path the proxy refuses is an error.
#[test]
fn trace_judges_paths_as_the_proxy_does() {
    let dir = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string(example().join("policy/deathstar.yaml"))
        .unwrap()
        .replace(
            "path: /v1/request-landing",
            "path: \"/v1/request-landing.*\"",
        );
    std::fs::write(dir.path().join("deathstar.yaml"), policy).unwrap();
    let pd = dir.path().display().to_string();
    let trace = |path: &str| {
        let mut args = tiefighter_to_deathstar(&pd).to_vec();
        args.extend(["--http-method", "POST", "--http-path", path, "-o", "json"]);
        membrane(&args)
    };
    let verdict = |path: &str| json(&trace(path))["verdict"].as_str().unwrap().to_string();
    assert_eq!(verdict("/v1/request-landing/x"), "allowed");
    assert_eq!(verdict("/v1/./request-landing//x"), "allowed");
    assert_eq!(verdict("/v1/request-landing/a%2Fb"), "allowed");
    assert_eq!(verdict("/v1/request-landing/../exhaust-port"), "denied");
    let v = json(&trace("/v1/request-landing/..%2F..%2Fexhaust-port"));
    assert_eq!(v["verdict"], "denied", "{v}");
    let why = v["directions"][1]["reason"].as_str().unwrap();
    assert!(
        why.contains("POST /exhaust-port") && why.contains("lenient upstream"),
        "{why}"
    );
    assert_eq!(
        verdict("/v1/request-landing/..;/..;/exhaust-port"),
        "denied"
    );
    let out = trace("/v1/%zz");
    assert_eq!(out.status.code(), Some(2), "bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("malformed percent-encoding"), "{err}");
}

#[test]
fn trace_by_address() {
    let pd = policy_dir();
    let eps = example().join("endpoints.yaml").display().to_string();
    let run = |dst: &str, port: &str| {
        json(&membrane(&[
            "policy",
            "trace",
            "--policy-dir",
            &pd,
            "--endpoints",
            &eps,
            "--src-ip",
            "10.200.1.20",
            "--dst-ip",
            dst,
            "--dport",
            port,
            "-o",
            "json",
        ]))
    };
    let v = run("10.1.2.3", "443");
    assert_eq!(v["verdict"], "denied", "the xwing may not reach 10/8: {v}");
    assert_eq!(v["src"]["endpoint"], "xwing");
    assert_eq!(run("192.0.2.1", "443")["verdict"], "allowed");
    assert_eq!(run("10.1.2.3", "53/UDP")["verdict"], "allowed");
}

#[test]
fn trace_bad_input_exits_2() {
    let pd = policy_dir();
    for args in [
        vec![
            "policy",
            "trace",
            "--policy-dir",
            &pd,
            "--src",
            "a=b",
            "--dst",
            "c=d",
            "--dport",
            "http",
        ],
        vec![
            "policy",
            "trace",
            "--policy-dir",
            &pd,
            "--src",
            "bogus:a=b",
            "--dst",
            "c=d",
            "--dport",
            "80",
        ],
        vec![
            "policy",
            "trace",
            "--policy-dir",
            &pd,
            "--src",
            "a=b",
            "--dst",
            "c=d",
            "--dport",
            "80",
            "--kafka-api-key",
            "nope",
        ],
        vec![
            "policy",
            "trace",
            "--policy-dir",
            "/nonexistent",
            "--src",
            "a=b",
            "--dst",
            "c=d",
            "--dport",
            "80",
        ],
        vec![
            "policy",
            "trace",
            "--policy-dir",
            &pd,
            "--dst",
            "c=d",
            "--dport",
            "80",
        ],
    ] {
        let out = membrane(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn trace_kafka() {
    let pd = policy_dir();
    let run = |key: &str, topic: &str| {
        json(&membrane(&[
            "policy",
            "trace",
            "--policy-dir",
            &pd,
            "--src",
            "org=empire,app=empire-outpost",
            "--src-namespace",
            "empire",
            "--dst",
            "org=empire,app=kafka",
            "--dst-namespace",
            "empire",
            "--dport",
            "9092",
            "--kafka-api-key",
            key,
            "--kafka-api-version",
            "12",
            "--kafka-topic",
            topic,
            "-o",
            "json",
        ]))["verdict"]
            .clone()
    };
    assert_eq!(run("fetch", "empire-announce"), "allowed");
    assert_eq!(run("fetch", "deathstar-plans"), "denied");
    assert_eq!(run("produce", "empire-announce"), "denied");
}

#[test]
fn resolve_prints_tables() {
    let pd = policy_dir();
    let eps = example().join("endpoints.yaml").display().to_string();
    let v = json(&membrane(&[
        "policy",
        "resolve",
        "--policy-dir",
        &pd,
        "--endpoints",
        &eps,
        "-o",
        "json",
    ]));
    let deathstar = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "deathstar")
        .unwrap();
    assert_eq!(deathstar["ingress"]["enforced"], true);
    assert_eq!(deathstar["egress"]["enforced"], false);
    let entries = deathstar["ingress"]["entries"].as_array().unwrap();
    let host = entries.iter().find(|e| e["remote_identity"] == 1).unwrap();
    assert_eq!(
        (host["port"].as_u64(), host["verdict"].as_str()),
        (Some(22), Some("allow"))
    );
    assert!(
        entries
            .iter()
            .any(|e| e["port"] == 80 && e["verdict"] == "redirect" && e["l7"]["kind"] == "http")
    );
    let out = membrane(&[
        "policy",
        "resolve",
        "--policy-dir",
        &pd,
        "--endpoints",
        &eps,
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Endpoint xwing (namespace rebels"));
}

#[test]
fn istio_manifests_and_injection() {
    let out = membrane(&["istio", "manifests", "--sha256", &"0f".repeat(32)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"sha256\": \"0f0f"), "{text}");
    assert!(
        text.contains("\"path\": \"/var/run/membrane/xds.sock\""),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let pod = dir.path().join("pod.yaml");
    std::fs::write(
        &pod,
        "kind: Pod\nmetadata: {name: web}\nspec: {containers: []}\n",
    )
    .unwrap();
    let out = membrane(&[
        "istio",
        "inject",
        "-f",
        &pod.display().to_string(),
        "--concurrency",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let annotations = &json(&out)["metadata"]["annotations"];
    assert_eq!(annotations["proxy.istio.io/config"], "{\"concurrency\":3}");

    std::fs::write(&pod, "kind: Service\nmetadata: {name: web}\n").unwrap();
    let out = membrane(&["istio", "inject", "-f", &pod.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("pod.yaml: kind: Service has no pod template"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `membrane-agent` refuses a bad configuration file with an error that names the file and the
/// key, before it touches any state (the state and bpffs paths here are never created).
#[test]
fn agent_configuration_errors_name_the_file_and_the_key() {
    let dir = std::env::temp_dir().join(format!("membrane-agent-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |text: &str| {
        let file = dir.join("agent.yaml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_membrane-agent"))
            .arg("--config")
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpf-root")
            .arg(dir.join("bpf"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .env_remove("MEMBRANE_PROXY_ALLOW_UPGRADE")
            .output()
            .expect("membrane-agent runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run("proxy-allow-upgrade: [websocket, h2c]\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--proxy-allow-upgrade: upgrade protocol \"h2c\" cannot be allowed"),
        "{stderr}"
    );
    let (code, stderr) = run("proxy-alow-upgrade: [websocket]\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("agent.yaml: unknown key \"proxy-alow-upgrade\""),
        "{stderr}"
    );
    assert!(!dir.join("state").exists() && !dir.join("bpf").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
