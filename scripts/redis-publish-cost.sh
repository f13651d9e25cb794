#!/usr/bin/env bash
# Redis's own cost of Herald's publish script, per publication, at given git revisions:
#   scripts/redis-publish-cost.sh [-n CALLS] [-r RUNS] REV...     (e.g. 55c0bc2 HEAD)
# Starts a throwaway redis-server (from PATH) on a free port, loads each revision's
# PUBLISH_LUA (crates/herald/src/engine/redis/scripts.rs), and runs it CALLS times from 8
# redis-benchmark connections (1 channel, history size 1000 for 5 min, a 110-byte body).
# Prints, per run: Redis's usec_per_call for EVALSHA (INFO commandstats: time inside the
# script) and redis-server's CPU time per call (/proc: utime + stime, network included).
# Bounded: CALLS × RUNS × revisions calls, on 127.0.0.1 only.
set -euo pipefail
calls=100000 runs=3
while getopts n:r: o; do case $o in n) calls=$OPTARG ;; r) runs=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-n CALLS] [-r RUNS] REV..." >&2; exit 2; }
root=$(git rev-parse --show-toplevel)
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null &
pid=$!
trap 'kill $pid; rm -rf "$dir"' EXIT
until redis-cli -p "$port" PING >/dev/null 2>&1; do sleep 0.05; done
body=$(printf '{"user":"42","client":"c"}\n{"text":"%s"}' "$(printf 'x%.0s' $(seq 80))")
for rev in "$@"; do
  git -C "$root" show "$rev:crates/herald/src/engine/redis/scripts.rs" |
    python3 -c 'import re,sys; print(re.search(r"PUBLISH_LUA: &str = r#\"(.*?)\"#;", sys.stdin.read(), re.S).group(1))' \
      >"$dir/$rev.lua"
  sha=$(redis-cli -p "$port" SCRIPT LOAD "$(cat "$dir/$rev.lua")")
  for _ in $(seq "$runs"); do
    redis-cli -p "$port" FLUSHALL >/dev/null
    redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
    t0=$(awk '{print $14 + $15}' /proc/$pid/stat)
    redis-benchmark -p "$port" -n "$calls" -c 8 -q EVALSHA "$sha" 2 '{t:c}:meta' '{t:c}:stream' \
      base 300 1000 300000 300000 "$body" '{t:c}:pub' '' >/dev/null
    t1=$(awk '{print $14 + $15}' /proc/$pid/stat)
    tick=$(getconf CLK_TCK)
    upc=$(redis-cli -p "$port" INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
    cpu=$(python3 -c "print(f'{($t1 - $t0) / $tick * 1e6 / $calls:.1f}')")
    echo "$rev: evalsha usec_per_call=$upc redis_cpu_us_per_call=$cpu load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
