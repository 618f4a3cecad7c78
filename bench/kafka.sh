#!/usr/bin/env bash
# Kafka proxy benchmark, one interleaved run on this machine (loopback only), against one broker
# build (tansu 0.6 from the pinned wheel unless MEMBRANE_TANSU=cargo; compare only within a run):
#   direct       kcat -> tansu broker
#   membrane     kcat -> membrane-proxy --upstream (parses and judges every request: produce and
#                consume rules on topic perf) -> broker
#   tansu_proxy  kcat -> `tansu proxy` (a Kafka-aware Rust proxy) -> broker
#   envoy_tcp    kcat -> Envoy 1.40 tcp_proxy (L4 only: the PyPI build has no kafka_broker filter,
#                so this is the floor for any proxy) -> broker
# Throughput: kcat (librdkafka 2.16) produces N messages of SIZE bytes, acks=1, linger.ms=5, to a
# fresh in-memory broker; acked records are counted by reading the tail back. CPU per message is
# utime+stime of the proxy process from /proc. Latency: a paced probe (confluent-kafka, LAT_N
# messages at LAT_RATE/s, same linger and acks) reports p50/p99 of produce-to-ack time. Every
# proxy needs the broker to advertise the proxy's address (none but tansu proxy rewrites
# Metadata); the script checks the advertised address before each run.
# Loadgen on CPU $LG_CPU, broker and proxies on CPU $SRV_CPU. Repetitions interleaved, medians.
#
# Knobs: N=100000 SIZE=1024 REPS=3 LAT_N=2000 LAT_RATE=1000 PIN=1 LG_CPU=0 SRV_CPU=1 PROXY_BIN=
# Ports: 127.0.0.2:18092 (broker), 127.0.0.1:18093-18095, 18903. Kills only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
need_cargo
N=${N:-100000}; SIZE=${SIZE:-1024}; REPS=${REPS:-3}; LAT_N=${LAT_N:-2000}; LAT_RATE=${LAT_RATE:-1000}
PIN=${PIN:-1}; LG_CPU=${LG_CPU:-0}; SRV_CPU=${SRV_CPU:-1}
BROKER_IP=127.0.0.2; P_BROKER=18092; P_ENVOY=18093; P_TPROXY=18094; P_MEMBRANE=18095; P_ADMIN=18903

apt_need taskset util-linux; apt_need curl curl
kafka_clients
TANSU=$(tansu_bin)
TANSU_KIND=${MEMBRANE_TANSU:-wheel}
ENVOY=$(envoy_bin)
# PROXY_BIN=PATH measures another build (say, an earlier commit's) in place of this tree's.
if [ -z "${PROXY_BIN:-}" ]; then
  cargo build --release --quiet -p membrane-l7-proxy --bin membrane-proxy
  PROXY_BIN="$CARGO_TARGET_DIR/release/membrane-proxy"
fi
export LD_LIBRARY_PATH="$KCAT_LD_LIBRARY_PATH"

. bench/lib.sh
bench_setup kafka

for p in $P_BROKER $P_ENVOY $P_TPROXY $P_MEMBRANE $P_ADMIN; do
  if ss -ltn "( sport = :$p )" | grep -q LISTEN; then echo "port $p busy (ss -ltnp)" >&2; exit 1; fi
done

MSGS="$WORK/msgs.txt"
python3 - "$MSGS" "$N" "$SIZE" <<'PY'
import sys
path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pad = b'x' * size
with open(path, 'wb') as f:
    for i in range(n):
        f.write((b'%08d' % i + pad)[:size] + b'\n')
PY

# membrane: the broker is workload kafka; clients on 127.0.0.1 are world.
cat > "$WORK/identities.yaml" <<EOF
endpoints:
  - name: kafka
    labels: {app: kafka}
    ips: [$BROKER_IP]
EOF
cat > "$WORK/policy/kafka.yaml" <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-bench, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "$P_BROKER", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: perf}
        - {role: consume, topic: perf}
EOF
cat > "$WORK/envoy.yaml" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $P_ADMIN}}}
static_resources:
  listeners:
  - name: kafka
    address: {socket_address: {address: 127.0.0.1, port_value: $P_ENVOY}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: kafka_tcp
          cluster: tansu
  clusters:
  - name: tansu
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: tansu
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $BROKER_IP, port_value: $P_BROKER}}}}]}]
EOF

