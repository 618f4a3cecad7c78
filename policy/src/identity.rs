//! Numeric identities: reserved numbers, the identity-relevant label filter, CIDR identities, and
//! the allocator that hands out numbers for label sets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::labels::{Label, LabelSet, Source};
use crate::selector::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL};

/// A numeric security identity, as carried in the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct NumericIdentity(pub u32);

impl NumericIdentity {
    /// 0: unknown; also the wildcard in policy table keys.
    pub const UNKNOWN: NumericIdentity = NumericIdentity(0);
    /// 1: the local node.
    pub const HOST: NumericIdentity = NumericIdentity(1);
    /// 2: anything outside the cluster.
    pub const WORLD: NumericIdentity = NumericIdentity(2);
    /// 3: in the cluster but not managed by membrane (Cilium 1.1 called it `cluster`).
    pub const UNMANAGED: NumericIdentity = NumericIdentity(3);
    /// 4: the health endpoint.
    pub const HEALTH: NumericIdentity = NumericIdentity(4);
    /// 5: an endpoint whose labels are not known yet.
    pub const INIT: NumericIdentity = NumericIdentity(5);
    /// 6: other nodes.
    pub const REMOTE_NODE: NumericIdentity = NumericIdentity(6);
    /// First identity handed out for label sets.
    pub const MIN_GLOBAL: u32 = 256;
    /// Last global identity of a cluster.
    pub const MAX_GLOBAL: u32 = 0xFFFF;
    /// Node-local identities (CIDRs) carry this scope bit, as in Cilium.
    pub const LOCAL_SCOPE: u32 = 1 << 24;

    /// Whether this is one of the reserved identities 1..=6.
    pub fn is_reserved(self) -> bool {
        (1..=6).contains(&self.0)
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The reserved identities and the label each one has.
pub const RESERVED: &[(NumericIdentity, &str)] = &[
    (NumericIdentity::HOST, "host"),
    (NumericIdentity::WORLD, "world"),
    (NumericIdentity::UNMANAGED, "unmanaged"),
    (NumericIdentity::HEALTH, "health"),
    (NumericIdentity::INIT, "init"),
    (NumericIdentity::REMOTE_NODE, "remote-node"),
];

/// The reserved identity for `reserved:<name>`.
pub fn reserved_identity(name: &str) -> Option<NumericIdentity> {
    RESERVED.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
}

/// An identity: its number and its labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    /// The number.
    pub id: NumericIdentity,
    /// The identity-relevant labels (shared: an identity is cloned into many places).
    pub labels: Arc<LabelSet>,
}

impl Identity {
    /// Whether traffic of this identity belongs to an endpoint membrane manages (and so has
    /// egress policy of its own): not host, world, unmanaged, remote nodes or CIDRs.
    pub fn is_endpoint(&self) -> bool {
        !matches!(
            self.id,
            NumericIdentity::HOST
                | NumericIdentity::WORLD
                | NumericIdentity::UNMANAGED
                | NumericIdentity::REMOTE_NODE
        ) && self.id.0 & NumericIdentity::LOCAL_SCOPE == 0
    }
}

// ---- label filter ----

/// Whether a label counts towards identity (Cilium's default label filter).
///
/// Kept: reserved and CIDR labels, the namespace, namespace labels, the service account, and
/// ordinary labels (including `app.kubernetes.io/*`). Dropped: labels that change per pod or per
/// rollout and would give every pod its own identity.
pub fn is_identity_relevant(label: &Label) -> bool {
    if matches!(label.source, Source::Reserved | Source::Cidr) {
        return true;
    }
    let key = label.key.as_str();
    if key == NAMESPACE_LABEL
        || key == SERVICE_ACCOUNT_LABEL
        || key.starts_with(NAMESPACE_LABELS_PREFIX)
    {
        return true;
    }
    if key.starts_with("app.kubernetes.io") {
        return true;
    }
    const DROPPED: &[&str] = &[
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "job-name",
        "batch.kubernetes.io/job-name",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
    ];
    if DROPPED.contains(&key) || key.starts_with("annotation.") {
        return false;
    }
    !(key.starts_with("io.kubernetes")
        || key.contains("kubernetes.io")
        || key.starts_with("io.cilium.k8s"))
}

/// The identity-relevant subset of `labels`.
pub fn identity_labels(labels: &LabelSet) -> LabelSet {
    labels
        .iter()
        .filter(|l| is_identity_relevant(l))
        .cloned()
        .collect()
}

// ---- CIDR identities ----

/// The label key Cilium uses for a prefix (`:` is not allowed in keys, so IPv6 uses `-`).
pub fn cidr_label_key(net: &IpNet) -> String {
    net.trunc().to_string().replace(':', "-")
}

/// The labels of a CIDR identity: the prefix itself, every shorter super-prefix down to /0, and
/// `reserved:world`. A selector for `10.0.0.0/8` thus matches the identity of `10.1.2.0/24`.
pub fn cidr_labels(net: &IpNet) -> LabelSet {
    let net = net.trunc();
    let mut set = LabelSet::new();
    for len in 0..=net.prefix_len() {
        if let Ok(sup) = IpNet::new(net.addr(), len) {
            set.insert(Label::new(Source::Cidr, cidr_label_key(&sup.trunc()), ""));
        }
    }
    set.insert(Label::reserved("world"));
    set
}

// ---- allocation ----

/// Why an identity could not be allocated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every number of the range is in use.
    #[error("identity space exhausted ({0} identities in use)")]
    Exhausted(usize),
    /// A label set with no labels cannot have an identity (it is `reserved:init`'s job).
    #[error("an identity needs at least one label")]
    Empty,
}

