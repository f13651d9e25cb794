#!/usr/bin/env bash
# Starts the Node `ws` peer on 127.0.0.1:$PORT (default 8392), pinned to core $PIN_CPU
# (default 0); runs `npm ci` the first time. Prints its process id on stdout.
# Env: PORT, PIN_CPU, LOG (default /tmp/herald-bench-node.log).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${PORT:-8392}"
log="${LOG:-/tmp/herald-bench-node.log}"
if [ ! -d "$here/node_modules/ws" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is already in use" >&2
  exit 1
fi
ulimit -n 20000 2>/dev/null || true
taskset -c "${PIN_CPU:-0}" node "$here/server.js" "$port" >"$log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
if ! kill -0 "$pid" 2>/dev/null; then
  echo "node peer did not start; see $log" >&2
  exit 1
fi
echo "node ws peer on 127.0.0.1:$port (pid $pid)" >&2
echo "$pid"
