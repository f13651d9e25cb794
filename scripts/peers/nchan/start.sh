#!/usr/bin/env bash
# Starts Nchan on 127.0.0.1:$NCHAN_PORT (default 8091), pinned to core $PIN_CPU (default 0).
# Installs Debian's nginx and libnginx-mod-nchan when missing. Prints the ids of the nginx
# master and worker on stdout (measure both: the worker holds the connections).
# Env: NCHAN_PORT, PIN_CPU, NCHAN_RUN (run directory, default /tmp/herald-bench-nchan).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run="${NCHAN_RUN:-/tmp/herald-bench-nchan}"
port="${NCHAN_PORT:-8091}"

if [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  echo "installing nginx and libnginx-mod-nchan" >&2
  for attempt in 1 2 3 4 5 6; do
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan >/dev/null; then
      break
    fi
    [ "$attempt" = 6 ] && { echo "could not install nginx/nchan" >&2; exit 1; }
    echo "apt is busy; retrying in 10 s" >&2
    sleep 10
  done
  # Debian starts the packaged nginx on port 80; we only want the binary.
  { systemctl stop nginx || service nginx stop; } >&2 2>/dev/null || true
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is already in use" >&2
  exit 1
fi
mkdir -p "$run/tmp"
rm -f "$run/nginx.pid"
sed "s/__PORT__/$port/" "$here/nginx.conf" >"$run/nginx.conf"
ulimit -n 20000 2>/dev/null || true
nginx -q -t -e "$run/error.log" -p "$run/" -c "$run/nginx.conf"
taskset -c "${PIN_CPU:-0}" nginx -e "$run/error.log" -p "$run/" -c "$run/nginx.conf"
for _ in $(seq 100); do
  [ -s "$run/nginx.pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
master="$(cat "$run/nginx.pid")"
workers="$(pgrep -P "$master" | tr '\n' ' ')"
echo "nchan on 127.0.0.1:$port (master $master, workers $workers; logs in $run)" >&2
echo "$master $workers"
