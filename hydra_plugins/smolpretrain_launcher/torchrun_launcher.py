"""`hydra/launcher=torchrun` (the default of `python -m train --multirun`): each point of a sweep is its
own process group, run one after another:

    python -m train.launch torchrun --standalone --nproc_per_node N -m train <the point's overrides>
    python -m train <the point's overrides>                               (N = 1)

Hydra's in-process basic launcher cannot do this: a process group cannot be re-created in the process
that ran the previous point. Per point, before anything starts, the launcher composes and validates
its config (a refused point fails alone, with the reason), and skips it when its newest complete
checkpoint is at its last step; otherwise the point runs in `<hydra.sweep.dir>/<its overrides>` with
`trainer.resume=auto` when it has a checkpoint there (train.sweep.plan_point). The console says what
each point does, in which directory, and how it ended; so does the sweep's points ledger
(train.sweep.record_point), from which summary.md lists refused points too. Each point's exit
status becomes its JobReturn: 0 completed; anything else failed (the sweep goes on with the next
point, and Hydra reports the failures at the end). SIGTERM / SIGINT to the sweep reaches the running
point, which saves a checkpoint and stops; the sweep then stops with exit status 75, and re-running
the same command continues it.

    hydra.launcher.nproc_per_node=2       processes per point (torchrun)
    hydra.launcher.torchrun_args=[--shutdown-timeout=120]   more torchrun arguments
    hydra.launcher.python=/path/to/python the interpreter for the points (default: this one)
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without putting
# it in sys.modules, and dataclasses then cannot resolve string annotations.
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("train.sweep")

EXIT_STOPPED = 75  # train.loop.EXIT_STOPPED (not imported: plugin discovery must stay light)
EXIT_REFUSED = 2  # train.cli.EXIT_REFUSED


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.smolpretrain_launcher.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 1
    torchrun_args: List[str] = field(default_factory=list)
    python: Optional[str] = None


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf,
                             provider="smolpretrain")


class PointFailed(CompactHydraException):
    """A point that exited with a non-zero status or was refused before it started. (Compact: Hydra
    prints the message, not a traceback of the launcher.)"""


class SweepStopped(SystemExit):
    """SIGTERM / SIGINT during a sweep: the running point saved a checkpoint and stopped."""


def quote(value: str) -> str:
    """A string as a Hydra override value; quoted when it holds more than word characters and `/.@:-`
    (a point's directory has `=` and `,` in its name: literal only inside quotes)."""
    if re.fullmatch(r"[\w./@:-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"  # inside quotes Hydra unescapes only \\'


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int = 1, torchrun_args: Sequence[str] = (), python: Optional[str] = None):
        if nproc_per_node < 1:
            raise ValueError(f"hydra.launcher.nproc_per_node={nproc_per_node} must be >= 1 (processes per point)")
        self.nproc_per_node = nproc_per_node
        self.torchrun_args = list(torchrun_args)
        self.python = python or sys.executable
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self._child: Optional[subprocess.Popen] = None
        self._stop_signal: Optional[int] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    # ------------------------------------------------------------------ one point
    def _command(self, overrides: Sequence[str], point_dir: Path, resume: Optional[str]) -> List[str]:
        head = [self.python, "-m", "train"]
        if self.nproc_per_node > 1:
            # torchrun through train.launch: the point's own exit status (2 refused, 75 stopped), not torchrun's 1
            head = [self.python, "-m", "train.launch", "torchrun", "--standalone", "--nproc_per_node",
                    str(self.nproc_per_node), *self.torchrun_args, "-m", "train"]
        config = self.config.hydra
        if config.job.config_name != "config":
            head += ["--config-name", str(config.job.config_name)]
        for source in config.runtime.config_sources:
            if source.provider == "command-line":  # --config-dir
                head += ["--config-dir", str(source.path)]
        point = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("trainer.output_dir", "trainer.resume")]
        resume_override = [f"trainer.resume={quote(resume)}"] if resume else []
        return [*head, *point, f"trainer.output_dir={quote(str(point_dir))}", *resume_override]

    def _environment(self) -> Dict[str, str]:
        import train  # the same code for the points as for this process, wherever it was imported from

        env = dict(os.environ)
        root = str(Path(train.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        return env

    def _forward(self, signum, frame) -> None:
        # SIGINT too becomes a SIGTERM for the point: a second SIGINT would make it stop without a checkpoint
        self._stop_signal = signum
        if self._child is not None and self._child.poll() is None:
            log.warning("%s: stopping the running point (it saves a checkpoint first); the sweep stops after it",
                        signal.Signals(signum).name)
            self._child.send_signal(signal.SIGTERM)

    def _run(self, cmd: List[str], env: dict) -> int:
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._child = subprocess.Popen(cmd, env=env)
            if self._stop_signal is not None:  # it arrived while the point was being started
                self._child.send_signal(signal.SIGTERM)
            return self._child.wait()
        finally:
            self._child = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _plan(self, overrides: Sequence[str], idx: int) -> Tuple[JobReturn, Path, Any]:
        """Compose and validate one point: (its JobReturn, its directory, its PointPlan or the refusal)."""
        from train.config import RunConfigError, validate
        from train.sweep import plan_point

        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = str(idx)
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        point_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        task_cfg = OmegaConf.create(OmegaConf.to_container(sweep_config, resolve=True))
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(overrides=list(overrides), cfg=task_cfg, hydra_cfg=sweep_config, working_dir=str(point_dir),
                        task_name=str(sweep_config.hydra.job.name))
        values = OmegaConf.to_container(task_cfg)
        values["trainer"]["output_dir"] = str(point_dir)
        try:
            return ret, point_dir, plan_point(validate(values), point_dir)
        except RunConfigError as exc:
            return ret, point_dir, exc

    def _run_point(self, ret: JobReturn, point_dir: Path, plan, idx: int, env: Dict[str, str]) -> JobReturn:
        from train.sweep import outcome_message, record_point

        if plan.skip:
            ret.status = JobStatus.COMPLETED
            ret.return_value = {"point_dir": str(point_dir), "skipped": True, "step": plan.last_step}
            return ret
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info("#%d %s", idx, plan.describe(point_dir))
        record_point(sweep_dir, idx, point_dir, plan.event, plan.describe(point_dir), step=plan.last_step,
                     target=plan.target_step)
        cmd = self._command(ret.overrides, point_dir, plan.resume)
        log.info("#%d %s", idx, shlex.join(cmd))
        code = self._run(cmd, env)
        final = _final(point_dir)
        # under torchrun the exit status is 1 whatever the ranks returned: the run's own record says more
        stopped = code == EXIT_STOPPED or (code != 0 and _run_status(point_dir) == "stopped")
        if code == 0 or stopped:
            event, fields = ("stopped" if stopped else "finished"), {"step": final.get("step")}
        elif code == EXIT_REFUSED:
            event, fields = "refused", {"reason": "exit status 2; its message is above in the sweep's log"}
        else:
            event, fields = "failed", {"reason": f"exit status {code}; its log is above in the sweep's log"}
        message = outcome_message(point_dir, event, **fields)
        log.log(logging.INFO if event == "finished" else logging.WARNING, "#%d %s", idx, message)
        record_point(sweep_dir, idx, point_dir, event, message, **fields)
        if code == 0:
            ret.status = JobStatus.COMPLETED
            ret.return_value = {"point_dir": str(point_dir), "skipped": False, "exit_status": 0, **final}
            return ret
        what = "stopped on request" if stopped else f"{event} (exit status {code}; its log is above)"
        ret.status, ret.return_value = JobStatus.FAILED, PointFailed(f"{point_dir}: {what}")
        return ret

    # ------------------------------------------------------------------ the sweep
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from train.sweep import outcome_message, record_point

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        per_point = f"torchrun, {self.nproc_per_node} processes" if self.nproc_per_node > 1 else "1 process"
        log.info("sweep of %d points in %s (%s per point, one after another)", len(job_overrides), sweep_dir, per_point)
        # every point is composed, checked and looked up first: refusals and skips are known before anything runs
        plans = [self._plan(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        for i, (ret, point_dir, plan) in enumerate(plans):
            idx = initial_job_idx + i
            if isinstance(plan, Exception):
                log.error("#%d %s: refused: %s", idx, point_dir.name, plan)
                ret.status, ret.return_value = JobStatus.FAILED, PointFailed(f"{point_dir}: refused: {plan}")
                record_point(sweep_dir, idx, point_dir, "refused", outcome_message(point_dir, "refused", reason=plan),
                             reason=str(plan))
            elif plan.skip:
                log.info("#%d %s", idx, plan.describe(point_dir))
                record_point(sweep_dir, idx, point_dir, plan.event, plan.describe(point_dir), step=plan.last_step,
                             target=plan.target_step)
        env = self._environment()
        results: List[JobReturn] = []
        for i, (ret, point_dir, plan) in enumerate(plans):
            idx = initial_job_idx + i
            results.append(ret if isinstance(plan, Exception) else self._run_point(ret, point_dir, plan, idx, env))
            if self._stop_signal is not None:
                log.warning("sweep stopped by %s at point #%d (%d points not started); run the same command again "
                            "to continue it", signal.Signals(self._stop_signal).name, idx, len(plans) - i - 1)
                raise SweepStopped(EXIT_STOPPED)
        failed = [r for r in results if r.status == JobStatus.FAILED]
        if failed:
            log.error("%d of %d points failed:\n  %s", len(failed), len(results),
                      "\n  ".join(str(r._return_value) for r in failed))
        return results


def _run_status(point_dir: Path) -> Optional[str]:
    """The run's own record of how it ended (train.loop.write_status)."""
    try:
        return (point_dir / "status").read_text().strip()
    except OSError:
        return None


def _final(point_dir: Path) -> Dict[str, float]:
    """The last logged train and eval loss of a point."""
    import json

    out = {}
    try:
        lines = (point_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in ("loss", "eval_loss", "step"):
            if key in record:
                out[key] = record[key]
    return out
