/* SPDX-License-Identifier: Apache-2.0 */
/*
 * membrane datapath ABI: every map key and value, defined once. The Rust mirror lives in
 * bpf/src/abi.rs and checks sizes and offsets at compile time. Bump MEMBRANE_ABI_VERSION on any
 * layout change: map pin names carry it, so an old pinned map is never reused by mistake.
 */
#ifndef MEMBRANE_ABI_H
#define MEMBRANE_ABI_H

#include <linux/types.h>

#define MEMBRANE_ABI_VERSION 3

/* Reserved identities (Cilium's numbers). */
#define ID_UNKNOWN 0
#define ID_HOST	   1
#define ID_WORLD   2
/* Node-local identities (CIDRs) carry this bit. */
#define ID_LOCAL_SCOPE (1U << 24)

/* Directions, from the endpoint's point of view. */
#define DIR_INGRESS 1
#define DIR_EGRESS  2

/* ipcache: LPM trie, address -> identity. prefixlen counts the address bits only. */
struct ipcache_key4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct ipcache_key6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct ipcache_value {
	__u32 identity;
	/* The endpoint an address belongs to when it is a local endpoint's (0 otherwise): the
	 * source side consults that endpoint's ingress policy for L7 redirects. */
	__u32 endpoint_id;
};

/*
 * Packet marks. TO_PROXY: set with bpf_sk_assign so policy routing (fwmark 0x200/0xf00 ->
 * table 100, local default route) delivers the packet to the proxy's IP_TRANSPARENT socket.
 * FROM_PROXY: the proxy's upstream sockets (SO_MARK) carry the identity of the workload they act
 * for, so the destination's ingress policy is judged for that workload, not for the host.
 * Identity bits 0-15 sit in mark bits 16-31, bits 16-23 in mark bits 0-7, the local-scope bit in
 * mark bit 12.
 */
#define MARK_MAGIC_MASK	      0x0f00
#define MARK_MAGIC_TO_PROXY   0x0200
#define MARK_MAGIC_FROM_PROXY 0x0b00
#define MARK_LOCAL_SCOPE      0x1000

static inline __u32 mark_identity(__u32 mark)
{
	__u32 id = (mark >> 16) | ((mark & 0xff) << 16);
	if (mark & MARK_LOCAL_SCOPE)
		id |= ID_LOCAL_SCOPE;
	return id;
}

/* endpoints: host-side veth ifindex -> the endpoint behind it; at most MAX_ENDPOINTS. */
#define MAX_ENDPOINTS 2048

#define EP_ENFORCE_INGRESS 1
#define EP_ENFORCE_EGRESS  2

struct endpoint_info {
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags;
	__u32 pad;
};

/*
 * local: the address (16 bytes, v4 mapped) of a local endpoint -> that endpoint and how to reach
 * it. A packet one endpoint sends to another on the node is judged by both policies at the
 * sender's TC ingress and handed straight to the receiver's interface (bpf_redirect_peer, as
 * Cilium's local delivery): no host routing, no second program run. At most MAX_ENDPOINTS
 * endpoints with 4 addresses each.
 */
#define LOCAL_ADDRESSES_PER_ENDPOINT 4
struct local_key {
	__u8 addr[16];
};
struct local_endpoint {
	/* Its host-side veth, whose peer is the endpoint's interface. */
	__u32 ifindex;
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags;
	/* The Ethernet addresses of a delivered frame: the endpoint's interface (destination),
	 * then its host-side veth (source, the endpoint's gateway). */
	__u8 mac[6];
	__u8 host_mac[6];
	__u32 pad;
};

/*
 * devices: ifindex of an external device -> the identity its traffic has when the ipcache knows no
 * better (world; host with --k8s-legacy-host-allows-world). Traffic that arrives from an external
 * device never carries a local endpoint's or the host's identity, whatever its source address.
 */
struct device_info {
	__u32 identity;
	__u32 flags;
};

