#!/usr/bin/env bash
# Install the Autobahn|Testsuite client `wstest` (autobahntestsuite==25.10.1), idempotently.
#
# Usage: scripts/autobahn/install.sh
#   Prints progress on stderr and the absolute path of the wstest executable as the LAST line
#   of stdout, e.g.  wstest="$(scripts/autobahn/install.sh | tail -n1)"
#
# The suite is Python 2.7 only, so it gets a Python 2.7 virtualenv, made by virtualenv==20.21.1
# (the last virtualenv release able to create 2.7 environments), which itself runs from python3.
#
# Environment:
#   AUTOBAHN_VENVS  where the venvs live (default: $HOME/.cache/herald/autobahn)
#   AB_PYTHON2      a Python 2.7 interpreter to use; otherwise pyenv's 2.7.18, then `python2.7`
#                   on PATH. (Debian 12 ships no Python 2.)
# Exit status: 0 installed / already installed; 3 no usable Python 2.7; other non-zero: failure.
set -euo pipefail

AB_VERSION="25.10.1"
VIRTUALENV_VERSION="20.21.1"

log() { echo "autobahn/install: $*" >&2; }

VENVS="${AUTOBAHN_VENVS:-$HOME/.cache/herald/autobahn}"
mkdir -p "$VENVS"
VENVS="$(cd "$VENVS" && pwd)"
AB_VENV="$VENVS/wstest-$AB_VERSION"
TOOL_VENV="$VENVS/virtualenv-$VIRTUALENV_VERSION"
STAMP="$AB_VENV/.herald-installed"

# Serialize concurrent installs (two test runs at once must not build the same venv twice).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$VENVS/.lock"
  flock 9
fi

installed_ok() {
  [ -f "$STAMP" ] && [ -x "$AB_VENV/bin/wstest" ] &&
    "$AB_VENV/bin/wstest" --autobahnversion 2>/dev/null | grep -qF "$AB_VERSION"
}

if installed_ok; then
  echo "$AB_VENV/bin/wstest"
  exit 0
fi

# --- find Python 2.7 -------------------------------------------------------------------------
candidates=()
if [ -n "${AB_PYTHON2:-}" ]; then
  candidates+=("$AB_PYTHON2")
else
  candidates+=("${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python2.7")
  if command -v python2.7 >/dev/null 2>&1; then candidates+=("$(command -v python2.7)"); fi
fi
PY2=""
for c in "${candidates[@]}"; do
  # ssl and zlib are needed by Twisted / permessage-deflate; a stripped build is useless here.
  if [ -x "$c" ] && "$c" -c 'import sys, ssl, zlib; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; then
    PY2="$c"
    break
  fi
done
if [ -z "$PY2" ]; then
  log "no usable Python 2.7 found (tried: ${candidates[*]:-none})."
  log "Autobahn|Testsuite $AB_VERSION runs only on Python 2.7 (with ssl and zlib); Debian 12 has"
  log "no python2 package. Install one (e.g. 'pyenv install 2.7.18') or set AB_PYTHON2=/path/to/python2.7."
  exit 3
fi
log "using Python 2.7 at $PY2"

command -v python3 >/dev/null 2>&1 || { log "python3 is required (to run virtualenv)"; exit 1; }

# --- virtualenv tool (python3) -----------------------------------------------------------------
if [ ! -x "$TOOL_VENV/bin/virtualenv" ]; then
  log "creating virtualenv==$VIRTUALENV_VERSION tool venv in $TOOL_VENV"
  rm -rf "$TOOL_VENV"
  python3 -m venv "$TOOL_VENV" >&2
  "$TOOL_VENV/bin/pip" install -q --disable-pip-version-check "virtualenv==$VIRTUALENV_VERSION" >&2
fi

# --- the Python 2.7 venv with wstest -------------------------------------------------------------
log "installing autobahntestsuite==$AB_VERSION into $AB_VENV (first time: about half a minute)"
rm -rf "$AB_VENV"
"$TOOL_VENV/bin/virtualenv" -q -p "$PY2" "$AB_VENV" >&2
# Pulls its pinned Python 2 dependencies (Twisted, autobahn 0.10.9, ...); compiles wsaccel/ujson with gcc.
"$AB_VENV/bin/pip" install -q --disable-pip-version-check --no-python-version-warning \
  "autobahntestsuite==$AB_VERSION" >&2
version="$("$AB_VENV/bin/wstest" --autobahnversion 2>&1 || true)"
if ! grep -qF "$AB_VERSION" <<<"$version"; then
  log "wstest does not run after install; it said: $version"
  exit 1
fi
touch "$STAMP"
log "installed: $(tr '\n' ' ' <<<"$version")"
echo "$AB_VENV/bin/wstest"
