#!/usr/bin/env bash
# Installs stmoe on one TPU VM worker, into a Python 3.11 virtual environment. Run it on every worker
# from the checkout with run_on_workers.sh (which then runs every command in that environment):
#
#   scripts/tpu/run_on_workers.sh TPU_NAME ZONE -- bash scripts/tpu/setup_worker.sh
#   bash scripts/tpu/setup_worker.sh --dry-run      # prints the commands it would run, runs none
#
# The TPU VM images (tpu-ubuntu2204-base, v2-alpha-tpuv5-lite: Ubuntu 22.04) ship Python 3.10, and
# stmoe needs >= 3.11 (setup.py). So uv, installed from PyPI into ~/.local, fetches a standalone
# CPython $STMOE_PYTHON (default 3.11) and makes the venv $STMOE_VENV (default ~/stmoe-venv);
# jax[tpu] and `pip install -e .` of this checkout go into it. Nothing touches the system Python's
# packages but the user-level uv.
#
# Idempotent: a rerun skips uv and the venv when they exist and reinstalls the checkout (after a
# `git pull`, say); after a preemption, on a fresh VM, it installs everything again.
set -euo pipefail

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "setup_worker.sh: unknown argument '$1' (use --dry-run or nothing)" >&2; exit 2 ;;
esac

PYTHON_VERSION=${STMOE_PYTHON:-3.11}
VENV=${STMOE_VENV:-$HOME/stmoe-venv}
UV=$HOME/.local/bin/uv
CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LIBTPU_RELEASES=https://storage.googleapis.com/jax-releases/libtpu_releases.html

run() {  # prints the command, then runs it unless --dry-run
  echo "+ $*"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

if [[ ! -x $UV ]]; then
  if ! python3 -m pip --version > /dev/null 2>&1; then
    run sudo apt-get update
    run sudo apt-get install -y python3-pip
  fi
  run python3 -m pip install --user --upgrade uv
fi
run "$UV" python install "$PYTHON_VERSION"
if [[ ! -x $VENV/bin/python ]]; then
  run "$UV" venv --python "$PYTHON_VERSION" "$VENV"
fi
run "$UV" pip install --python "$VENV/bin/python" "jax[tpu]>=0.10.0" --find-links "$LIBTPU_RELEASES"
run "$UV" pip install --python "$VENV/bin/python" -e "$CHECKOUT"
# Imports only: touching the TPU here would start a pod-wide backend outside a training run.
run "$VENV/bin/python" -c "import sys, jax, stmoe.partitioning; print('python', sys.version.split()[0], 'jax', jax.__version__, 'ok')"
