"""The training loop: one `Trainer` for every parallel layout. Per optimizer step it draws this rank's
micro-batches, hands them to the engine (`engine.train_step`, which owns the objective, accumulation
and the update) and logs the result; it evaluates, saves, and stops on request. It never branches
on the engine it holds.

    train(run)                          set up the process group, build the run, fit it
    Trainer(build_run(run, topology))   the same in parts (train/builders.py builds them)

A run that is refused (bad config, missing checkpoint, changed data on resume, vocab mismatch, bad
layout) writes nothing: `build_run` checks everything first, and the Trainer writes the output
directory, its config.json and metrics only when it starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch

from data import merge_counters

from . import checkpoint
from .builders import RunParts, build_run, check_output_dir, remove_earlier_run, write_status
from .config import RunConfig
from .distributed import Topology, setup, teardown
from .engines import uses_deepspeed
from .metrics import MetricsLogger, PeakFlops, expert_shares

logger = logging.getLogger("train")

# The exit status of a run stopped on request (SIGTERM / SIGINT) after saving its checkpoint: sysexits'
# EX_TEMPFAIL, "temporary failure, try again". launch/slurm.sbatch requeues the job on it.
EXIT_STOPPED = 75


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""

class StoppedBeforeTraining(BaseException):
    """SIGTERM / SIGINT arrived while the run was still setting up: nothing was trained or written. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (a data source that
    turns failures into its own errors) mistakes the request for a failure."""

class _Preemption:
    """SIGTERM / SIGINT. While the run sets up (data, tokenizer, model) it stops the run at once;
    once training runs: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.requested = False
        self.training = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training:
            raise StoppedBeforeTraining(f"{name} received while setting up; stopped before the first step")
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: saving a checkpoint after this step", name)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(run: RunConfig, config_dict: dict | None = None) -> dict:
    """Run training; returns a summary (final step, losses, checkpoint path, whether it was stopped)."""
    preemption = _Preemption()
    try:
        check_output_dir(Path(run.trainer.output_dir))
        topology = setup(run.trainer.device, run.parallel.backend, run.parallel.pipeline_stages,
                         run.parallel.expert_parallel, run.parallel.timeout_minutes, run.parallel.barrier_timeout_minutes,
                         deepspeed=uses_deepspeed(run))
        try:
            return Trainer(build_run(run, topology, config_dict), preemption).fit()
        finally:
            teardown()
    finally:
        preemption.restore()


