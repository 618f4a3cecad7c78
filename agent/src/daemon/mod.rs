//! The node agent: policy from the watched directory, identities, endpoints with their plumbing,
//! the resolver, and the datapath maps kept in step with all of it.
//!
//! ```text
//!  policy dir ──(watcher)──> apply_policy ─┐
//!  REST API ──> create/delete/relabel ─────┼─> resolver tables ──> sync ──> pinned BPF maps
//!  reconcile controller (periodic) ────────┘        ipcache, endpoints, policy; TCX links
//! ```
//!
//! Every operation runs under one lock; the REST handlers call in from blocking tasks.

pub mod api;
pub mod config;
pub mod metrics;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use membrane_bpf::abi::EndpointInfo;
use membrane_policy::endpoints::endpoint_labels;
use membrane_policy::identity::{
    Identity, IdentityAllocator, LocalAllocator, NumericIdentity, RESERVED, cidr_labels,
};
use membrane_policy::labels::{Label, LabelSet, Source};
use membrane_policy::prefixes::PrefixMap;
use membrane_policy::resolve::{ChangeSet, Resolver};
use membrane_policy::{Diagnostic, PolicySet};
use serde::{Deserialize, Serialize};

use membrane_api::{NETWORK_POLICY_HOSTS_TYPE, NETWORK_POLICY_TYPE, SPIFFE_IDENTITIES_TYPE};
use membrane_l7_proxy::policy::{PolicyHandle, SnapshotBuilder, canonical};
use membrane_xds_server::ads::XdsCache;
use membrane_xds_server::translate;
use prost::Message;

use crate::datapath::{Datapath, LocalDelivery, sync};
use crate::ipam::Ipam;
use crate::netns::{self, EndpointNet};
use crate::policy_dir;
pub use config::Config;

/// One endpoint the agent manages.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    /// Name (also the network namespace's).
    pub name: String,
    /// Kubernetes-style namespace.
    pub namespace: String,
    /// Labels as given (k8s: source unless stated).
    pub labels: LabelSet,
    /// Datapath endpoint id.
    pub id: u32,
    /// Its identity.
    pub identity: Identity,
    /// Plumbing.
    pub net: EndpointNet,
    /// Host veth ifindex.
    pub ifindex: u32,
    /// The endpoint's interface's Ethernet address (local delivery writes it).
    pub mac: netns::Mac,
    /// The host veth's.
    pub host_mac: netns::Mac,
}

/// What is persisted per endpoint, so a restarted agent finds its endpoints again.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct EndpointRecord {
    name: String,
    namespace: String,
    labels: String,
    id: u32,
    net: EndpointNet,
}

/// The health of one controller.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ControllerStatus {
    /// Successful runs.
    pub successes: u64,
    /// Failed runs.
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    /// The last error, if the last run failed.
    pub last_error: Option<String>,
    /// Unix time of the last run.
    pub last_run: u64,
}

