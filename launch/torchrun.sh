#!/usr/bin/env bash
# Launch mohge-train with torchrun on this node; the environment describes the job.
#
#   NNODES (1)  NODE_RANK (0)
#   NPROC_PER_NODE, or Megatron's GPUS_PER_NODE (default: the GPUs CUDA_VISIBLE_DEVICES leaves
#                 visible, else all of nvidia-smi's; 2 on CPU)
#   MASTER_ADDR + MASTER_PORT (29500): static rendezvous, global rank 0 on NODE_RANK 0, or
#   RDZV_ENDPOINT=host:port: c10d rendezvous (ranks follow the order nodes join)
#                 with NNODES > 1 one of MASTER_ADDR / RDZV_ENDPOINT is required
#   MOHGE_CPU=1   force CPU + gloo (laptops, CI); also chosen when no GPU is visible
#   PYTHON        interpreter (default python3)
#   DRY_RUN=1     print the command instead of running it
#
#   launch/torchrun.sh --config-name mohge_3b parallel.ep=8
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

fail() { echo "launch/torchrun.sh: $*" >&2; exit 2; }

gpus=0
if [[ "${MOHGE_CPU:-0}" != "1" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # respected as CUDA does: "" hides every GPU
    IFS=, read -r -a visible <<< "${CUDA_VISIBLE_DEVICES}"
    gpus=${#visible[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  fi
fi
extra=()
if [[ "$gpus" -eq 0 ]]; then
  export MOHGE_CPU=1
  NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-2}}
  extra=(parallel.backend=gloo train.device=cpu)
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-$gpus}}
  if [[ "$NPROC_PER_NODE" -gt "$gpus" ]]; then
    fail "NPROC_PER_NODE=$NPROC_PER_NODE but only $gpus GPU(s) are visible on $(hostname); lower it or check CUDA_VISIBLE_DEVICES"
  fi
fi
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=${RDZV_ENDPOINT}" "--rdzv-id=${RDZV_ID:-mohge}")
elif [[ "$NNODES" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  fail "NNODES=$NNODES needs MASTER_ADDR=<host of NODE_RANK 0> (static rendezvous) or RDZV_ENDPOINT=<host:port> (c10d)"
else
  rdzv=("--master-addr=${MASTER_ADDR:-127.0.0.1}" "--master-port=${MASTER_PORT:-29500}")
fi

# mohge.launch.run is torchrun that prints one line, not a failure block, for user errors (exit 2)
# and preemption (exit 75).
cmd=("$PYTHON" -m mohge.launch.run "--nnodes=${NNODES}" "--node-rank=${NODE_RANK}"
     "--nproc-per-node=${NPROC_PER_NODE}" "${rdzv[@]}" -m mohge.train.cli "$@" "${extra[@]}")
echo "+ ${cmd[*]}" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exit 0
fi
exec "${cmd[@]}"
