#!/usr/bin/env bash
# Starts Herald with herald.toml on 127.0.0.1:$PORT (default 8080), pinned to core $PIN_CPU
# (default 0), without the caller's HERALD_* settings. Prints its process id on stdout.
# Env: BIN (default: release/herald under $CARGO_TARGET_DIR or target/), PORT, PIN_CPU,
# LOG (default /tmp/herald-bench-herald.log).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
bin="${BIN:-${CARGO_TARGET_DIR:-$root/target}/release/herald}"
port="${PORT:-8080}"
log="${LOG:-/tmp/herald-bench-herald.log}"
[ -x "$bin" ] || { echo "no $bin: run cargo build --release -p herald-cli" >&2; exit 1; }
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is already in use" >&2
  exit 1
fi
ulimit -n 20000 2>/dev/null || true
# shellcheck disable=SC2046 # one -u per variable
env $(env | grep -o '^HERALD_[A-Za-z0-9_]*' | sed 's/^/-u /') \
  taskset -c "${PIN_CPU:-0}" "$bin" serve --config "$here/herald.toml" --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
if ! kill -0 "$pid" 2>/dev/null; then
  echo "herald did not start; see $log" >&2
  exit 1
fi
echo "herald on 127.0.0.1:$port (pid $pid)" >&2
echo "$pid"
