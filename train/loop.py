"""The training loop: one loop for every parallel layout. Per optimizer step it draws this rank's
micro-batches, hands them to the engine (`engine.train_step`, which owns the objective, accumulation
and the update) and logs the result; it evaluates, saves, and stops on request. It never branches
on the engine it holds.

A run that is refused (bad config, missing checkpoint, changed data on resume, vocab mismatch, bad
layout) writes nothing: the output directory, its config.json and metrics are written only once every
check has passed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
import uuid
from pathlib import Path

import torch

import models
from data import DataError, HeldOut, TokenLoader, build_tokenizer, check_vocab, eval_batches, merge_counters

from . import checkpoint
from .config import RunConfig, RunConfigError, check_layout, data_config
from .distributed import Topology, setup, teardown
from .engine import build_engine
from .metrics import MetricsLogger, expert_shares, measured_peak_flops
from .parallelize import parallelize
from .schedule import build_schedule, is_branch

logger = logging.getLogger("train")

# The exit status of a run stopped on request (SIGTERM / SIGINT) after saving its checkpoint: sysexits'
# EX_TEMPFAIL, "temporary failure, try again". launch/slurm.sbatch requeues the job on it.
EXIT_STOPPED = 75


STATUS_FILE = "status"


def write_status(output_dir: Path, status: str) -> None:
    """<output_dir>/status: `running` once the run starts writing, then `stopped` (on request, after
    its checkpoint: continue it with trainer.resume=auto) or `finished`; a run that failed leaves
    `running`. For launchers, which under torchrun see only torchrun's exit status (1 whatever the
    ranks returned): launch/slurm.sbatch requeues a job whose run says `stopped`."""
    tmp = output_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(status + "\n")
    tmp.replace(output_dir / STATUS_FILE)


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


def gradient_accumulation(run: RunConfig, dp_size: int) -> int:
    t = run.trainer
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise RunConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"replicas = {t.micro_batch_size} x {dp_size}; change one of them"
        )
    return t.global_batch_size // per_step


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise RunConfigError(f"trainer.output_dir={output_dir} is a file, not a directory; choose another path")


def _resolve_resume(run: RunConfig, output_dir: Path) -> tuple[Path | None, list[Path]]:
    """The checkpoint to continue, and broken checkpoints of output_dir that `resume=auto` skipped."""
    resume = run.trainer.resume
    if resume in (None, "", "none", "null"):
        return None, []
    try:
        if resume == "auto":
            found, corrupt = checkpoint.find_resumable(output_dir, run.trainer.verify_checksums)
            if found is None:
                logger.info("resume=auto: no complete checkpoint in %s; starting fresh", output_dir)
            return found, corrupt
        path = Path(resume)
        if not path.exists():
            raise RunConfigError(f"trainer.resume={resume}: no such checkpoint or run directory")
        if run.scheduler.branch_from_step is not None:
            path = _branch_checkpoint(path, run.scheduler.branch_from_step, resume)
        elif (path / "checkpoints").is_dir() and not checkpoint.STEP_DIR.match(path.name):
            path, _ = checkpoint.find_resumable(path, run.trainer.verify_checksums)  # a run directory
            if path is None:
                raise RunConfigError(f"trainer.resume={resume}: no complete checkpoint in that run directory")
        checkpoint.verify(path, run.trainer.verify_checksums)
    except checkpoint.CheckpointCorrupt as exc:
        raise RunConfigError(f"trainer.resume={resume}: {exc}") from None
    return path, []


def _branch_checkpoint(path: Path, step: int, resume: str) -> Path:
    """scheduler.branch_from_step=N with trainer.resume=<run dir>: that run's checkpoints/step-N."""
    if checkpoint.STEP_DIR.match(path.name):
        if checkpoint.step_of(path) != step:
            raise RunConfigError(f"trainer.resume={resume} is the step-{checkpoint.step_of(path)} checkpoint but "
                                 f"scheduler.branch_from_step={step}: name the run directory instead")
        return path
    found = path / "checkpoints" / f"step-{step}"
    if not found.is_dir():
        saved = ", ".join(p.name for p in checkpoint.list_checkpoints(path)) or "none"
        raise RunConfigError(
            f"scheduler.branch_from_step={step}: {path} has no checkpoint at step {step} (it has: {saved}). Branch "
            f"from a step it saved, or save the stable run with trainer.save_every dividing {step} and "
            f"trainer.keep_last=0 (keep every checkpoint)")
    return found


