//! The Rust mirror of `include/membrane/abi.h`. Every struct is `#[repr(C)]` and its size and
//! field offsets are checked against the C layout at compile time; this module holds the crate's
//! only `unsafe` (the `aya::Pod` impls).

use std::mem::{offset_of, size_of};

/// `MEMBRANE_ABI_VERSION`: map names end in `_v{ABI_VERSION}`.
pub const ABI_VERSION: u32 = 3;

/// `DIR_INGRESS`.
pub const DIR_INGRESS: u8 = 1;
/// `DIR_EGRESS`.
pub const DIR_EGRESS: u8 = 2;
/// `EP_ENFORCE_INGRESS`.
pub const EP_ENFORCE_INGRESS: u32 = 1;
/// `EP_ENFORCE_EGRESS`.
pub const EP_ENFORCE_EGRESS: u32 = 2;
/// `POLICY_ALLOW`.
pub const POLICY_ALLOW: u8 = 1;
/// `POLICY_REDIRECT`.
pub const POLICY_REDIRECT: u8 = 2;
/// `EVENT_DROP`.
pub const EVENT_DROP: u8 = 1;
/// `EVENT_VERDICT`.
pub const EVENT_VERDICT: u8 = 2;

/// Drop reasons (Cilium's numbers; negated in Cilium's own output).
pub mod drop {
    /// The source address is not the sending endpoint's.
    pub const INVALID_SIP: u8 = 132;
    /// Policy denied.
    pub const POLICY: u8 = 133;
    /// Invalid packet.
    pub const INVALID: u8 = 134;
    /// Truncated L4 header.
    pub const CT_INVALID_HDR: u8 = 135;
    /// Writing to the packet failed (local delivery rewrites its Ethernet header and TTL).
    pub const WRITE_ERROR: u8 = 141;
    /// Unsupported IPv6 extension header.
    pub const INVALID_EXTHDR: u8 = 156;
    /// Fragments are not supported.
    pub const FRAG_NOSUPPORT: u8 = 157;
    /// The flow needs the L7 proxy and none could take it.
    pub const PROXY_LOOKUP_FAILED: u8 = 178;
}

/// `struct ipcache_key4`: an LPM trie key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheKey4 {
    /// Prefix length in bits.
    pub prefixlen: u32,
    /// Address, network order.
    pub addr: [u8; 4],
}

/// `struct ipcache_key6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheKey6 {
    /// Prefix length in bits.
    pub prefixlen: u32,
    /// Address, network order.
    pub addr: [u8; 16],
}

/// `struct ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    /// Numeric identity.
    pub identity: u32,
    /// The local endpoint the address belongs to (0: not a local endpoint's).
    pub endpoint_id: u32,
}

/// `MARK_MAGIC_MASK`.
pub const MARK_MAGIC_MASK: u32 = 0x0f00;
/// `MARK_MAGIC_TO_PROXY`: set by the datapath with `bpf_sk_assign`; policy routing delivers
/// such packets locally (see [`TO_PROXY_ROUTE_TABLE`]).
pub const MARK_MAGIC_TO_PROXY: u32 = 0x0200;
/// `MARK_MAGIC_FROM_PROXY`: on the proxy's upstream sockets, with the identity it acts for.
pub const MARK_MAGIC_FROM_PROXY: u32 = 0x0b00;
/// `MARK_LOCAL_SCOPE`.
pub const MARK_LOCAL_SCOPE: u32 = 0x1000;
/// The routing table with the local default route for [`MARK_MAGIC_TO_PROXY`] packets.
pub const TO_PROXY_ROUTE_TABLE: u32 = 100;

/// The SO_MARK of a proxy upstream socket acting for `identity` (`mark_identity` in abi.h
/// decodes it).
pub fn proxy_mark(identity: u32) -> u32 {
    let mut mark = ((identity & 0xffff) << 16) | MARK_MAGIC_FROM_PROXY | ((identity >> 16) & 0xff);
    if identity & (1 << 24) != 0 {
        mark |= MARK_LOCAL_SCOPE;
    }
    mark
}

/// `struct endpoint_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The endpoint's id (policy keys carry it).
    pub endpoint_id: u32,
    /// Its identity.
    pub identity: u32,
    /// `EP_ENFORCE_*` bits.
    pub flags: u32,
    /// Reserved.
    pub pad: u32,
}

/// `struct local_key`: a local endpoint's address, 16 bytes (IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalKey {
    /// The address.
    pub addr: [u8; 16],
}

impl LocalKey {
    /// The key of an address (IPv4 as `::ffff:a.b.c.d`, as the programs parse it).
    pub fn of(addr: std::net::IpAddr) -> LocalKey {
        let v6 = match addr {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
            std::net::IpAddr::V6(a) => a,
        };
        LocalKey { addr: v6.octets() }
    }
}

