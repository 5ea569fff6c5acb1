"""The launch scripts start real runs: torchrun, the deepspeed launcher (which passes --local_rank),
a sweep of one job per point, and the Slurm batch script in a fake Slurm (srun runs its command here,
scontrol records requeues): SIGTERM to the batch shell reaches the ranks, which checkpoint and stop,
and the job is requeued; a finished run is not."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FAST, REPO, losses, metrics

TINY = [*FAST, "trainer.max_steps=2"]

FAKE_SRUN = """#!/usr/bin/env bash
# srun: runs its command on this machine and forwards SIGTERM to it, as srun does to its tasks
while [ $# -gt 0 ] && [[ $1 == -* ]]; do shift; done
echo "srun $1" >> "$FAKE_SLURM_LOG"
"$@" &
child=$!
trap 'echo "srun: SIGTERM" >> "$FAKE_SLURM_LOG"; kill -TERM $child' TERM
wait $child; code=$?
while kill -0 $child 2>/dev/null; do wait $child; code=$?; done
exit $code
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
    show) echo localhost ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""


def _run(cmd, env):
    # the interpreter running the tests (a checkout need not have .venv; the fallback has its own test)
    proc = subprocess.run(cmd, env={"PYTHON": sys.executable, **env}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_torchrun_script(tmp_path, env):
    _run(["launch/torchrun.sh", *TINY, f"trainer.output_dir={tmp_path}"], {**env, "NPROC": "2"})
    assert sorted(losses(tmp_path)) == [1, 2]


def test_deepspeed_launcher_script(tmp_path, env):
    """The deepspeed launcher (it passes --local_rank) with the layout only DeepSpeed runs: two pipeline
    stages on ZeRO-1."""
    proc = _run(["launch/deepspeed.sh", *TINY, "parallel=zero1", "parallel.pipeline_stages=2",
                 f"trainer.output_dir={tmp_path}"], {**env, "NUM_GPUS": "2", "MASTER_PORT": "29533"})
    assert sorted(losses(tmp_path)) == [1, 2]
    assert "pipeline stage 1:" in proc.stderr  # two stages ran
    from train.engines import optimizer_state

    saved = optimizer_state.read_full(tmp_path / "checkpoints" / "step-2" / "trainer_state")
    assert "model.embed_tokens.weight" in saved and "exp_avg_sq" in saved["model.embed_tokens.weight"]


def _refused_once(proc, message: str) -> None:
    """A refusal as one process says it: exit status 2 and one `error:` line, whatever the launcher."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == [f"error: {message}"], proc.stderr[-5000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


# 6 rows per step cannot be split over 2 ranks x 4 rows: refused by every rank
REFUSED = [*(o for o in TINY if not o.startswith("trainer.global_batch_size")), "trainer.global_batch_size=6"]
REFUSAL = ("trainer.global_batch_size=6 is not a multiple of micro_batch_size x data-parallel replicas = 4 x 2; "
           "change one of them")


def test_launch_scripts_exit_with_the_runs_own_status(tmp_path, env):
    """torchrun and the deepspeed launcher exit 1 whatever their ranks returned (torchrun after ~40 lines
    of ChildFailedError): through the launch scripts, a refusal is said once (rank 0) and exits 2."""
    out = tmp_path / "run"
    run_env = {"PYTHON": sys.executable, **env}
    proc = subprocess.run(["launch/torchrun.sh", *REFUSED, f"trainer.output_dir={out}"],
                          env={**run_env, "NPROC": "2"}, cwd=REPO, capture_output=True, text=True, timeout=300)
    _refused_once(proc, REFUSAL)
    proc = subprocess.run(["launch/deepspeed.sh", *REFUSED, f"trainer.output_dir={out}"],
                          env={**run_env, "NUM_GPUS": "2", "MASTER_PORT": "29534"}, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    _refused_once(proc, REFUSAL)
    assert not out.exists()


def test_torchrun_script_stopped_on_request_exits_75(tmp_path, env):
    """SIGTERM to the script (as Slurm or a user sends it) reaches both ranks, which save a checkpoint and
    stop; the script exits 75 (requeue me), not torchrun's 1."""
    out = tmp_path / "run"
    proc = subprocess.Popen(["launch/torchrun.sh", *FAST, "trainer.max_steps=100000", f"trainer.output_dir={out}"],
                            env={"PYTHON": sys.executable, **env, "NPROC": "2"}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and metrics(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 75, stderr[-5000:]
    last = max(losses(out))
    assert f"stopped on request at step {last} of 100000" in stderr and "ChildFailedError" not in stderr
    assert (out / "status").read_text().strip() == "stopped"
    state = out / "checkpoints" / f"step-{last}" / "trainer_state"
    assert sorted(p.name for p in state.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]  # both ranks saved


def test_sweep_script_runs_one_job_per_point(tmp_path, env):
    proc = _run(["launch/sweep.sh", "optim.lr=1e-3,3e-3", *TINY, f"hydra.sweep.dir={tmp_path}"], {**env, "NPROC": "1"})
    for point in ("optim.lr=0.001", "optim.lr=0.003"):
        assert sorted(losses(tmp_path / point)) == [1, 2]
    assert proc.stderr.count(f"{sys.executable} -m train ") == 2  # one process per point
    assert (tmp_path / "summary.md").is_file()


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_launch_scripts_fall_back_to_the_python_on_path(tmp_path, env):
    """No .venv and no $PYTHON: the scripts run the interpreter that `python3` names on PATH (an
    activated environment). A copy of the repository without .venv, and a python3 on PATH that records
    its use."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for script in (REPO / "launch").iterdir():
        (repo / "launch" / script.name).write_bytes(script.read_bytes())
        (repo / "launch" / script.name).chmod(script.stat().st_mode)
    for package in ("train", "models", "data", "configs", "hydra_plugins"):
        (repo / package).symlink_to(REPO / package)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    used = tmp_path / "python3-used"
    _executable(bin_dir / "python3", f'#!/bin/sh\necho "$@" >> {used}\nexec {sys.executable} "$@"\n')
    run_env = {k: v for k, v in env.items() if k != "PYTHON"}
    run_env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", NPROC="1")
    out = tmp_path / "run"
    proc = subprocess.run([str(repo / "launch" / "torchrun.sh"), *TINY, f"trainer.output_dir={out}"], env=run_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert sorted(losses(out)) == [1, 2]
    assert "-m train.launch torchrun --standalone --nproc_per_node 1 -m train" in used.read_text()

    tools = tmp_path / "no-python"  # a PATH with no python at all: a message that says what to do
    tools.mkdir()
    for tool in ("dirname", "basename"):
        (tools / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                                                 text=True).stdout.strip())
    run_env["PATH"] = str(tools)
    proc = subprocess.run(["/bin/bash", str(repo / "launch" / "torchrun.sh")], env=run_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "no Python" in proc.stderr and "PYTHON=" in proc.stderr


@pytest.fixture()
def fake_slurm(tmp_path, env):
    """PATH with a fake srun and scontrol, the Slurm variables of a one-node job, and the log they write."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "slurm.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return log, {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_SLURM_LOG": str(log),
                 "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "2", "MASTER_PORT": str(port),
                 "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def test_slurm_sigterm_reaches_the_ranks_and_requeues_the_job(tmp_path, fake_slurm):
    log, slurm_env = fake_slurm
    out = tmp_path / "run"
    # as sbatch runs it: the batch shell is the one process Slurm signals (--signal=B:TERM@120)
    proc = subprocess.Popen(["/bin/bash", str(REPO / "launch" / "slurm.sbatch"), *FAST, "trainer.max_steps=100000",
                             f"trainer.output_dir={out}"], env=slurm_env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-5000:]
    last = max(losses(out))
    assert f"stopped on request at step {last} of 100000" in stderr
    assert (out / "status").read_text().strip() == "stopped"
    state = out / "checkpoints" / f"step-{last}" / "trainer_state"
    assert sorted(p.name for p in state.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]  # both ranks saved
    assert log.read_text().splitlines()[-2:] == ["srun: SIGTERM", "requeue 4242"]

    # the requeued job continues from that checkpoint (trainer.resume=auto)
    proc = subprocess.run(["/bin/bash", str(REPO / "launch" / "slurm.sbatch"), *FAST, f"trainer.max_steps={last + 1}",
                           f"trainer.output_dir={out}"], env=slurm_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{last}'}" in proc.stderr
    assert max(losses(out)) == last + 1 and (out / "status").read_text().strip() == "finished"
    assert log.read_text().count("requeue") == 1  # finished: not requeued again


def test_slurm_finished_or_failed_run_is_not_requeued(tmp_path, fake_slurm):
    """The finished run is a pipeline over the job's 2 GPUs: slurm.sbatch's ranks make its stages."""
    log, slurm_env = fake_slurm
    out = tmp_path / "run"
    proc = subprocess.run(["/bin/bash", str(REPO / "launch" / "slurm.sbatch"), *TINY, "parallel=zero1",
                           "parallel.pipeline_stages=2", f"trainer.output_dir={out}"], env=slurm_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "pipeline stage 1:" in proc.stderr  # two stages ran
    assert sorted(losses(out)) == [1, 2] and (out / "status").read_text().strip() == "finished"
    assert "requeue" not in log.read_text()
    # a run that fails (a missing checkpoint to resume) exits non-zero and is not requeued either
    proc = subprocess.run(["/bin/bash", str(REPO / "launch" / "slurm.sbatch"), *TINY, f"trainer.output_dir={out}",
                           f"trainer.resume={tmp_path / 'nowhere'}"], env=slurm_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no such checkpoint" in proc.stderr
    assert "requeue" not in log.read_text()
    assert (out / "status").read_text().strip() == "finished"  # the refused attempt changed nothing


def test_slurm_starts_one_rank_per_gpu_of_the_job_not_of_the_node(tmp_path, fake_slurm):
    """A job given 2 of a node's 4 GPUs (SLURM_GPUS_ON_NODE=2): nvidia-smi, which lists the node's 4 where no
    cgroup hides them, made the script start 4 ranks."""
    log, slurm_env = fake_slurm
    bin_dir = Path(slurm_env["PATH"].split(os.pathsep)[0])
    _executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo \"GPU $i: H100\"; done\n")
    job_env = {k: v for k, v in slurm_env.items() if k != "GPUS_PER_NODE"}
    out = tmp_path / "run"
    proc = subprocess.run(["/bin/bash", str(REPO / "launch" / "slurm.sbatch"), *TINY, f"trainer.output_dir={out}"],
                          env={**job_env, "SLURM_GPUS_ON_NODE": "2"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    state = out / "checkpoints" / "step-2" / "trainer_state"
    assert sorted(p.name for p in state.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