class Trainer:
    """Runs the parts `build_run` built: the loop, held-out evaluation, saving, metrics, stopping on
    request. `fit()` once."""

    def __init__(self, parts: RunParts, preemption: _Preemption | None = None):
        self.parts = parts
        self.run, self.topology, self.engine, self.data = parts.run, parts.topology, parts.engine, parts.data
        self.state, self.schedule = parts.state, parts.schedule
        self.output_dir = parts.output_dir
        self.preemption = preemption or _Preemption()
        self.start_step = self.state["step"]
        self.max_steps = self.schedule.total_steps
        self.tokens_per_step = self.run.trainer.global_batch_size * self.data.config.seq_len
        self.last_checkpoint: Path | None = None
        self.metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        t, topology, engine = self.run.trainer, self.topology, self.engine
        self._start()
        batches = iter(self.data.loader)
        losses, step, stopped = [], self.start_step, False
        window_start, window_tokens = time.perf_counter(), 0
        self.preemption.training = True
        try:
            while step < self.max_steps:
                lr = self.schedule(step)
                micro = [next(batches) for _ in range(self.parts.accumulation)]
                result = engine.train_step(micro, lr, only_new=step < self.parts.only_new_until)
                step += 1
                self._count(step, result)
                window_tokens += self.tokens_per_step
                losses.append(result.loss)
                evaluate_now = bool(self.data.evaluation) and (step % t.eval_every == 0 or step == self.max_steps)
                if step % t.log_every == 0 or step == self.max_steps or evaluate_now:
                    self._log(step, lr, result, time.perf_counter() - window_start, window_tokens, evaluate_now)
                    window_start, window_tokens = time.perf_counter(), 0
                if self.state["bad_steps"] >= t.max_bad_steps:
                    raise TrainingStopped(
                        f"{self.state['bad_steps']} non-finite steps in a row (last at step {step}); stopping. The last "
                        f"good checkpoint is {self.last_checkpoint or 'none (no checkpoint was saved yet)'}. Lower the "
                        f"learning rate, check the data, or raise trainer.max_bad_steps.")
                stopped = topology.any(self.preemption.requested)
                if (t.save_every and step % t.save_every == 0) or step == self.max_steps or stopped:
                    self.last_checkpoint = self.save(step)
                if stopped:
                    break
        finally:
            self.metrics.close()
            batches.close()  # its loader workers end now, not whenever the garbage collector gets to them
            engine.close()  # so that teardown can end its process groups (distributed.teardown says why)
        self._finish(step, losses, stopped)
        return {"step": step, "losses": losses, "checkpoint": self.last_checkpoint, "start_step": self.start_step,
                "stopped": stopped}

    def evaluate(self) -> dict:
        """Held-out loss over this rank's evaluation batches, summed over the data-parallel replicas."""
        loss_sum, count = 0.0, 0
        for batch in self.data.evaluation:
            batch_loss, batch_count = self.engine.eval_step(batch)
            loss_sum, count = loss_sum + batch_loss, count + batch_count
        loss_sum, count = self.topology.dp_sum(loss_sum, count)
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save(self, step: int) -> Path:
        """A checkpoint of this step (collective), scored by lm-eval when trainer.eval_tasks asks."""
        t = self.run.trainer
        path = checkpoint.save(self.output_dir, step, self.engine, self.parts.model_config, self.data.tokenizer,
                               self.data.loader, {**self.state, "step": step}, self.topology, t.keep_last,
                               t.verify_checksums, run_config=self.parts.config_dict)
        if t.eval_tasks:
            _score_checkpoint(path, self.run, self.topology, self.metrics, step, self.state["tokens"])
        return path

    # ------------------------------------------------------------------ pieces of fit
    def _start(self) -> None:
        """Every check has passed (build_run): from here on the run writes to its output directory."""
        run, t, topology, parts, output_dir = self.run, self.run.trainer, self.topology, self.parts, self.output_dir
        if topology.is_main:
            if parts.overwrite is not None:
                remove_earlier_run(output_dir, parts.overwrite)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "config.json").write_text(json.dumps(parts.config_dict, indent=2, default=str) + "\n")
            write_status(output_dir, "running")
            checkpoint.clean_stale(output_dir)
            checkpoint.quarantine(parts.corrupt)
            others = [c.name for c in checkpoint.list_checkpoints(output_dir)
                      if checkpoint.run_id_of(c) != self.state["run_id"]]
            if others:
                logger.warning("%s also holds checkpoints of other runs (%s); this run leaves them alone and does not "
                               "prune them", output_dir / "checkpoints", ", ".join(others))
        self.peak = PeakFlops(t.peak_flops, topology.device, torch.bfloat16 if t.precision == "bf16" else torch.float32,
                              topology.is_main)
        if topology.is_main:
            logger.info(
                "model %s: %.2fM parameters (%.2fM active), %.3g FLOPs/token; %d data-parallel x %d micro-batch x %d "
                "accumulation = %d rows x %d tokens per step", parts.model_config.model_type, parts.num_parameters / 1e6,
                parts.active_parameters / 1e6, parts.flops_per_token, topology.dp_size, t.micro_batch_size,
                parts.accumulation, t.global_batch_size, self.data.config.seq_len)
            if run.optim.new_params_only_steps:
                logger.info("training only %s until step %d, then everything", run.optim.new_params,
                            parts.only_new_until)
            logger.info("schedule: %s%s", self.schedule.describe(),
                        f" (decay branch from step {self.start_step})" if parts.branch else "")
            logger.info("output: %s", output_dir.resolve())
        self.metrics = MetricsLogger(output_dir, topology.is_main, run.logger, self.state["run_id"], self.start_step,
                                     self.max_steps, parts.config_dict, t.progress)

    def _count(self, step: int, result) -> None:
        """The state's counters after a step (the non-finite policy's: engines/base.py)."""
        finite = result.applied and math.isfinite(result.loss)
        self.state["bad_steps"] = 0 if finite else self.state["bad_steps"] + 1
        if not finite:
            self.state["skipped_steps"] += 1
            logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped",
                           step, result.loss, result.grad_norm)
        self.state["tokens"] += self.tokens_per_step
        self.state["step"] = step

    def _log(self, step: int, lr: float, result, elapsed: float, window_tokens: int, evaluate_now: bool) -> None:
        tokens_per_sec = window_tokens / elapsed
        record = {
            "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": self.state["tokens"],
            "tokens_per_sec": tokens_per_sec,
            # the seconds of this run's steps since its previous record: a run resumed from another run's
            # checkpoint has tokens from before its start, which tokens / rate would count
            "train_seconds": elapsed,
            "mfu": self.peak.mfu(self.parts.flops_per_token * tokens_per_sec / self.topology.world_size, step),
            "skipped_steps": self.state["skipped_steps"],
        }
        if result.aux_loss is not None:
            record["aux_loss"] = result.aux_loss
        if result.expert_counts is not None:
            record.update(_expert_load(result.expert_counts))
            if evaluate_now or step == self.max_steps:  # per-expert shares: big lines, so only now and then
                record["expert_load"] = expert_shares(result.expert_counts)
        record.update(result.metrics)
        record.update(_data_counters(self.data.loader, self.topology))
        if evaluate_now:
            record.update(self.evaluate())
        self.metrics.log(step, record)
        self.metrics.progress(step, result.loss, lr, tokens_per_sec)

    def _finish(self, step: int, losses: list[float], stopped: bool) -> None:
        topology, output_dir = self.topology, self.output_dir
        if topology.is_main:
            write_status(output_dir, "stopped" if stopped else "finished")
        if self.run.trainer.plot and topology.is_main:
            from .plot import plot_run

            plot_run(output_dir)  # never raises: a failure is a warning
        totals = _run_counters(self.data.loader, topology)
        skips = {"skipped_empty": "empty", "skipped_heldout": "held out", "skipped_fetch": "failed to fetch"}
        if not topology.is_main or self.last_checkpoint is None:
            return
        logger.info("tokens trained per source: %s", {k: v["tokens"] for k, v in totals.items()})
        skipped = {name: {what: v[f] for f, what in skips.items() if v[f]} for name, v in totals.items()}
        if any(skipped.values()):  # the same counts are data/<source>/skipped_* in metrics.jsonl
            logger.info("documents skipped per source: %s", {k: v for k, v in skipped.items() if v})
        repeated = {name: v["epoch"] for name, v in totals.items() if v["epoch"]}
        if repeated:  # data/<source>/epoch in metrics.jsonl; per loader node at DEBUG
            logger.info("sources read to the end and begun again (times, on the loader node that read most): %s",
                        repeated)
        if stopped:
            logger.warning("stopped on request at step %d of %d; checkpoint: %s. Continue with trainer.resume=auto "
                           "(exit status %d: requeue me)", step, self.max_steps, self.last_checkpoint.resolve(),
                           EXIT_STOPPED)
        else:
            logger.info("done: step %d, loss %.4f -> %.4f; checkpoint: %s (a Hugging Face model directory)",
                        step, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                        self.last_checkpoint.resolve())


