#!/usr/bin/env bash
# One command: set up this machine and run the demo (the built-in merge benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/weightmerge demo "$@"