/// Hands out numeric identities for label sets, with reference counts.
///
/// The local implementation is [`LocalAllocator`]; cluster mode will share allocations through
/// etcd behind the same interface.
pub trait IdentityAllocator {
    /// The identity for `labels` (already filtered), allocating one and taking a reference.
    /// Returns whether it was newly created.
    fn allocate(&mut self, labels: &LabelSet) -> Result<(Identity, bool), AllocError>;
    /// Drops one reference; returns true when the identity was freed.
    fn release(&mut self, id: NumericIdentity) -> bool;
    /// The identity with this number.
    fn lookup(&self, id: NumericIdentity) -> Option<&Identity>;
    /// The identity with these labels.
    fn lookup_labels(&self, labels: &LabelSet) -> Option<&Identity>;
}

/// An in-memory allocator: reserved label sets get their reserved numbers, CIDR label sets get
/// node-local numbers, everything else numbers from 256 up.
#[derive(Debug, Default)]
pub struct LocalAllocator {
    by_id: BTreeMap<NumericIdentity, (Identity, usize)>,
    by_labels: HashMap<Arc<LabelSet>, NumericIdentity>,
    next_global: u32,
    next_local: u32,
    free_global: Vec<u32>,
}

impl LocalAllocator {
    /// An allocator that knows the reserved identities.
    pub fn new() -> LocalAllocator {
        let mut a = LocalAllocator {
            next_global: NumericIdentity::MIN_GLOBAL,
            next_local: 1,
            ..Default::default()
        };
        for (id, name) in RESERVED {
            let labels: Arc<LabelSet> = Arc::new([Label::reserved(name)].into_iter().collect());
            a.by_labels.insert(labels.clone(), *id);
            // Reserved identities are never freed: start them with one reference that nobody holds.
            a.by_id.insert(*id, (Identity { id: *id, labels }, 1));
        }
        a
    }

