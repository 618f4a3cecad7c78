/* SPDX-License-Identifier: Apache-2.0 */
/*
 * membrane endpoint programs, attached to the host side of each endpoint's veth:
 *   from_endpoint  TC ingress: packets leaving the endpoint, judged by its egress policy;
 *   to_endpoint    TC egress:  packets arriving at the endpoint, judged by its ingress policy.
 * A packet from one endpoint to another on the node is judged by both policies in from_endpoint
 * and handed straight to the receiver (bpf_redirect_peer): it never meets the host's routing or
 * the receiver's to_endpoint.
 * Replies of allowed flows pass through conntrack; a flow that policy now denies loses its
 * conntrack entry, so its replies stop too.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "include/membrane/abi.h"
#include "lib/parse.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 512000);
	__type(key, struct ipcache_key4);
	__type(value, struct ipcache_value);
} mbr_ipcache4_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 512000);
	__type(key, struct ipcache_key6);
	__type(value, struct ipcache_value);
} mbr_ipcache6_v3 SEC(".maps");

/* Every packet looks its interface up here: small (the bucket array fits a kmalloc) and not
 * preallocated (entries come from the kernel's direct map), so the lookup costs no TLB miss on
 * vmalloc'd pages. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct endpoint_info);
} mbr_endpoints_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_ENDPOINTS *LOCAL_ADDRESSES_PER_ENDPOINT);
	__type(key, struct local_key);
	__type(value, struct local_endpoint);
} mbr_local_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct device_info);
} mbr_devices_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} mbr_policy_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} mbr_ct_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, METRICS_SLOTS);
	__type(key, __u32);
	__type(value, struct metrics_value);
} mbr_metrics_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct revision_value);
} mbr_revision_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} mbr_events_v3 SEC(".maps");

static __always_inline void count(__u8 reason, __u8 dir, __u32 len)
{
	__u32 slot = metrics_slot(reason, dir);
	struct metrics_value *v = bpf_map_lookup_elem(&mbr_metrics_v3, &slot);
	if (v) {
		v->packets += 1;
		v->bytes += len;
	}
}

static __always_inline void emit(__u8 type, __u8 reason, __u8 dir, struct __sk_buff *skb,
				 __u32 ifindex, const struct flow *f, __u32 ep, __u32 src_id,
				 __u32 dst_id)
{
	struct event *e = bpf_ringbuf_reserve(&mbr_events_v3, sizeof(*e), 0);
	if (!e)
		return;
	e->type = type;
	e->reason = reason;
	e->dir = dir;
	e->proto = f->proto;
	e->family = f->family;
	e->pad[0] = e->pad[1] = e->pad[2] = 0;
	e->ifindex = ifindex;
	e->endpoint_id = ep;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	__builtin_memcpy(e->saddr, f->saddr, 16);
	__builtin_memcpy(e->daddr, f->daddr, 16);
	e->sport = f->sport;
	e->dport = f->dport;
	e->len = skb->len;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline struct ipcache_value *lookup_ipcache(const struct flow *f, const __u8 *addr)
{
	if (f->family == 4) {
		struct ipcache_key4 k = {.prefixlen = 32};
		__builtin_memcpy(k.addr, addr + 12, 4);
		return bpf_map_lookup_elem(&mbr_ipcache4_v3, &k);
	}
	struct ipcache_key6 k = {.prefixlen = 128};
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&mbr_ipcache6_v3, &k);
}

static __always_inline __u32 policy_revision(void)
{
	__u32 zero = 0;
	struct revision_value *r = bpf_map_lookup_elem(&mbr_revision_v3, &zero);
	return r ? r->policy : 0;
}

/*
 * Hands a TCP packet to the L7 proxy: to the proxy's established socket for this connection if
 * there is one (the accepted socket's local address is the original destination), else to its
 * IP_TRANSPARENT listener on `port`. Returns 0 when assigned. (Kernel selftest test_sk_assign;
 * notes/bpf-lab.md §3.)
 */
