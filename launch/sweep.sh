#!/usr/bin/env bash
# A sweep, one job per point: a thin example over `python -m train --multirun` (docs/sweeps.md).
# Each point runs as its own torchrun process group (NPROC per point: visible GPUs, or 1), one after
# another, in <hydra.sweep.dir>/<its overrides> (default: <trainer.output_dir>-sweep); running the same
# command again skips finished points and resumes the others; summary.md and plots at the end.
#   launch/sweep.sh optim.lr=1e-3,3e-3,1e-2 model=doge-20m,doge-60m trainer.output_dir=outputs/lr
#   NPROC=8 launch/sweep.sh experiment=doge-20m optim.lr=2e-3,4e-3,8e-3
# On Slurm, each point its own job: python -m train --multirun hydra/launcher=submitit_slurm ... (docs/sweeps.md)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python.sh
if [ -z "${NPROC:-}" ]; then
    NPROC=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec $PY -m train --multirun "hydra.launcher.nproc_per_node=$NPROC" "$@"