wait_port() { for _ in $(seq 1 400); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.025; done; return 1; }
stop() { for p in "$@"; do kill "$p" 2>/dev/null || true; done; for p in "$@"; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done; }
start_broker() {  # start_broker ADVERTISED_HOST:PORT; sets BPID
  bg_pin "$SRV_CPU" "$TANSU" broker --listener-url "tcp://$BROKER_IP:$P_BROKER" \
    --advertised-listener-url "tcp://$1" --storage-engine memory://tansu/ >"$WORK/log/broker.log" 2>&1 &
  BPID=$!; PIDS+=("$BPID"); wait_port "$BROKER_IP" "$P_BROKER"
  "$TANSU" topic create --broker "tcp://$BROKER_IP:$P_BROKER" --partitions 1 perf >/dev/null
}
acked() {  # records acked = last offset + 1, read back through the entry point
  "$KAFKA_PYTHON" - "$1" <<'PY'
import sys
from confluent_kafka import Consumer, TopicPartition
c = Consumer({'bootstrap.servers': sys.argv[1], 'group.id': 'hw', 'enable.partition.eof': True,
              'enable.auto.commit': False})
lo, hi = c.get_watermark_offsets(TopicPartition('perf', 0), timeout=10)
# tansu's ListOffsets(latest) is the last batch's base offset: read on from there.
c.assign([TopicPartition('perf', 0, max(0, hi - 1))])
last = -1
while True:
    m = c.poll(10)
    if m is None:
        break
    if m.error():
        if m.error().code() == -191:
            break
        continue
    last = max(last, m.offset())
print(last + 1)
c.close()
PY
}
latency_probe() {  # p50/p99 ms of produce-to-ack, paced
  pin "$LG_CPU" "$KAFKA_PYTHON" - "$1" "$LAT_N" "$LAT_RATE" "$SIZE" <<'PY'
import sys, time
from confluent_kafka import Producer
bs, n, rate, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lat = []
p = Producer({'bootstrap.servers': bs, 'acks': 1, 'linger.ms': 5, 'enable.metrics.push': False})
def cb(err, msg):
    if err is None:
        lat.append(msg.latency())
p.produce('perf', b'warm'); p.flush(10)
lat.clear()
payload = b'x' * size
start = time.perf_counter()
for i in range(n):
    while time.perf_counter() < start + i / rate:
        p.poll(0)
    p.produce('perf', payload, on_delivery=cb)
p.flush(30)
lat.sort()
q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000
print(f"{q(0.5):.2f} {q(0.99):.2f} {len(lat)}")
PY
}