static __always_inline int assign_to_proxy(struct __sk_buff *skb, const struct flow *f, __u16 port)
{
	struct bpf_sock_tuple tup = {};
	__u32 len;
	if (f->family == 4) {
		__builtin_memcpy(&tup.ipv4.saddr, f->saddr + 12, 4);
		__builtin_memcpy(&tup.ipv4.daddr, f->daddr + 12, 4);
		tup.ipv4.sport = bpf_htons(f->sport);
		tup.ipv4.dport = bpf_htons(f->dport);
		len = sizeof(tup.ipv4);
	} else {
		__builtin_memcpy(tup.ipv6.saddr, f->saddr, 16);
		__builtin_memcpy(tup.ipv6.daddr, f->daddr, 16);
		tup.ipv6.sport = bpf_htons(f->sport);
		tup.ipv6.dport = bpf_htons(f->dport);
		len = sizeof(tup.ipv6);
	}
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tup, len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			goto assign;
		bpf_sk_release(sk);
	}
	if (f->family == 4)
		tup.ipv4.dport = bpf_htons(port);
	else
		tup.ipv6.dport = bpf_htons(port);
	sk = bpf_skc_lookup_tcp(skb, &tup, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
assign:
	skb->mark = (skb->mark & ~MARK_MAGIC_MASK) | MARK_MAGIC_TO_PROXY;
	int err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err;
}

/* The six probes of membrane_policy::resolve::PROBE_ORDER; the first hit decides. */
static __always_inline struct policy_value *lookup_policy(__u32 ep, __u32 id, __u16 port,
							  __u8 proto, __u8 dir)
{
	struct policy_key k = {.endpoint_id = ep, .dir = dir};
	struct policy_value *v;
#define PROBE(i, p, pr)                              \
	k.identity = (i);                            \
	k.dport = (p);                               \
	k.proto = (pr);                              \
	v = bpf_map_lookup_elem(&mbr_policy_v3, &k); \
	if (v)                                       \
		return v;
	PROBE(id, port, proto)
	PROBE(id, 0, proto)
	PROBE(id, 0, 0)
	PROBE(0, port, proto)
	PROBE(0, 0, proto)
	PROBE(0, 0, 0)
#undef PROBE
	return 0;
}

/* Orders two 16-byte addresses as memcmp would (big-endian words), without a byte loop. */
static __always_inline int addr_cmp(const __u8 *a, const __u8 *b)
{
	const __u64 *a64 = (const __u64 *)a, *b64 = (const __u64 *)b;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		__u64 x = bpf_be64_to_cpu(a64[i]), y = bpf_be64_to_cpu(b64[i]);
		if (x != y)
			return x < y ? -1 : 1;
	}
	return 0;
}

/*
 * The conntrack key of a packet's flow (abi.h): the lower (address, port) end first, so that a
 * packet and its reply share one key. Returns 1 when the packet travels from the key's second
 * end to its first.
 */
static __always_inline int ct_key_of(struct ct_key *k, const struct flow *f, __u32 ep)
{
	int c = addr_cmp(f->saddr, f->daddr);
	/* ICMP echo: the identifier would be the port; ports stay 0 so replies match. */
	int from_second = c > 0 || (c == 0 && f->sport > f->dport);
	__builtin_memset(k, 0, sizeof(*k));
	k->endpoint_id = ep;
	if (from_second) {
		__builtin_memcpy(k->saddr, f->daddr, 16);
		__builtin_memcpy(k->daddr, f->saddr, 16);
		k->sport = f->dport;
		k->dport = f->sport;
	} else {
		__builtin_memcpy(k->saddr, f->saddr, 16);
		__builtin_memcpy(k->daddr, f->daddr, 16);
		k->sport = f->sport;
		k->dport = f->dport;
	}
	k->proto = f->proto;
	k->family = f->family;
	return from_second;
}

static __always_inline __u64 lifetime(const struct flow *f, __u8 flags)
{
	if (flags & CT_CLOSING)
		return CT_LIFETIME_CLOSING_NS;
	if (f->proto == IPPROTO_TCP)
		return (flags & CT_SEEN_REPLY) ? CT_LIFETIME_TCP_NS : CT_LIFETIME_SYN_NS;
	return (flags & CT_SEEN_REPLY) ? CT_LIFETIME_NONTCP_NS : CT_LIFETIME_UNREPLIED_NS;
}

/* Another packet of a tracked flow: counters, flags (FIN/RST start the closing lifetime) and
 * expiry. */
static __always_inline void ct_touch(struct ct_value *v, const struct flow *f, __u64 now, __u32 len,
				     __u8 add_flags)
{
	__u8 flags = v->flags | add_flags;
	if (f->proto == IPPROTO_TCP && (f->tcp_flags & (TCP_FIN | TCP_RST)))
		flags |= CT_CLOSING;
	v->flags = flags;
	v->expires_ns = now + lifetime(f, flags);
	v->packets += 1;
	v->bytes += len;
}

