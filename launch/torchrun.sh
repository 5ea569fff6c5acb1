#!/usr/bin/env bash
# One node, N processes under torchrun (N = visible GPUs, or NPROC=..., or 1 on a CPU-only machine).
#   launch/torchrun.sh experiment=doge-20m parallel=ddp
#   NPROC=8 launch/torchrun.sh experiment=doge-160m parallel=zero2
#   NPROC=8 launch/torchrun.sh experiment=jetmoe-200m parallel.expert_parallel=8    # experts over 8 GPUs
#   NPROC=8 launch/torchrun.sh experiment=doge-160m parallel=zero1 parallel.pipeline_stages=2
#   NPROC=2 launch/torchrun.sh model=jetmoe-tiny parallel.expert_parallel=2        # the same on 2 CPU processes
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python.sh  # PY: $PYTHON, .venv/bin/python, or python3 on PATH
if [ -z "${NPROC:-}" ]; then
    NPROC=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
# torchrun sets OMP_NUM_THREADS=1 per rank when unset; on CPU give each rank its share of the cores
if [ "$NPROC" -gt 0 ] && ! $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
# torchrun through train.launch: the run's own exit status (2 refused, 75 stopped, 1 failed) and message,
# not torchrun's status 1 and report; SIGTERM / SIGINT reach the ranks, which checkpoint and stop
exec $PY -m train.launch torchrun --standalone --nproc_per_node "$NPROC" -m train "$@"