/*
 * policy: (endpoint, remote identity | 0, dport | 0, proto | 0, direction) -> verdict, probed in
 * membrane_policy::resolve::PROBE_ORDER: exact, (id, *, proto), (id, *, *), (*, port, proto),
 * (*, *, proto), (*, *, *). dport is in host byte order.
 */
struct policy_key {
	__u32 endpoint_id;
	__u32 identity;
	__u16 dport;
	__u8 proto;
	__u8 dir;
};

#define POLICY_ALLOW	1
#define POLICY_REDIRECT 2

struct policy_value {
	__u8 action;
	__u8 pad;
	__u16 proxy_port;
	__u32 pad2;
};

/*
 * conntrack: LRU hash keyed by a flow's two ends (addresses as 16 bytes, v4 mapped) in a fixed
 * order, the same for a packet and its reply, so that one lookup finds the flow in either
 * direction, scoped to the endpoint whose policy admitted it (one endpoint's allowed flow never
 * passes another endpoint's packets as "replies"). The first end is the lower (address, port);
 * CT_INITIATOR_SECOND in the value says the flow was started from the second end.
 */
#define CT_SEEN_REPLY	    1
#define CT_CLOSING	    2
#define CT_INITIATOR_SECOND 4

struct ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
	__u32 endpoint_id;
};

struct ct_value {
	__u64 expires_ns;
	__u64 packets;
	__u64 bytes;
	__u32 remote_identity;
	__u32 endpoint_id;
	__u8 dir;
	__u8 flags;
	__u16 pad;
	/* The policy revision the flow's verdict was judged under (0: judge every packet). */
	__u32 policy_rev;
};

/*
 * revision: a one-entry array. The agent bumps `policy` after every write to the ipcache,
 * endpoints, devices or policy maps. While a conntrack entry's policy_rev is the current one,
 * its flow's packets keep their verdict without the ipcache and policy lookups; any change
 * makes every flow be judged again on its next packet. 0 means no revision yet.
 */
struct revision_value {
	__u32 policy;
	__u32 pad;
};

/* Connection-tracking lifetimes (Cilium's). */
#define CT_LIFETIME_TCP_NS     (21600ULL * 1000000000ULL)
#define CT_LIFETIME_NONTCP_NS  (60ULL * 1000000000ULL)
#define CT_LIFETIME_SYN_NS     (60ULL * 1000000000ULL)
#define CT_LIFETIME_CLOSING_NS (10ULL * 1000000000ULL)
/* Unreplied UDP and other non-TCP flows age out quickly. */
#define CT_LIFETIME_UNREPLIED_NS (10ULL * 1000000000ULL)

/*
 * metrics: per-CPU array of counters, slot metrics_slot(reason, direction); reason 0 = forwarded,
 * else the drop code. An array slot is found without hashing (the verifier inlines the lookup),
 * which matters on a path every packet takes.
 */
#define METRICS_SLOTS (4 << 8)

static inline __u32 metrics_slot(__u8 reason, __u8 dir)
{
	return ((__u32)(dir & 3) << 8) | reason;
}

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* Drop reasons: Cilium's numbers, negated in events and metrics. */
#define DROP_INVALID_SIP	 132
#define DROP_INVALID		 134
#define DROP_POLICY		 133
#define DROP_CT_INVALID_HDR	 135
#define DROP_WRITE_ERROR	 141
#define DROP_UNKNOWN_L4		 142
#define DROP_INVALID_EXTHDR	 156
#define DROP_FRAG_NOSUPPORT	 157
#define DROP_PROXY_LOOKUP_FAILED 178

/* events: ring buffer records. */
#define EVENT_DROP    1
#define EVENT_VERDICT 2

struct event {
	__u8 type;
	__u8 reason;
	__u8 dir;
	__u8 proto;
	__u8 family;
	__u8 pad[3];
	__u32 ifindex;
	__u32 endpoint_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u32 len;
};

#endif