/* What the fast path learned about a packet, handed to the judging slow path. */
struct pkt {
	struct flow f;
	struct ct_key key;
	__u64 now;
	/* The endpoint judged, behind this host veth. */
	__u32 ifindex;
	__u32 ep_id;
	__u32 ep_identity;
	__u32 enforce;
	__u32 revision;
	__u32 mark;
	__u8 dir;
	__u8 from_second;
	__u8 from_proxy;
	/* Judged for local delivery: a flow that needs the proxy goes through the stack instead. */
	__u8 local;
	/* Set by judge(): the packet was assigned to the L7 proxy. */
	__u8 to_proxy;
	__u8 pad[3];
};

/*
 * The slow path: the first packet of a flow, and the first after a policy change. Out of line
 * (a BPF-to-BPF call), so that the fast path every other packet takes is a short run of code:
 * per packet, the cost of these programs is mostly cache misses, instruction fetch included.
 * Returns TC_ACT_UNSPEC, with nothing recorded, for a locally delivered packet that needs the
 * proxy.
 */
static __noinline int judge(struct __sk_buff *skb, struct pkt *p, struct ct_value *ct)
{
	struct flow *f = &p->f;
	__u8 dir = p->dir;
	/* What leaves an endpoint carries one of its own addresses: with another's, it would pass
	 * for that workload at the receiver. Checked when a flow is judged, so a spoofed flow never
	 * gets a conntrack entry to ride on. */
	if (dir == DIR_EGRESS) {
		struct local_key own;
		__builtin_memcpy(own.addr, f->saddr, 16);
		struct local_endpoint *self = bpf_map_lookup_elem(&mbr_local_v3, &own);
		if (!self || self->endpoint_id != p->ep_id) {
			count(DROP_INVALID_SIP, dir, skb->len);
			emit(EVENT_DROP, DROP_INVALID_SIP, dir, skb, p->ifindex, f, p->ep_id,
			     p->ep_identity, 0);
			return TC_ACT_SHOT;
		}
	}
	/* The remote end: the destination of what leaves, the source of what arrives. */
	struct ipcache_value *rv = lookup_ipcache(f, dir == DIR_EGRESS ? f->daddr : f->saddr);
	__u32 remote = rv ? rv->identity : ID_WORLD;
	if (dir == DIR_INGRESS) {
		/* From outside the node: world (or host, in legacy mode), never a local identity. */
		__u32 in_if = skb->ingress_ifindex;
		struct device_info *dev = bpf_map_lookup_elem(&mbr_devices_v3, &in_if);
		if (dev && !(remote & ID_LOCAL_SCOPE))
			remote = dev->identity;
		/* Sent by the L7 proxy for a workload: judged as that workload's traffic. */
		if (p->from_proxy)
			remote = mark_identity(p->mark);
	}
	__u32 src_id = dir == DIR_EGRESS ? p->ep_identity : remote;
	__u32 dst_id = dir == DIR_EGRESS ? remote : p->ep_identity;

	struct policy_value *pv = 0;
	__u16 redirect_port = 0;
	int redirect = 0;
	if (p->enforce) {
		pv = lookup_policy(p->ep_id, remote, f->dport, f->proto, dir);
		if (!pv) {
			bpf_map_delete_elem(&mbr_ct_v3, &p->key);
			count(DROP_POLICY, dir, skb->len);
			emit(EVENT_DROP, DROP_POLICY, dir, skb, p->ifindex, f, p->ep_id, src_id,
			     dst_id);
			return TC_ACT_SHOT;
		}
		/* What the proxy sends has passed its L7 rules already. */
		if (pv->action == POLICY_REDIRECT && !p->from_proxy) {
			redirect = 1;
			redirect_port = pv->proxy_port;
		}
	}
	/* A local destination whose ingress policy wants L7: the proxy must get the connection
	 * here, at TC ingress where bpf_sk_assign works, not at the destination's to_endpoint. */
	if (dir == DIR_EGRESS && !redirect) {
		/* The remote end of what leaves is the destination: rv is its ipcache entry. */
		if (rv && rv->endpoint_id) {
			struct policy_value *ipv = lookup_policy(rv->endpoint_id, p->ep_identity,
								 f->dport, f->proto, DIR_INGRESS);
			if (ipv && ipv->action == POLICY_REDIRECT) {
				redirect = 1;
				redirect_port = ipv->proxy_port;
			}
		}
	}
	/* The sender's egress judgement saw no redirect, the maps changed since: the stack and
	 * the destination's to_endpoint decide, as for any packet not delivered here. */
	if (redirect && p->local)
		return TC_ACT_UNSPEC;
	/* No proxy, or not TCP: fail closed. */
	if (redirect && (!redirect_port || f->proto != IPPROTO_TCP)) {
		bpf_map_delete_elem(&mbr_ct_v3, &p->key);
		count(DROP_PROXY_LOOKUP_FAILED, dir, skb->len);
		emit(EVENT_DROP, DROP_PROXY_LOOKUP_FAILED, dir, skb, p->ifindex, f, p->ep_id,
		     src_id, dst_id);
		return TC_ACT_SHOT;
	}

	/* Redirected flows are never fast-pathed: each packet must be assigned to the proxy. */
	__u32 judged_rev = redirect ? 0 : p->revision;
	if (ct) {
		ct_touch(ct, f, p->now, skb->len, 0);
		ct->remote_identity = remote;
		ct->policy_rev = judged_rev;
	} else {
		struct ct_value v = {};
		v.remote_identity = remote;
		v.endpoint_id = p->ep_id;
		v.dir = dir;
		v.flags = p->from_second ? CT_INITIATOR_SECOND : 0;
		v.expires_ns = p->now + lifetime(f, 0);
		v.packets = 1;
		v.bytes = skb->len;
		v.policy_rev = judged_rev;
		bpf_map_update_elem(&mbr_ct_v3, &p->key, &v, BPF_ANY);
		emit(EVENT_VERDICT, 0, dir, skb, p->ifindex, f, p->ep_id, src_id, dst_id);
	}
	if (redirect) {
		if (assign_to_proxy(skb, f, redirect_port)) {
			/* The proxy is not listening (stopped, restarting): never let the flow
			 * bypass it. */
			count(DROP_PROXY_LOOKUP_FAILED, dir, skb->len);
			emit(EVENT_DROP, DROP_PROXY_LOOKUP_FAILED, dir, skb, p->ifindex, f,
			     p->ep_id, src_id, dst_id);
			return TC_ACT_SHOT;
		}
		p->to_proxy = 1;
	}
	count(0, dir, skb->len);
	return TC_ACT_OK;
}