RES="$WORK/res/results.tsv"; : > "$RES"
run_one() {  # run_one NAME REP
  local name=$1 rep=$2 boot proxy=""
  case "$name" in
    direct) boot=$P_BROKER ;;
    membrane) boot=$P_MEMBRANE ;;
    tansu_proxy) boot=$P_TPROXY ;;
    envoy_tcp) boot=$P_ENVOY ;;
  esac
  # tansu proxy rewrites Metadata itself; every other proxy needs the broker to advertise it.
  local entry="127.0.0.1:$boot"
  [ "$name" = direct ] && entry="$BROKER_IP:$P_BROKER"
  if [ "$name" = tansu_proxy ]; then start_broker "$BROKER_IP:$P_BROKER"; else start_broker "$entry"; fi
  case "$name" in
    membrane)
      bg_pin "$SRV_CPU" "$PROXY_BIN" --policy-dir "$WORK/policy" --identities "$WORK/identities.yaml" \
        --listen "127.0.0.1:$P_MEMBRANE" --upstream "$BROKER_IP:$P_BROKER" --workers 1 >"$WORK/log/membrane.log" 2>&1 &
      proxy=$!; PIDS+=("$proxy"); wait_port 127.0.0.1 "$P_MEMBRANE" ;;
    tansu_proxy)
      bg_pin "$SRV_CPU" "$TANSU" proxy --listener-url "tcp://127.0.0.1:$P_TPROXY" \
        --advertised-listener-url "tcp://127.0.0.1:$P_TPROXY" --origin-url "tcp://$BROKER_IP:$P_BROKER" \
        >"$WORK/log/tansu-proxy.log" 2>&1 &
      proxy=$!; PIDS+=("$proxy"); wait_port 127.0.0.1 "$P_TPROXY" ;;
    envoy_tcp)
      bg_pin "$SRV_CPU" "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --disable-hot-restart \
        --base-id 18093 --log-level warn >"$WORK/log/envoy.log" 2>&1 &
      proxy=$!; PIDS+=("$proxy")
      for _ in $(seq 1 400); do [ "$(curl -s "http://127.0.0.1:$P_ADMIN/ready" 2>/dev/null)" = LIVE ] && break; sleep 0.025; done ;;
  esac
  local md; md=$(kcat -L -b "$entry" -t perf 2>&1 | grep -o 'broker 111 at [0-9.:]*' | head -1 || true)
  if [ "$md" != "broker 111 at $entry" ]; then
    echo "$name: metadata advertises '$md', expected $entry (clients would bypass the proxy)" >&2; exit 1
  fi
  local b0 p0 t0 t1 b1 p1
  b0=$(cpu_ticks "$BPID"); p0=$(cpu_ticks $proxy); t0=$(date +%s.%N)
  pin "$LG_CPU" kcat -P -b "$entry" -t perf -X acks=1 -X linger.ms=5 <"$MSGS" 2>"$WORK/log/kcat-$name-$rep.err" || true
  t1=$(date +%s.%N); b1=$(cpu_ticks "$BPID"); p1=$(cpu_ticks $proxy)
  local hw; hw=$(acked "$entry" 2>/dev/null || echo 0)
  local lat; lat=$(latency_probe "$entry" 2>"$WORK/log/latency-$name-$rep.err" || echo "0 0 0")
  local rss=0; [ -n "$proxy" ] && rss=$(awk '/VmHWM/{print $2}' "/proc/$proxy/status")
  python3 - "$name" "$rep" "$t0" "$t1" "$hw" "$SIZE" "$b0" "$b1" "$p0" "$p1" "$(getconf CLK_TCK)" "$lat" "$rss" >>"$RES" <<'PY'
import sys
name, rep, t0, t1, hw, size, b0, b1, p0, p1, hz, lat, rss = sys.argv[1:]
el = float(t1) - float(t0); hw = int(hw)
cpu = lambda a, b: (int(b) - int(a)) * 1e6 / int(hz) / max(1, hw)
p50, p99, nlat = lat.split()
print(f"{name}\t{rep}\t{el:.3f}\t{hw/el:.0f}\t{cpu(b0, b1):.2f}\t{cpu(p0, p1):.2f}\t{hw}\t{p50}\t{p99}\t{rss}")
PY
  log "$name rep$rep: $(tail -1 "$RES" | awk -F'\t' '{printf "%s msg/s, broker %s us/msg, proxy %s us/msg, acked %s, produce p50 %s ms p99 %s ms", $4,$5,$6,$7,$8,$9}')"
  stop $proxy "$BPID"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load $LOAD_BEFORE; N=$N x ${SIZE}B acks=1 linger 5 ms; $(kcat -V | grep -o 'librdkafka [0-9.]*'); tansu=$TANSU_KIND"
for rep in $(seq 1 "$REPS"); do
  for s in direct membrane tansu_proxy envoy_tcp; do run_one "$s" "$rep"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$RES" "$LOAD_BEFORE" "$LOAD_AFTER" "$N" "$SIZE" "$TANSU_KIND" <<'PY' | tee "$WORK/res/summary.txt"
import sys, statistics as st, collections
res, lb, la, n, size, tansu = sys.argv[1:]
rows = collections.defaultdict(list); order = []
for line in open(res):
    name, rep, el, mps, bcpu, pcpu, hw, p50, p99, rss = line.rstrip('\n').split('\t')
    order.append(name) if name not in order else None
    rows[name].append(dict(mps=float(mps), bcpu=float(bcpu), pcpu=float(pcpu), hw=int(hw),
                           p50=float(p50), p99=float(p99), rss=int(rss)))
med = lambda name, k: st.median(r[k] for r in rows[name])
print(f"# kafka bench: {n} x {size} B, acks=1, linger 5 ms; tansu={tansu}; load {lb} -> {la}")
print(f"{'target':12} {'msg/s':>9} {'ratio':>6} {'proxy us/msg':>12} {'broker us/msg':>13} {'p50 ms':>7} {'p99 ms':>7} {'peak RSS KiB':>12}  acked")
base = med('direct', 'mps')
for name in order:
    print(f"{name:12} {med(name, 'mps'):9.0f} {med(name, 'mps') / base:6.3f} {med(name, 'pcpu'):12.2f} "
          f"{med(name, 'bcpu'):13.2f} {med(name, 'p50'):7.2f} {med(name, 'p99'):7.2f} {max(r['rss'] for r in rows[name]):12}  "
          + ",".join(str(r['hw']) for r in rows[name]))
short = [r['hw'] for name in order for r in rows[name] if r['hw'] < int(n)]
if short:
    print(f"WARNING: some runs acked fewer than {n} records: {short}")
ratio = med('membrane', 'mps') / base
cpu = med('membrane', 'pcpu')
for label, ok, v in [("membrane/direct throughput >= 0.90", ratio >= 0.90, f"{ratio:.3f}"),
                     ("membrane proxy CPU <= 1.2 us/msg", cpu <= 1.2, f"{cpu:.2f}"),
                     ("membrane CPU below tansu proxy", cpu < med('tansu_proxy', 'pcpu'), f"{cpu:.2f} vs {med('tansu_proxy', 'pcpu'):.2f}")]:
    print(f"{'MET ' if ok else 'MISS'} {label}: {v}")
print("KAFKA-BENCH " + " ".join(
    f"{name}={med(name, 'mps'):.0f}msg/s" if name == 'direct' else
    f"{name}/direct={med(name, 'mps') / base:.3f}(cpu={med(name, 'pcpu'):.2f}us/msg,p99={med(name, 'p99'):.2f}ms)"
    for name in order) + f" tansu={tansu} load={lb}->{la}")
PY
