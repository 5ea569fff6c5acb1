#!/usr/bin/env bash
# One node under the deepspeed launcher (it passes --local_rank, which `python -m train` accepts).
#   launch/deepspeed.sh parallel=zero3 experiment=doge-320m
#   NUM_GPUS=4 launch/deepspeed.sh parallel=zero2
#   NUM_GPUS=8 launch/deepspeed.sh experiment=jetmoe-200m parallel=zero2 parallel.expert_parallel=8
#   NUM_GPUS=2 launch/deepspeed.sh parallel=zero1 parallel.pipeline_stages=2
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python.sh  # PY: $PYTHON, .venv/bin/python, or python3 on PATH
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the deepspeed launcher does not set it
# the deepspeed launcher through train.launch: the run's own exit status (2 refused, 75 stopped, 1 failed);
# SIGTERM / SIGINT reach the ranks, which checkpoint and stop
exec $PY -m train.launch deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module train "$@"
