#!/usr/bin/env bash
# Set up a fresh machine: Debian data packages (for the built-in benchmark), a virtual environment
# in .venv with the CPU build of torch 2.13.0, weightmerge and its extras. Idempotent.
# With --test, also the test-only oracles (mergekit 0.1.5, fusion-bench 0.2.33, peft).
set -euo pipefail
cd "$(dirname "$0")/.."
DEB_PACKAGES="wordnet-base fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs fortunes-eo"
# the vision benchmark's images (docs/tasks.md): Fashion-MNIST and the fonts glyphs are rendered from
DEB_PACKAGES="$DEB_PACKAGES dataset-fashion-mnist fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-font-awesome"
say() { echo "setup: $*" >&2; }
missing=""
for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  say "Debian data packages for the built-in benchmark:$missing"
  # another apt/dpkg (unattended upgrades, a second shell) may hold the lock: wait for it, visibly
  if command -v fuser >/dev/null 2>&1 && fuser /var/lib/dpkg/lock-frontend /var/lib/apt/lists/lock >/dev/null 2>&1; then
    say "another apt/dpkg process holds the package lock; waiting for it (up to 10 minutes)..."
  fi
  APT_WAIT=(-o DPkg::Lock::Timeout=600)
  $SUDO apt-get "${APT_WAIT[@]}" update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_WAIT[@]}" install -y -qq $missing >/dev/null
  say "Debian packages installed"
fi
# pip, quietly (this machine's pip prints one warning line per unused local index)
pipq() {
  .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || { say "creating the virtual environment .venv"; "$PY" -m venv .venv; }
say "torch 2.13.0 into .venv (the largest download; pip shows nothing until it is done)"
pipq "torch==2.13.0"
say "weightmerge with its eval, search and dev extras (transformers, numba, optuna, pytest, ...) into .venv"
pipq -e ".[eval,search,dev]"
# Animal-MNIST's data files (its metadata asks for tensorflow, which its data do not need)
pipq --no-deps "animal-mnist==0.4"
if [ "${1:-}" = "--test" ]; then
  say "test oracles: mergekit 0.1.5, fusion-bench 0.2.33, peft, ray, lm_eval"
  # test-only oracle: mergekit 0.1.5 (its in-memory API and mergekit-yaml); torch 2.13.0 already
  # satisfies its torch>=2.0, so nothing pulls another torch.
  pipq "mergekit==0.1.5"
  # EMR oracle (tests/test_emr.py): fusion-bench's deps (lightning, hydra, ...) accept torch 2.13.0
  pipq "fusion-bench==0.2.33"
  # PEFT oracle (tests/test_io_peft.py: merge_and_unload); --no-deps keeps torch as installed
  pipq --no-deps "peft>=0.17" "accelerate>=1.0"  # usually already pulled in by fusion-bench
  # weightmerge search: Ray (--ray, tests/test_search_parallel.py) and lm-evaluation-harness (the
  # lm_eval evaluator, tests/test_search_lm_eval.py); neither pulls another torch
  pipq "ray==2.60.0" "lm_eval==0.4.13"
fi
.venv/bin/python -c "import torch, weightmerge; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# compile the numba kernels once now (cached next to weightmerge/kernels/_numba.py, or in
# NUMBA_CACHE_DIR), so that neither the first merge nor the first test run pays for it
.venv/bin/python -c "import weightmerge.kernels as k; k.warm_up()"
say "done: .venv/bin/weightmerge is ready"