def _warn_about_precision(run: RunConfig, topology: Topology) -> None:
    if run.trainer.precision == "bf16" and topology.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "trainer.precision=bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16): bf16 matrix products "
            "are emulated and run many times slower than fp32 here. Use trainer.precision=fp32 on this machine; "
            "bf16 is for GPUs and bf16-capable CPUs.")


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: cannot tell, do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(run: RunConfig, config_dict: dict | None = None) -> dict:
    """Run training; returns a summary (final step, losses, checkpoint path, whether it was stopped)."""
    preemption = _Preemption()
    try:
        _check_output_dir(Path(run.trainer.output_dir))
        topology = setup(run.trainer.device, run.parallel.backend, run.parallel.pipeline_stages,
                         run.parallel.expert_parallel)
        try:
            return _train(run, topology, config_dict or {}, preemption)
        finally:
            teardown()
    finally:
        preemption.restore()


def _train(run: RunConfig, topology: Topology, config_dict: dict, preemption: _Preemption) -> dict:
    t = run.trainer
    output_dir = Path(t.output_dir)
    accumulation = gradient_accumulation(run, topology.dp_size)
    _warn_about_precision(run, topology)
    torch.manual_seed(t.seed)
    resume_from, corrupt = _resolve_resume(run, output_dir)

    # ---- data (the tokenizer cache is shared: one rank trains it, the others wait on its lock)
    dcfg = data_config(run.data, t.micro_batch_size, t.seed)
    heldout = HeldOut(dcfg)
    tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.sources, heldout.exclude)
    loader = TokenLoader(dcfg, tokenizer, topology.dp_rank, topology.dp_size, heldout)
    evaluation = eval_batches(dcfg, tokenizer, heldout, topology.dp_rank, topology.dp_size) if t.eval_every else []

    # ---- model
    runtime = {f: getattr(run.model, f) for f in run.model.runtime_fields}
    if resume_from is not None:
        # The checkpoint's config.json is the architecture (it may differ from the model group, e.g.
        # after upcycling a dense model into a mixture of experts).
        model = models.from_pretrained(resume_from, **runtime)
        if _architecture(model.config) != _architecture(run.model):
            logger.info("model architecture taken from %s/config.json (it differs from the model group)", resume_from)
    elif run.init_from:
        model = models.from_pretrained(run.init_from, **runtime)
        logger.info("weights from %s (a new run: fresh optimizer, schedule and data)", run.init_from)
    else:
        model = models.build(run.model)
    model_config = model.config  # resumed or init_from: the architecture comes from that directory
    check_layout(run, model_config)
    try:
        check_vocab(tokenizer, model_config.vocab_size)
    except DataError as exc:
        raise RunConfigError(str(exc)) from None
    if dcfg.seq_len > model_config.max_position_embeddings:
        logger.warning("data.seq_len=%d exceeds the model's max_position_embeddings=%d: positions beyond it are "
                       "extrapolated (set model.max_position_embeddings, or a shorter data.seq_len)",
                       dcfg.seq_len, model_config.max_position_embeddings)
    flops_per_token = model.flops_per_token(dcfg.seq_len)
    num_parameters, active_parameters = model.num_parameters(), model.active_parameters()
    parallelize(model, run)
    engine = build_engine(run, model, topology, accumulation)

    # ---- state (a refused resume stops here, before anything is written)
    state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_steps": 0, "run_id": uuid.uuid4().hex[:12],
             "schedule": None}
    if resume_from is not None:
        state.update(checkpoint.load(resume_from, engine, loader, topology, run_config=config_dict))
        state.pop("optimizer_state", None)  # from here on, checkpoints carry the optimizer
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    upcycled_at = state.get("upcycled_at")
    only_new_until = (upcycled_at or 0) + run.optim.new_params_only_steps
    if run.optim.new_params_only_steps and upcycled_at is None:
        raise RunConfigError(
            f"optim.new_params_only_steps={run.optim.new_params_only_steps}, but "
            f"{resume_from or 'this run'} does not continue an upcycled checkpoint (python -m train.upcycle)")
    branch = is_branch(run.scheduler) and resume_from is not None
    if is_branch(run.scheduler) and resume_from is None:
        raise RunConfigError("scheduler.branch_decay_steps / branch_decay_fraction start a decay branch from a "
                             "checkpoint: set trainer.resume")
    # A branch resumed from its own checkpoint (preempted, requeued) goes on with the decay it started:
    # its checkpoints record the step the branch started at.
    state["branch_from"] = (run.scheduler.branch_from_step or state.get("branch_from") or state["step"]) if branch \
        else None
    try:
        schedule = build_schedule(run.scheduler, run.optim.lr, t.max_steps, branch_from=state["branch_from"])
    except ValueError as exc:
        raise RunConfigError(str(exc)) from None
    max_steps = schedule.total_steps
    if branch and "trainer" in config_dict:  # config.json states where this run ends (plots, sweep status)
        config_dict = {**config_dict, "trainer": {**config_dict["trainer"], "max_steps": max_steps}}
    state["schedule"] = schedule.describe()
    start_step = state["step"]
    _check_eval_tasks(run, topology)

    # ---- every check has passed: from here on the run writes to its output directory
    if topology.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n")
        write_status(output_dir, "running")
        checkpoint.clean_stale(output_dir)
        checkpoint.quarantine(corrupt)
        others = [c.name for c in checkpoint.list_checkpoints(output_dir) if checkpoint.run_id_of(c) != state["run_id"]]
        if others:
            logger.warning("%s also holds checkpoints of other runs (%s); this run leaves them alone and does not "
                           "prune them", output_dir / "checkpoints", ", ".join(others))
    peak = t.peak_flops or measured_peak_flops(
        topology.device, torch.bfloat16 if t.precision == "bf16" else torch.float32)
    tokens_per_step = t.global_batch_size * dcfg.seq_len
    if topology.is_main:
        logger.info(
            "model %s: %.2fM parameters (%.2fM active), %.3g FLOPs/token; %d data-parallel x %d micro-batch x %d "
            "accumulation = %d rows x %d tokens per step", model_config.model_type, num_parameters / 1e6,
            active_parameters / 1e6, flops_per_token, topology.dp_size, t.micro_batch_size, accumulation,
            t.global_batch_size, dcfg.seq_len)
        if run.optim.new_params_only_steps:
            logger.info("training only %s until step %d, then everything", run.optim.new_params, only_new_until)
        logger.info("schedule: %s%s", schedule.describe(),
                    f" (decay branch from step {start_step})" if branch else "")
        logger.info("output: %s", output_dir.resolve())
    metrics = MetricsLogger(output_dir, topology.is_main, run.logger, state["run_id"], start_step, max_steps,
                            config_dict, t.progress)

    def save(step: int) -> Path:
        path = checkpoint.save(output_dir, step, engine, model_config, tokenizer, loader, {**state, "step": step},
                               topology, t.keep_last, t.verify_checksums, run_config=config_dict)
        if t.eval_tasks:
            _score_checkpoint(path, run, topology, metrics, step, state["tokens"])
        return path

    def evaluate() -> dict:
        loss_sum, count = 0.0, 0
        for batch in evaluation:
            batch_loss, batch_count = engine.eval_step(batch)
            loss_sum, count = loss_sum + batch_loss, count + batch_count
        loss_sum, count = topology.dp_sum(loss_sum, count)
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    batches = iter(loader)
    last_checkpoint, losses, step, stopped = None, [], start_step, False
    window_start, window_tokens = time.perf_counter(), 0
    preemption.training = True
    try:
        while step < max_steps:
            lr = schedule(step)
            micro = [next(batches) for _ in range(accumulation)]
            result = engine.train_step(micro, lr, only_new=step < only_new_until)
            step += 1
            finite = result.applied and math.isfinite(result.loss)
            state["bad_steps"] = 0 if finite else state["bad_steps"] + 1
            if not finite:
                state["skipped_steps"] += 1
                logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped",
                               step, result.loss, result.grad_norm)
            state["tokens"] += tokens_per_step
            state["step"] = step
            window_tokens += tokens_per_step
            losses.append(result.loss)

            evaluate_now = bool(evaluation) and (step % t.eval_every == 0 or step == max_steps)
            if step % t.log_every == 0 or step == max_steps or evaluate_now:
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_tokens / elapsed
                record = {
                    "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": state["tokens"],
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": flops_per_token * tokens_per_sec / (peak * topology.world_size),
                    "skipped_steps": state["skipped_steps"],
                }
                if result.aux_loss is not None:
                    record["aux_loss"] = result.aux_loss
                if result.expert_counts is not None:
                    record.update(_expert_load(result.expert_counts))
                    if evaluate_now or step == max_steps:  # per-expert shares: big lines, so only now and then
                        record["expert_load"] = expert_shares(result.expert_counts)
                record.update(result.metrics)
                record.update(_data_counters(loader, topology))
                if evaluate_now:
                    record.update(evaluate())
                metrics.log(step, record)
                metrics.progress(step, result.loss, lr, tokens_per_sec)
                window_start, window_tokens = time.perf_counter(), 0
            if state["bad_steps"] >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{state['bad_steps']} non-finite steps in a row (last at step {step}); stopping. The last good "
                    f"checkpoint is {last_checkpoint or 'none (no checkpoint was saved yet)'}. Lower the learning "
                    f"rate, check the data, or raise trainer.max_bad_steps.")
            stopped = topology.any(preemption.requested)
            if (t.save_every and step % t.save_every == 0) or step == max_steps or stopped:
                last_checkpoint = save(step)
            if stopped:
                break
    finally:
        metrics.close()
    if topology.is_main:
        write_status(output_dir, "stopped" if stopped else "finished")
    if t.plot and topology.is_main:
        from .plot import plot_run

        plot_run(output_dir)  # never raises: a failure is a warning
    totals = _run_counters(loader, topology)
    skips = {"skipped_empty": "empty", "skipped_heldout": "held out", "skipped_fetch": "failed to fetch"}
    if topology.is_main and last_checkpoint is not None:
        logger.info("tokens trained per source: %s", {k: v["tokens"] for k, v in totals.items()})
        skipped = {name: {what: v[f] for f, what in skips.items() if v[f]} for name, v in totals.items()}
        if any(skipped.values()):  # the same counts are data/<source>/skipped_* in metrics.jsonl
            logger.info("documents skipped per source: %s", {k: v for k, v in skipped.items() if v})
        if stopped:
            logger.warning("stopped on request at step %d of %d; checkpoint: %s. Continue with trainer.resume=auto "
                           "(exit status %d: requeue me)", step, max_steps, last_checkpoint.resolve(), EXIT_STOPPED)
        else:
            logger.info("done: step %d, loss %.4f -> %.4f; checkpoint: %s (a Hugging Face model directory)",
                        step, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                        last_checkpoint.resolve())
    return {"step": step, "losses": losses, "checkpoint": last_checkpoint, "start_step": start_step,
            "stopped": stopped}


def _architecture(config) -> dict:
    """A model config without its token ids (checkpoints carry the tokenizer's; presets may not)."""
    return {k: v for k, v in config.to_hf_dict().items() if k not in checkpoint.TOKEN_ID_FIELDS}


def _check_eval_tasks(run: RunConfig, topology: Topology) -> None:
    """A bad `trainer.eval_tasks` (unknown task, dataset out of reach offline) stops the run before it
    trains; rank 0 checks, every rank learns the verdict."""
    if not run.trainer.eval_tasks:
        return
    problem = None
    if topology.is_main:
        from .evaluate import EvaluationError, check_tasks

        try:
            check_tasks(run.trainer.eval_tasks, run.trainer.eval_tasks_include_path)
        except EvaluationError as exc:
            problem = f"trainer.eval_tasks={list(run.trainer.eval_tasks)}: {exc}"
    if topology.any(problem is not None):
        raise RunConfigError(problem or "trainer.eval_tasks: refused on rank 0 (see its message)")


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