/// `struct local_endpoint`: a local endpoint as the sender's program delivers to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Its host-side veth.
    pub ifindex: u32,
    /// The endpoint's id.
    pub endpoint_id: u32,
    /// Its identity.
    pub identity: u32,
    /// `EP_ENFORCE_*` bits.
    pub flags: u32,
    /// The endpoint's interface's Ethernet address.
    pub mac: [u8; 6],
    /// The host-side veth's Ethernet address.
    pub host_mac: [u8; 6],
    /// Reserved.
    pub pad: u32,
}

/// Addresses per endpoint the local map is sized for.
pub const LOCAL_ADDRESSES_PER_ENDPOINT: u32 = 4;

/// `struct device_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The identity of traffic from this device that the ipcache knows no better.
    pub identity: u32,
    /// Reserved.
    pub flags: u32,
}

/// `struct policy_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// The endpoint.
    pub endpoint_id: u32,
    /// Remote identity, 0 = any.
    pub identity: u32,
    /// Destination port (host order), 0 = any.
    pub dport: u16,
    /// IP protocol, 0 = any.
    pub proto: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u8,
}

/// `struct policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// `POLICY_ALLOW` or `POLICY_REDIRECT`.
    pub action: u8,
    /// Reserved.
    pub pad: u8,
    /// Proxy port for redirects.
    pub proxy_port: u16,
    /// Reserved.
    pub pad2: u32,
}

/// `CT_SEEN_REPLY`: a reply has been seen.
pub const CT_SEEN_REPLY: u8 = 1;
/// `CT_CLOSING`: FIN or RST seen; the short lifetime applies.
pub const CT_CLOSING: u8 = 2;
/// `CT_INITIATOR_SECOND`: the flow was started from the key's second end (`daddr`, `dport`).
pub const CT_INITIATOR_SECOND: u8 = 4;

/// `struct ct_key`: a flow's two ends (IPv4 as v4-mapped IPv6) with the lower (address, port)
/// first, the same key for a packet and its reply, scoped to an endpoint. [`CtKey::of_flow`]
/// builds one as the datapath does; [`CtKey::initiated`] reads the flow's direction back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address.
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Source port (host order).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Reserved.
    pub pad: u16,
    /// The endpoint whose policy admitted the flow.
    pub endpoint_id: u32,
}

impl CtKey {
    /// The key of the flow whose initiator sent `src:sport -> dst:dport`, and the value flags
    /// that record who initiated it (IPv4 as v4-mapped addresses). Mirrors `ct_key_of`.
    pub fn of_flow(
        endpoint_id: u32,
        family: u8,
        proto: u8,
        (src, sport): ([u8; 16], u16),
        (dst, dport): ([u8; 16], u16),
    ) -> (CtKey, u8) {
        let from_second = (src, sport) > (dst, dport);
        let ((saddr, sport), (daddr, dport)) = if from_second {
            ((dst, dport), (src, sport))
        } else {
            ((src, sport), (dst, dport))
        };
        let key = CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            family,
            pad: 0,
            endpoint_id,
        };
        (key, if from_second { CT_INITIATOR_SECOND } else { 0 })
    }

    /// The flow as its initiator sent it: (source, source port, destination, destination port).
    pub fn initiated(&self, value: &CtValue) -> ([u8; 16], u16, [u8; 16], u16) {
        if value.flags & CT_INITIATOR_SECOND != 0 {
            (self.daddr, self.dport, self.saddr, self.sport)
        } else {
            (self.saddr, self.sport, self.daddr, self.dport)
        }
    }
}

/// `struct ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Expiry, in `bpf_ktime_get_ns` time.
    pub expires_ns: u64,
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen.
    pub bytes: u64,
    /// The remote identity when the flow was allowed.
    pub remote_identity: u32,
    /// The endpoint.
    pub endpoint_id: u32,
    /// Direction of the initiating packet.
    pub dir: u8,
    /// `CT_SEEN_REPLY`, `CT_CLOSING`, `CT_INITIATOR_SECOND`.
    pub flags: u8,
    /// Reserved.
    pub pad: u16,
    /// The policy revision the verdict was judged under (0: judge every packet).
    pub policy_rev: u32,
}

/// `struct revision_value`: the one entry of the revision map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevisionValue {
    /// Bumped after every write to the ipcache, endpoints, devices or policy maps.
    pub policy: u32,
    /// Reserved.
    pub pad: u32,
}

/// Most endpoints a node's datapath holds (`max_entries` of the endpoints map).
pub const MAX_ENDPOINTS: u32 = 2048;

/// `METRICS_SLOTS`: entries of the per-CPU metrics array.
pub const METRICS_SLOTS: u32 = 4 << 8;

