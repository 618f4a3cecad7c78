//! End-to-end tests live in `tests/`. This library holds fixtures that other crates' tests share:
//! the Star Wars example (`examples/starwars`) resolved the way the agent resolves it, and the
//! Envoy configuration pieces of the tests that run a real Envoy, and the Kafka broker, client and
//! frames of the tests that run Kafka.

pub mod envoy;
pub mod kafka;

use std::net::IpAddr;

use membrane_policy::PolicySet;
use membrane_policy::endpoints::{endpoint_labels, parse_endpoints};
use membrane_policy::identity::{
    Identity, IdentityAllocator, LocalAllocator, NumericIdentity, RESERVED,
};
use membrane_policy::labels::{Label, LabelSet};
use membrane_policy::resolve::Resolver;
use membrane_policy::rule::EnforcementMode;

/// Runs `openssl` in `dir`, as the tests make their certificates with it; panics with its output
/// when it fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/test.sh installs it)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// `openssl req` arguments for a new unencrypted EC P-256 key.
pub const OPENSSL_EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A resolved example: its tables and its endpoints.
#[derive(Debug)]
pub struct Example {
    /// Tables of every endpoint, and every identity.
    pub resolver: Resolver,
    /// (name, identity, addresses) of each endpoint, in file order.
    pub endpoints: Vec<(String, NumericIdentity, Vec<IpAddr>)>,
}

/// `examples/starwars`: its policy directory and endpoints file, with reserved identities and
/// identities numbered in file order.
pub fn starwars() -> Example {
    example(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/starwars"))
}

/// An example directory (`policy/*.yaml` and `endpoints.yaml`) resolved the way the agent
/// resolves it: reserved identities, then identities numbered in file order. Panics with the
/// parser's error on invalid input (this is a fixture loader).
pub fn example(dir: impl AsRef<std::path::Path>) -> Example {
    let dir = dir.as_ref().display();
    let mut sources = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(format!("{dir}/policy"))
        .unwrap_or_else(|e| panic!("{dir}/policy: {e}"))
        .map(|e| e.expect("readable directory").path())
        .collect();
    paths.sort();
    for path in paths {
        let name = format!(
            "policy/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        sources.push((
            name,
            std::fs::read_to_string(&path).expect("readable policy"),
        ));
    }
    let set = PolicySet::from_sources(sources.iter().map(|(p, t)| (p.as_str(), t.as_str())))
        .unwrap_or_else(|e| panic!("{dir}/policy: {e:?}"));
    let text = std::fs::read_to_string(format!("{dir}/endpoints.yaml")).expect("endpoints.yaml");
    let specs = parse_endpoints("endpoints.yaml", &text).unwrap_or_else(|e| panic!("{dir}: {e:?}"));
    let mut resolver = Resolver::new(EnforcementMode::Default);
    resolver.set_rules(&set.rules);
    let mut alloc = LocalAllocator::new();
    // As the agent does: reserved identities are born allocated (`new` is false for them).
    for (_, name) in RESERVED {
        let labels: LabelSet = [Label::reserved(name)].into_iter().collect();
        let (identity, _) = alloc.allocate(&labels).expect("a reserved identity");
        resolver.add_identity(identity);
    }
    let mut add = |resolver: &mut Resolver, labels: &LabelSet| -> Identity {
        let (identity, new) = alloc.allocate(labels).expect("an identity");
        if new {
            resolver.add_identity(identity.clone());
        }
        identity
    };
    let mut endpoints = Vec::new();
    for spec in &specs {
        let labels = endpoint_labels(
            &spec.labels,
            &spec.namespace,
            spec.service_account.as_deref(),
            &set.namespaces,
        );
        let identity = add(&mut resolver, &labels);
        resolver.add_endpoint(identity.id);
        endpoints.push((spec.name.clone(), identity.id, spec.ips.clone()));
    }
    Example {
        resolver,
        endpoints,
    }
}
