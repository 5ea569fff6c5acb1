#!/usr/bin/env bash
# A sweep: one training job per value (Hydra's --multirun cannot re-create a process group inside one
# torchrun job, so each point is its own launch). Each point gets its own output directory.
#   launch/sweep.sh optim.lr 1e-3 3e-3 1e-2 -- experiment=doge-20m trainer.max_steps=2000
# Single-process sweeps can also use Hydra directly: python -m train --multirun optim.lr=1e-3,3e-3
set -euo pipefail
cd "$(dirname "$0")/.."
KEY=$1; shift
VALUES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do VALUES+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
BASE=${SWEEP_DIR:-outputs/sweep-${KEY//./-}}
LAUNCH=${LAUNCH:-launch/torchrun.sh}
for value in "${VALUES[@]}"; do
    echo "== $KEY=$value"
    "$LAUNCH" "$@" "$KEY=$value" "trainer.output_dir=$BASE/${KEY//./-}_$value"
done
