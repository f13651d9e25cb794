#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient (the suite is the client) against a WebSocket server
# that echoes every message back, then summarize the report with the strict rule.
#
# Usage: scripts/autobahn/run.sh [options] OUTDIR URL
#   OUTDIR  report directory (created): spec.json, wstest.log, index.json, index.html, per-case files
#   URL     ws://HOST:PORT/path of the server under test; HOST must be loopback
#           (127.0.0.0/8, ::1 or localhost) -- any other address is refused.
# Options:
#   --no-compression  skip the permessage-deflate cases (12.* and 13.*)
#   --cases LIST      comma-separated case patterns to run (default "*", e.g. "1.*,2.*" or "1.1.*")
#   --exclude LIST    comma-separated case patterns to skip (may be repeated)
#   --agent NAME      agent name in the report (default "herald")
#   --timeout SECS    kill wstest after SECS (default $AUTOBAHN_TIMEOUT or 1800)
#   --markdown        print the summary tables as markdown (see summarize.py)
#
# Strict rule: a case passes only when behavior and behaviorClose are both OK or INFORMATIONAL;
# NON-STRICT, FAILED, UNIMPLEMENTED, WRONG CODE, UNCLEAN and announced-but-missing cases fail.
# Last line printed: "autobahn: N passed, M failed". Exit 0 iff M == 0 (and N > 0).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { echo "autobahn/run: $*" >&2; exit 2; }

cases="*"
exclude=""
agent="herald"
timeout_s="${AUTOBAHN_TIMEOUT:-1800}"
sumflags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-compression) exclude="${exclude:+$exclude,}12.*,13.*"; shift ;;
    --cases) [ $# -ge 2 ] || die "--cases needs a value"; cases="$2"; shift 2 ;;
    --exclude) [ $# -ge 2 ] || die "--exclude needs a value"; exclude="${exclude:+$exclude,}$2"; shift 2 ;;
    --agent) [ $# -ge 2 ] || die "--agent needs a value"; agent="$2"; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs a value"; timeout_s="$2"; shift 2 ;;
    --markdown) sumflags+=(--markdown); shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || { usage >&2; die "expected OUTDIR URL, got $# argument(s)"; }
outdir="$1"
url="$2"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"

# Only loopback targets: this sends fuzzing traffic, and must never reach another machine.
python3 - "$url" <<'EOF' || die "refusing URL '$url': need ws://HOST[:PORT][/path] with a loopback HOST"
import ipaddress, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
try:
    host = u.hostname or ""
    u.port  # raises ValueError on a malformed port
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
except ValueError:
    ok = False
sys.exit(0 if u.scheme == "ws" and ok else 1)
EOF

wstest="$("$HERE/install.sh" | tail -n1)"
[ -x "$wstest" ] || die "install.sh did not produce a wstest executable"

mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
# index.json / index.html are rewritten at the end of a run; never read a stale one.
rm -f "$outdir/index.json" "$outdir/index.html" "$outdir/wstest.log"

python3 - "$outdir" "$url" "$agent" "$cases" "$exclude" >"$outdir/spec.json" <<'EOF'
import json, sys
outdir, url, agent, cases, exclude = sys.argv[1:]
split = lambda s: [c.strip() for c in s.split(",") if c.strip()]
print(json.dumps({
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": split(cases) or ["*"],
    "exclude-cases": split(exclude),
    "exclude-agent-cases": {},
}, indent=2))
EOF

echo "autobahn/run: wstest fuzzingclient -> $url (cases: $cases${exclude:+; excluded: $exclude}); log: $outdir/wstest.log" >&2
start=$SECONDS
status=0
# wstest resolves report paths against its cwd, so run it inside OUTDIR. It exits 0 even when the
# server is unreachable: completeness is judged by summarize.py from the log, not by this status.
(cd "$outdir" && exec timeout --kill-after=10 "$timeout_s" "$wstest" -m fuzzingclient -s "$outdir/spec.json") \
  >"$outdir/wstest.log" 2>&1 || status=$?
echo "autobahn/run: wstest finished in $((SECONDS - start))s (exit $status); report: $outdir/index.html" >&2
if [ "$status" -ne 0 ]; then
  [ "$status" -eq 124 ] && echo "autobahn/run: wstest timed out after ${timeout_s}s" >&2
  echo "autobahn/run: last lines of $outdir/wstest.log:" >&2
  tail -n 20 "$outdir/wstest.log" >&2
fi
grep -m1 -E '^Connection to .* failed' "$outdir/wstest.log" >&2 || true

sum_status=0
python3 "$HERE/summarize.py" --wstest-log "$outdir/wstest.log" "${sumflags[@]+"${sumflags[@]}"}" \
  "$outdir/index.json" || sum_status=$?
if [ "$sum_status" -eq 0 ] && [ "$status" -ne 0 ]; then
  echo "autobahn/run: all reported cases passed but wstest exited $status" >&2
  exit 1
fi
exit "$sum_status"
