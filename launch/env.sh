# The job environment shared by launch/torchrun.sh and the rendered SLURM script (inlined there).
# Each variable is set only when unset, so a site's own settings win. See docs/launch.md.
if [[ "${MOHGE_CPU:-0}" == "1" ]]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # a failed collective tears the job down
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}          # keep comm kernels ordered after compute
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                                  # tolerate slow InfiniBand fabrics
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
fi
