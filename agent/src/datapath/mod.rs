//! The datapath at the edge: loads membrane-bpf's object with its maps pinned under the bpffs
//! root, attaches the endpoint programs with pinned TCX links (so enforcement outlives the agent),
//! and writes identities, endpoints and policy into the maps.

pub mod sync;

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use membrane_bpf::abi::{
    ABI_VERSION, CtKey, CtValue, DeviceInfo, EndpointInfo, IpcacheValue,
    LOCAL_ADDRESSES_PER_ENDPOINT, LocalEndpoint, LocalKey, MAX_ENDPOINTS, METRICS_SLOTS,
    MetricsKey, MetricsValue, PolicyKey, PolicyValue, RevisionValue,
};
use membrane_bpf::{OBJECT, maps, programs};

use crate::netns::Mac;

/// Every map of the object, pinned by name under the root.
const ALL_MAPS: &[&str] = &[
    maps::IPCACHE4,
    maps::IPCACHE6,
    maps::ENDPOINTS,
    maps::LOCAL,
    maps::DEVICES,
    maps::POLICY,
    maps::CT,
    maps::METRICS,
    maps::EVENTS,
    maps::REVISION,
];

/// How other endpoints' packets reach an endpoint straight from their own program
/// (`struct local_endpoint`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalDelivery {
    /// The endpoint's addresses.
    pub addresses: Vec<IpAddr>,
    /// Its interface's Ethernet address.
    pub mac: Mac,
    /// Its host-side veth's.
    pub host_mac: Mac,
}

/// The loaded datapath.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    /// The last revision written to the revision map.
    revision: u32,
}

