# Shared by the benchmark scripts (sourced): a work directory that is removed on exit (its res/
# copied to /tmp/membrane-NAME-bench-last), the processes started (PIDS) ended on exit, logging,
# CPU pinning and per-process CPU ticks.
# bench_setup NAME: creates $WORK and installs the exit trap.
bench_setup() {
  BENCH_NAME=$1
  WORK=$(mktemp -d "/tmp/membrane-$1-bench.XXXXXX")
  mkdir -p "$WORK"/{log,res,policy}
  PIDS=()
  trap bench_cleanup EXIT INT TERM
}
bench_cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  cp -r "$WORK/res" "/tmp/membrane-$BENCH_NAME-bench-last" 2>/dev/null || true
  rm -rf "$WORK"
}
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
pin() { if [ "$PIN" = 1 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# For "cmd &": $! is then the server's own PID.
bg_pin() { if [ "$PIN" = 1 ]; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
# utime+stime ticks of the given PIDs, summed.
cpu_ticks() { local t=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
