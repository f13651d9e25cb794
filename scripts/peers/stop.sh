#!/usr/bin/env bash
# Stops the processes whose ids are given: SIGTERM, then SIGKILL after 5 s.
# Usage: scripts/peers/stop.sh PID...
for pid in "$@"; do
  kill -TERM "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || continue 2
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
done
exit 0
