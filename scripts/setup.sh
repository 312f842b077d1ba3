#!/usr/bin/env bash
# token-agent set-up, shared by scripts/test.sh and scripts/demo.sh. Idempotent: on a ready
# machine it touches neither apt nor the network.
#
#   1. Debian packages (apt-get when root; otherwise says which `sudo apt-get install` to run)
#   2. a virtualenv at .venv (Python >= 3.11) with `pip install -e '.[test,postgresql,server]'`, redone only when
#      pyproject.toml changed since the last install
#   3. python-fido2's source distribution, unpacked in .cache/fido2-sdist/, for the conformance
#      suite it ships (tests/device); fetched from PyPI, never committed
#
# Environment:
#   PYTHON=/path/to/python3        interpreter for the venv (default: python3 on PATH)
#   TOKEN_AGENT_SKIP_APT=1         skip the Debian package step (non-Debian machines; you are then
#                                  responsible for swig, libpcsclite-dev, pcscd, vpcd, opensc)
set -euo pipefail

log() { printf 'token-agent setup: %s\n' "$*" >&2; }
die() { printf 'token-agent setup: ERROR: %s\n' "$*" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export DEBIAN_FRONTEND=noninteractive

# --- 1. Debian packages -------------------------------------------------------------------------
# python3-*: the interpreter and venv; gcc, swig, python3-dev, libpcsclite-dev: pyscard builds
# from source (no Linux wheel); pcscd, vsmartcard-vpcd, opensc, pcsc-tools: the PC/SC stack the
# smartcard simulator and its tests run against; yubico-piv-tool: Yubico's PIV tool, which the
# card tests run against the virtual card (it needs the card to answer as the T=1 card its ATR
# announces); oathtool: an independent TOTP implementation
# the authenticator-app tests check codes against; libpam-python, pamtester: the PAM module
# (pam/pam_token_agent.py) and its tests with the real PAM stack; postgresql: PostgreSQL 15, the
# shared store's engine, started as a throwaway cluster by the tests (tests/pgserver.py);
# chromium,
# chromium-driver: the real browser the pages' tests drive; libnss3-tools: certutil, which
# makes the tests' browser trust their organisation's CA, as a trust's managed browsers do.
APT_PACKAGES=(python3 python3-venv python3-dev gcc swig libpcsclite-dev pcscd vsmartcard-vpcd
              opensc pcsc-tools yubico-piv-tool oathtool libpam-python pamtester postgresql
              chromium chromium-driver libnss3-tools)
# Node.js and npm fetch the NHS.UK frontend (the pages' styles) and axe-core (step 4): Debian's
# nodejs and npm packages, unless a Node.js with npm is already installed (NodeSource's nodejs
# package brings its own npm and conflicts with Debian's)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)

if [[ "${TOKEN_AGENT_SKIP_APT:-}" == 1 ]]; then
    log "skipping Debian packages (TOKEN_AGENT_SKIP_APT=1)"
elif ! command -v dpkg-query >/dev/null 2>&1; then
    log "no dpkg-query: not a Debian system; make sure these (or your distribution's equivalents) are installed: ${APT_PACKAGES[*]}"
else
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == installed ]] || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -eq 0 ]]; then
            log "installing Debian packages: ${missing[*]}"
            apt-get update -qq </dev/null >&2
            apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
        else
            die "missing Debian packages: ${missing[*]}
  run first:  sudo apt-get install -y --no-install-recommends ${missing[*]}
  (or set TOKEN_AGENT_SKIP_APT=1 if you provide them another way)"
        fi
    fi
fi

# --- 2. virtualenv --------------------------------------------------------------------------------
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found: install python3 (>= 3.11) or set PYTHON=/path/to/python3"
python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }
python_ok "$PY" || die "token-agent needs Python >= 3.11; '$PY' is $("$PY" -V 2>&1 || echo unknown). Set PYTHON=/path/to/python3.11"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
if [[ -d "$VENV" ]] && ! { python_ok "$VPY" && "$VPY" -m pip --version >/dev/null 2>&1; }; then
    log "existing .venv is broken or too old: recreating it"
    rm -rf "$VENV"
fi
if [[ ! -d "$VENV" ]]; then
    log "creating .venv with $("$PY" -V 2>&1) ($(command -v "$PY"))"
    "$PY" -m venv "$VENV" || die "could not create the venv (on Debian: apt-get install python3-venv)"
fi

