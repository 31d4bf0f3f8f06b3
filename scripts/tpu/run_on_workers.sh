#!/usr/bin/env bash
# Runs one command on every worker of an existing TPU VM slice, at the same time.
#
#   scripts/tpu/run_on_workers.sh [--dry-run] TPU_NAME ZONE [PROJECT] -- COMMAND...
#
# It creates, deletes and copies nothing: it is `gcloud compute tpus tpu-vm ssh --worker=all` with
# the command run from the repository checkout on each worker ($STMOE_DIR, default ~/stmoe), inside
# the virtual environment that setup_worker.sh made ($STMOE_VENV, default ~/stmoe-venv; `python` is
# its Python 3.11 once it exists). Every worker must run the same command: JAX processes meet in
# jax.distributed.initialize() (stmoe.partitioning.maybe_initialize_distributed), and each reads its
# own data shard. Logs also go to ~/stmoe_logs/ on each worker. --dry-run prints the gcloud command.
#
# Examples:
#   scripts/tpu/run_on_workers.sh my-v4-64 us-central2-b -- bash scripts/tpu/setup_worker.sh
#   scripts/tpu/run_on_workers.sh my-v4-64 us-central2-b -- python scripts/train.py \
#       --config configs/pretrain.py:st_moe_l --workdir gs://BUCKET/st_moe_l --config.mesh.expert=32
set -euo pipefail

usage() { sed -n '2,17p' "$0" >&2; exit 2; }
DRY_RUN=0
if [[ ${1:-} == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 3 ]] || usage
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [[ $1 != "--" ]]; then PROJECT_FLAG=(--project="$1"); shift; fi
[[ ${1:-} == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage

# Expanded on the worker (~ is the worker's home), so kept unexpanded here.
# shellcheck disable=SC2088
STMOE_DIR=${STMOE_DIR:-'~/stmoe'}
# shellcheck disable=SC2088
STMOE_VENV=${STMOE_VENV:-'~/stmoe-venv'}
# Quote the command once for the remote shell.
REMOTE_CMD=$(printf '%q ' "$@")
STAMP=$(date +%Y%m%d-%H%M%S)
ACTIVATE="if [ -f ${STMOE_VENV}/bin/activate ]; then . ${STMOE_VENV}/bin/activate; fi"
REMOTE="mkdir -p ~/stmoe_logs && cd ${STMOE_DIR} && ${ACTIVATE} && ${REMOTE_CMD} 2>&1 | tee ~/stmoe_logs/${STAMP}.log"

GCLOUD=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" --worker=all
        --command="${REMOTE}")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${GCLOUD[@]}"; echo
  exit 0
fi
exec "${GCLOUD[@]}"