/// The policy source's state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyStatus {
    /// Bumped on every applied change.
    pub revision: u64,
    /// Rules in force.
    pub rules: usize,
    /// Problems of the last rejected change (the previous policy stays in force).
    pub rejected: Vec<Diagnostic>,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    policy: PolicySet,
    /// Policy status.
    pub policy_status: PolicyStatus,
    /// The policy files and their stamps as last read.
    policy_scan: policy_dir::Scan,
    policy_cache: policy_dir::PolicyCache,
    allocator: LocalAllocator,
    resolver: Resolver,
    cidr_identities: BTreeMap<IpNet, NumericIdentity>,
    /// The prefixes last published as the xDS hosts map.
    published_hosts: Option<Vec<(IpNet, NumericIdentity)>>,
    ipam: Ipam,
    endpoints: BTreeMap<String, Endpoint>,
    datapath: Datapath,
    /// Controller health by name.
    pub controllers: BTreeMap<String, ControllerStatus>,
    /// The embedded L7 proxy's view of policy (when a proxy port is configured).
    proxy_policy: Option<(Arc<PolicyHandle>, SnapshotBuilder)>,
    /// The resources the xDS server serves to membrane's wasm filters in Envoy sidecars.
    xds: XdsCache,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Agent {
    /// Starts: loads and validates the policy (refusing to start on invalid policy, since there is
    /// no last good one to keep), loads the datapath, restores persisted endpoints.
    pub fn start(config: Config) -> Result<Agent> {
        if config.clean_state {
            clean_state(&config)?;
        }
        fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let mut policy_cache = policy_dir::PolicyCache::default();
        // The scan that is loaded is the one later polls compare with: a write in between is
        // never missed.
        let policy_scan = policy_dir::scan(std::slice::from_ref(&config.policy_dir))?;
        let policy = match policy_cache.load_scanned(policy_scan.clone())? {
            Ok(set) => set,
            Err(diags) => {
                let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
                bail!(
                    "the policy in {} is invalid:\n{}",
                    config.policy_dir.display(),
                    lines.join("\n")
                );
            }
        };
        let datapath = Datapath::load(&config.bpf_root)?;
        // The node routes between its endpoints (and for them).
        fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        if config.ipv6_range.is_some() {
            fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                .context("enabling IPv6 forwarding")?;
        }
        let ranges: Vec<IpNet> = config
            .ipv4_range
            .iter()
            .chain(config.ipv6_range.iter())
            .copied()
            .collect();
        for r in &ranges {
            // Addresses of the node's ranges that no endpoint holds never leave the machine.
            let fam = if matches!(r, IpNet::V4(_)) {
                "-4"
            } else {
                "-6"
            };
            let _ = std::process::Command::new("ip")
                .args([fam, "route", "replace", "unreachable", &r.to_string()])
                .status();
        }
        let mut agent = Agent {
            resolver: Resolver::new(config.enable_policy),
            ipam: Ipam::new(&ranges),
            policy_scan,
            policy_cache,
            config,
            policy: PolicySet::default(),
            policy_status: PolicyStatus::default(),
            allocator: LocalAllocator::new(),
            cidr_identities: BTreeMap::new(),
            published_hosts: None,
            endpoints: BTreeMap::new(),
            datapath,
            controllers: BTreeMap::new(),
            proxy_policy: None,
            xds: XdsCache::new(),
        };
        // Identities keep their numbers across restarts: the pinned maps still hold them, and a
        // renumbering would deny flows until every map caught up.
        if let Ok(text) = fs::read_to_string(agent.config.state_dir.join("identities.json")) {
            let saved: Vec<(u32, String)> =
                serde_json::from_str(&text).context("reading the identity state")?;
            for (id, labels) in saved {
                if let Ok(labels) = LabelSet::parse_list(&labels, Source::K8s) {
                    agent.allocator.restore(&Identity {
                        id: NumericIdentity(id),
                        labels: labels.into(),
                    });
                }
            }
        }
        for (_, name) in RESERVED {
            let labels: LabelSet = [Label::reserved(name)].into_iter().collect();
            let (identity, _) = agent.allocator.allocate(&labels)?;
            agent.resolver.add_identity(identity);
        }
        // The init policy always has a table: sidecars enforce it for pods whose own policy
        // has not arrived (the xDS resource `reserved:init`).
        agent.resolver.add_endpoint(NumericIdentity::INIT);
        if agent.config.proxy_port != 0 {
            // Packets the datapath hands to the proxy must be delivered locally.
            membrane_l7_proxy::redirect::install_routing()
                .context("policy routing for the L7 proxy")?;
        }
        agent.write_devices()?;
        agent.apply_policy(policy)?;
        agent.write_host_addresses()?;
        agent.restore_endpoints()?;
        // Only now, with this agent's programs on every endpoint: an older agent's links would
        // keep its programs judging packets by maps nobody updates any more.
        for pin in agent.datapath.remove_other_abi_pins()? {
            eprintln!(
                "membrane-agent: removed {}, pinned by an agent of another datapath ABI",
                pin.display()
            );
        }
        agent.allocator.drop_unclaimed();
        agent.persist()?;
        agent.refresh_proxy()?;
        Ok(agent)
    }

    /// The embedded proxy's policy handle, when the agent runs a proxy.
    pub fn proxy_policy(&self) -> Option<Arc<PolicyHandle>> {
        self.proxy_policy.as_ref().map(|(h, _)| h.clone())
    }

    /// Puts the current policy, endpoints and identities in force for the embedded proxy (a
    /// request is judged by the version in force when its headers arrive).
    fn refresh_proxy(&mut self) -> Result<()> {
        let node_addresses = host_addresses();
        self.publish_xds(&node_addresses);
        if self.config.proxy_port == 0 {
            return Ok(());
        }
        // The proxy judges with the agent's own tables and identities: resolving again for it
        // would double the agent's memory and policy-change latency.
        let mut prefixes = PrefixMap::new();
        let mut names = HashMap::new();
        for e in self.endpoints.values() {
            for a in &e.net.addresses {
                prefixes.insert(IpNet::from(canonical(*a)), e.identity.id);
            }
            names.entry(e.identity.id).or_insert_with(|| e.name.clone());
        }
        for a in &node_addresses {
            prefixes.insert(IpNet::from(canonical(*a)), NumericIdentity::HOST);
        }
        for (net, id) in &self.cidr_identities {
            prefixes.insert(*net, *id);
        }
        let (_, builder) = self.proxy_policy.get_or_insert_with(|| {
            let builder = SnapshotBuilder::new(self.config.enable_policy);
            (Arc::new(PolicyHandle::new_empty()), builder)
        });
        let snapshot = builder.snapshot_of(&self.resolver, prefixes, names);
        let (handle, _) = self.proxy_policy.as_ref().expect("set above");
        handle.store(snapshot);
        Ok(())
    }

    /// Publishes the xDS resources: each endpoint's NetworkPolicy and the init policy's, the
    /// identity -> addresses map (endpoints, policy CIDRs, the node's own addresses as host) and
    /// the SPIFFE ID table. Streams see a new version only when something changed.
    fn publish_xds(&mut self, node_addresses: &[IpAddr]) {
        let mut policies = BTreeMap::new();
        let mut prefixes: Vec<(IpNet, NumericIdentity)> = Vec::new();
        for e in self.endpoints.values() {
            prefixes.extend(
                e.net
                    .addresses
                    .iter()
                    .map(|a| (IpNet::from(*a), e.identity.id)),
            );
            let Some(table) = self.resolver.table(e.identity.id) else {
                continue;
            };
            let np = translate::network_policy(&e.name, e.identity.id, &e.net.addresses, table);
            policies.insert(e.name.clone(), translate::aliased(&np));
        }
        if let Some(table) = self.resolver.table(NumericIdentity::INIT) {
            let np = translate::init_policy(table);
            policies.insert(np.endpoint.clone(), translate::aliased(&np));
        }
        prefixes.extend(self.cidr_identities.iter().map(|(n, id)| (*n, *id)));
        prefixes.extend(
            node_addresses
                .iter()
                .map(|a| (IpNet::from(*a), NumericIdentity::HOST)),
        );
        let spiffe = translate::spiffe_identities(
            &self.config.xds_trust_domain,
            self.resolver.identities().map(|i| &**i),
        );
        self.xds
            .set_aliased_resources(NETWORK_POLICY_TYPE, policies);
        // Most changes leave the 10,000-entry hosts map as it was: encode it only when not.
        if self.published_hosts.as_ref() != Some(&prefixes) {
            let hosts = translate::network_policy_hosts(prefixes.iter().copied())
                .into_iter()
                .map(|h| (h.identity.to_string(), h.encode_to_vec()))
                .collect();
            self.xds.set_resources(NETWORK_POLICY_HOSTS_TYPE, hosts);
            self.published_hosts = Some(prefixes);
        }
        self.xds.set_resources(
            SPIFFE_IDENTITIES_TYPE,
            BTreeMap::from([("spiffe".to_string(), spiffe.encode_to_vec())]),
        );
        if let Some(module) = &self.config.xds_wasm_module {
            let (module, cluster) = (module.display().to_string(), &self.config.xds_wasm_cluster);
            self.xds.set_resources(
                translate::TYPED_EXTENSION_CONFIG_TYPE,
                translate::standalone_extensions(&module, cluster),
            );
        }
    }

    /// The xDS resources and their subscribers' acknowledgements.
    pub fn xds(&self) -> XdsCache {
        self.xds.clone()
    }

    /// An endpoint's policy revision served over xDS and what each subscribed proxy (a stream,
    /// `NODE#STREAM`) last acknowledged or rejected.
    pub fn xds_status(&self, endpoint: &str) -> serde_json::Value {
        let proxies: serde_json::Map<String, serde_json::Value> = self
            .xds
            .subscribers(NETWORK_POLICY_TYPE, endpoint)
            .into_iter()
            .map(|(k, s)| {
                (
                    k,
                    serde_json::json!({
                        "acked": s.acked,
                        "nacked": s.nacked.map(|(v, detail)| serde_json::json!({"revision": v, "error": detail})),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "revision": self.xds.version(NETWORK_POLICY_TYPE),
            "proxies": proxies,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies a validated policy: new CIDR identities, rules, and every endpoint's maps.
    pub fn apply_policy(&mut self, set: PolicySet) -> Result<()> {
        let wanted = set.cidr_prefixes();
        let mut identities_changed = false;
        for net in &wanted {
            if !self.cidr_identities.contains_key(net) {
                let (identity, new) = self.allocator.allocate(&cidr_labels(net))?;
                if new {
                    self.resolver.add_identity(identity.clone());
                }
                self.datapath.set_ipcache(*net, identity.id.0, 0)?;
                self.cidr_identities.insert(*net, identity.id);
                identities_changed = true;
            }
        }
        let stale: Vec<IpNet> = self
            .cidr_identities
            .keys()
            .filter(|n| !wanted.contains(n))
            .copied()
            .collect();
        for net in stale {
            if let Some(id) = self.cidr_identities.remove(&net) {
                identities_changed = true;
                self.datapath.remove_ipcache(net)?;
                if self.allocator.release(id) {
                    self.resolver.remove_identity(id);
                }
            }
        }
        self.resolver.set_rules(&set.rules);
        self.policy_status.revision += 1;
        self.policy_status.rules = set.rules.len();
        self.policy_status.rejected.clear();
        self.policy = set;
        self.sync_all()?;
        // Only when the set changed: with thousands of CIDR identities the file is megabytes.
        if identities_changed {
            self.persist_identities()?;
        }
        self.refresh_proxy()?;
        Ok(())
    }

    /// Re-reads the policy directory if it changed. An invalid change is recorded and rejected;
    /// the policy in force stays.
    pub fn poll_policy(&mut self) -> Result<bool> {
        let scan = policy_dir::scan(std::slice::from_ref(&self.config.policy_dir))?;
        if scan == self.policy_scan {
            return Ok(false);
        }
        self.policy_scan = scan.clone();
        let started = std::time::Instant::now();
        match self.policy_cache.load_scanned(scan)? {
            Ok(set) => {
                let read = started.elapsed();
                self.apply_policy(set)?;
                eprintln!(
                    "membrane-agent: policy revision {} applied ({} rules; read in {read:?}, applied in {:?})",
                    self.policy_status.revision,
                    self.policy_status.rules,
                    started.elapsed() - read
                );
            }
            Err(diags) => {
                for d in &diags {
                    eprintln!("membrane-agent: policy change rejected: {d}");
                }
                self.policy_status.rejected = diags;
            }
        }
        Ok(true)
    }

    /// External devices: what arrives through them is world, or host in legacy mode.
    fn write_devices(&mut self) -> Result<()> {
        let identity = if self.config.k8s_legacy_host_allows_world {
            NumericIdentity::HOST
        } else {
            NumericIdentity::WORLD
        };
        for d in self.config.devices.clone() {
            let ifindex = netns::ifindex(&d).with_context(|| format!("--devices: {d}"))?;
            self.datapath.set_device(ifindex, identity.0)?;
        }
        Ok(())
    }

    /// The node's own addresses are the host identity.
    fn write_host_addresses(&mut self) -> Result<()> {
        for addr in host_addresses() {
            self.datapath
                .set_ipcache(IpNet::from(addr), NumericIdentity::HOST.0, 0)?;
        }
        Ok(())
    }

    fn state_file(&self) -> PathBuf {
        self.config.state_dir.join("endpoints.json")
    }

    fn persist(&self) -> Result<()> {
        let records: Vec<EndpointRecord> = self
            .endpoints
            .values()
            .map(|e| EndpointRecord {
                name: e.name.clone(),
                namespace: e.namespace.clone(),
                labels: e.labels.to_string(),
                id: e.id,
                net: e.net.clone(),
            })
            .collect();
        let tmp = self.state_file().with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&records)?)?;
        fs::rename(&tmp, self.state_file())?;
        self.persist_identities()
    }

    /// Saves `[[number, "labels"], ...]`, streamed: with 10,000 CIDR identities the whole text
    /// is megabytes the agent would otherwise hold at its peak.
    fn persist_identities(&self) -> Result<()> {
        use serde::Serializer as _;
        use std::io::Write as _;
        struct LabelsText<'a>(&'a LabelSet);
        impl Serialize for LabelsText<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self.0)
            }
        }
        let path = self.config.state_dir.join("identities.json");
        let tmp = path.with_extension("json.tmp");
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut json = serde_json::Serializer::new(std::io::BufWriter::new(file));
        json.collect_seq(
            self.allocator
                .identities()
                .filter(|i| !i.id.is_reserved())
                .map(|i| (i.id.0, LabelsText(&i.labels))),
        )?;
        json.into_inner().flush()?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    fn restore_endpoints(&mut self) -> Result<()> {
        let Ok(text) = fs::read_to_string(self.state_file()) else {
            return Ok(());
        };
        let records: Vec<EndpointRecord> =
            serde_json::from_str(&text).context("reading the endpoint state")?;
        for r in records {
            for a in &r.net.addresses {
                self.ipam.reserve(*a);
            }
            let labels =
                LabelSet::parse_list(&r.labels, Source::K8s).map_err(|e| anyhow!("{e}"))?;
            self.install(r.name, r.namespace, labels, r.id, r.net)?;
        }
        Ok(())
    }

    fn next_id(&self) -> u32 {
        (1..)
            .find(|i| !self.endpoints.values().any(|e| e.id == *i))
            .unwrap_or(1)
    }

    /// The identity for an endpoint's labels. A new identity may be a peer of other endpoints'
    /// tables: those are written to the maps again.
    fn identity_for(&mut self, labels: &LabelSet, namespace: &str) -> Result<Identity> {
        let labels = endpoint_labels(labels, namespace, None, &self.policy.namespaces);
        let (identity, new) = self.allocator.allocate(&labels)?;
        if new {
            let changes = self.resolver.add_identity(identity.clone());
            self.sync_changed(&changes)?;
        }
        Ok(identity)
    }

    /// Writes the maps of the endpoints whose tables a resolver update changed.
    fn sync_changed(&mut self, changes: &ChangeSet) -> Result<()> {
        let names: Vec<String> = self
            .endpoints
            .values()
            .filter(|e| changes.endpoints.contains(&e.identity.id))
            .map(|e| e.name.clone())
            .collect();
        for n in names {
            self.sync_endpoint(&n)?;
        }
        Ok(())
    }

    fn install(
        &mut self,
        name: String,
        namespace: String,
        labels: LabelSet,
        id: u32,
        net: EndpointNet,
    ) -> Result<()> {
        let plumbed = netns::ensure(&net)?;
        let identity = self.identity_for(&labels, &namespace)?;
        for a in &net.addresses {
            self.datapath
                .set_ipcache(IpNet::from(*a), identity.id.0, id)?;
        }
        self.resolver.add_endpoint(identity.id);
        let ep = Endpoint {
            name: name.clone(),
            namespace,
            labels,
            id,
            identity,
            net,
            ifindex: plumbed.ifindex,
            mac: plumbed.mac,
            host_mac: plumbed.host_mac,
        };
        self.endpoints.insert(name.clone(), ep);
        self.sync_endpoint(&name)?;
        self.datapath
            .attach_endpoint(&self.endpoints[&name].net.host_if)?;
        self.refresh_proxy()?;
        Ok(())
    }

    /// Creates an endpoint: namespace, veth, addresses, routes, identity, maps, programs.
    pub fn create_endpoint(
        &mut self,
        name: &str,
        namespace: &str,
        labels: LabelSet,
    ) -> Result<Endpoint> {
        if self.endpoints.contains_key(name) {
            bail!("endpoint {name:?} exists");
        }
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            bail!("invalid endpoint name {name:?} (letters, digits, '-', '_', '.')");
        }
        let addresses = self
            .ipam
            .allocate()
            .ok_or_else(|| anyhow!("no free addresses in the node ranges"))?;
        let net = EndpointNet {
            netns: name.to_string(),
            host_if: netns::host_if_name(name),
            addresses: addresses.clone(),
            mtu: 1500,
        };
        let id = self.next_id();
        if let Err(e) = self.install(
            name.to_string(),
            namespace.to_string(),
            labels,
            id,
            net.clone(),
        ) {
            // Nothing half-made stays behind.
            let _ = netns::remove(&net);
            self.endpoints.remove(name);
            for a in addresses {
                self.ipam.release(a);
            }
            return Err(e);
        }
        self.persist()?;
        Ok(self.endpoints[name].clone())
    }

    /// Deletes an endpoint and everything made for it.
    pub fn delete_endpoint(&mut self, name: &str) -> Result<()> {
        let ep = self
            .endpoints
            .remove(name)
            .ok_or_else(|| anyhow!("no endpoint {name:?}"))?;
        self.datapath.detach_endpoint(&ep.net.host_if)?;
        self.datapath.sync_policy(ep.id, &[])?;
        self.datapath
            .remove_endpoint(ep.ifindex, &ep.net.addresses)?;
        for a in &ep.net.addresses {
            self.datapath.remove_ipcache(IpNet::from(*a))?;
            self.ipam.release(*a);
        }
        netns::remove(&ep.net)?;
        self.release_identity(&ep.identity)?;
        self.persist()?;
        self.refresh_proxy()
    }

    fn release_identity(&mut self, identity: &Identity) -> Result<()> {
        let still_used = self
            .endpoints
            .values()
            .any(|e| e.identity.id == identity.id);
        if !still_used && identity.id != NumericIdentity::INIT {
            self.resolver.remove_endpoint(identity.id);
        }
        if self.allocator.release(identity.id) {
            let changes = self.resolver.remove_identity(identity.id);
            self.sync_changed(&changes)?;
        }
        Ok(())
    }

    /// Changes an endpoint's labels: new identity, policy recomputed, maps updated. Established
    /// connections are judged by the new policy on their next packet.
    pub fn relabel(&mut self, name: &str, set: &LabelSet, unset: &[String]) -> Result<Endpoint> {
        let ep = self
            .endpoints
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("no endpoint {name:?}"))?;
        let mut labels = ep.labels.clone();
        for key in unset {
            let (source, key) = membrane_policy::labels::split_source(key, Source::Any)
                .map_err(|e| anyhow!("{e}"))?;
            labels.remove(source, key);
        }
        for l in set.iter() {
            labels.insert(l.clone());
        }
        let identity = self.identity_for(&labels, &ep.namespace)?;
        self.resolver.add_endpoint(identity.id);
        for a in &ep.net.addresses {
            self.datapath
                .set_ipcache(IpNet::from(*a), identity.id.0, ep.id)?;
        }
        {
            let e = self.endpoints.get_mut(name).expect("present above");
            e.labels = labels;
            e.identity = identity;
        }
        self.release_identity(&ep.identity)?;
        self.sync_all()?;
        self.persist()?;
        self.refresh_proxy()?;
        Ok(self.endpoints[name].clone())
    }

    /// Writes one endpoint's entry and policy into the maps.
    fn sync_endpoint(&mut self, name: &str) -> Result<()> {
        let ep = &self.endpoints[name];
        let (id, ifindex, identity) = (ep.id, ep.ifindex, ep.identity.id);
        let table = self
            .resolver
            .table(identity)
            .ok_or_else(|| anyhow!("no policy table for {name}"))?;
        let flags = sync::enforcement_flags(table);
        // The L7 proxy does not exist yet: redirects carry no port and the datapath fails closed.
        // Redirects go to the embedded proxy's listener (0 without a proxy: the datapath drops).
        let proxy_port = self.config.proxy_port;
        let (key, value) = membrane_istio::SIDECAR_LABEL;
        let l7 = if ep.labels.value(Source::K8s, key) == Some(value) {
            sync::L7Enforcer::Sidecar
        } else {
            sync::L7Enforcer::Proxy
        };
        let entries = sync::policy_entries(id, table, l7, |_| proxy_port);
        let delivery = LocalDelivery {
            addresses: ep.net.addresses.clone(),
            mac: ep.mac,
            host_mac: ep.host_mac,
        };
        self.datapath.set_endpoint(
            ifindex,
            EndpointInfo {
                endpoint_id: id,
                identity: identity.0,
                flags,
                pad: 0,
            },
            &delivery,
        )?;
        self.datapath.sync_policy(id, &entries)?;
        Ok(())
    }

    fn sync_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.endpoints.keys().cloned().collect();
        for n in names {
            self.sync_endpoint(&n)?;
        }
        Ok(())
    }

    /// The reconcile controller: repairs drift in plumbing, links and maps.
    pub fn reconcile(&mut self) -> Result<()> {
        let names: Vec<String> = self.endpoints.keys().cloned().collect();
        let mut ipcache = Vec::new();
        let mut endpoint_addresses = Vec::new();
        for n in &names {
            let ep = self.endpoints[n].clone();
            let plumbed = netns::ensure(&ep.net)?;
            let e = self.endpoints.get_mut(n).expect("listed");
            (e.ifindex, e.mac, e.host_mac) = (plumbed.ifindex, plumbed.mac, plumbed.host_mac);
            for a in &ep.net.addresses {
                ipcache.push((IpNet::from(*a), ep.identity.id.0, ep.id));
                endpoint_addresses.push(*a);
            }
            self.datapath.attach_endpoint(&ep.net.host_if)?;
        }
        for (net, id) in &self.cidr_identities {
            ipcache.push((*net, id.0, 0));
        }
        for addr in host_addresses() {
            ipcache.push((IpNet::from(addr), NumericIdentity::HOST.0, 0));
        }
        // Only what drifted is written (and moves the policy revision).
        self.datapath.ensure_ipcache(&ipcache)?;
        self.datapath.prune_local(&endpoint_addresses)?;
        self.write_devices()?;
        self.sync_all()
    }

    /// The connection-tracking garbage collector: deletes expired entries; returns how many.
    pub fn gc_ct(&mut self) -> Result<usize> {
        self.datapath.gc_ct(crate::datapath::monotonic_ns())
    }

    /// Records a controller run.
    pub fn record(&mut self, controller: &str, result: &Result<()>) {
        let c = self.controllers.entry(controller.to_string()).or_default();
        c.last_run = now();
        match result {
            Ok(()) => {
                c.successes += 1;
                c.consecutive_failures = 0;
                c.last_error = None;
            }
            Err(e) => {
                c.failures += 1;
                c.consecutive_failures += 1;
                c.last_error = Some(format!("{e:#}"));
            }
        }
    }

    /// Traces a flow against the policy in force. Parties are endpoint names, label lists or
    /// addresses (an endpoint's, or else world with its CIDR labels).
    pub fn trace(&mut self, req: &crate::trace_view::TraceRequest) -> Result<serde_json::Value> {
        let proto = req.proto()?;
        let facts = req.facts()?;
        let src = self.party(&req.src, req.src_namespace.as_deref())?;
        let dst = self.party(&req.dst, req.dst_namespace.as_deref())?;
        let flow = membrane_policy::trace::Flow {
            src: &src.0,
            dst: &dst.0,
            port: req.dport,
            proto,
            l7: facts.clone(),
        };
        let (t, judged) = crate::trace_view::trace_as_proxy(
            &self.policy.rules,
            self.config.enable_policy,
            &flow,
        )?;
        let mut v = serde_json::to_value(&t)?;
        v["src"]["endpoint"] = serde_json::json!(src.1);
        v["dst"]["endpoint"] = serde_json::json!(dst.1);
        Ok(serde_json::json!({ "trace": v, "text": crate::trace_view::render(&t, &judged) }))
    }

    fn party(&self, text: &str, namespace: Option<&str>) -> Result<(Identity, Option<String>)> {
        if let Some(e) = self.endpoints.get(text) {
            return Ok((e.identity.clone(), Some(e.name.clone())));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            if let Some(e) = self
                .endpoints
                .values()
                .find(|e| e.net.addresses.contains(&ip))
            {
                return Ok((e.identity.clone(), Some(e.name.clone())));
            }
            let labels = cidr_labels(&IpNet::from(ip));
            let id = self
                .allocator
                .lookup_labels(&labels)
                .map(|i| i.id)
                .unwrap_or(NumericIdentity::WORLD);
            return Ok((
                Identity {
                    id,
                    labels: labels.into(),
                },
                None,
            ));
        }
        if !text.contains('=') && !text.contains(':') {
            bail!("no endpoint named {text:?}");
        }
        let labels = LabelSet::parse_list(text, Source::K8s).map_err(|e| anyhow!("{e}"))?;
        let labels = endpoint_labels(
            &labels,
            namespace.unwrap_or("default"),
            None,
            &self.policy.namespaces,
        );
        let id = self
            .allocator
            .lookup_labels(&labels)
            .map(|i| i.id)
            .unwrap_or(NumericIdentity::UNKNOWN);
        Ok((
            Identity {
                id,
                labels: labels.into(),
            },
            None,
        ))
    }

    /// Every endpoint.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// One endpoint.
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.get(name)
    }

    /// Every identity in use.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.allocator.identities()
    }

    /// The rules in force.
    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    /// Identities with the endpoints that hold them.
    pub fn identity_users(&self) -> BTreeMap<NumericIdentity, BTreeSet<String>> {
        let mut out: BTreeMap<NumericIdentity, BTreeSet<String>> = BTreeMap::new();
        for e in self.endpoints.values() {
            out.entry(e.identity.id).or_default().insert(e.name.clone());
        }
        out
    }
}