STAMP="$VENV/.token-agent-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ "$want" != "$have" ]] || ! "$VPY" -c 'import token_agent, fido2, psycopg, psycopg_pool, starlette, uvicorn, websockets, jinja2, multipart, selenium' >/dev/null 2>&1; then
    log "pip install -e '.[test,postgresql,server]' (pyproject.toml changed or first install)"
    rm -f "$STAMP"
    "$VPY" -m pip install --quiet --disable-pip-version-check -e '.[test,postgresql,server]' </dev/null >&2 \
        || die "pip install -e '.[test,postgresql,server]' failed (see the errors above)"
    printf '%s\n' "$want" >"$STAMP"
fi

# --- 3. python-fido2 sdist (conformance suite) ------------------------------------------------------
FIDO2_VERSION=$("$VPY" -c 'from importlib.metadata import version; print(version("fido2"))')
SDIST_DIR="$ROOT/.cache/fido2-sdist"
SDIST_ROOT="$SDIST_DIR/fido2-$FIDO2_VERSION"
if [[ ! -f "$SDIST_ROOT/tests/device/conftest.py" ]]; then
    log "fetching python-fido2 $FIDO2_VERSION source distribution (conformance suite)"
    mkdir -p "$SDIST_DIR"
    tmp=$(mktemp -d "$SDIST_DIR/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    "$VPY" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
        "fido2==$FIDO2_VERSION" -d "$tmp" </dev/null >&2 \
        || die "could not download the fido2 $FIDO2_VERSION sdist from PyPI"
    tarball=$(find "$tmp" -maxdepth 1 -name "fido2-$FIDO2_VERSION.tar.gz" | head -n1)
    [[ -n "$tarball" ]] || die "pip download gave no fido2-$FIDO2_VERSION.tar.gz"
    tar -xzf "$tarball" -C "$tmp"
    [[ -f "$tmp/fido2-$FIDO2_VERSION/tests/device/conftest.py" ]] \
        || die "the fido2 $FIDO2_VERSION sdist has no tests/device suite"
    rm -rf "$SDIST_ROOT"
    mv "$tmp/fido2-$FIDO2_VERSION" "$SDIST_ROOT"
    mv "$tarball" "$SDIST_DIR/"
    rm -rf "$tmp"
    trap - EXIT
fi

# --- 4. the pages' front-end files (npm) ------------------------------------------------------------
# package.json pins nhsuk-frontend (the NHS.UK design system: served by the organisation
# server, copied into token_agent/web/static/) and axe-core (the accessibility checks the
# pages' tests run in the browser); package-lock.json records their integrity hashes.
# Redone only when package-lock.json changed since the last install.
NPM_STAMP="$ROOT/node_modules/.token-agent-installed"
npm_want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ "$npm_want" != "$(cat "$NPM_STAMP" 2>/dev/null || true)" ]]; then
    command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js and npm (Debian: apt-get install nodejs npm)"
    log "npm ci (the NHS.UK frontend and axe-core)"
    npm ci --no-audit --no-fund --loglevel=error </dev/null >&2 || die "npm ci failed (see the errors above)"
    printf '%s\n' "$npm_want" >"$NPM_STAMP"
fi
NHSUK="$ROOT/node_modules/nhsuk-frontend/dist/nhsuk"
STATIC="$ROOT/token_agent/web/static"
if [[ ! -f "$STATIC/nhsuk/nhsuk-frontend.min.css" || "$NHSUK/nhsuk-frontend.min.css" -nt "$STATIC/nhsuk/nhsuk-frontend.min.css" ]]; then
    mkdir -p "$STATIC/nhsuk" "$STATIC/images"
    cp "$NHSUK/nhsuk-frontend.min.css" "$NHSUK/nhsuk-frontend.min.js" "$STATIC/nhsuk/"
    cp "$NHSUK"/assets/images/* "$STATIC/images/"
fi

# Byte-compile the project's own modules (pip compiles site-packages, not an editable
# checkout): every `token-agent` command then starts without compiling them again, also where
# PYTHONDONTWRITEBYTECODE is set. Quick, and a no-op when nothing changed.
"$VPY" -m compileall -q -j 0 token_agent drivers simulators >/dev/null \
    || log "warning: could not byte-compile the sources (every command compiles them at start)"

log "ready (python $("$VPY" -c 'import platform; print(platform.python_version())'), fido2 $FIDO2_VERSION)"
