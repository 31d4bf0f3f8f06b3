#!/usr/bin/env bash
# Installs stmoe on one TPU VM worker; run it on all of them with run_on_workers.sh:
#
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#       --command="git clone REPO_URL ~/stmoe"           # once, or scp a checkout
#   scripts/tpu/run_on_workers.sh TPU_NAME ZONE -- bash scripts/tpu/setup_worker.sh
#
# Idempotent: safe to rerun after a preemption (on a fresh VM) or an update of the checkout.
set -euo pipefail
python3 -m pip install --upgrade pip
python3 -m pip install "jax[tpu]>=0.10.0" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python3 -m pip install -e .
# Imports only: touching the TPU here would start a pod-wide backend outside a training run.
python3 -c "import jax, stmoe.partitioning; print('jax', jax.__version__, 'ok')"
