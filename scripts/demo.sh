#!/usr/bin/env bash
# The main job on the embedded default: build membrane, start the standalone agent on the bundled
# "empire" example policy, create endpoints (network namespaces), send real TCP traffic between
# them, print what was allowed and denied and why, and clean up (also on failure or Ctrl-C).
#
# Network rule: every endpoint address is in 10.202.0.0/24, which the agent covers with an
# unreachable route; traffic goes only between the namespaces this script creates and the host.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "membrane demo: needs root (network namespaces, BPF)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi
. scripts/env.sh
need_cargo

missing=()
command -v clang-19 >/dev/null || missing+=(clang-19 llvm-19)
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
command -v ip >/dev/null || missing+=(iproute2)
command -v python3 >/dev/null || missing+=(python3)
command -v protoc >/dev/null || missing+=(protobuf-compiler)  # api/ (membrane's xDS resources)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "==> building membrane and membrane-agent (release)"
cargo build --release --quiet --bin membrane --bin membrane-agent
bin="$CARGO_TARGET_DIR/release"
ex=examples/starwars
range=10.202.0.0/24

work=$(mktemp -d /tmp/membrane-demo.XXXXXX)
mkdir -p "$work/bpf" "$work/policy"
cp "$ex"/policy/*.yaml "$work/policy/"
export MEMBRANE_API_SOCKET="$work/membrane.sock"
forwarding_before=$(cat /proc/sys/net/ipv4/ip_forward)
agent_pid=""
pids=()
endpoints=(deathstar tiefighter xwing outpost)

cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  if [ -n "$agent_pid" ]; then
    for e in "${endpoints[@]}"; do "$bin/membrane" endpoint delete "demo-$e" >/dev/null 2>&1; done
    kill "$agent_pid" 2>/dev/null
    wait "$agent_pid" 2>/dev/null
  fi
  for e in "${endpoints[@]}"; do ip netns del "demo-$e" 2>/dev/null; done
  ip route del unreachable "$range" 2>/dev/null
  rm -rf "$work/bpf/links"; rm -f "$work"/bpf/mbr_* 2>/dev/null
  umount "$work/bpf" 2>/dev/null
  rm -rf "$work"
  sysctl -qw net.ipv4.ip_forward="$forwarding_before"
  # The agent's policy routing for its L7 proxy (it only routes packets marked for the proxy).
  for fam in -4 -6; do
    ip "$fam" rule del fwmark 0x200/0xf00 lookup 100 2>/dev/null
    ip "$fam" route flush table 100 2>/dev/null
  done
}
trap cleanup EXIT

echo "==> starting membrane-agent on $ex/policy"
"$bin/membrane-agent" --policy-dir "$work/policy" --state-dir "$work/state" --bpf-root "$work/bpf" \
  --api-socket "$MEMBRANE_API_SOCKET" --ipv4-range "$range" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do "$bin/membrane" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/membrane" status

echo "==> creating endpoints"
declare -A ns labels ip
ns[deathstar]=empire;   labels[deathstar]=org=empire,class=deathstar
ns[tiefighter]=empire;  labels[tiefighter]=org=empire,class=tiefighter
ns[xwing]=rebels;       labels[xwing]=org=alliance,class=xwing
ns[outpost]=empire;     labels[outpost]=org=empire,app=empire-outpost
for e in "${endpoints[@]}"; do
  ip[$e]=$("$bin/membrane" endpoint create "demo-$e" --namespace "${ns[$e]}" --labels "${labels[$e]}" -o json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["addresses"][0])')
done
"$bin/membrane" endpoint list

serve() { # endpoint port...
  local e=$1; shift
  ip netns exec "demo-$e" python3 -c "
import socket,sys,threading
def run(p):
    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('${ip[$e]}',p)); s.listen(16)
    while True:
        c,_=s.accept(); c.sendall(b'ok'); c.close()
for p in map(int, sys.argv[1:]): threading.Thread(target=run,args=(p,),daemon=True).start()
threading.Event().wait()" "$@" &
  pids+=($!)
}
serve deathstar 22
serve outpost 8080
serve xwing 9000
# The Death Star's landing API: HTTP on port 80.
ip netns exec demo-deathstar python3 -c "
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def answer(self):
        self.rfile.read(int(self.headers.get('Content-Length') or 0))
        b = ('deathstar: ' + self.command + ' ' + self.path + ' ok').encode()
        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers(); self.wfile.write(b)
    do_GET = do_POST = do_PUT = answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('${ip[deathstar]}', 80), H).serve_forever()" &
pids+=($!)
for _ in $(seq 100); do ip netns exec demo-deathstar ss -Htln | grep -q ":80 " && break; sleep 0.1; done

connect() { # from(endpoint|host) to port
  local cmd=(python3 -c "import socket,sys; s=socket.create_connection(('${ip[$2]}',$3),timeout=1); sys.exit(0 if s.recv(2)==b'ok' else 1)")
  if [ "$1" = host ]; then "${cmd[@]}" 2>/dev/null; else ip netns exec "demo-$1" "${cmd[@]}" 2>/dev/null; fi
}

why() { # from to port
  local src=(--src "${labels[$1]:-}" --src-namespace "${ns[$1]:-default}")
  [ "$1" = host ] && src=(--src reserved:host)
  "$bin/membrane" policy trace --policy-dir "$work/policy" "${src[@]}" --dst "${labels[$2]}" --dst-namespace "${ns[$2]}" \
    --dport "$3" -o json | python3 -c '
import json,sys
t=json.load(sys.stdin)
l7=[d for d in t["directions"] if d["stage"]=="L7"]
note=" (HTTP rules apply: see the L7 table below)" if l7 else ""
print(t["reason"]+note)'
}

flows=(
  "tiefighter deathstar 22" "host deathstar 22" "tiefighter outpost 8080" "xwing outpost 8080"
  "outpost xwing 9000" "deathstar xwing 9000"
)
printf '\n%-34s %-8s %s\n' "FLOW (real TCP)" RESULT "WHY (membrane policy trace)"
printf '%-34s %-8s %s\n' --------------- ------ ---------------------------
for f in "${flows[@]}"; do
  read -r from to port <<<"$f"
  if connect "$from" "$to" "$port"; then result=allowed; else result=DENIED; fi
  printf '%-34s %-8s %s\n' "$from -> $to:$port" "$result" "$(why "$from" "$to" "$port")"
done

# L7: the datapath hands port-80 connections to the agent's HTTP proxy, which judges each request.
http() { # from method path [curl args...]
  local from=$1 method=$2 path=$3; shift 3
  ip netns exec "demo-$from" curl -s --max-time 2 -X "$method" "$@" -w ' [%{http_code}]' \
    "http://${ip[deathstar]}$path" 2>/dev/null | tr -d '\r\n' || true
}
printf '\n%-58s %s\n' "HTTP REQUEST (real curl, through membrane's L7 proxy)" "ANSWER [status]"
printf '%-58s %s\n' ------------------------------------------------------ ---------------
for r in "tiefighter POST /v1/request-landing" "tiefighter PUT /v1/exhaust-port" \
         "tiefighter GET /v1/status" "xwing POST /v1/request-landing"; do
  read -r from method path <<<"$r"
  out=$(http "$from" "$method" "$path" -d '')
  [ "$out" != " [000]" ] || out="(no answer: dropped at L3/L4, see the monitor below)"
  printf '%-58s %s\n' "$from: $method $path" "$out"
done
printf '%-58s %s\n' "tiefighter: GET /v1/status with X-Empire-Clearance" \
  "$(http tiefighter GET /v1/status -H 'X-Empire-Clearance: top-secret')"

echo
echo "==> datapath view of the deathstar (membrane bpf policy get) and the last drops (membrane monitor)"
"$bin/membrane" bpf policy get "$("$bin/membrane" endpoint get demo-deathstar -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')" --bpf-root "$work/bpf"
"$bin/membrane" monitor --bpf-root "$work/bpf" --timeout 0.2 | grep dropped | tail -n 4 || true
echo
echo "==> cleaning up"
