"""Sweeps through the user's door, `python -m train --multirun ...`: the default launcher (one torchrun
process group per point, one after another), submitit_local, re-runs that skip finished points and
resume unfinished ones, and decay branches fanned out from one stable run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FAST, REPO, losses, metrics

TINY = [*FAST, "trainer.max_steps=2"]
GRID = ["optim.lr=1e-3,3e-3", "model=doge-tiny,glm4-tiny"]
POINTS = ["model=doge-tiny,optim.lr=0.001", "model=doge-tiny,optim.lr=0.003",
          "model=glm4-tiny,optim.lr=0.001", "model=glm4-tiny,optim.lr=0.003"]


def sweep(args: list[str], env: dict, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", "--multirun", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-20000:]}")
    return proc


def summary_cells(sweep_dir: Path, column: int) -> dict[str, str]:
    """summary.md's table, in its order: point -> the cell of `column` (6: status, 5: wall time)."""
    rows = {}
    for line in (sweep_dir / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("point", "---"):
            rows[cells[0]] = cells[column]
    return rows


def summary_rows(sweep_dir: Path) -> dict[str, str]:
    """summary.md's table: point -> status."""
    return summary_cells(sweep_dir, 6)


def assert_finished_sweep(sweep_dir: Path, points: list[str], steps: list[int]) -> None:
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "metrics.jsonl").is_file()) == points
    for point in points:
        assert sorted(losses(sweep_dir / point)) == steps, point
    assert summary_rows(sweep_dir) == {p: "finished" for p in points}
    for plot in ("curves.png", "final_eval_loss.png"):
        assert (sweep_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def point_lines(stderr: str, sweep_dir: Path, points: list[str], what: str) -> list[str]:
    """The console's `#N <what>` lines of each point, e.g. what="starting {dir}"; asserts one per point."""
    found = []
    for point in points:
        wanted = what.format(dir=sweep_dir / point)
        lines = [line for line in stderr.splitlines() if re.search(r"#\d+ " + re.escape(wanted), line)]
        assert len(lines) == 1, (wanted, stderr[-5000:])
        found += lines
    return found


def ranks_that_saved(point_dir: Path, step: int) -> list[str]:
    return sorted(p.name for p in (point_dir / "checkpoints" / f"step-{step}" / "trainer_state").glob("rank-*.pt"))


def test_local_launcher_runs_a_grid_and_a_rerun_skips_the_finished_points(tmp_path, env):
    sweep_dir = tmp_path / "grid"
    args = [*TINY, *GRID, f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    proc = sweep(args, env)
    first_run = time.perf_counter() - started
    assert_finished_sweep(sweep_dir, POINTS, [1, 2])
    for point in POINTS:
        config = json.loads((sweep_dir / point / "config.json").read_text())
        assert f"model={config['model']['model_type']}-tiny,optim.lr={config['optim']['lr']}" == point
    point_lines(proc.stderr, sweep_dir, POINTS, "starting {dir}")
    point_lines(proc.stderr, sweep_dir, POINTS, "{dir}: finished at step 2")

    before = {p: (sweep_dir / p / "metrics.jsonl").read_bytes() for p in POINTS}
    started = time.perf_counter()
    proc = sweep(args, env)
    elapsed = time.perf_counter() - started
    assert proc.stderr.count("finished (checkpoint at step 2 of 2)") == 4, proc.stderr[-3000:]
    assert " -m train " not in proc.stderr  # no point was launched
    assert elapsed < first_run / 2, (elapsed, first_run)
    assert {p: (sweep_dir / p / "metrics.jsonl").read_bytes() for p in POINTS} == before
    assert summary_rows(sweep_dir) == {p: "finished" for p in POINTS}

    # the sweep extended by a value that its points refuse: those fail alone, with the reason; the
    # finished points keep their names (and are skipped); the sweep exits 1
    extended = [*TINY, "optim.lr=1e-3,3e-3,-1e-3", "model=doge-tiny,glm4-tiny", f"hydra.sweep.dir={sweep_dir}"]
    proc = sweep(extended, env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("finished (checkpoint at step 2 of 2)") == 4
    for model in ("doge-tiny", "glm4-tiny"):
        assert f"model={model},optim.lr=-0.001: refused: optim.lr=-0.001 must be > 0" in proc.stderr
        assert not (sweep_dir / f"model={model},optim.lr=-0.001").exists()
    assert "2 of 6 points failed" in proc.stderr and "Traceback" not in proc.stderr
    assert_refused_points_are_summarised(sweep_dir)


REFUSED = ["model=doge-tiny,optim.lr=-0.001", "model=glm4-tiny,optim.lr=-0.001"]


def assert_refused_points_are_summarised(sweep_dir: Path) -> None:
    """The grid extended by optim.lr=-1e-3: summary.md lists all 6 points, the refused ones with the
    reason, in the order of their values (-0.001 first); the plots mark them."""
    from train import plot
    from train.ledger import last_events

    text = (sweep_dir / "summary.md").read_text()
    assert "6 points (4 finished, 2 refused)" in text
    rows = summary_rows(sweep_dir)
    assert list(rows) == [REFUSED[0], *POINTS[:2], REFUSED[1], *POINTS[2:]]
    for point in REFUSED:
        assert rows[point].startswith("refused: optim.lr=-0.001 must be > 0"), rows[point]
    runs = [plot.load_run(sweep_dir / p) for p in POINTS]
    keys = plot.swept_keys(runs, REFUSED)
    table = plot.sweep_rows(runs, keys, last_events(sweep_dir))
    marks = _gid(plot.sweep_figure(table, keys).panels["optim.lr"], "optim.lr:no final eval loss")
    assert list(marks.get_xdata()) == [-0.001, -0.001]
    labels, title = plot._labels(table, keys)
    legend = plot.figure_for_runs(runs, labels=labels, legend_title=title,
                                  absent=[(labels[p], "refused") for p in REFUSED]).legends[0]
    assert [t.get_text() for t in legend.get_texts()][-2:] == ["doge-tiny, -0.001 (refused)",
                                                              "glm4-tiny, -0.001 (refused)"]


def _gid(ax, gid):
    (line,) = [line for line in ax.lines if line.get_gid() == gid]
    return line


def test_submitit_local_launcher(tmp_path, env):
    sweep_dir = tmp_path / "grid"
    proc = sweep([*TINY, *GRID, "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"], env)
    assert_finished_sweep(sweep_dir, POINTS, [1, 2])
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 4  # one submitit job per point
    # the sweep's own console (not only the jobs' logs in .submitit/) says what each point does, and where
    point_lines(proc.stderr, sweep_dir, POINTS, "starting {dir}")
    point_lines(proc.stderr, sweep_dir, POINTS, "{dir}: finished at step 2")
    assert f"each point writes to {sweep_dir}/<its swept overrides>" in proc.stderr

    extended = [*TINY, "optim.lr=1e-3,3e-3,-1e-3", "model=doge-tiny,glm4-tiny", "hydra/launcher=submitit_local",
                f"hydra.sweep.dir={sweep_dir}"]
    proc = sweep(extended, env, check=False)
    assert proc.returncode == 1
    point_lines(proc.stderr, sweep_dir, POINTS, "skipping {dir}: finished (checkpoint at step 2 of 2)")
    point_lines(proc.stderr, sweep_dir, REFUSED, "{dir}: refused: optim.lr=-0.001 must be > 0")
    assert_refused_points_are_summarised(sweep_dir)


def test_a_stopped_point_is_resumed_by_running_the_sweep_again(tmp_path, env):
    """Two processes per point: SIGTERM to the sweep reaches the ranks through torchrun, and the re-run
    creates a process group for each of its two points in turn."""
    sweep_dir = tmp_path / "lr"
    args = [*FAST, "trainer.max_steps=20", "optim.lr=1e-3,3e-3", "hydra.launcher.nproc_per_node=2",
            f"hydra.sweep.dir={sweep_dir}"]
    first, second = sweep_dir / "optim.lr=0.001", sweep_dir / "optim.lr=0.003"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--multirun", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((first / "metrics.jsonl").is_file() and metrics(first)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # as Slurm or a user stopping the sweep
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-5000:]  # stopped on request: run me again
    stopped_at = max(losses(first))
    assert 1 <= stopped_at < 20
    assert (first / "status").read_text().strip() == "stopped"
    assert ranks_that_saved(first, stopped_at) == ["rank-0.pt", "rank-1.pt"]
    assert (first / "checkpoints" / f"step-{stopped_at}" / "MANIFEST.json").is_file()
    assert not second.exists()  # the sweep stopped: the next point never started
    assert summary_rows(sweep_dir) == {"optim.lr=0.001": f"unfinished (step {stopped_at})"}

    proc = sweep(args, env)
    assert f"resuming {first} from its step-{stopped_at} checkpoint (of 20 steps)" in proc.stderr
    assert f"resumed from {first / 'checkpoints' / f'step-{stopped_at}'}" in proc.stderr
    steps = [m["step"] for m in metrics(first) if "loss" in m]
    assert steps == list(range(1, 21))  # each step once: continued, not restarted
    assert_finished_sweep(sweep_dir, ["optim.lr=0.001", "optim.lr=0.003"], list(range(1, 21)))
    for point in (first, second):
        assert ranks_that_saved(point, 20) == ["rank-0.pt", "rank-1.pt"]


def test_a_typo_anywhere_in_a_sweep_is_refused_before_anything_starts(tmp_path, env):
    for bad, message in (("optim.lrr=1e-3,3e-3", "unknown config key optim.lrr. Did you mean lr?"),
                         ("optim.lr=1e-3,fast", "optim.lr: Value 'fast' of type 'str' could not be converted")):
        proc = sweep([*TINY, bad, f"hydra.sweep.dir={tmp_path / 'typo'}"], env, check=False, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
        assert not (tmp_path / "typo").exists()
    # a sweep under torchrun (each rank would launch the whole sweep): refused, with what to run instead
    proc = sweep([*TINY, "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path / 'typo'}"],
                 {**env, "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0"}, check=False, timeout=60)
    assert proc.returncode == 2 and "hydra.launcher.nproc_per_node=N" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_decay_branches_fan_out_from_a_stable_run_in_one_command(tmp_path, env):
    stable = tmp_path / "stable"
    subprocess.run([sys.executable, "-m", "train", *FAST, f"trainer.output_dir={stable}", "trainer.max_steps=6",
                    "trainer.save_every=2", "trainer.keep_last=0", "scheduler.warmup=0", "scheduler.decay=0"],
                   env=env, cwd=REPO, check=True, capture_output=True)
    decays = tmp_path / "decays"
    peak, min_lr_ratio = 3e-3, 0.1
    proc = sweep([*FAST, f"trainer.resume={stable}", "scheduler.branch_from_step=range(2,5,2)",
                  "scheduler.branch_decay_fraction=0.5", f"scheduler.min_lr_ratio={min_lr_ratio}", "scheduler.warmup=0",
                  f"hydra.sweep.dir={decays}"], env)
    # step 2 decays over 1 step (half of 2), step 4 over 2; each resumed the stable run's checkpoint
    expected = {"scheduler.branch_from_step=2": (2, [3]), "scheduler.branch_from_step=4": (4, [5, 6])}
    assert sorted(p.name for p in decays.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(expected)
    for name, (start, steps) in expected.items():
        assert f"resumed from {stable / 'checkpoints' / f'step-{start}'}" in proc.stderr
        lrs = {m["step"]: m["lr"] for m in metrics(decays / name) if "lr" in m}
        assert sorted(lrs) == steps, name
        assert lrs[steps[-1]] == pytest.approx(min_lr_ratio * peak)  # decayed to the floor at its last step
    # linear decay over steps 4, 5: half-way after the first
    assert metrics(decays / "scheduler.branch_from_step=4")[0]["lr"] == pytest.approx(peak * (1 - 0.5 * (1 - min_lr_ratio)))
    assert summary_rows(decays) == {name: "finished" for name in expected}
    # wall time: each record's window of the branch's own steps (from its start, not from step 0) at the
    # rate logged for it; summary.md shows it to 0.1 s
    walls = summary_cells(decays, 5)
    for name, (start, _) in expected.items():
        records = [m for m in metrics(decays / name) if "tokens_per_sec" in m]
        steps = [start] + [m["step"] for m in records]
        own = sum((b - a) * 8 * 64 / m["tokens_per_sec"] for a, b, m in zip(steps, steps[1:], records))
        assert float(walls[name].removesuffix(" s")) == pytest.approx(own, abs=0.05 + 1e-9), name
    assert sorted(losses(stable)) == [1, 2, 3, 4, 5, 6]  # the stable run is untouched
    # a step the stable run did not save: refused, with the steps it has
    proc = subprocess.run([sys.executable, "-m", "train", *FAST, f"trainer.resume={stable}", "scheduler.warmup=0",
                           "scheduler.branch_from_step=3", "scheduler.branch_decay_fraction=0.5",
                           f"trainer.output_dir={tmp_path / 'nope'}"], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "has no checkpoint at step 3 (it has: step-2, step-4, step-6)" in proc.stderr
    assert not (tmp_path / "nope").exists()


def _submitit_task_pids(folder: Path) -> list[int]:
    """Processes running a submitit task of the jobs under `folder` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and any(str(folder) in arg for arg in cmdline):
            pids.append(int(proc.name))
    return pids


def test_submitit_preemption_checkpoints_requeues_and_resumes_the_point(tmp_path, env):
    """submitit's preemption signal (USR2) to a point: it saves a checkpoint after the current step
    (not killed mid-step), submitit requeues the job, and the requeued job resumes the point."""
    sweep_dir = tmp_path / "preempt"
    point = sweep_dir / "optim.lr=0.001"
    cmd = [sys.executable, "-m", "train", "--multirun", *FAST, "trainer.max_steps=30", "optim.lr=choice(1e-3)",
           "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((point / "metrics.jsonl").is_file() and metrics(point)):
        time.sleep(0.1)
    pids = _submitit_task_pids(sweep_dir / ".submitit")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-5000:]
    log = "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_0_log.err")))
    stopped = re.search(r"stopped on request at step (\d+) of 30", log)
    assert stopped, log[-5000:]
    at = int(stopped.group(1))
    assert "asking submitit to requeue this point" in log and "Requeued job" in log
    assert f"resuming {point} from its step-{at} checkpoint (of 30 steps)" in log
    assert [m["step"] for m in metrics(point) if "loss" in m] == list(range(1, 31))  # each step once
    assert (point / "status").read_text().strip() == "finished"
    assert summary_rows(sweep_dir) == {"optim.lr=0.001": "finished"}


def test_submitit_tasks_are_the_ranks_of_a_point(tmp_path, env):
    """hydra.launcher.tasks_per_node=2: each submitit task of a point's job is one rank, its rank,
    world size and rendezvous taken from submitit's job environment (on Slurm, SLURM_PROCID and the
    node list), so a point trains data-parallel on 2 ranks and each rank saves its own loader state."""
    sweep_dir = tmp_path / "tasks"
    sweep([*TINY, "optim.lr=choice(1e-3)", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
           f"hydra.sweep.dir={sweep_dir}"], {**env, "OMP_NUM_THREADS": "1"})
    point = sweep_dir / "optim.lr=0.001"
    assert sorted(losses(point)) == [1, 2]
    assert ranks_that_saved(point, 2) == ["rank-0.pt", "rank-1.pt"]
    log = "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.err")))
    assert "; 2 data-parallel x 4 micro-batch x 1 accumulation = 8 rows" in log, log[-3000:]
    assert summary_rows(sweep_dir) == {"optim.lr=0.001": "finished"}


def test_point_names_are_the_swept_overrides_made_safe_for_a_filesystem():
    from train.sweep import multirun_argv, point_dirname

    assert point_dirname("model=doge-20m,optim.lr=0.001") == "model=doge-20m,optim.lr=0.001"
    # a swept path (decay branches from explicit checkpoints) stays one directory level
    assert point_dirname("trainer.resume=/runs/a/checkpoints/step-2000") == "trainer.resume=_runs_a_checkpoints_step-2000"
    assert point_dirname("++model.hidden_size=64,optim.lr=0.001") == "model.hidden_size=64,optim.lr=0.001"
    assert point_dirname("", 3) == "point-3"  # nothing swept
    long = point_dirname(",".join(f"key{i}=value{i}" for i in range(60)))
    assert len(long.encode()) <= 200 and long != point_dirname(",".join(f"key{i}=value{i}" for i in range(61)))
    # constant overrides (and the output directory) are left out of the names; swept ones stay
    argv = multirun_argv(["--multirun", "optim.lr=1e-3,3e-3", "trainer.max_steps=2", "model=doge-tiny",
                          "scheduler.branch_from_step=range(2,5,2)", "hydra.sweep.dir=x", "--cfg", "job"])
    assert argv[1] == "hydra.job.config.override_dirname.exclude_keys=[model,trainer.max_steps,trainer.output_dir]"


@pytest.mark.parametrize("overrides, message", [
    (["scheduler.branch_decay_fraction=1.5"], "scheduler.branch_decay_fraction=1.5 must be in (0, 1]"),
    (["scheduler.branch_decay_fraction=0.1", "scheduler.branch_decay_steps=400"], "set one of them"),
    (["scheduler.branch_from_step=2000", "trainer.resume=outputs/stable"],
     "also set scheduler.branch_decay_fraction"),
    (["scheduler.branch_from_step=2000", "scheduler.branch_decay_fraction=0.1"],
     "set trainer.resume to that run's directory"),
])
def test_decay_branch_keys_are_checked(overrides, message):
    from train.config import RunConfigError, validate

    from .conftest import compose

    with pytest.raises(RunConfigError, match=re.escape(message)):
        validate(compose(overrides))


def test_branch_decay_fraction_scales_with_the_branch_start():
    from train.config import SchedulerSchema
    from train.schedule import build_schedule

    cfg = SchedulerSchema(warmup=10, branch_decay_fraction=0.1)
    for start in (2000, 4000):
        s = build_schedule(cfg, 1.0, 100, branch_from=start)
        assert (s.decay_start, s.decay_steps, s.total_steps) == (start, start // 10, start + start // 10)
        assert s(start - 1) == 1.0 and s(s.total_steps - 1) == 0.0


def test_a_point_with_overwrite_output_dir_starts_afresh(tmp_path):
    """A finished point is skipped and an unfinished one continued (resume=auto); with
    trainer.overwrite_output_dir=true every point starts afresh (the run removes what its directory
    holds), and overwriting while continuing is refused."""
    from train.config import RunConfigError, validate
    from train.sweep import plan_point

    from .conftest import compose

    point = tmp_path / "point"
    (point / "checkpoints" / "step-2").mkdir(parents=True)
    (point / "checkpoints" / "step-2" / "MANIFEST.json").write_text("{}")
    plan = plan_point(validate(compose(["trainer.max_steps=2"])), point)
    assert plan.skip and plan.last_step == 2
    plan = plan_point(validate(compose(["trainer.max_steps=4"])), point)
    assert not plan.skip and plan.resume == "auto" and plan.last_step == 2
    plan = plan_point(validate(compose(["trainer.max_steps=2", "trainer.overwrite_output_dir=true"])), point)
    assert not plan.skip and plan.resume is None and plan.last_step is None
    with pytest.raises(RunConfigError, match=r"trainer.overwrite_output_dir=true starts a fresh run.*set only one"):
        validate(compose(["trainer.overwrite_output_dir=true", "trainer.resume=auto"]))