impl Datapath {
    /// Loads the programs, reusing maps already pinned under `root` (a directory on a bpffs)
    /// and pinning the ones that are not.
    pub fn load(root: &Path) -> Result<Datapath> {
        if OBJECT.is_empty() {
            bail!(
                "membrane was built without clang: the datapath object is empty (install clang-19 and rebuild)"
            );
        }
        ensure_bpffs(root)?;
        fs::create_dir_all(root.join("links"))
            .with_context(|| format!("creating {}", root.display()))?;
        let pins: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, root.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading the datapath object")?;
        for name in [programs::FROM_ENDPOINT, programs::TO_ENDPOINT] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            p.load().with_context(|| format!("verifying {name}"))?;
        }
        let revision = {
            let m: Array<&mut MapData, RevisionValue> =
                Array::try_from(ebpf.map_mut(maps::REVISION).context("revision")?)?;
            m.get(&0, 0)?.policy
        };
        let mut datapath = Datapath {
            ebpf,
            root: root.to_path_buf(),
            revision,
        };
        // Flows judged before this agent started are judged again.
        datapath.bump_revision()?;
        Ok(datapath)
    }

    /// Moves the policy revision on: every established flow is judged again on its next packet.
    /// Called after each write to a map a verdict depends on, never before: a verdict must not
    /// be recorded under a revision newer than the maps it read.
    fn bump_revision(&mut self) -> Result<()> {
        // 0 means "no revision": skip it on wrap-around.
        let next = self.revision.wrapping_add(1).max(1);
        let mut m: Array<&mut MapData, RevisionValue> =
            Array::try_from(self.ebpf.map_mut(maps::REVISION).context("revision")?)?;
        m.set(
            0,
            RevisionValue {
                policy: next,
                pad: 0,
            },
            0,
        )?;
        self.revision = next;
        Ok(())
    }

    /// The pin of one TC hook of an interface.
    fn link_pin(&self, ifname: &str, hook: &str) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{ifname}_{hook}_v{ABI_VERSION}"))
    }

    /// Attaches the endpoint programs to an endpoint's host-side veth. An existing pinned link
    /// (left by an earlier agent) is updated in place, atomically, so enforcement never stops.
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<()> {
        for (prog, attach, hook) in [
            (programs::FROM_ENDPOINT, TcAttachType::Ingress, "ingress"),
            (programs::TO_ENDPOINT, TcAttachType::Egress, "egress"),
        ] {
            let pin = self.link_pin(ifname, hook);
            let p: &mut SchedClassifier =
                self.ebpf.program_mut(prog).context("program")?.try_into()?;
            let id = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                    let id = p
                        .attach_to_link(link)
                        .with_context(|| format!("updating {}", pin.display()))?;
                    fs::remove_file(&pin)
                        .with_context(|| format!("replacing {}", pin.display()))?;
                    id
                }
                Err(_) => p
                    .attach_with_options(
                        ifname,
                        attach,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attaching {prog} to {ifname} {hook}"))?,
            };
            let link: FdLink = p.take_link(id)?.try_into()?;
            // Without the pin the link, and enforcement with it, would die with this process.
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
        }
        Ok(())
    }

    /// Removes the links and maps that an agent of another datapath ABI pinned under the root:
    /// names ending in `_v<N>` for another N. Their connection-tracking state is not carried
    /// over (a new ABI reads it differently): flows are judged again on their next packet.
    /// Returns what was removed.
    pub fn remove_other_abi_pins(&self) -> Result<Vec<PathBuf>> {
        let current = format!("_v{ABI_VERSION}");
        let is_other_abi = |name: &str| {
            name.rsplit_once("_v").is_some_and(|(_, v)| {
                !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(&current)
            })
        };
        let mut removed = Vec::new();
        for dir in [self.root.join("links"), self.root.clone()] {
            for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = dir != self.root || name.starts_with("mbr_");
                if ours && e.file_type()?.is_file() && is_other_abi(&name) {
                    fs::remove_file(e.path())
                        .with_context(|| format!("removing {}", e.path().display()))?;
                    removed.push(e.path());
                }
            }
        }
        Ok(removed)
    }

    /// Detaches the programs from an interface by dropping its pinned links.
    pub fn detach_endpoint(&mut self, ifname: &str) -> Result<()> {
        for hook in ["ingress", "egress"] {
            let pin = self.link_pin(ifname, hook);
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                drop(link.unpin()?);
            }
        }
        Ok(())
    }

    /// Maps an address prefix to an identity, and a local endpoint's address to that endpoint
    /// (`endpoint_id`, 0 for others), whose ingress policy the sender's side consults for L7
    /// redirects.
    pub fn set_ipcache(&mut self, net: IpNet, identity: u32, endpoint_id: u32) -> Result<()> {
        let value = IpcacheValue {
            identity,
            endpoint_id,
        };
        self.write_ipcache(net, value)?;
        self.bump_revision()
    }

    /// Makes the ipcache hold exactly `entries` (prefix, identity, endpoint id): writes only
    /// those missing or different, deletes prefixes it does not name (written by something
    /// else, or left by an interrupted removal), and moves the policy revision once if anything
    /// changed. The reconcile controller calls it every few seconds with every prefix (10,000
    /// CIDR identities in the benchmark): writing them all each time, with a revision bump per
    /// write, was work for nothing and re-judged every flow. Returns how many entries it wrote
    /// or deleted.
    pub fn ensure_ipcache(&mut self, entries: &[(IpNet, u32, u32)]) -> Result<usize> {
        let mut current: std::collections::HashMap<IpNet, IpcacheValue> =
            std::collections::HashMap::new();
        {
            let m: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
                LpmTrie::try_from(self.ebpf.map_mut(maps::IPCACHE4).context("ipcache4")?)?;
            for (k, v) in m.iter().filter_map(Result::ok) {
                let addr = std::net::Ipv4Addr::from(k.data());
                if let Ok(net) = ipnet::Ipv4Net::new(addr, k.prefix_len() as u8) {
                    current.insert(IpNet::V4(net), v);
                }
            }
        }
        {
            let m: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                LpmTrie::try_from(self.ebpf.map_mut(maps::IPCACHE6).context("ipcache6")?)?;
            for (k, v) in m.iter().filter_map(Result::ok) {
                let addr = std::net::Ipv6Addr::from(k.data());
                if let Ok(net) = ipnet::Ipv6Net::new(addr, k.prefix_len() as u8) {
                    current.insert(IpNet::V6(net), v);
                }
            }
        }
        let mut changed = 0;
        for &(net, identity, endpoint_id) in entries {
            let value = IpcacheValue {
                identity,
                endpoint_id,
            };
            if current.remove(&net.trunc()) != Some(value) {
                self.write_ipcache(net, value)?;
                changed += 1;
            }
        }
        // What is left was named by no entry.
        for net in current.into_keys() {
            self.delete_ipcache(net)?;
            changed += 1;
        }
        if changed > 0 {
            self.bump_revision()?;
        }
        Ok(changed)
    }

    fn delete_ipcache(&mut self, net: IpNet) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(a) => {
                let mut m: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
                    LpmTrie::try_from(self.ebpf.map_mut(maps::IPCACHE4).context("ipcache4")?)?;
                // Gone already is what was wanted.
                let _ = m.remove(&Key::new(len, a.octets()));
            }
            IpAddr::V6(a) => {
                let mut m: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                    LpmTrie::try_from(self.ebpf.map_mut(maps::IPCACHE6).context("ipcache6")?)?;
                let _ = m.remove(&Key::new(len, a.octets()));
            }
        }
        Ok(())
    }

    fn write_ipcache(&mut self, net: IpNet, value: IpcacheValue) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(a) => {
                let mut m: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
                    LpmTrie::try_from(self.ebpf.map_mut(maps::IPCACHE4).context("ipcache4")?)?;
                m.insert(&Key::new(len, a.octets()), value, 0)?;
            }
            IpAddr::V6(a) => {
                let mut m: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                    LpmTrie::try_from(self.ebpf.map_mut(maps::IPCACHE6).context("ipcache6")?)?;
                m.insert(&Key::new(len, a.octets()), value, 0)?;
            }
        }
        Ok(())
    }

    /// Declares an external device: what arrives through it is `identity` (world, or host in
    /// legacy mode) unless the ipcache maps its source to a CIDR identity.
    pub fn set_device(&mut self, ifindex: u32, identity: u32) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, DeviceInfo> =
            HashMap::try_from(self.ebpf.map_mut(maps::DEVICES).context("devices")?)?;
        m.insert(ifindex, DeviceInfo { identity, flags: 0 }, 0)?;
        self.bump_revision()
    }

    /// Registers the endpoint behind a host veth, and under its addresses for delivery from
    /// other endpoints. Writes only what differs from the maps (and moves the revision only
    /// then), so the reconcile pass calls it for every endpoint; returns how many entries it
    /// wrote.
    pub fn set_endpoint(
        &mut self,
        ifindex: u32,
        info: EndpointInfo,
        delivery: &LocalDelivery,
    ) -> Result<usize> {
        if delivery.addresses.len() > LOCAL_ADDRESSES_PER_ENDPOINT as usize {
            bail!(
                "endpoint {} has {} addresses; the datapath delivers to at most {LOCAL_ADDRESSES_PER_ENDPOINT}",
                info.endpoint_id,
                delivery.addresses.len()
            );
        }
        let mut written = 0;
        {
            let mut m: HashMap<&mut MapData, u32, EndpointInfo> =
                HashMap::try_from(self.ebpf.map_mut(maps::ENDPOINTS).context("endpoints")?)?;
            if m.get(&ifindex, 0).ok() != Some(info) {
                m.insert(ifindex, info, 0).with_context(|| {
                    format!(
                        "registering endpoint {} in the datapath (it holds at most {MAX_ENDPOINTS})",
                        info.endpoint_id
                    )
                })?;
                written += 1;
            }
        }
        let local = LocalEndpoint {
            ifindex,
            endpoint_id: info.endpoint_id,
            identity: info.identity,
            flags: info.flags,
            mac: delivery.mac.0,
            host_mac: delivery.host_mac.0,
            pad: 0,
        };
        {
            let mut m: HashMap<&mut MapData, LocalKey, LocalEndpoint> =
                HashMap::try_from(self.ebpf.map_mut(maps::LOCAL).context("local")?)?;
            for a in &delivery.addresses {
                let key = LocalKey::of(*a);
                if m.get(&key, 0).ok() != Some(local) {
                    m.insert(key, local, 0)
                        .with_context(|| format!("registering {a} for local delivery"))?;
                    written += 1;
                }
            }
        }
        if written > 0 {
            self.bump_revision()?;
        }
        Ok(written)
    }

    /// Deletes the local-delivery entries of addresses that belong to no endpoint any more
    /// (drift: something else wrote them, or a removal was interrupted); returns how many.
    pub fn prune_local(&mut self, endpoint_addresses: &[IpAddr]) -> Result<usize> {
        let keep: std::collections::HashSet<LocalKey> = endpoint_addresses
            .iter()
            .map(|a| LocalKey::of(*a))
            .collect();
        let mut m: HashMap<&mut MapData, LocalKey, LocalEndpoint> =
            HashMap::try_from(self.ebpf.map_mut(maps::LOCAL).context("local")?)?;
        let stale: Vec<LocalKey> = m
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !keep.contains(k))
            .collect();
        for k in &stale {
            let _ = m.remove(k);
        }
        if !stale.is_empty() {
            self.bump_revision()?;
        }
        Ok(stale.len())
    }

    /// Removes a prefix from the ipcache.
    pub fn remove_ipcache(&mut self, net: IpNet) -> Result<()> {
        self.delete_ipcache(net)?;
        self.bump_revision()
    }

    /// Forgets the endpoint behind a host veth, and its addresses for local delivery.
    pub fn remove_endpoint(&mut self, ifindex: u32, addresses: &[IpAddr]) -> Result<()> {
        {
            let mut m: HashMap<&mut MapData, LocalKey, LocalEndpoint> =
                HashMap::try_from(self.ebpf.map_mut(maps::LOCAL).context("local")?)?;
            for a in addresses {
                let _ = m.remove(&LocalKey::of(*a));
            }
        }
        let mut m: HashMap<&mut MapData, u32, EndpointInfo> =
            HashMap::try_from(self.ebpf.map_mut(maps::ENDPOINTS).context("endpoints")?)?;
        let _ = m.remove(&ifindex);
        self.bump_revision()
    }

    /// The datapath's counters, summed over CPUs: (key, packets and bytes).
    pub fn metrics(&mut self) -> Result<Vec<(MetricsKey, MetricsValue)>> {
        let m: PerCpuArray<&mut MapData, MetricsValue> =
            PerCpuArray::try_from(self.ebpf.map_mut(maps::METRICS).context("metrics")?)?;
        let mut out = Vec::new();
        for slot in 0..METRICS_SLOTS {
            let mut total = MetricsValue::default();
            for v in m.get(&slot, 0)?.iter() {
                total.packets += v.packets;
                total.bytes += v.bytes;
            }
            // Untouched slots are counters that never moved, not series worth reporting.
            if total.packets > 0 {
                out.push((MetricsKey::of_slot(slot), total));
            }
        }
        Ok(out)
    }

    /// Deletes the connection-tracking entries whose lifetime ended at or before `now_ns`
    /// ([`monotonic_ns`], the clock the programs stamp expiry with). The map is LRU, so it never
    /// fills up, but an expired entry holds its slot, and shows in `membrane bpf ct list`, until
    /// eviction. Each entry is read again just before it is deleted, so one the datapath has
    /// just refreshed stays. Returns how many were deleted.
    pub fn gc_ct(&mut self, now_ns: u64) -> Result<usize> {
        let mut m: HashMap<&mut MapData, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(maps::CT).context("ct")?)?;
        let expired: Vec<CtKey> = m
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        let mut deleted = 0;
        for k in &expired {
            let still_expired = m.get(k, 0).is_ok_and(|v| v.expires_ns <= now_ns);
            if still_expired && m.remove(k).is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Makes an endpoint's policy entries exactly `entries`: stale keys are deleted, others
    /// written. Returns (written, deleted).
    pub fn sync_policy(
        &mut self,
        endpoint_id: u32,
        entries: &[(PolicyKey, PolicyValue)],
    ) -> Result<(usize, usize)> {
        let mut m: HashMap<&mut MapData, PolicyKey, PolicyValue> =
            HashMap::try_from(self.ebpf.map_mut(maps::POLICY).context("policy")?)?;
        let current: Vec<(PolicyKey, PolicyValue)> = m
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.endpoint_id == endpoint_id)
            .collect();
        let mut deleted = 0;
        for (k, _) in &current {
            if !entries.iter().any(|(nk, _)| nk == k) {
                m.remove(k)?;
                deleted += 1;
            }
        }
        let mut written = 0;
        for (k, v) in entries {
            if !current.iter().any(|(ck, cv)| ck == k && cv == v) {
                m.insert(*k, *v, 0)?;
                written += 1;
            }
        }
        if written + deleted > 0 {
            self.bump_revision()?;
        }
        Ok((written, deleted))
    }
}

/// Now on CLOCK_MONOTONIC, in nanoseconds: the clock the programs stamp expiry with (they read
/// its coarse variant, which lags by less than a tick).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// Makes sure `root` lies on a bpffs, mounting one at `root` when it does not.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let canonical = fs::canonicalize(root)?;
    let on_bpffs = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            Some((point.to_string(), fstype.to_string()))
        })
        .filter(|(point, _)| canonical.starts_with(point))
        .max_by_key(|(point, _)| point.len())
        .is_some_and(|(_, fstype)| fstype == "bpf");
    if !on_bpffs {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(root)
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mounting a bpffs at {} failed", root.display());
        }
    }
    Ok(())
}
