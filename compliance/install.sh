#!/usr/bin/env bash
# Install wstest (Autobahn|Testsuite) for compliance/run.py. Idempotent and quiet:
# a second run with nothing to do takes about a second and prints one line.
#
#   bash compliance/install.sh
#
# Every autobahntestsuite release is Python 2.7 code, and Debian 12 (bookworm)
# has no Python 2.7, so:
#   1. python2.7 and python2.7-dev come from Debian 11 (bullseye), added as an
#      apt source pinned at priority 100, so that apt takes from bullseye only
#      what bookworm lacks (python2.7 and its libraries) and upgrades nothing;
#   2. a Python 3 venv gets 'virtualenv<20.22' (the last series that can still
#      create a Python 2 environment);
#   3. that virtualenv creates the Python 2.7 environment $WSN_AB_VENV, and pip
#      installs compliance/requirements-wstest.txt into it (Twisted, wsaccel and
#      ujson are compiled: gcc + python2.7-dev).
# Steps 1 and 2 need root (or sudo) only when a Debian package is missing.
#
# Environment (all optional):
#   WSN_AB_VENV   Python 2.7 virtualenv for wstest       (default /tmp/wsnursery-ab-venv)
#   WSN_AB_TOOLS  Python 3 venv that holds virtualenv    (default /tmp/wsnursery-ab-tools)
#   WSN_AB_PY3    Python 3 used to create WSN_AB_TOOLS   (default /usr/bin/python3, else python3)
#   WSN_AB_LOG    where apt and pip output goes          (default ${TMPDIR:-/tmp}/wsnursery-ab-install.log)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${WSN_AB_VENV:-/tmp/wsnursery-ab-venv}"
tools="${WSN_AB_TOOLS:-/tmp/wsnursery-ab-tools}"
log="${WSN_AB_LOG:-${TMPDIR:-/tmp}/wsnursery-ab-install.log}"
reqs="$here/requirements-wstest.txt"
stamp="$venv/.wsnursery-requirements.sha256"
py2=/usr/bin/python2.7   # not "python2.7" from PATH: a pyenv shim may answer that name without working

: >"$log"
say() { echo "compliance/install.sh: $*"; }
die() {
    echo "compliance/install.sh: error: $*" >&2
    if [ -s "$log" ]; then
        echo "--- last lines of $log ---" >&2
        tail -n 30 "$log" >&2
    fi
    exit 1
}
# run CMD...: run quietly, output to the log; on failure show the log and stop.
run() { "$@" >>"$log" 2>&1 || die "'$*' failed (exit $?)"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root for '$*' (run this script as root, or install the packages by hand)"
    fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# --- 1. Debian packages -------------------------------------------------------
py3="${WSN_AB_PY3:-}"
if [ -z "$py3" ]; then
    if [ -x /usr/bin/python3 ]; then py3=/usr/bin/python3; else py3="$(command -v python3 || true)"; fi
fi
wanted=(python2.7 python2.7-dev gcc libc6-dev)
# The tools venv needs a Python 3 with venv + ensurepip (Debian splits it into python3-venv).
# (Debian's python3 has ensurepip/__init__.py but not ensurepip/__main__.py without it.)
if [ -z "$py3" ] || ! "$py3" -c 'import importlib.util as u, sys, venv; sys.exit(u.find_spec("ensurepip.__main__") is None)' >/dev/null 2>&1; then
    if [ -n "${WSN_AB_PY3:-}" ]; then
        die "WSN_AB_PY3=$WSN_AB_PY3 cannot create venvs (no venv/ensurepip module)"
    fi
    py3=/usr/bin/python3
    wanted+=(python3 python3-venv)
fi
missing=()
for pkg in "${wanted[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]} (python2.7 from bullseye, pinned at priority 100)"
    # Add bullseye unless some apt source already offers it.
    if ! grep -rqsE '^[[:space:]]*(Suites:.*[[:space:]]bullseye([[:space:]]|$)|deb[[:space:]].*[[:space:]]bullseye[[:space:]])' \
            /etc/apt/sources.list /etc/apt/sources.list.d/; then
        as_root tee /etc/apt/sources.list.d/wsnursery-bullseye-py27.sources >/dev/null <<'SRC'
# Added by wsnursery's compliance/install.sh: Python 2.7 for wstest.
# Pinned at priority 100 in /etc/apt/preferences.d/wsnursery-bullseye-py27.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    as_root tee /etc/apt/preferences.d/wsnursery-bullseye-py27 >/dev/null <<'PIN'
# Added by wsnursery's compliance/install.sh: take from bullseye only what bookworm lacks.
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
    run as_root apt-get update -q
    run as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[ -x "$py2" ] || die "$py2 is missing after the apt step"

# --- 2. virtualenv<20.22 in a Python 3 venv ------------------------------------
if [ ! -x "$tools/bin/virtualenv" ]; then
    say "creating $tools (virtualenv<20.22)"
    rm -rf "$tools"
    run "$py3" -m venv "$tools"
    run "$tools/bin/python" -m pip install -q 'virtualenv<20.22'
fi

# --- 3. the wstest virtualenv --------------------------------------------------
want_sum="$(sha256sum "$reqs" | cut -d' ' -f1)"
have_sum="$(cat "$stamp" 2>/dev/null || true)"
if [ ! -x "$venv/bin/wstest" ] || [ "$want_sum" != "$have_sum" ] || ! "$venv/bin/wstest" -a >/dev/null 2>&1; then
    say "creating $venv (wstest for Python 2.7; compiles Twisted, wsaccel, ujson)"
    rm -rf "$venv"
    run "$tools/bin/virtualenv" -q -p "$py2" "$venv"
    run "$venv/bin/python" -m pip install -q --no-warn-script-location -r "$reqs"
    echo "$want_sum" >"$stamp"
fi

version="$("$venv/bin/wstest" -a 2>&1 | tr '\n' ' ' | sed 's/[[:space:]]*$//')" ||
    die "$venv/bin/wstest -a failed: $version"
say "ok: $venv/bin/wstest ($version)"