/// What a metrics slot counts: forwarded (reason 0) or dropped packets, in a direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetricsKey {
    /// 0 = forwarded, else the drop reason.
    pub reason: u8,
    /// Direction.
    pub dir: u8,
}

impl MetricsKey {
    /// The array slot of this counter (`metrics_slot` in abi.h).
    pub fn slot(self) -> u32 {
        (u32::from(self.dir & 3) << 8) | u32::from(self.reason)
    }

    /// The counter a slot holds.
    pub fn of_slot(slot: u32) -> MetricsKey {
        MetricsKey {
            reason: (slot & 0xff) as u8,
            dir: ((slot >> 8) & 3) as u8,
        }
    }
}

/// `struct metrics_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsValue {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// `struct event`, as read from the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_DROP` or `EVENT_VERDICT`.
    pub kind: u8,
    /// Drop reason (0 for verdicts).
    pub reason: u8,
    /// Direction.
    pub dir: u8,
    /// IP protocol.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Reserved.
    pub pad: [u8; 3],
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// The endpoint.
    pub endpoint_id: u32,
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Source address (IPv4 v4-mapped).
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Packet length.
    pub len: u32,
}

impl Event {
    /// Reads an event from a ring-buffer record.
    pub fn from_bytes(b: &[u8]) -> Option<Event> {
        if b.len() < size_of::<Event>() {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let mut saddr = [0; 16];
        let mut daddr = [0; 16];
        saddr.copy_from_slice(&b[offset_of!(Event, saddr)..offset_of!(Event, saddr) + 16]);
        daddr.copy_from_slice(&b[offset_of!(Event, daddr)..offset_of!(Event, daddr) + 16]);
        Some(Event {
            kind: b[0],
            reason: b[1],
            dir: b[2],
            proto: b[3],
            family: b[4],
            pad: [0; 3],
            ifindex: u32_at(offset_of!(Event, ifindex)),
            endpoint_id: u32_at(offset_of!(Event, endpoint_id)),
            src_identity: u32_at(offset_of!(Event, src_identity)),
            dst_identity: u32_at(offset_of!(Event, dst_identity)),
            saddr,
            daddr,
            sport: u16_at(offset_of!(Event, sport)),
            dport: u16_at(offset_of!(Event, dport)),
            len: u32_at(offset_of!(Event, len)),
        })
    }
}

// Layout checks against abi.h (sizes and the offsets the C code relies on).
const _: () = {
    assert!(size_of::<IpcacheKey4>() == 8);
    assert!(size_of::<IpcacheKey6>() == 20);
    assert!(size_of::<IpcacheValue>() == 8);
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(size_of::<DeviceInfo>() == 8);
    assert!(size_of::<LocalKey>() == 16);
    assert!(size_of::<LocalEndpoint>() == 32);
    assert!(offset_of!(LocalEndpoint, mac) == 16 && offset_of!(LocalEndpoint, host_mac) == 22);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(
        offset_of!(PolicyKey, dport) == 8
            && offset_of!(PolicyKey, proto) == 10
            && offset_of!(PolicyKey, dir) == 11
    );
    assert!(size_of::<PolicyValue>() == 8);
    assert!(offset_of!(PolicyValue, proxy_port) == 2);
    assert!(size_of::<CtKey>() == 44);
    assert!(offset_of!(CtKey, endpoint_id) == 40);
    assert!(
        offset_of!(CtKey, sport) == 32
            && offset_of!(CtKey, proto) == 36
            && offset_of!(CtKey, family) == 37
    );
    assert!(size_of::<CtValue>() == 40);
    assert!(
        offset_of!(CtValue, remote_identity) == 24
            && offset_of!(CtValue, dir) == 32
            && offset_of!(CtValue, flags) == 33
    );
    assert!(offset_of!(CtValue, policy_rev) == 36);
    assert!(size_of::<RevisionValue>() == 8);
    assert!(size_of::<MetricsValue>() == 16);
    assert!(size_of::<Event>() == 64);
    assert!(
        offset_of!(Event, ifindex) == 8
            && offset_of!(Event, saddr) == 24
            && offset_of!(Event, sport) == 56
            && offset_of!(Event, len) == 60
    );
};

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: a #[repr(C)] struct of integers and integer arrays with no implicit padding
        // (sizes are checked above), so every bit pattern is valid and it can be copied as bytes.
        #[allow(unsafe_code)]
        unsafe impl aya::Pod for $t {}
    )*};
}
pod!(
    RevisionValue,
    DeviceInfo,
    IpcacheKey4,
    IpcacheKey6,
    IpcacheValue,
    EndpointInfo,
    LocalKey,
    LocalEndpoint,
    PolicyKey,
    PolicyValue,
    CtKey,
    CtValue,
    MetricsValue
);