static __always_inline int is_echo_request(const struct flow *f)
{
	return (f->proto == IPPROTO_ICMP && f->icmp_type == 8) ||
	       (f->proto == IPPROTO_ICMPV6 && f->icmp_type == 128);
}

/*
 * One endpoint's verdict on a parsed packet (p: flow, endpoint, direction, clock, mark): replies
 * of tracked flows and flows judged under the policy revision in force pass here; any other
 * packet is judged.
 */
static __always_inline int enforce(struct __sk_buff *skb, struct pkt *p)
{
	struct flow *f = &p->f;
	p->from_second = ct_key_of(&p->key, f, p->ep_id);
	struct ct_value *ct = bpf_map_lookup_elem(&mbr_ct_v3, &p->key);
	if (ct && ct->expires_ns <= p->now)
		ct = 0; /* expired: this packet starts a new flow */

	int from_initiator = ct && p->from_second == !!(ct->flags & CT_INITIATOR_SECOND);
	/* A reply of a flow the other side started (and policy allowed) passes. An echo request
	 * is never a reply: it shares its key with the other end's pings (ICMP has no ports), and
	 * is judged as the new exchange it is. */
	if (ct && !from_initiator && !is_echo_request(f)) {
		ct_touch(ct, f, p->now, skb->len, CT_SEEN_REPLY);
		count(0, p->dir, skb->len);
		return TC_ACT_OK;
	}

	/* Read before any lookup: a verdict is never recorded under a newer revision than the
	 * maps it was judged by. */
	p->revision = policy_revision();

	/* A flow already judged under the policy in force (and not redirected) keeps its verdict;
	 * any other is judged (again, after a policy change, so a change reaches established
	 * flows too). */
	if (from_initiator && p->revision && ct->policy_rev == p->revision && !p->from_proxy) {
		ct_touch(ct, f, p->now, skb->len, 0);
		count(0, p->dir, skb->len);
		return TC_ACT_OK;
	}
	return judge(skb, p, ct);
}

#define GO_ON 0x100

/* Parses the packet and finds the endpoint behind the interface: GO_ON, or the verdict on a
 * packet that is no business of policy (not IP, neighbour discovery, no endpoint) or malformed. */
