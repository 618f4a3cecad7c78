//! Policy evaluated without a running agent: identities are allocated locally for the endpoints a
//! user lists, and the resolver computes their tables. `membrane policy trace` and
//! `membrane policy resolve` use it.

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use membrane_policy::PolicySet;
use membrane_policy::endpoints::{EndpointSpec, endpoint_labels};
use membrane_policy::identity::{
    Identity, IdentityAllocator, LocalAllocator, RESERVED, cidr_labels,
};
use membrane_policy::labels::{Label, LabelSet};
use membrane_policy::resolve::Resolver;
use membrane_policy::rule::EnforcementMode;

/// A policy set, its identities and its resolved tables.
#[derive(Debug)]
pub struct Offline {
    /// The policy.
    pub set: PolicySet,
    /// Enforcement mode.
    pub mode: EnforcementMode,
    /// Identities handed out so far.
    pub allocator: LocalAllocator,
    /// Tables of the listed endpoints.
    pub resolver: Resolver,
    /// The listed endpoints and their identities.
    pub endpoints: Vec<(EndpointSpec, Identity)>,
}

impl Offline {
    /// Allocates identities for the reserved identities, every CIDR the rules name and every
    /// endpoint, then resolves the endpoints' tables.
    pub fn new(set: PolicySet, mode: EnforcementMode, specs: Vec<EndpointSpec>) -> Result<Offline> {
        let mut allocator = LocalAllocator::new();
        let mut resolver = Resolver::new(mode);
        resolver.set_rules(&set.rules);
        for (_, name) in RESERVED {
            let labels: LabelSet = [Label::reserved(name)].into_iter().collect();
            let (identity, _) = allocator.allocate(&labels).context("reserved identity")?;
            resolver.add_identity(identity);
        }
        for net in set.cidr_prefixes() {
            let (identity, _) = allocator
                .allocate(&cidr_labels(&net))
                .context("CIDR identity")?;
            resolver.add_identity(identity);
        }
        let mut endpoints = Vec::with_capacity(specs.len());
        for spec in specs {
            let labels = endpoint_labels(
                &spec.labels,
                &spec.namespace,
                spec.service_account.as_deref(),
                &set.namespaces,
            );
            let (identity, new) = allocator
                .allocate(&labels)
                .with_context(|| format!("identity for endpoint {}", spec.name))?;
            if new {
                resolver.add_identity(identity.clone());
            }
            resolver.add_endpoint(identity.id);
            endpoints.push((spec, identity));
        }
        Ok(Offline {
            set,
            mode,
            allocator,
            resolver,
            endpoints,
        })
    }

    /// The identity of a workload given by labels (and the namespace to put it in).
    pub fn identity_for_labels(&mut self, labels: &LabelSet, namespace: &str) -> Result<Identity> {
        let labels = endpoint_labels(labels, namespace, None, &self.set.namespaces);
        let (identity, new) = self.allocator.allocate(&labels)?;
        if new {
            self.resolver.add_identity(identity.clone());
        }
        Ok(identity)
    }

    /// The identity of an address: a listed endpoint's, or else world with the address's CIDR
    /// labels.
    pub fn identity_for_ip(&mut self, ip: IpAddr) -> Result<(Identity, Option<String>)> {
        if let Some((spec, identity)) = self.endpoints.iter().find(|(s, _)| s.ips.contains(&ip)) {
            return Ok((identity.clone(), Some(spec.name.clone())));
        }
        let (identity, new) = self.allocator.allocate(&cidr_labels(&IpNet::from(ip)))?;
        if new {
            self.resolver.add_identity(identity.clone());
        }
        Ok((identity, None))
    }

    /// A listed endpoint by name.
    pub fn endpoint(&self, name: &str) -> Option<&(EndpointSpec, Identity)> {
        self.endpoints.iter().find(|(s, _)| s.name == name)
    }
}
