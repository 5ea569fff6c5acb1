"""The launch scripts start real runs: torchrun, the deepspeed launcher (which passes --local_rank),
and a sweep of one job per value."""

from __future__ import annotations

import subprocess

from .conftest import FAST, REPO, losses

TINY = [*FAST, "trainer.max_steps=2"]


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_torchrun_script(tmp_path, env):
    _run(["launch/torchrun.sh", *TINY, f"trainer.output_dir={tmp_path}"], {**env, "NPROC": "2"})
    assert sorted(losses(tmp_path)) == [1, 2]


def test_deepspeed_launcher_script(tmp_path, env):
    _run(["launch/deepspeed.sh", *TINY, "parallel=zero2", f"trainer.output_dir={tmp_path}"],
         {**env, "NUM_GPUS": "2", "MASTER_PORT": "29533"})
    assert sorted(losses(tmp_path)) == [1, 2]
    assert (tmp_path / "checkpoints" / "step-2" / "trainer_state" / "deepspeed").is_dir()


def test_sweep_script_runs_one_job_per_value(tmp_path, env):
    _run(["launch/sweep.sh", "optim.lr", "1e-3", "3e-3", "--", *TINY], {**env, "NPROC": "1", "SWEEP_DIR": str(tmp_path)})
    for value in ("1e-3", "3e-3"):
        records = losses(tmp_path / f"optim-lr_{value}")
        assert sorted(records) == [1, 2]