static __always_inline int begin(struct __sk_buff *skb, struct pkt *p, __u8 dir)
{
	int ret = parse_packet(skb, &p->f);
	if (ret == PARSE_NOT_IP || ret == PARSE_PASS_NDP)
		return TC_ACT_OK;

	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = bpf_map_lookup_elem(&mbr_endpoints_v3, &ifindex);
	if (!ep)
		return TC_ACT_OK; /* not a membrane endpoint */
	p->ifindex = ifindex;
	p->ep_id = ep->endpoint_id;
	p->ep_identity = ep->identity;
	p->enforce = ep->flags & (dir == DIR_INGRESS ? EP_ENFORCE_INGRESS : EP_ENFORCE_EGRESS);
	p->dir = dir;
	if (ret < 0) {
		count((__u8)-ret, dir, skb->len);
		emit(EVENT_DROP, (__u8)-ret, dir, skb, ifindex, &p->f, p->ep_id, 0, 0);
		return TC_ACT_SHOT;
	}
	/* The coarse clock (CLOCK_MONOTONIC, one tick's resolution) reads no hardware counter; the
	 * precise one serializes the pipeline on every packet, for lifetimes counted in seconds. */
	p->now = bpf_ktime_get_coarse_ns();
	return GO_ON;
}

/*
 * A packet its sender's policy let out, for another endpoint on this node: judged by the
 * receiver's ingress policy here and handed to the receiver's interface, with what the host's
 * forwarding would have done to it (Ethernet addresses, one hop off the TTL). Anything this path
 * does not take goes through the stack to the receiver's to_endpoint, as before.
 */
static __always_inline int deliver_local(struct __sk_buff *skb, struct pkt *p)
{
	struct local_key k;
	__builtin_memcpy(k.addr, p->f.daddr, 16);
	struct local_endpoint *dst = bpf_map_lookup_elem(&mbr_local_v3, &k);
	if (!dst)
		return TC_ACT_OK;
	__u32 ttl_off =
	    ETH_HLEN + (p->f.family == 4 ? __builtin_offsetof(struct iphdr, ttl)
					 : __builtin_offsetof(struct ipv6hdr, hop_limit));
	__u8 ttl;
	/* Expiring: the stack answers with ICMP time exceeded. */
	if (bpf_skb_load_bytes(skb, ttl_off, &ttl, 1) || ttl <= 1)
		return TC_ACT_OK;

	p->ifindex = dst->ifindex;
	p->ep_id = dst->endpoint_id;
	p->ep_identity = dst->identity;
	p->enforce = dst->flags & EP_ENFORCE_INGRESS;
	p->dir = DIR_INGRESS;
	p->from_proxy = 0;
	p->local = 1;
	int verdict = enforce(skb, p);
	if (verdict == TC_ACT_UNSPEC)
		return TC_ACT_OK;
	if (verdict != TC_ACT_OK)
		return verdict;

	__u8 new_ttl = ttl - 1;
	/* The checksum word holds TTL and protocol; only the TTL byte changes. */
	if ((p->f.family == 4 &&
	     bpf_l3_csum_replace(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, check), ttl,
				 new_ttl, 2)) ||
	    bpf_skb_store_bytes(skb, ttl_off, &new_ttl, 1, 0) ||
	    bpf_skb_store_bytes(skb, 0, dst->mac, 12, 0)) {
		count(DROP_WRITE_ERROR, DIR_INGRESS, skb->len);
		emit(EVENT_DROP, DROP_WRITE_ERROR, DIR_INGRESS, skb, p->ifindex, &p->f, p->ep_id, 0,
		     p->ep_identity);
		return TC_ACT_SHOT;
	}
	return bpf_redirect_peer(p->ifindex, 0);
}

SEC("classifier")
int from_endpoint(struct __sk_buff *skb)
{
	struct pkt p = {};
	int verdict = begin(skb, &p, DIR_EGRESS);
	if (verdict != GO_ON)
		return verdict;
	verdict = enforce(skb, &p);
	if (verdict != TC_ACT_OK || p.to_proxy)
		return verdict;
	return deliver_local(skb, &p);
}

SEC("classifier")
int to_endpoint(struct __sk_buff *skb)
{
	struct pkt p = {};
	int verdict = begin(skb, &p, DIR_INGRESS);
	if (verdict != GO_ON)
		return verdict;
	/* Read once, here: clang would otherwise address the context through a derived pointer,
	 * which the verifier refuses. */
	p.mark = skb->mark;
	p.from_proxy = (p.mark & MARK_MAGIC_MASK) == MARK_MAGIC_FROM_PROXY;
	return enforce(skb, &p);
}
