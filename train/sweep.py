"""Sweeps: `python -m train --multirun key=a,b other=x,y` runs one training job per point.

What a point needs, whichever Hydra launcher runs it (hydra_plugins/smolpretrain_launcher, the
default, one `torchrun` per point; `submitit_slurm` / `submitit_local`; Hydra's in-process `basic`):

  * its own directory `<hydra.sweep.dir>/<its overrides>`: `configs/config.yaml` names it with the
    `smolpretrain.point_dir` resolver over `hydra.job.override_dirname`, which `multirun_argv` limits
    to the keys swept on the command line (constant overrides would make every name long and alike);
  * `plan_point`: skip it when its newest complete checkpoint is at its last step, resume it
    (`trainer.resume=auto`) when it has a checkpoint, otherwise start as its overrides say (a decay
    branch starts from the checkpoint its `trainer.resume` names);
  * under submitit: ranks from submitit's job environment (`submitit_distributed_environment`), and
    a requeue when the run was stopped after its checkpoint (`SubmititPreemption`);
  * at the end, the sweep's plots and summary.md (`SweepSummary`, a Hydra callback).

Nothing here imports torch at module level: the Hydra callback is instantiated by every
`python -m train` (and every point).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import signal
import zlib
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback

logger = logging.getLogger("train.sweep")

RESOLVER = "smolpretrain.point_dir"
# Overrides that never name a point: where the sweep writes is the sweep directory's business.
NEVER_IN_NAME = ("trainer.output_dir",)
MAX_NAME = 200  # bytes; most filesystems allow 255 per path component


def point_dirname(override_dirname: str, job_num=0) -> str:
    """A filesystem-safe directory name for a point from Hydra's `override_dirname`
    (`model=doge-20m,optim.lr=0.001`): `/` and other separators in values become `_`, `+`/`~`
    prefixes go, and a name too long for a path component keeps its start plus a hash of the whole."""
    name = re.sub(r"(^|,)[+~]+", r"\1", str(override_dirname))
    name = re.sub(r"[/\\\s'\"\x00-\x1f]+", "_", name).strip("._") or f"point-{job_num}"
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_NAME - 11].decode(errors="ignore") + "-" + digest
    return name


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, point_dirname)


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def multirun_argv(argv: list[str]) -> list[str]:
    """Name each point by the keys swept on the command line only: every constant override (and
    trainer.output_dir) goes into `hydra.job.config.override_dirname.exclude_keys`, unless the user
    set that list."""
    if any(a.split("=", 1)[0].lstrip("+") == "hydra.job.config.override_dirname.exclude_keys" for a in argv):
        return argv
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    parsed = OverridesParser.create().parse_overrides(task)
    constant = {o.key_or_group for o in parsed if not o.is_sweep_override()} | set(NEVER_IN_NAME)
    exclude = f"hydra.job.config.override_dirname.exclude_keys=[{','.join(sorted(constant))}]"
    # beside the other overrides: Hydra's argument parser takes them as one run of positionals
    at = argv.index(task[0]) if task else len(argv)
    return [*argv[:at], exclude, *argv[at:]]


# ---------------------------------------------------------------------------------------------------
# One point: skip, resume or start


@dataclass
class PointPlan:
    skip: bool
    resume: str | None  # the trainer.resume to run the point with
    target_step: int
    last_step: int | None  # the newest complete checkpoint of the point's own directory

    def describe(self, point_dir: Path) -> str:
        if self.skip:
            return f"skipping {point_dir}: finished (checkpoint at step {self.last_step} of {self.target_step})"
        if self.last_step is not None:
            return f"resuming {point_dir} from its step-{self.last_step} checkpoint (of {self.target_step} steps)"
        return f"starting {point_dir}"


def newest_complete_checkpoint(output_dir: Path) -> int | None:
    """The step of the newest checkpoint whose manifest (written last) exists."""
    from .checkpoint import MANIFEST, list_checkpoints, step_of

    complete = [p for p in list_checkpoints(Path(output_dir)) if (p / MANIFEST).is_file()]
    return step_of(complete[-1]) if complete else None


def branch_start(run) -> int | None:
    """The step a decay branch starts at: scheduler.branch_from_step, or the step of the checkpoint
    trainer.resume names; None when the run is no decay branch."""
    from .checkpoint import STEP_DIR
    from .schedule import is_branch

    s = run.scheduler
    if not is_branch(s):
        return None
    if s.branch_from_step is not None:
        return s.branch_from_step
    match = STEP_DIR.match(Path(str(run.trainer.resume or "")).name)
    return int(match.group(1)) if match else None


def target_steps(run) -> int:
    """The last step of a run: trainer.max_steps, or where its decay branch ends. Raises
    RunConfigError when the branch cannot be built (as the run itself would)."""
    from .config import RunConfigError
    from .schedule import build_schedule

    start = branch_start(run)
    if start is None:
        return run.trainer.max_steps
    try:
        return build_schedule(run.scheduler, run.optim.lr, run.trainer.max_steps, branch_from=start).total_steps
    except ValueError as exc:
        raise RunConfigError(str(exc)) from None


def plan_point(run, point_dir: Path) -> PointPlan:
    """`run`: the point's validated RunConfig. A point with a checkpoint of its own continues it
    (trainer.resume=auto, which also carries a decay branch on: its checkpoints record where the
    branch started); a point without one starts as its own trainer.resume says (null: fresh)."""
    target = target_steps(run)
    last = newest_complete_checkpoint(point_dir)
    if last is not None and last >= target:
        return PointPlan(True, None, target, last)
    resume = "auto" if last is not None or run.trainer.resume in (None, "", "none", "null") else run.trainer.resume
    return PointPlan(False, resume, target, last)


# ---------------------------------------------------------------------------------------------------
# submitit: ranks and requeue


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_FOLDER"))  # set by submitit's worker before it loads the job


def submitit_distributed_environment() -> dict[str, str]:
    """torch.distributed's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from submitit's
    job environment (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host of SLURM_JOB_NODELIST
    on Slurm; submitit's own variables for submitit_local). Each task of a point is one rank. Variables
    already set win. Returns what it set."""
    if not in_submitit_job():
        return {}
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return {}
    # every task of the job derives the same port from the job id; away from torchrun's default 29500
    port = 20000 + zlib.crc32(str(env.job_id).encode()) % 20000
    wanted = {"RANK": env.global_rank, "LOCAL_RANK": env.local_rank, "WORLD_SIZE": env.num_tasks,
              "MASTER_ADDR": env.hostnames[0], "MASTER_PORT": port}
    set_now = {k: str(v) for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


class SubmititPreemption:
    """Under submitit, its preemption/timeout signal (USR2 by default) would requeue the job at once,
    in the middle of a step, losing everything since the last periodic checkpoint. While the point
    trains, the signal becomes a SIGTERM to this process, which the training loop answers by saving a
    checkpoint after the current step and stopping; `requeue` then hands over to submitit's handler
    (global rank 0 requeues the job; the requeued job resumes the point with trainer.resume=auto)."""

    def __init__(self):
        self.signum = None
        self.handler = None
        if not in_submitit_job():
            return
        import submitit

        self.signum = submitit.JobEnvironment._usr_sig()
        self.handler = signal.getsignal(self.signum)
        signal.signal(self.signum, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))

    def restore(self) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self.handler)

    def requeue(self) -> bool:
        """Requeue through submitit (which exits this process on rank 0); False when not under submitit."""
        self.restore()
        if self.signum is None or not callable(self.handler):
            return False
        logger.warning("stopped after a checkpoint: asking submitit to requeue this point")
        self.handler(self.signum, None)
        return True


# ---------------------------------------------------------------------------------------------------
# The end of a sweep


class SweepSummary(Callback):
    """Hydra callback (configs/config.yaml, `hydra.callbacks.sweep_summary`): when a multirun ends,
    `train.plot.plot_sweep(hydra.sweep.dir)` writes summary.md, curves.png and final_eval_loss.png.
    Also when a point failed or the sweep was stopped (Hydra then skips on_multirun_end; an atexit
    hook covers it). `hydra.callbacks.sweep_summary.enabled=false` turns it off."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.sweep_dir: Path | None = None
        self.done = False

    def on_multirun_start(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        atexit.register(self.write)

    def on_multirun_end(self, config, **kwargs) -> None:
        self.write()

    def write(self) -> None:
        if not self.enabled or self.done or self.sweep_dir is None:
            return
        self.done = True
        from .plot import PlotError, plot_sweep, sweep_points

        if not self.sweep_dir.is_dir() or not sweep_points(self.sweep_dir):
            return  # no point has logged anything (all refused, or stopped before their first step)

        try:
            written = plot_sweep(self.sweep_dir)
        except PlotError as exc:
            logger.warning("sweep summary not written: %s", exc)
            return
        except Exception as exc:  # a plotting bug must not hide how the sweep itself went
            logger.warning("sweep summary failed (%s: %s); try python -m train.plot %s", type(exc).__name__, exc,
                           self.sweep_dir)
            return
        logger.info("sweep summary: %s (plots: %s, %s)", written["summary"], written["curves"],
                    written["final_eval_loss"])
