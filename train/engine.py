"""Engines: how a parallel layout runs a training step. The loop holds one and never branches on
which:

    engine.forward(batch)     -> model output (under the configured precision)
    engine.backward(loss)     gradients of Σ over ranks and micro-steps of `loss` (the loop passes this
                              rank's share of the step objective; each engine undoes its own averaging)
    engine.step(lr, only_new) -> (grad_norm, applied): clip, update, zero the gradients (only_new: the
                              parameter groups tagged stage=old get learning rate 0)
    engine.save(dir) / engine.load(dir)      optimizer (and engine) state, collectively
    engine.export_state_dict()               full model weights (collective; every rank gets them)

`TorchEngine` covers a single process and DDP; `DeepSpeedEngine` covers ZeRO 0–3 and offload. Model
files know nothing of either: engines wrap the model from outside. Expert and pipeline parallelism
are further engines behind the same interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from .distributed import Dist
from .optim import build_optimizer

logger = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TorchEngine:
    """One process, or torch DDP over the process group. fp32 master weights; bf16 runs under autocast."""

    def __init__(self, model: nn.Module, optim_cfg, precision: str, dist: Dist, accumulation: int):
        self.module = model.to(dist.device)
        self.dist, self.precision, self.accumulation = dist, precision, accumulation
        self.grad_clip = optim_cfg.grad_clip
        self.optimizer = build_optimizer(self.module, optim_cfg, dist.device.type)
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module
        self._micro = 0

    def forward(self, **batch):
        # DDP all-reduces gradients in the last micro-step's backward only
        last = (self._micro + 1) % self.accumulation == 0
        sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.model.no_sync()
        self._sync = sync
        sync.__enter__()
        with autocast(self.dist.device, self.precision):
            return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the objective is their sum
        (loss * self.dist.world_size).backward()
        self._sync.__exit__(None, None, None)
        self._micro += 1

    def step(self, lr: float, only_new: bool = False) -> tuple[float, bool]:
        set_learning_rates(self.optimizer, lr, only_new)
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def _names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.module.named_parameters()}

    def save(self, directory: Path) -> None:
        """The AdamW state keyed by parameter name (not by position), so that a checkpoint still loads
        when the parameter groups change, or parameters are added (upcycling)."""
        if self.dist.is_main:  # replicated on every rank
            names = self._names()
            state = {names[id(p)]: self.optimizer.state[p] for g in self.optimizer.param_groups for p in g["params"]
                     if p in self.optimizer.state}
            torch.save({"format": "adamw-by-name", "state": state}, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        saved = torch.load(directory / "optimizer.pt", map_location=self.dist.device, weights_only=True)
        if saved.get("format") != "adamw-by-name":
            raise RuntimeError(f"{directory / 'optimizer.pt'}: not an optimizer state this trainer wrote")
        load_optimizer_by_name(self.optimizer, self._names(), saved["state"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def set_learning_rates(optimizer, lr: float, only_new: bool) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if only_new and group.get("stage") == "old" else lr


def load_optimizer_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str], saved: dict) -> None:
    """Restore per-parameter AdamW state by name. A parameter the saved state does not know (a new
    expert after upcycling) starts with zero moments at the saved step count, so its first updates are
    damped like the others' rather than a full bias-corrected step."""
    steps = [s["step"] for s in saved.values() if "step" in s]
    step = max(steps, key=float) if steps else None
    current = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise RuntimeError(f"optimizer state for parameters this model does not have: {unknown[:5]}")
    for name, param in current.items():
        if name in saved:
            optimizer.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in saved[name].items()}
        elif step is not None:
            optimizer.state[param] = {
                "step": step.clone() if torch.is_tensor(step) else step,
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def deepspeed_config(parallel_cfg, trainer_cfg, optim_cfg, accumulation: int) -> dict:
    """The DeepSpeed JSON, from the run config: batch sizes are derived here once, not stated twice.
    `parallel.deepspeed` keys are merged last (a user's extra or overriding keys)."""
    zero = {"stage": parallel_cfg.zero_stage}
    if parallel_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if parallel_cfg.offload_param:
        if parallel_cfg.zero_stage != 3:
            raise ValueError("parallel.offload_param needs ZeRO stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_batch_size": trainer_cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": trainer_cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optim_cfg.grad_clip,
        "bf16": {"enabled": trainer_cfg.precision == "bf16"},
        "zero_optimization": zero,
        # our torch AdamW also runs on offloaded (CPU) parameters; DeepSpeed's CPUAdam would need a
        # JIT C++ build at start-up
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(config, dict(parallel_cfg.deepspeed))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stages 0–3, optional CPU offload) via `deepspeed.initialize`, with our AdamW
    and weight-decay groups as its client optimizer."""

    def __init__(self, model: nn.Module, optim_cfg, ds_config: dict, dist: Dist):
        import deepspeed

        # The shared-memory comm op is a C++ build (~30 s) at every first start on CPU; gloo does the
        # same job here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if dist.device.type == "cuda" else "cpu")
        self.dist = dist
        self.module = model
        optimizer = build_optimizer(model, optim_cfg, dist.device.type)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        self.stage = ds_config["zero_optimization"]["stage"]
        self.accumulation = ds_config["gradient_accumulation_steps"]
        self._bad = False
        logger.info("deepspeed config: %s", json.dumps(ds_config))

    def forward(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by the accumulation steps and averages over ranks; the objective is the sum.
        if not torch.isfinite(loss.detach()).all():
            # Keep DeepSpeed's micro-step bookkeeping in step with zero gradients instead of NaNs.
            self._bad = True
            loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters() if p.requires_grad)
        self.engine.backward(loss * self.dist.world_size * self.accumulation)
        if not self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-steps in step(); it updates only at the accumulation boundary,
            # which `step(lr)` below takes once the learning rate is set.
            self.engine.step()

    def step(self, lr: float, only_new: bool = False) -> tuple[float, bool]:
        bad = self.dist.any(self._bad)
        # A non-finite step cannot be skipped inside DeepSpeed without desynchronising it: it is
        # neutralised instead (zero gradients, zero learning rate).
        set_learning_rates(self.optimizer, 0.0 if bad else lr, only_new)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        self._bad = False
        return (float("nan"), False) if bad else (norm, math.isfinite(norm))

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        if not (directory / "deepspeed").is_dir() and (directory / "optimizer.pt").is_file():
            raise RuntimeError(
                f"{directory.parent}: its optimizer state was written by the torch engine (a single process, DDP, or "
                f"upcycling), which DeepSpeed cannot load. Resume it with parallel=ddp, or start from its weights with "
                f"+model.init_from={directory.parent}"
            )
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"{directory / 'deepspeed'}: DeepSpeed found no checkpoint to load")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on every rank; under ZeRO-3 the partitions are gathered first."""
        module = self.engine.module
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in module.state_dict().items()}
        return module.state_dict()


def build_engine(run, model: nn.Module, dist: Dist, accumulation: int):
    if run.parallel.engine == "deepspeed":
        ds_config = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation)
        return DeepSpeedEngine(model.to(dist.device), run.optim, ds_config, dist)
    if run.parallel.zero_stage:
        raise ValueError("parallel.zero_stage needs parallel.engine=deepspeed")
    return TorchEngine(model, run.optim, run.trainer.precision, dist, accumulation)
