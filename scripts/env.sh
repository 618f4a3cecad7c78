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
