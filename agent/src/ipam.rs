//! Address management for endpoints: hands out addresses from the node's IPv4 and IPv6 ranges.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// The pools of one node.
#[derive(Debug, Default)]
pub struct Ipam {
    pools: Vec<Pool>,
}

#[derive(Debug)]
struct Pool {
    net: IpNet,
    used: BTreeSet<IpAddr>,
}

impl Ipam {
    /// Pools for the given ranges (at most one per family is expected).
    pub fn new(ranges: &[IpNet]) -> Ipam {
        Ipam {
            pools: ranges
                .iter()
                .map(|net| Pool {
                    net: net.trunc(),
                    used: BTreeSet::new(),
                })
                .collect(),
        }
    }

    /// The ranges.
    pub fn ranges(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.pools.iter().map(|p| p.net)
    }

    /// One free address from each pool; nothing is taken unless every pool has one.
    pub fn allocate(&mut self) -> Option<Vec<IpAddr>> {
        let picks: Vec<IpAddr> = self
            .pools
            .iter()
            // IPv6 `hosts()` includes the subnet-router anycast address (the network itself).
            .map(|p| {
                p.net
                    .hosts()
                    .find(|a| *a != p.net.network() && !p.used.contains(a))
            })
            .collect::<Option<_>>()?;
        for (pool, a) in self.pools.iter_mut().zip(&picks) {
            pool.used.insert(*a);
        }
        Some(picks)
    }

    /// Marks an address as used (an endpoint restored from state). False if it is outside
    /// every range or already taken.
    pub fn reserve(&mut self, addr: IpAddr) -> bool {
        self.pools
            .iter_mut()
            .find(|p| p.net.contains(&addr))
            .is_some_and(|p| p.used.insert(addr))
    }

    /// Returns an address to its pool.
    pub fn release(&mut self, addr: IpAddr) {
        for p in &mut self.pools {
            p.used.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_both_families_and_reuses_released_addresses() {
        let mut ipam = Ipam::new(&[
            "10.250.0.0/30".parse().unwrap(),
            "fd00:250::/126".parse().unwrap(),
        ]);
        let a = ipam.allocate().unwrap();
        assert_eq!(
            a,
            vec![
                "10.250.0.1".parse::<IpAddr>().unwrap(),
                "fd00:250::1".parse().unwrap()
            ]
        );
        let b = ipam.allocate().unwrap();
        assert_eq!(b[0], "10.250.0.2".parse::<IpAddr>().unwrap());
        assert!(ipam.allocate().is_none(), "a /30 has two hosts");
        ipam.release(a[0]);
        ipam.release(a[1]);
        assert_eq!(ipam.allocate().unwrap(), a);
        assert!(!ipam.reserve("10.1.1.1".parse().unwrap()));
        assert!(!ipam.reserve(b[0]), "already used");
    }
}
