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
  * the points ledger, `<hydra.sweep.dir>/points.jsonl`: what each point does (start, resume, skip)
    and how it ends (finished, stopped, refused, failed, with the reason), written by whichever process
    plans or runs it (`record_point`); the sweep's own console shows the lines of points that run in
    other processes (submitit jobs), and summary.md lists every point from it, refused ones included;
  * at the end, the sweep's plots and summary.md (`SweepSummary`, a Hydra callback).

Nothing here imports torch at module level: the Hydra callback is instantiated by every
`python -m train` (and every point).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import signal
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback

# the launcher and the jobs record points through this module
from .ledger import LEDGER, outcome_message, record_point

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

    @property
    def event(self) -> str:
        """What the point does, as the points ledger records it."""
        return "skipped" if self.skip else "resumed" if self.last_step is not None else "started"

    def describe(self, point_dir: Path) -> str:
        if self.skip:
            return f"skipping {point_dir}: finished (checkpoint at step {self.last_step} of {self.target_step})"
        if self.last_step is not None:
            return f"resuming {point_dir} from its step-{self.last_step} checkpoint (of {self.target_step} steps)"
        if self.resume not in (None, "auto"):  # a decay branch: another run's checkpoint
            return f"starting {point_dir} from {self.resume}"
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
    branch started); a point without one starts as its own trainer.resume says (null: resume=auto, which
    restarts a point that died before its first checkpoint). trainer.overwrite_output_dir=true starts
    every point afresh, removing what its directory holds (train.loop)."""
    target = target_steps(run)
    if run.trainer.overwrite_output_dir:
        return PointPlan(False, None, target, None)
    last = newest_complete_checkpoint(point_dir)
    if last is not None and last >= target:
        return PointPlan(True, None, target, last)
    from .config import is_unset

    resume = "auto" if last is not None or is_unset(run.trainer.resume) else run.trainer.resume
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
# The points ledger (train/ledger.py: what each point of the sweep did) is written here and read by plots


def _is_refusal(exc: BaseException) -> bool:
    """A point refused before it trained: a RunConfigError or LayoutError, or train.cli's PointFailed
    raised while handling one (in a sweep, a refusal fails the point alone)."""
    from .config import RunConfigError
    from .distributed import LayoutError

    return any(isinstance(e, (RunConfigError, LayoutError)) for e in (exc, exc.__context__, exc.__cause__))


def _first_task() -> bool:
    """Global rank 0 of a submitit job (each of its tasks runs the job callbacks); True elsewhere."""
    if not in_submitit_job():
        return True
    import submitit

    return submitit.JobEnvironment().global_rank == 0


class _LedgerFollower:
    """Shows on the sweep's console the ledger lines written by other processes (submitit jobs), as they
    come: what each point does and where it writes, which Hydra's submitit launcher does not say (its
    listing shows the command line's overrides, trainer.output_dir included, which points do not use)."""

    def __init__(self, sweep_dir: Path, interval: float = 1.0):
        self.path = Path(sweep_dir) / LEDGER
        self.interval = interval
        self.offset = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sweep-ledger", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.drain()

    def drain(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                text = f.read()
        except OSError:
            return
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next turn
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("pid") != os.getpid():  # this process's own points are on the console already
                level = logging.WARNING if entry.get("event") in ("refused", "failed") else logging.INFO
                logger.log(level, "#%s %s", entry.get("job"), entry.get("message"))

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        self.drain()


# ---------------------------------------------------------------------------------------------------
# The end of a sweep


def _in_multirun(config) -> bool:
    """A job of a multirun (a torchrun launcher's point is a plain run of its own `python -m train`)."""
    from omegaconf import OmegaConf

    return str(OmegaConf.select(config, "hydra.mode")) == "RunMode.MULTIRUN"


class SweepSummary(Callback):
    """Hydra callback (configs/config.yaml, `hydra.callbacks.sweep_summary`):

      * in a point's job (launchers that run `python -m train`'s task function: submitit, basic), it
        records in the points ledger what the point does (start, resume, skip) and how it ended
        (finished, refused, failed with the reason);
      * in the sweep's own process, it shows on the console the ledger lines of points run by other
        processes (submitit jobs) as they come, and when the multirun ends it writes summary.md,
        curves.png and final_eval_loss.png (`train.plot.plot_sweep(hydra.sweep.dir)`), also when a
        point failed or the sweep was stopped (Hydra then skips on_multirun_end; an atexit hook covers
        it). `hydra.callbacks.sweep_summary.enabled=false` turns the summary and plots off.

    The default torchrun launcher plans and runs the points itself and writes their ledger lines."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.sweep_dir: Path | None = None
        self.done = False
        self._follower: _LedgerFollower | None = None

    def __getstate__(self):
        # submitit pickles the launcher, and this callback with it, into every job: no thread in there
        return {**self.__dict__, "_follower": None}

    def on_multirun_start(self, config, **kwargs) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        # the ledger says what this run of the sweep does; the points' directories keep what earlier runs did
        (self.sweep_dir / LEDGER).unlink(missing_ok=True)
        self._follower = _LedgerFollower(self.sweep_dir)
        if "torchrun_launcher" not in str(config.hydra.launcher.get("_target_", "")):
            logger.info("sweep directory %s: each point writes to %s/<its swept overrides> (trainer.output_dir names "
                        "the sweep directory only)", self.sweep_dir, self.sweep_dir)
        atexit.register(self.write)

    def on_multirun_end(self, config, **kwargs) -> None:
        self.write()

    def on_job_start(self, config, **kwargs) -> None:
        if not _in_multirun(config) or not _first_task():
            return
        from omegaconf import OmegaConf

        from .config import validate

        point_dir = Path(str(config.hydra.runtime.output_dir))
        try:
            values = OmegaConf.to_container(config, resolve=True)
            values.pop("hydra", None)
            values["trainer"]["output_dir"] = str(point_dir)
            plan = plan_point(validate(values), point_dir)
        except Exception:  # refused: the job itself says why, and on_job_end records it
            return
        record_point(config.hydra.sweep.dir, config.hydra.job.num, point_dir, plan.event, plan.describe(point_dir),
                     step=plan.last_step, target=plan.target_step)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if not _in_multirun(config) or not _first_task():
            return
        from hydra.core.utils import JobStatus

        point_dir = Path(str(config.hydra.runtime.output_dir))
        if job_return.status == JobStatus.COMPLETED:
            result = job_return.return_value if isinstance(job_return.return_value, dict) else {}
            if result.get("skipped"):
                return  # on_job_start recorded it
            event, fields = ("stopped" if result.get("stopped") else "finished"), {"step": result.get("step")}
        else:
            exc = job_return._return_value
            event, fields = ("refused" if _is_refusal(exc) else "failed"), {"reason": str(exc).strip()}
        record_point(config.hydra.sweep.dir, config.hydra.job.num, point_dir, event,
                     outcome_message(point_dir, event, **fields), **fields)

    def write(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
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
