/* SPDX-License-Identifier: Apache-2.0 */
/*
 * membrane endpoint programs, attached to the host side of each endpoint's veth:
 *   from_endpoint  TC ingress: packets leaving the endpoint, judged by its egress policy;
 *   to_endpoint    TC egress:  packets arriving at the endpoint, judged by its ingress policy.
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
} mbr_ipcache4_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 512000);
	__type(key, struct ipcache_key6);
	__type(value, struct ipcache_value);
} mbr_ipcache6_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint_info);
} mbr_endpoints_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct device_info);
} mbr_devices_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} mbr_policy_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} mbr_ct_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
} mbr_metrics_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct revision_value);
} mbr_revision_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} mbr_events_v2 SEC(".maps");

static __always_inline void count(__u8 reason, __u8 dir, __u32 len)
{
	struct metrics_key k = {.reason = reason, .dir = dir};
	struct metrics_value *v = bpf_map_lookup_elem(&mbr_metrics_v2, &k);
	if (v) {
		v->packets += 1;
		v->bytes += len;
	} else {
		struct metrics_value init = {.packets = 1, .bytes = len};
		bpf_map_update_elem(&mbr_metrics_v2, &k, &init, BPF_NOEXIST);
	}
}

static __always_inline void emit(__u8 type, __u8 reason, __u8 dir, struct __sk_buff *skb,
				 const struct flow *f, __u32 ep, __u32 src_id, __u32 dst_id)
{
	struct event *e = bpf_ringbuf_reserve(&mbr_events_v2, sizeof(*e), 0);
	if (!e)
		return;
	e->type = type;
	e->reason = reason;
	e->dir = dir;
	e->proto = f->proto;
	e->family = f->family;
	e->pad[0] = e->pad[1] = e->pad[2] = 0;
	e->ifindex = skb->ifindex;
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
		return bpf_map_lookup_elem(&mbr_ipcache4_v2, &k);
	}
	struct ipcache_key6 k = {.prefixlen = 128};
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&mbr_ipcache6_v2, &k);
}

static __always_inline __u32 policy_revision(void)
{
	__u32 zero = 0;
	struct revision_value *r = bpf_map_lookup_elem(&mbr_revision_v2, &zero);
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
	v = bpf_map_lookup_elem(&mbr_policy_v2, &k); \
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

static __always_inline void tuple(struct ct_key *k, const struct flow *f, __u32 ep, int reverse)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->endpoint_id = ep;
	if (reverse) {
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
	/* ICMP echo: the identifier would be the port; keep ports 0 so replies match. */
	k->proto = f->proto;
	k->family = f->family;
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

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = {};
	int ret = parse_packet(skb, &f);
	if (ret == PARSE_NOT_IP || ret == PARSE_PASS_NDP)
		return TC_ACT_OK;

	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = bpf_map_lookup_elem(&mbr_endpoints_v2, &ifindex);
	if (!ep)
		return TC_ACT_OK; /* not a membrane endpoint */
	__u32 ep_id = ep->endpoint_id;
	__u32 ep_identity = ep->identity;
	__u32 enforce = ep->flags & (dir == DIR_INGRESS ? EP_ENFORCE_INGRESS : EP_ENFORCE_EGRESS);

	/* The remote end: the destination of what leaves, the source of what arrives. */
	const __u8 *remote_addr = dir == DIR_EGRESS ? f.daddr : f.saddr;
	__u32 remote = 0;
	if (ret < 0) {
		count((__u8)-ret, dir, skb->len);
		emit(EVENT_DROP, (__u8)-ret, dir, skb, &f, ep_id, 0, 0);
		return TC_ACT_SHOT;
	}

	__u64 now = bpf_ktime_get_ns();
	struct ct_key key;

	/* A reply of a flow the other side started (and policy allowed) passes. */
	tuple(&key, &f, ep_id, 1);
	struct ct_value *rev = bpf_map_lookup_elem(&mbr_ct_v2, &key);
	if (rev && rev->expires_ns > now) {
		ct_touch(rev, &f, now, skb->len, CT_SEEN_REPLY);
		count(0, dir, skb->len);
		return TC_ACT_OK;
	}

	/* Read before any lookup: a verdict is never recorded under a newer revision than the
	 * maps it was judged by. */
	__u32 revision = policy_revision();
	int from_proxy =
	    dir == DIR_INGRESS && (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_FROM_PROXY;

	/* A flow already judged under the policy in force (and not redirected) keeps its verdict. */
	tuple(&key, &f, ep_id, 0);
	struct ct_value *fwd = bpf_map_lookup_elem(&mbr_ct_v2, &key);
	if (fwd && revision && fwd->policy_rev == revision && !from_proxy &&
	    fwd->expires_ns > now) {
		ct_touch(fwd, &f, now, skb->len, 0);
		count(0, dir, skb->len);
		return TC_ACT_OK;
	}

	struct ipcache_value *rv = lookup_ipcache(&f, remote_addr);
	remote = rv ? rv->identity : ID_WORLD;
	if (dir == DIR_INGRESS) {
		/* From outside the node: world (or host, in legacy mode), never a local identity. */
		__u32 in_if = skb->ingress_ifindex;
		struct device_info *dev = bpf_map_lookup_elem(&mbr_devices_v2, &in_if);
		if (dev && !(remote & ID_LOCAL_SCOPE))
			remote = dev->identity;
		/* Sent by the L7 proxy for a workload: judged as that workload's traffic. */
		if (from_proxy)
			remote = mark_identity(skb->mark);
	}
	__u32 src_id = dir == DIR_EGRESS ? ep_identity : remote;
	__u32 dst_id = dir == DIR_EGRESS ? remote : ep_identity;

	/* Judged again on the first packet after any policy change, so a change also reaches
	 * established flows. */
	struct policy_value *pv = 0;
	__u16 redirect_port = 0;
	int redirect = 0;
	if (enforce) {
		pv = lookup_policy(ep_id, remote, f.dport, f.proto, dir);
		if (!pv) {
			bpf_map_delete_elem(&mbr_ct_v2, &key);
			count(DROP_POLICY, dir, skb->len);
			emit(EVENT_DROP, DROP_POLICY, dir, skb, &f, ep_id, src_id, dst_id);
			return TC_ACT_SHOT;
		}
		/* What the proxy sends has passed its L7 rules already. */
		if (pv->action == POLICY_REDIRECT && !from_proxy) {
			redirect = 1;
			redirect_port = pv->proxy_port;
		}
	}
	/* A local destination whose ingress policy wants L7: the proxy must get the connection
	 * here, at TC ingress where bpf_sk_assign works, not at the destination's to_endpoint. */
	if (dir == DIR_EGRESS && !redirect) {
		/* The remote end of what leaves is the destination: rv is its ipcache entry. */
		if (rv && rv->endpoint_id) {
			struct policy_value *ipv = lookup_policy(rv->endpoint_id, ep_identity,
								 f.dport, f.proto, DIR_INGRESS);
			if (ipv && ipv->action == POLICY_REDIRECT) {
				redirect = 1;
				redirect_port = ipv->proxy_port;
			}
		}
	}
	/* No proxy, or not TCP: fail closed. */
	if (redirect && (!redirect_port || f.proto != IPPROTO_TCP)) {
		bpf_map_delete_elem(&mbr_ct_v2, &key);
		count(DROP_PROXY_LOOKUP_FAILED, dir, skb->len);
		emit(EVENT_DROP, DROP_PROXY_LOOKUP_FAILED, dir, skb, &f, ep_id, src_id, dst_id);
		return TC_ACT_SHOT;
	}

	/* Redirected flows are never fast-pathed: each packet must be assigned to the proxy. */
	__u32 judged_rev = redirect ? 0 : revision;
	if (fwd && fwd->expires_ns > now) {
		ct_touch(fwd, &f, now, skb->len, 0);
		fwd->remote_identity = remote;
		fwd->policy_rev = judged_rev;
	} else {
		struct ct_value v = {};
		v.remote_identity = remote;
		v.endpoint_id = ep_id;
		v.dir = dir;
		v.expires_ns = now + lifetime(&f, 0);
		v.packets = 1;
		v.bytes = skb->len;
		v.policy_rev = judged_rev;
		bpf_map_update_elem(&mbr_ct_v2, &key, &v, BPF_ANY);
		emit(EVENT_VERDICT, 0, dir, skb, &f, ep_id, src_id, dst_id);
	}
	if (redirect && assign_to_proxy(skb, &f, redirect_port)) {
		/* The proxy is not listening (stopped, restarting): never let the flow bypass it. */
		count(DROP_PROXY_LOOKUP_FAILED, dir, skb->len);
		emit(EVENT_DROP, DROP_PROXY_LOOKUP_FAILED, dir, skb, &f, ep_id, src_id, dst_id);
		return TC_ACT_SHOT;
	}
	count(0, dir, skb->len);
	return TC_ACT_OK;
}

SEC("classifier")
int from_endpoint(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

SEC("classifier")
int to_endpoint(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}