    /// Every identity currently allocated (including the reserved ones).
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.by_id
            .values()
            .filter(|(_, refs)| *refs > 0)
            .map(|(i, _)| i)
    }

    /// Re-creates an identity with the number it had before a restart, without a reference, so
    /// that numbers stay stable (the datapath's maps still hold them). The next `allocate` of its
    /// labels takes it; [`drop_unclaimed`](Self::drop_unclaimed) frees those nobody took.
    pub fn restore(&mut self, identity: &Identity) -> bool {
        let taken =
            self.by_id.contains_key(&identity.id) || self.by_labels.contains_key(&*identity.labels);
        if taken || identity.id.is_reserved() || identity.id.0 < NumericIdentity::MIN_GLOBAL {
            return false;
        }
        let n = identity.id.0;
        if n & NumericIdentity::LOCAL_SCOPE != 0 {
            self.next_local = self.next_local.max((n & !NumericIdentity::LOCAL_SCOPE) + 1);
        } else {
            self.next_global = self.next_global.max(n + 1);
            self.free_global.retain(|f| *f != n);
        }
        self.by_labels.insert(identity.labels.clone(), identity.id);
        self.by_id.insert(identity.id, (identity.clone(), 0));
        true
    }

    /// Frees restored identities that nothing claimed; returns them.
    pub fn drop_unclaimed(&mut self) -> Vec<NumericIdentity> {
        let unclaimed: Vec<NumericIdentity> = self
            .by_id
            .iter()
            .filter(|(id, (_, refs))| *refs == 0 && !id.is_reserved())
            .map(|(id, _)| *id)
            .collect();
        for id in &unclaimed {
            if let Some((identity, _)) = self.by_id.remove(id) {
                self.by_labels.remove(&*identity.labels);
                if id.0 & NumericIdentity::LOCAL_SCOPE == 0 {
                    self.free_global.push(id.0);
                }
            }
        }
        unclaimed
    }

    fn next_number(&mut self, labels: &LabelSet) -> Result<NumericIdentity, AllocError> {
        if labels.iter().any(|l| l.source == Source::Cidr) {
            let n = self.next_local;
            if n >= NumericIdentity::LOCAL_SCOPE {
                return Err(AllocError::Exhausted(self.by_id.len()));
            }
            self.next_local += 1;
            return Ok(NumericIdentity(NumericIdentity::LOCAL_SCOPE | n));
        }
        if let Some(n) = self.free_global.pop() {
            return Ok(NumericIdentity(n));
        }
        if self.next_global > NumericIdentity::MAX_GLOBAL {
            return Err(AllocError::Exhausted(self.by_id.len()));
        }
        self.next_global += 1;
        Ok(NumericIdentity(self.next_global - 1))
    }
}

impl IdentityAllocator for LocalAllocator {
    fn allocate(&mut self, labels: &LabelSet) -> Result<(Identity, bool), AllocError> {
        if labels.is_empty() {
            return Err(AllocError::Empty);
        }
        if let Some(id) = self.by_labels.get(labels) {
            let entry = self
                .by_id
                .get_mut(id)
                .expect("by_labels and by_id are kept in step");
            entry.1 += 1;
            // A restored identity's first reference makes it live.
            return Ok((entry.0.clone(), entry.1 == 1));
        }
        let id = self.next_number(labels)?;
        let labels = Arc::new(labels.clone());
        let identity = Identity {
            id,
            labels: labels.clone(),
        };
        self.by_labels.insert(labels, id);
        self.by_id.insert(id, (identity.clone(), 1));
        Ok((identity, true))
    }

    fn release(&mut self, id: NumericIdentity) -> bool {
        if self.by_id.get(&id).is_some_and(|(_, refs)| *refs == 0) {
            return false;
        }
        if id.is_reserved() {
            return false;
        }
        let Some(entry) = self.by_id.get_mut(&id) else {
            return false;
        };
        entry.1 -= 1;
        if entry.1 > 0 {
            return false;
        }
        let (identity, _) = self.by_id.remove(&id).expect("present above");
        self.by_labels.remove(&identity.labels);
        if id.0 & NumericIdentity::LOCAL_SCOPE == 0 {
            self.free_global.push(id.0);
        }
        true
    }

