#!/usr/bin/env bash
# Launch mohge-train with torchrun on this node; the environment describes the job.
#
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (GPUs on this node, or 2 on CPU)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)   or   RDZV_ENDPOINT=host:port (c10d rendezvous)
#   MOHGE_CPU=1   force CPU + gloo (laptops, CI); also chosen when no GPU is visible
#   PYTHON        interpreter (default python3)
#   DRY_RUN=1     print the command instead of running it
#
#   launch/torchrun.sh --config-name mohge_3b parallel.ep=8 parallel.dp_shard=8
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

gpus=0
if [[ "${MOHGE_CPU:-0}" != "1" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
fi
extra=()
if [[ "$gpus" -eq 0 ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  extra=(parallel.backend=gloo train.device=cpu)
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-$gpus}
  # NCCL defaults, each only if unset (see docs/launch.md):
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # a failed collective tears the job down
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}          # keep comm kernels ordered after compute
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                                  # tolerate slow InfiniBand fabrics
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=${RDZV_ENDPOINT}" "--rdzv-id=${RDZV_ID:-mohge}")
else
  rdzv=("--master-addr=${MASTER_ADDR:-127.0.0.1}" "--master-port=${MASTER_PORT:-29500}")
fi

cmd=("$PYTHON" -m mohge.launch.run "--nnodes=${NNODES}" "--node-rank=${NODE_RANK}"
     "--nproc-per-node=${NPROC_PER_NODE}" "${rdzv[@]}" -m mohge.train.cli "$@" "${extra[@]}")
echo "+ ${cmd[*]}" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exit 0
fi
exec "${cmd[@]}"