/// `--clean-state`: remove pinned links and maps and the endpoints of an earlier run.
/// The node's own addresses (what `ip addr` lists in the host namespace).
fn host_addresses() -> Vec<IpAddr> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
    else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split_whitespace();
        while let Some(w) = f.next() {
            if (w == "inet" || w == "inet6")
                && let Some(addr) = f
                    .next()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse::<IpAddr>().ok())
            {
                addrs.push(addr);
            }
        }
    }
    addrs
}

fn clean_state(config: &Config) -> Result<()> {
    if let Ok(text) = fs::read_to_string(config.state_dir.join("endpoints.json")) {
        if let Ok(records) = serde_json::from_str::<Vec<EndpointRecord>>(&text) {
            for r in records {
                let _ = netns::remove(&r.net);
            }
        }
        let _ = fs::remove_file(config.state_dir.join("endpoints.json"));
    }
    if config.bpf_root.exists() {
        let links = config.bpf_root.join("links");
        if links.exists() {
            fs::remove_dir_all(&links).with_context(|| format!("removing {}", links.display()))?;
        }
        for e in fs::read_dir(&config.bpf_root)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("mbr_") {
                fs::remove_file(e.path())?;
            }
        }
    }
    Ok(())
}

/// How often an unwatchable policy directory is checked.
const UNWATCHED_POLL: Duration = Duration::from_millis(500);

