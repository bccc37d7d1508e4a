#!/usr/bin/env bash
# Set up a fresh machine: Debian data packages (for the built-in benchmark), a virtual environment
# in .venv with the CPU build of torch 2.13.0, weightmerge and its extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
DEB_PACKAGES="wordnet-base fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs fortunes-eo"
missing=""
for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[eval,dev]" 2>&1 | grep -v '^WARNING: Location' || true
if [ "${1:-}" = "--test" ]; then
  # test-only oracle: mergekit's in-memory API needs only torch, numpy, pydantic, typing_extensions
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "mergekit==0.1.5" 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -c "import torch, weightmerge; assert torch.__version__.startswith('2.13.0'), torch.__version__"