    fn lookup(&self, id: NumericIdentity) -> Option<&Identity> {
        self.by_id.get(&id).map(|(i, _)| i)
    }

    fn lookup_labels(&self, labels: &LabelSet) -> Option<&Identity> {
        self.by_labels.get(labels).and_then(|id| self.lookup(*id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_filter_matches_cilium_defaults() {
        let set: LabelSet = "app=web,pod-template-hash=abc,controller-revision-hash=1,io.kubernetes.pod.namespace=prod,\
             io.cilium.k8s.namespace.labels.team=a,io.cilium.k8s.policy.serviceaccount=web,\
             app.kubernetes.io/name=web,kubernetes.io/hostname=n1,io.kubernetes.container.name=x"
            .parse()
            .unwrap();
        let kept = identity_labels(&set).to_string();
        assert_eq!(
            kept,
            "k8s:app=web,k8s:app.kubernetes.io/name=web,k8s:io.cilium.k8s.namespace.labels.team=a,\
             k8s:io.cilium.k8s.policy.serviceaccount=web,k8s:io.kubernetes.pod.namespace=prod"
        );
    }

    #[test]
    fn cidr_labels_include_super_prefixes() {
        let net: IpNet = "10.1.2.0/24".parse().unwrap();
        let labels = cidr_labels(&net);
        assert_eq!(labels.len(), 26);
        assert!(labels.has_key(Source::Cidr, "10.0.0.0/8"));
        assert!(labels.has_key(Source::Cidr, "0.0.0.0/0"));
        assert!(labels.has_reserved("world"));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(cidr_labels(&v6).has_key(Source::Cidr, "2001-db8--/32"));
    }

    #[test]
    fn allocator_reuses_and_frees() {
        let mut a = LocalAllocator::new();
        let web: LabelSet = "app=web".parse().unwrap();
        let (i1, new1) = a.allocate(&web).unwrap();
        let (i2, new2) = a.allocate(&web).unwrap();
        assert!(new1 && !new2);
        assert_eq!(i1.id, NumericIdentity(256));
        assert_eq!(i1, i2);
        assert!(!a.release(i1.id));
        assert!(a.release(i1.id));
        assert!(a.lookup(i1.id).is_none());
        let (i3, _) = a.allocate(&"app=db".parse().unwrap()).unwrap();
        assert_eq!(i3.id, NumericIdentity(256), "freed numbers are reused");
        let world: LabelSet = "reserved:world".parse().unwrap();
        assert_eq!(a.allocate(&world).unwrap().0.id, NumericIdentity::WORLD);
        let cidr = cidr_labels(&"192.0.2.0/24".parse().unwrap());
        assert_eq!(
            a.allocate(&cidr).unwrap().0.id.0,
            NumericIdentity::LOCAL_SCOPE | 1
        );
        assert!(
            !a.release(NumericIdentity::WORLD),
            "reserved identities are never freed"
        );
    }

    #[test]
    fn restored_numbers_are_kept() {
        let mut a = LocalAllocator::new();
        let old = Identity {
            id: NumericIdentity(300),
            labels: Arc::new("app=web".parse().unwrap()),
        };
        let gone = Identity {
            id: NumericIdentity(301),
            labels: Arc::new("app=gone".parse().unwrap()),
        };
        assert!(a.restore(&old) && a.restore(&gone));
        assert_eq!(
            a.identities().count(),
            RESERVED.len(),
            "restored identities are not live yet"
        );
        let (web, new) = a.allocate(&"app=web".parse().unwrap()).unwrap();
        assert_eq!(
            (web.id, new),
            (NumericIdentity(300), true),
            "same number, and live from now on"
        );
        assert_eq!(a.drop_unclaimed(), vec![NumericIdentity(301)]);
        let (other, _) = a.allocate(&"app=other".parse().unwrap()).unwrap();
        assert_eq!(other.id, NumericIdentity(301), "freed numbers are reused");
    }
}
