#!/usr/bin/env bash
# Datapath benchmark, one interleaved run on this machine:
#   - iperf3 TCP throughput and a TCP request/response rate between two endpoints, with membrane's
#     programs and a 1,000-rule policy (10,000 CIDR identities) vs. two plain namespaces;
#   - policy change to datapath: p99 from a policy file write to the policy-map update;
#   - agent RSS with those 10,000 identities and 1,000 rules.
# Prints each figure and the ratios. Needs root; installs iperf3 when missing.
#
# Network rule: membrane endpoints in 10.254.0.0/24, plain namespaces in 10.253.0.0/24, both
# covered by unreachable routes; everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/datapath.sh needs root" >&2; exit 1; }
. scripts/env.sh
need_cargo
apt_need iperf3 iperf3
ROUNDS=${ROUNDS:-10}
SECS=${SECS:-3}

cargo build --release --quiet --bin membrane --bin membrane-agent --bin membrane-bench-rr
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d /tmp/membrane-bench.XXXXXX)
mkdir -p "$work/policy" "$work/bpf"
export MEMBRANE_API_SOCKET="$work/membrane.sock"
fwd=$(cat /proc/sys/net/ipv4/ip_forward)
agent_pid=""; pids=()

cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  if [ -n "$agent_pid" ]; then
    for e in bench-srv bench-cli; do "$bin/membrane" endpoint delete "$e" >/dev/null 2>&1; done
    kill "$agent_pid"; wait "$agent_pid" 2>/dev/null
  fi
  for n in bench-srv bench-cli plain-srv plain-cli; do ip netns del "$n" 2>/dev/null; done
  for h in plainsrv plaincli; do ip link del "$h" 2>/dev/null; done
  ip route del 10.253.0.1/32 2>/dev/null; ip route del 10.253.0.2/32 2>/dev/null
  ip route del unreachable 10.253.0.0/24 2>/dev/null; ip route del unreachable 10.254.0.0/24 2>/dev/null
  rm -rf "$work/bpf/links"; rm -f "$work"/bpf/mbr_* 2>/dev/null; umount "$work/bpf" 2>/dev/null
  cp "$work/agent.log" /tmp/bench-agent.log 2>/dev/null; rm -rf "$work"; sysctl -qw net.ipv4.ip_forward="$fwd"
}
trap cleanup EXIT

# 1,000 rules: 999 for other apps (100 of them naming 100 CIDRs each: 10,000 CIDR identities),
# and the one that allows the benchmark's traffic.
python3 - "$work/policy" <<'PY'
import os, sys
out = []
for r in range(999):
    cidrs = ""
    if r < 100:
        cidrs = "  - toCIDR: [" + ", ".join(f"172.{16 + r // 50}.{(r % 50) * 5 + i // 20}.{(i % 20) * 8}/29" for i in range(100)) + "]\n"
    out.append(f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: rule{r}}}\nspec:\n"
               f"  endpointSelector: {{matchLabels: {{app: app{r}}}}}\n"
               f"  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: app{(r * 7 + 1) % 999}}}}}]\n"
               f"    toPorts: [{{ports: [{{port: \"{80 + r % 20}\", protocol: TCP}}]}}]\n"
               + ("  egress:\n" + cidrs if cidrs else ""))
out.append("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench}\nspec:\n"
           "  endpointSelector: {matchLabels: {app: bench-srv}}\n  ingress:\n"
           "  - fromEndpoints: [{matchLabels: {app: bench-cli}}]\n"
           "    toPorts: [{ports: [{port: \"5201\", protocol: TCP}, {port: \"7000\", protocol: TCP}]}]\n")
# One policy per file, as a policy directory usually is.
for i, doc in enumerate(out):
    open(os.path.join(sys.argv[1], f"rule{i:04}.yaml" if i < 999 else "bench.yaml"), "w").write(doc)
PY

# Plain namespaces: the same plumbing, no programs.
sysctl -qw net.ipv4.ip_forward=1
ip route add unreachable 10.253.0.0/24
for p in "srv 10.253.0.1" "cli 10.253.0.2"; do
  set -- $p
  ip netns add "plain-$1"; ip link add "plain$1" type veth peer name eth0 netns "plain-$1"
  ip link set "plain$1" up; sysctl -qw "net.ipv4.conf.plain$1.proxy_arp=1" "net.ipv4.neigh.plain$1.proxy_delay=0"
  ip -n "plain-$1" link set lo up; ip -n "plain-$1" link set eth0 up
  ip -n "plain-$1" addr add "$2/32" dev eth0; ip -n "plain-$1" route add default dev eth0
  ip route add "$2/32" dev "plain$1"
done

start=$(date +%s%N)
"$bin/membrane-agent" --policy-dir "$work/policy" --state-dir "$work/state" --bpf-root "$work/bpf" \
  --api-socket "$MEMBRANE_API_SOCKET" --ipv4-range 10.254.0.0/24 2>"$work/agent.log" &
