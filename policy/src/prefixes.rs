//! Longest-prefix match from addresses to values (identities): the userspace twin of the
//! datapath's ipcache, used by the proxy and the wasm filter to name a peer.
//!
//! One hash map per prefix length present, longest first: a lookup costs one probe per distinct
//! length (policies use a handful), not one comparison per prefix, so 10,000 policy CIDRs cost
//! what 10 do.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use ipnet::IpNet;

/// Prefixes of one address family, bucketed by length, longest first.
#[derive(Clone, Debug)]
struct Buckets<K, V> {
    by_len: Vec<(u8, HashMap<K, V>)>,
}

impl<K, V> Default for Buckets<K, V> {
    fn default() -> Self {
        Buckets { by_len: Vec::new() }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V: Copy> Buckets<K, V> {
    /// Adds `key` (already masked to `len`); returns false when the prefix was present.
    fn insert(&mut self, len: u8, key: K, value: V) -> bool {
        let at = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                self.by_len.insert(at, (len, HashMap::new()));
                at
            }
        };
        match self.by_len[at].1.entry(key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(value);
                true
            }
        }
    }

    fn lookup(&self, mask: impl Fn(u8) -> K) -> Option<V> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(*len)).copied())
    }
}

/// Address prefix -> value, longest match wins; of two equal prefixes the first inserted wins.
#[derive(Clone, Debug)]
pub struct PrefixMap<V> {
    v4: Buckets<u32, V>,
    v6: Buckets<u128, V>,
    len: usize,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: Buckets::default(),
            v6: Buckets::default(),
            len: 0,
        }
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    addr & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(addr: u128, len: u8) -> u128 {
    addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl<V: Copy> PrefixMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a prefix (host bits are ignored). An equal prefix already present keeps its value:
    /// callers insert the more authoritative source first.
    pub fn insert(&mut self, net: IpNet, value: V) {
        let len = net.prefix_len();
        let added = match net {
            IpNet::V4(n) => self.v4.insert(len, mask4(n.addr().to_bits(), len), value),
            IpNet::V6(n) => self.v6.insert(len, mask6(n.addr().to_bits(), len), value),
        };
        self.len += usize::from(added);
    }

    /// The value of the longest prefix holding `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(|len| mask4(a.to_bits(), len)),
            IpAddr::V6(a) => self.v6.lookup(|len| mask6(a.to_bits(), len)),
        }
    }

    /// Number of distinct prefixes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<V: Copy> FromIterator<(IpNet, V)> for PrefixMap<V> {
    fn from_iter<I: IntoIterator<Item = (IpNet, V)>>(iter: I) -> Self {
        let mut map = PrefixMap::new();
        for (net, value) in iter {
            map.insert(net, value);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, u32)]) -> PrefixMap<u32> {
        entries
            .iter()
            .map(|(n, v)| (n.parse().unwrap(), *v))
            .collect()
    }

    fn at(m: &PrefixMap<u32>, ip: &str) -> Option<u32> {
        m.lookup(ip.parse().unwrap())
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let m = map(&[
            ("0.0.0.0/0", 2),
            ("10.0.0.0/8", 8),
            ("10.1.0.0/16", 16),
            ("10.1.2.3/32", 32),
            ("2001:db8::/32", 60),
            ("2001:db8::1/128", 61),
            ("::/0", 62),
        ]);
        assert_eq!(m.len(), 7);
        assert_eq!(at(&m, "10.1.2.3"), Some(32));
        assert_eq!(at(&m, "10.1.2.4"), Some(16));
        assert_eq!(at(&m, "10.2.0.1"), Some(8));
        assert_eq!(at(&m, "192.0.2.1"), Some(2));
        assert_eq!(at(&m, "2001:db8::1"), Some(61));
        assert_eq!(at(&m, "2001:db8::2"), Some(60));
        assert_eq!(at(&m, "2001:db9::2"), Some(62));
    }

    #[test]
    fn host_bits_are_ignored_and_the_first_equal_prefix_wins() {
        let m = map(&[("10.1.2.3/24", 1), ("10.1.2.0/24", 2), ("fd00::5/127", 3)]);
        assert_eq!(m.len(), 2);
        assert_eq!(at(&m, "10.1.2.200"), Some(1));
        assert_eq!(at(&m, "fd00::4"), Some(3));
        assert_eq!(at(&m, "fd00::6"), None);
        assert_eq!(at(&m, "10.1.3.0"), None);
        // No default: an IPv4 map says nothing about IPv6.
        assert_eq!(at(&m, "::ffff:10.1.2.3"), None);
    }

    #[test]
    fn agrees_with_a_linear_scan() {
        // Deterministic pseudo-random prefixes and probes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut entries: Vec<(IpNet, u32)> = Vec::new();
        for i in 0..500 {
            let addr = std::net::Ipv4Addr::from_bits(0x0a00_0000 | (next() as u32 & 0x00ff_ffff));
            let len = 8 + (next() % 25) as u8;
            entries.push((IpNet::new(addr.into(), len).unwrap().trunc(), i));
        }
        let m: PrefixMap<u32> = entries.iter().copied().collect();
        for _ in 0..5000 {
            let ip: IpAddr =
                std::net::Ipv4Addr::from_bits(0x0a00_0000 | (next() as u32 & 0x00ff_ffff)).into();
            let linear = entries
                .iter()
                .filter(|(n, _)| n.contains(&ip))
                .max_by_key(|(n, v)| (n.prefix_len(), std::cmp::Reverse(*v)))
                .map(|(_, v)| *v);
            assert_eq!(m.lookup(ip), linear, "{ip}");
        }
    }
}
