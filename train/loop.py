"""The training loop: one loop for every parallel layout (the engine hides which).

Per optimizer step: the micro-batches of this rank are drawn, the number of target tokens over all
ranks is summed once, and each micro-batch contributes (cross-entropy summed over its tokens) / (all
target tokens of the step) + aux_coef · aux / (micro-batches · ranks). Summed over ranks and
micro-batches that is exactly the mean token loss of the global batch plus the mean aux loss, whatever
the accumulation and world size, so every layout computes the same step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
import uuid
from pathlib import Path

import torch

import models
from data import HeldOut, TokenLoader, build_tokenizer, check_vocab, eval_batches
from models.layers import causal_lm_loss

from . import checkpoint
from .config import RunConfig, RunConfigError, data_config
from .distributed import Dist, setup, teardown
from .engine import build_engine
from .metrics import MetricsLogger, expert_shares, measured_peak_flops
from .schedule import build_schedule

logger = logging.getLogger("train")


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class _Preemption:
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _gradient_accumulation(run: RunConfig, world_size: int) -> int:
    t = run.trainer
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise RunConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x ranks = "
            f"{t.micro_batch_size} x {world_size}; change one of them"
        )
    return t.global_batch_size // per_step


def _apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass; applied from outside the model file."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint as recompute

    for layer in model.model.layers:
        layer.forward = partial(recompute, layer.forward, use_reentrant=False)


def _resolve_resume(run: RunConfig, output_dir: Path) -> Path | None:
    resume = run.trainer.resume
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        found = checkpoint.find_resumable(output_dir, run.trainer.verify_checksums)
        if found is None:
            logger.info("resume=auto: no complete checkpoint in %s; starting fresh", output_dir)
        return found
    path = Path(resume)
    if (path / "checkpoints").is_dir() and not checkpoint.STEP_DIR.match(path.name):
        path = checkpoint.find_resumable(path, run.trainer.verify_checksums)  # a run directory: its newest
        if path is None:
            raise RunConfigError(f"trainer.resume={resume}: no complete checkpoint in that run directory")
    try:
        checkpoint.verify(path, run.trainer.verify_checksums)
    except checkpoint.CheckpointCorrupt as exc:
        raise RunConfigError(f"trainer.resume={resume}: {exc}") from None
    return path


def train(run: RunConfig, config_dict: dict | None = None) -> dict:
    """Run training; returns a summary (final step, losses, checkpoint path)."""
    t = run.trainer
    dist = setup(t.device, run.parallel.backend)
    try:
        return _train(run, dist, config_dict or {})
    finally:
        teardown()


def _train(run: RunConfig, dist: Dist, config_dict: dict) -> dict:
    t = run.trainer
    output_dir = Path(t.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n")
    accumulation = _gradient_accumulation(run, dist.world_size)
    torch.manual_seed(t.seed)

    # ---- data (the tokenizer cache is shared: one rank trains it, the others wait on its lock)
    dcfg = data_config(run.data, t.micro_batch_size, t.seed)
    heldout = HeldOut(dcfg)
    tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.sources, heldout.exclude)
    loader = TokenLoader(dcfg, tokenizer, dist.rank, dist.world_size, heldout)
    evaluation = eval_batches(dcfg, tokenizer, heldout, dist.rank, dist.world_size) if t.eval_every else []

    # ---- model
    resume_from = _resolve_resume(run, output_dir)
    runtime = {f: getattr(run.model, f) for f in run.model.runtime_fields}
    if resume_from is not None:
        # The checkpoint's config.json is the architecture (it may differ from the model group, e.g.
        # after upcycling a dense model into a mixture of experts).
        model = models.from_pretrained(resume_from, **runtime)
        if model.config.to_hf_dict() != run.model.to_hf_dict():
            logger.info("model architecture taken from %s/config.json (it differs from the model group)", resume_from)
    elif run.init_from:
        model = models.from_pretrained(run.init_from, **runtime)
        logger.info("weights from %s (a new run: fresh optimizer, schedule and data)", run.init_from)
    else:
        model = models.build(run.model)
    model_config = model.config  # resumed or init_from: the architecture comes from that directory
    check_vocab(tokenizer, model_config.vocab_size)
    if t.activation_checkpointing:
        _apply_activation_checkpointing(model)
    if t.compile:
        for layer in model.model.layers:
            layer.compile()
    engine = build_engine(run, model, dist, accumulation)

    # ---- state
    state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_steps": 0, "run_id": uuid.uuid4().hex[:12],
             "schedule": None}
    if resume_from is not None:
        state.update(checkpoint.load(resume_from, engine, loader, dist))
        state.pop("optimizer_state", None)  # from here on, checkpoints carry the optimizer
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    upcycled_at = state.get("upcycled_at")
    only_new_until = (upcycled_at or 0) + run.optim.new_params_only_steps
    if run.optim.new_params_only_steps and upcycled_at is None:
        raise RunConfigError(
            f"optim.new_params_only_steps={run.optim.new_params_only_steps}, but "
            f"{resume_from or 'this run'} does not continue an upcycled checkpoint (python -m train.upcycle)")
    if run.optim.new_params_only_steps and dist.is_main:
        logger.info("training only %s until step %d, then everything", run.optim.new_params, only_new_until)
    branch = run.scheduler.branch_decay_steps is not None and resume_from is not None
    if run.scheduler.branch_decay_steps is not None and resume_from is None:
        raise RunConfigError("scheduler.branch_decay_steps starts a decay branch from a checkpoint: set trainer.resume")
    schedule = build_schedule(run.scheduler, run.optim.lr, t.max_steps, branch_from=state["step"] if branch else None)
    max_steps = schedule.total_steps
    state["schedule"] = schedule.describe()
    start_step = state["step"]

    flops_per_token = model.flops_per_token(dcfg.seq_len)
    peak = t.peak_flops or measured_peak_flops(
        dist.device, torch.bfloat16 if t.precision == "bf16" else torch.float32)
    tokens_per_step = t.global_batch_size * dcfg.seq_len
    if dist.is_main:
        logger.info(
            "model %s: %.2fM parameters (%.2fM active), %.3g FLOPs/token; %d ranks x %d micro-batch x %d "
            "accumulation = %d rows x %d tokens per step", model_config.model_type, model.num_parameters() / 1e6,
            model.active_parameters() / 1e6, flops_per_token, dist.world_size, t.micro_batch_size, accumulation,
            t.global_batch_size, dcfg.seq_len)
        logger.info("schedule: %s%s", schedule.describe(),
                    f" (decay branch from step {start_step})" if branch else "")
        logger.info("output: %s", output_dir.resolve())
    metrics = MetricsLogger(output_dir, dist.is_main, run.logger, state["run_id"], start_step, max_steps,
                            config_dict, t.progress)
    preemption = _Preemption()
    kill_after = os.environ.get("SMOLPRETRAIN_TEST_KILL_AFTER_CHECKPOINT")  # tests: SIGKILL after that save

    def save(step: int) -> Path:
        trainer_state = {**state, "step": step}
        path = checkpoint.save(output_dir, step, engine, model_config, tokenizer, loader, trainer_state, dist,
                               t.keep_last, t.verify_checksums)
        if kill_after is not None and int(kill_after) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def evaluate() -> dict:
        engine.model.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for batch in evaluation:
                batch = {k: v.to(dist.device) for k, v in batch.items()}
                labels = batch.pop("shift_labels")
                out = engine.forward(**batch)
                loss_sum += float(causal_lm_loss(out.logits, shift_labels=labels, num_items_in_batch=1))
                count += int((labels != -100).sum())
        engine.model.train()
        loss_sum, count = dist.sum(loss_sum, count)
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    batches = iter(loader)
    aux_coef = model.aux_loss_coef
    last_checkpoint, losses, step = None, [], start_step
    window_start, window_tokens = time.perf_counter(), 0
    engine.model.train()
    try:
        while step < max_steps:
            lr = schedule(step)
            micro = [{k: v.to(dist.device, non_blocking=True) for k, v in next(batches).items()} for _ in range(accumulation)]
            result = train_step(engine, micro, lr, dist, aux_coef, only_new=step < only_new_until)
            ce_sum, aux_sum, expert_counts, grad_norm, applied = result
            ce_total, aux_total = dist.sum(ce_sum, aux_sum)
            step += 1
            finite = applied and math.isfinite(ce_total)
            state["bad_steps"] = 0 if finite else state["bad_steps"] + 1
            if not finite:
                state["skipped_steps"] += 1
                logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped",
                               step, ce_total, grad_norm)
            state["tokens"] += tokens_per_step
            state["step"] = step
            window_tokens += tokens_per_step
            losses.append(ce_total)

            evaluate_now = bool(evaluation) and (step % t.eval_every == 0 or step == max_steps)
            if step % t.log_every == 0 or step == max_steps or evaluate_now:
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_tokens / elapsed
                record = {
                    "loss": ce_total, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": flops_per_token * tokens_per_sec / (peak * dist.world_size),
                    "skipped_steps": state["skipped_steps"],
                }
                if expert_counts is not None:
                    record["aux_loss"] = aux_total / (accumulation * dist.world_size)
                    counts = dist.all_reduce(expert_counts.float())
                    record.update(_expert_load(counts))
                    if evaluate_now or step == max_steps:  # per-expert shares: big lines, so only now and then
                        record["expert_load"] = expert_shares(counts)
                if evaluate_now:
                    record.update(evaluate())
                metrics.log(step, record)
                metrics.progress(step, ce_total, lr, tokens_per_sec)
                window_start, window_tokens = time.perf_counter(), 0
            if state["bad_steps"] >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{state['bad_steps']} non-finite steps in a row (last at step {step}); stopping. The last good "
                    f"checkpoint is {last_checkpoint or 'none (no checkpoint was saved yet)'}. Lower the learning "
                    f"rate, check the data, or raise trainer.max_bad_steps.")
            stop = dist.any(preemption.requested)
            if (t.save_every and step % t.save_every == 0) or step == max_steps or stop:
                last_checkpoint = save(step)
            if stop:
                logger.warning("stopped at step %d on request; checkpoint %s", step, last_checkpoint)
                break
    finally:
        preemption.restore()
        metrics.close()
    per_source = loader.source_stats()
    source_tokens = dict(zip(per_source, dist.sum(*(float(v["tokens"]) for v in per_source.values()))))
    if dist.is_main and last_checkpoint is not None:
        logger.info("tokens trained per source: %s", {k: int(v) for k, v in source_tokens.items()})
        logger.info("done: step %d, loss %.4f -> %.4f; checkpoint: %s (a Hugging Face model directory)",
                    step, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                    last_checkpoint.resolve())
    return {"step": step, "losses": losses, "checkpoint": last_checkpoint, "start_step": start_step}


def train_step(engine, micro_batches: list[dict], lr: float, dist: Dist, aux_coef: float, only_new: bool = False):
    """One optimizer step over this rank's micro-batches (see the module docstring for the objective).
    Returns (this rank's summed cross-entropy share, summed aux loss, expert pick counts, grad norm,
    whether the update was applied)."""
    local_targets = sum(int((b["shift_labels"] != -100).sum()) for b in micro_batches)
    (global_targets,) = dist.sum(local_targets)
    shares = len(micro_batches) * dist.world_size
    ce_sum, aux_sum, expert_counts = 0.0, 0.0, None
    for batch in micro_batches:
        batch = dict(batch)
        labels = batch.pop("shift_labels")
        out = engine.forward(**batch)
        ce = causal_lm_loss(out.logits, shift_labels=labels, num_items_in_batch=global_targets)
        objective = ce
        if out.aux_loss is not None:
            objective = objective + aux_coef * out.aux_loss / shares
            aux_sum += float(out.aux_loss.detach())
        if out.expert_counts is not None:
            expert_counts = out.expert_counts if expert_counts is None else expert_counts + out.expert_counts
        engine.backward(objective)
        ce_sum += float(ce.detach())
    grad_norm, applied = engine.step(lr, only_new)
    return ce_sum, aux_sum, expert_counts, grad_norm, applied


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