agent_pid=$!
until "$bin/membrane" status >/dev/null 2>&1; do sleep 0.05; done
echo "agent ready in $(( ($(date +%s%N) - start) / 1000000 )) ms: $("$bin/membrane" status -o json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["policy"]["rules"], "rules,", s["identities"], "identities")')"
read -r srv_ip srv_id < <("$bin/membrane" endpoint create bench-srv --labels app=bench-srv -o json | python3 -c 'import json,sys; e=json.load(sys.stdin); print(e["addresses"][0], e["id"])')
"$bin/membrane" endpoint create bench-cli --labels app=bench-cli >/dev/null

for ns in bench-srv plain-srv; do
  # In the foreground of a tracked PID: a daemonized server would outlive its namespace.
  ip netns exec "$ns" iperf3 -s >/dev/null 2>&1 &
  pids+=($!)
  ip netns exec "$ns" "$bin/membrane-bench-rr" serve 7000 &
  pids+=($!)
done
sleep 0.5

gbps() { ip netns exec "$1" iperf3 -c "$2" -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }
# Round trips per second of one TCP connection from each client, 1-byte messages, the two
# connections taking turns every few milliseconds: prints "plain membrane".
rr() { "$bin/membrane-bench-rr" plain-cli 10.253.0.1:7000 bench-cli "$srv_ip:7000" "$SECS"; }

# This shared VM drifts by tens of percent within a minute: each round measures both sides' throughput
# back to back, alternating which goes first (the request/response peer interleaves by itself),
# and the per-round ratios are reported with the medians.
declare -a t_plain t_mbr r_plain r_mbr t_ratio r_ratio
for i in $(seq "$ROUNDS"); do
  if (( i % 2 )); then
    tp1=$(gbps plain-cli 10.253.0.1); tm1=$(gbps bench-cli "$srv_ip")
  else
    tm1=$(gbps bench-cli "$srv_ip"); tp1=$(gbps plain-cli 10.253.0.1)
  fi
  rates=$(rr); read -r rp1 rm1 <<<"$rates"
  t_plain+=("$tp1"); t_mbr+=("$tm1"); r_plain+=("$rp1"); r_mbr+=("$rm1")
  t_ratio+=("$(echo "$tm1 / $tp1" | bc -l)"); r_ratio+=("$(echo "$rm1 / $rp1" | bc -l)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
tp=$(median "${t_plain[@]}"); tm=$(median "${t_mbr[@]}"); rp=$(median "${r_plain[@]}"); rm_=$(median "${r_mbr[@]}")
tr=$(median "${t_ratio[@]}"); rr_=$(median "${r_ratio[@]}")

# Policy change to map update: add port 7001 to the bench rule, wait for the map entry; 20 times.
lat=$(python3 - "$bin/membrane" "$work" "$srv_id" <<'PY'
import json, os, subprocess, sys, time
membrane, work, ep = sys.argv[1], sys.argv[2], sys.argv[3]
path = os.path.join(work, "policy", "bench.yaml")
base = open(path).read()
def has(port):
    # By endpoint id: the map is read directly, without asking the agent.
    out = subprocess.run([membrane, "bpf", "policy", "get", ep, "--bpf-root", os.path.join(work, "bpf"), "-o", "json"], capture_output=True, text=True).stdout
    return any(e["port"] == port for e in json.loads(out))
lat = []
for i in range(20):
    port = 7001 + i
    text = base.replace('{port: "7000", protocol: TCP}]', f'{{port: "7000", protocol: TCP}}, {{port: "{port}", protocol: TCP}}]')
    tmp = path + ".tmp"
    open(tmp, "w").write(text)
    t0 = time.monotonic(); os.rename(tmp, path)
    while not has(port):
        pass
    lat.append((time.monotonic() - t0) * 1000)
lat.sort()
print(f"{lat[len(lat) // 2]:.1f} {lat[int(len(lat) * 0.99) - 1 if len(lat) >= 100 else -1]:.1f}")
PY
)
rss=$(awk '/VmRSS/ {print $2/1024}' "/proc/$agent_pid/status")
hwm=$(awk '/VmHWM/ {print $2/1024}' "/proc/$agent_pid/status")

printf '\nmembrane datapath benchmark (%s rounds of %ss, medians)\n' "$ROUNDS" "$SECS"
printf '  TCP throughput      plain %6.2f Gbit/s   membrane %6.2f Gbit/s   ratio of medians %.3f, median of round ratios %.3f (target >= 0.95)\n' "$tp" "$tm" "$(echo "$tm / $tp" | bc -l)" "$tr"
printf '  TCP req/resp rate   plain %8.0f /s     membrane %8.0f /s     ratio of medians %.3f, median of round ratios %.3f (target >= 0.95)\n' "$rp" "$rm_" "$(echo "$rm_ / $rp" | bc -l)" "$rr_"
printf '  round ratios: throughput %s; req/resp %s\n' "$(printf '%.2f ' "${t_ratio[@]}")" "$(printf '%.2f ' "${r_ratio[@]}")"
set -- $lat
printf '  policy change -> map update: p50 %s ms, p99 (max of 20) %s ms (target p99 < 100 ms)\n' "$1" "$2"
printf '  agent RSS with 1,000 rules and 10,000 identities: %.1f MB (peak %.1f MB; target < 64 MB)\n' "$rss" "$hwm"