def _score_checkpoint(path: Path, run: RunConfig, topology: Topology, metrics: MetricsLogger, step: int,
                      tokens: int) -> None:
    """lm-eval scores of a saved checkpoint, on rank 0 while the others wait; a failed evaluation is a
    warning, not the end of the run."""
    t = run.trainer
    if topology.is_main:
        from .evaluate import evaluate_checkpoint

        try:
            result = evaluate_checkpoint(path, t.eval_tasks, limit=t.eval_tasks_limit,
                                         include_path=t.eval_tasks_include_path, batch_size=t.eval_tasks_batch_size,
                                         device=str(topology.device))
            metrics.log(step, {"tokens": tokens, **result["metrics"]})
        except Exception as exc:  # the checkpoint is saved; scoring it is a bonus
            logger.warning("trainer.eval_tasks: scoring %s failed (%s: %s)", path, type(exc).__name__, exc)
    topology.barrier()

def _run_counters(loader, topology: Topology) -> dict[str, dict[str, int]]:
    """Per source, over all data-parallel ranks (collective): tokens trained, documents read, documents
    skipped (empty, held out, failed fetch) and epochs."""
    counters = loader.counters()
    if topology.dp_size > 1:
        gathered = [None] * topology.dp_size
        torch.distributed.all_gather_object(gathered, counters, group=topology.dp_group)
        counters = merge_counters(gathered)
    return counters

def _data_counters(loader, topology: Topology) -> dict:
    """`_run_counters` as `data/<source>/<field>` metrics."""
    return {f"data/{source}/{field}": value
            for source, fields in _run_counters(loader, topology).items() for field, value in fields.items()}

def _expert_load(counts: torch.Tensor) -> dict:
    """Load statistics of one step's routing, (routers, experts) pick counts over all ranks: how much
    the busiest expert exceeds a uniform share (1.0 = balanced), and the share of experts left idle."""
    mean = counts.mean(dim=1, keepdim=True).clamp_min(1e-9)
    return {
        "expert_load_max": float((counts / mean).max(dim=1).values.mean()),
        "experts_idle": float((counts == 0).float().mean()),
    }

def run_config_dict(run: RunConfig) -> dict:
    out = {k: dataclasses.asdict(getattr(run, k)) for k in ("data", "optim", "scheduler", "parallel", "trainer", "logger")}
    out["model"] = run.model.to_dict()
    out["model"]["init_from"] = run.init_from
    return out
