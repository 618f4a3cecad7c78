#!/usr/bin/env bash
# The main job on the embedded default: build membrane, then judge the bundled "empire" demo's
# flows against its example policy with `membrane policy trace`, and print what was allowed and
# denied, and why. (The datapath issue replaces this with the live agent and real traffic.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
need_cargo
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3; }

echo "==> building membrane (release)"
cargo build --release --bin membrane --quiet
bin="$CARGO_TARGET_DIR/release/membrane"
ex=examples/starwars

echo "==> validating $ex/policy"
"$bin" policy validate "$ex/policy"

# name | trace arguments
flows=(
  "tiefighter -> deathstar  POST /v1/request-landing|--src-ip 10.200.0.11 --dst-ip 10.200.0.10 --dport 80 --http-method POST --http-path /v1/request-landing"
  "tiefighter -> deathstar  PUT /v1/exhaust-port|--src-ip 10.200.0.11 --dst-ip 10.200.0.10 --dport 80 --http-method PUT --http-path /v1/exhaust-port"
  "tiefighter -> deathstar  GET /v1/status + clearance|--src-ip 10.200.0.11 --dst-ip 10.200.0.10 --dport 80 --http-method GET --http-path /v1/status --http-header X-Empire-Clearance:top-secret"
  "xwing      -> deathstar  POST /v1/request-landing|--src-ip 10.200.1.20 --dst-ip 10.200.0.10 --dport 80 --http-method POST --http-path /v1/request-landing"
  "host       -> deathstar  22/TCP|--src reserved:host --dst-ip 10.200.0.10 --dport 22"
  "xwing      -> 10.1.2.3   443/TCP (empire range)|--src-ip 10.200.1.20 --dst-ip 10.1.2.3 --dport 443"
  "xwing      -> 192.0.2.1  443/TCP (the galaxy)|--src-ip 10.200.1.20 --dst-ip 192.0.2.1 --dport 443"
  "xwing      -> 10.1.2.3   53/UDP (DNS)|--src-ip 10.200.1.20 --dst-ip 10.1.2.3 --dport 53/UDP"
  "empire-hq  -> kafka      produce empire-announce|--src-ip 10.200.0.13 --dst-ip 10.200.0.12 --dport 9092 --kafka-api-key produce --kafka-api-version 9 --kafka-topic empire-announce"
  "outpost    -> kafka      fetch empire-announce|--src-ip 10.200.0.14 --dst-ip 10.200.0.12 --dport 9092 --kafka-api-key fetch --kafka-api-version 12 --kafka-topic empire-announce"
  "outpost    -> kafka      fetch deathstar-plans|--src-ip 10.200.0.14 --dst-ip 10.200.0.12 --dport 9092 --kafka-api-key fetch --kafka-api-version 12 --kafka-topic deathstar-plans"
  "tiefighter -> outpost    8080/TCP|--src-ip 10.200.0.11 --dst-ip 10.200.0.14 --dport 8080"
  "xwing      -> outpost    8080/TCP|--src-ip 10.200.1.20 --dst-ip 10.200.0.14 --dport 8080"
)

printf '\n%-52s %-8s %s\n' FLOW VERDICT WHY
printf '%-52s %-8s %s\n' ---- ------- ---
for f in "${flows[@]}"; do
  name=${f%%|*}
  read -r -a args <<<"${f#*|}"
  "$bin" policy trace --policy-dir "$ex/policy" --endpoints "$ex/endpoints.yaml" "${args[@]}" -o json |
    python3 -c 'import json,sys; t=json.load(sys.stdin); print(t["verdict"].upper() if t["verdict"]=="denied" else t["verdict"], "\t", t["reason"])' |
    { IFS=$'\t' read -r verdict why; printf '%-52s %-8s %s\n' "$name" "$verdict" "$why"; }
done
echo
echo "Try one yourself:  $bin policy trace --policy-dir $ex/policy --endpoints $ex/endpoints.yaml --src-ip 10.200.1.20 --dst-ip 10.200.0.10 --dport 80"
