/* SPDX-License-Identifier: Apache-2.0 */
/* Packet parsing: Ethernet, IPv4, IPv6 (extension headers walked), TCP/UDP ports. */
#ifndef MEMBRANE_PARSE_H
#define MEMBRANE_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_endian.h>

#define PARSE_OK       0
#define PARSE_NOT_IP   1
#define PARSE_PASS_NDP 2
/* Negative: a drop reason. */

#define MAX_EXT_HEADERS 4

/* 8-byte aligned: conntrack compares the addresses a word at a time. */
struct flow {
	__u8 saddr[16] __attribute__((aligned(8)));
	__u8 daddr[16];
	__u16 sport; /* host order */
	__u16 dport; /* host order */
	__u8 proto;
	__u8 family; /* 4 or 6 */
	__u8 tcp_flags;
	__u8 icmp_type;
};

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static __always_inline int parse_l4(void *data, void *data_end, __u64 off, struct flow *f)
{
	if (f->proto == IPPROTO_TCP) {
		__u8 *tcp = data + off;
		if ((void *)(tcp + 14) > data_end)
			return -DROP_CT_INVALID_HDR;
		f->sport = ((__u16)tcp[0] << 8) | tcp[1];
		f->dport = ((__u16)tcp[2] << 8) | tcp[3];
		f->tcp_flags = tcp[13];
	} else if (f->proto == IPPROTO_UDP) {
		__u8 *udp = data + off;
		if ((void *)(udp + 4) > data_end)
			return -DROP_CT_INVALID_HDR;
		f->sport = ((__u16)udp[0] << 8) | udp[1];
		f->dport = ((__u16)udp[2] << 8) | udp[3];
	} else if (f->proto == IPPROTO_ICMPV6 || f->proto == IPPROTO_ICMP) {
		__u8 *icmp = data + off;
		if ((void *)(icmp + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		f->icmp_type = icmp[0];
	}
	return PARSE_OK;
}

static __always_inline int parse_packet(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IP;
	__u64 off = sizeof(*eth);

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + off;
		if ((void *)(ip + 1) > data_end)
			return -DROP_INVALID;
		if (ip->ihl < 5)
			return -DROP_INVALID;
		f->family = 4;
		__builtin_memset(f->saddr, 0, 16);
		__builtin_memset(f->daddr, 0, 16);
		f->saddr[10] = 0xff;
		f->saddr[11] = 0xff;
		f->daddr[10] = 0xff;
		f->daddr[11] = 0xff;
		__builtin_memcpy(&f->saddr[12], &ip->saddr, 4);
		__builtin_memcpy(&f->daddr[12], &ip->daddr, 4);
		f->proto = ip->protocol;
		/* Fragments carry no (or partial) L4 headers; policy cannot judge them. */
		if (ip->frag_off & bpf_htons(0x3fff))
			return -DROP_FRAG_NOSUPPORT;
		off += (__u64)ip->ihl * 4;
		return parse_l4(data, data_end, off, f);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;
		if ((void *)(ip6 + 1) > data_end)
			return -DROP_INVALID;
		f->family = 6;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		__u8 next = ip6->nexthdr;
		off += sizeof(*ip6);
#pragma unroll
		for (int i = 0; i < MAX_EXT_HEADERS; i++) {
			if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING ||
			    next == IPPROTO_DSTOPTS) {
				__u8 *ext = data + off;
				if ((void *)(ext + 2) > data_end)
					return -DROP_INVALID_EXTHDR;
				next = ext[0];
				off += ((__u64)ext[1] + 1) * 8;
			} else if (next == IPPROTO_FRAGMENT) {
				return -DROP_FRAG_NOSUPPORT;
			} else {
				break;
			}
		}
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
		    next == IPPROTO_AH || next == IPPROTO_ESP || next == 135 /* mobility */)
			return -DROP_INVALID_EXTHDR;
		f->proto = next;
		int ret = parse_l4(data, data_end, off, f);
		if (ret != PARSE_OK)
			return ret;
		/* Neighbour discovery always passes, or IPv6 dies when neighbour entries expire; so
		 * does multicast listener discovery (130-132, 143), link-local control traffic. */
		if (f->proto == IPPROTO_ICMPV6 &&
		    ((f->icmp_type >= 133 && f->icmp_type <= 137) ||
		     (f->icmp_type >= 130 && f->icmp_type <= 132) || f->icmp_type == 143))
			return PARSE_PASS_NDP;
		return PARSE_OK;
	}
	return PARSE_NOT_IP;
}

#endif