/// Runs the controllers on a thread until the process ends: the policy watch (woken by inotify
/// on the policy directory, with a periodic check as a safety net), the reconcile loop and,
/// with it, the connection-tracking garbage collector.
pub fn spawn_controllers(
    agent: std::sync::Arc<std::sync::Mutex<Agent>>,
    policy_dir: PathBuf,
    safety_poll: Duration,
    reconcile_every: Duration,
) {
    std::thread::spawn(move || {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Opening and reading (our own scan lists the directory) are not changes: waking
            // on them made every scan trigger the next, a busy loop of stat calls.
            if let Ok(ev) = &ev
                && matches!(ev.kind, notify::EventKind::Access(_))
            {
                return;
            }
            let _ = tx.send(());
        })
        .and_then(|mut w| {
            use notify::Watcher as _;
            w.watch(&policy_dir, notify::RecursiveMode::Recursive)
                .map(|_| w)
        });
        // Each check stats every policy file: with inotify it is only a safety net (and kept
        // rare, it costs CPU next to the workloads); without, it is how changes are found.
        let (_watcher, check_every) = match watcher {
            Ok(w) => (Some(w), safety_poll),
            Err(e) => {
                let every = UNWATCHED_POLL.min(safety_poll);
                eprintln!(
                    "membrane-agent: cannot watch {} ({e}); checking it every {every:?}",
                    policy_dir.display()
                );
                (None, every)
            }
        };
        let mut last_reconcile = std::time::Instant::now();
        loop {
            if rx.recv_timeout(check_every).is_ok() {
                // Let a burst of events (an editor's save) settle, then read once.
                std::thread::sleep(Duration::from_millis(5));
                while rx.try_recv().is_ok() {}
            }
            let Ok(mut a) = agent.lock() else { return };
            let r = a.poll_policy().map(|_| ());
            a.record("policy-watch", &r);
            if last_reconcile.elapsed() >= reconcile_every {
                last_reconcile = std::time::Instant::now();
                let r = a.reconcile();
                if let Err(e) = &r {
                    eprintln!("membrane-agent: reconcile failed: {e:#}");
                }
                a.record("reconcile", &r);
                let r = a.gc_ct();
                if let Err(e) = &r {
                    eprintln!("membrane-agent: ct-gc failed: {e:#}");
                }
                a.record("ct-gc", &r.map(|_| ()));
            }
        }
    });
}
