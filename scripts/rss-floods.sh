#!/usr/bin/env bash
# Herald's resident memory after floods of publications to new channels expire:
#   scripts/rss-floods.sh [-n CHANNELS] [-f FLOODS] [BINARY]    (default: target/release/herald)
# Starts BINARY on a free loopback port with history_ttl 2s, then FLOODS times: publishes one
# 100-byte publication to each of CHANNELS new channels (POST /api/publish from 8 keep-alive
# connections at once, so Herald's worker threads all allocate), waits until the gauge
# herald_stored_channels is back to 0 (at most 120 s), and prints VmRSS from /proc/<pid>/status. The environment passes through, so compare allocator
# settings with e.g. `MALLOC_ARENA_MAX=2 scripts/rss-floods.sh`. Bounded: CHANNELS × FLOODS
# publications on 127.0.0.1 only.
set -euo pipefail
channels=100000 floods=3
while getopts n:f: o; do case $o in n) channels=$OPTARG ;; f) floods=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
root=$(git rev-parse --show-toplevel)
bin=${1:-${CARGO_TARGET_DIR:-$root/target}/release/herald}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
HERALD_CHANNELS__DEFAULT__HISTORY_TTL=2s HERALD_API__KEY= "$bin" serve --listen "127.0.0.1:$port" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.1; done
rss() { awk '/^VmRSS/ {print $2 / 1024 " MB"}' "/proc/$pid/status"; }
echo "start: rss $(rss)"
for flood in $(seq "$floods"); do
  python3 - "$port" "$channels" "$flood" <<'PY'
import http.client, json, sys, threading
port, n, flood = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data, failed = "x" * 100, []
def publish(part):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(part, n, 8):
        c.request("POST", "/api/publish", json.dumps({"channel": f"flood{flood}-{i}", "data": data}),
                  {"Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status != 200:
            failed.append(f"publish {i}: HTTP {r.status}"); return
threads = [threading.Thread(target=publish, args=(p,)) for p in range(8)]
for t in threads: t.start()
for t in threads: t.join()
if failed: sys.exit(failed[0])
PY
  peak=$(rss)
  sleep 2 # the history_ttl
  for _ in $(seq 1200); do
    left=$(curl -sf "http://127.0.0.1:$port/metrics" | awk '$1 == "herald_stored_channels" {print $2}')
    [ "${left:-0}" = 0 ] && break
    sleep 0.1
  done
  echo "flood $flood: $channels channels, rss after publishing $peak, stored channels now ${left:-0}, rss $(rss)"
done
