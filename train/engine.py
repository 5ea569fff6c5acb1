"""Engines: how a parallel layout runs an optimizer step. The loop holds one and never branches on
which, never counts micro-steps and never enters DDP's no_sync itself:

    engine.train_step(micro_batches, lr, only_new) -> StepResult   one optimizer step over this rank's
                                              micro-batches (only_new: the parameter groups tagged
                                              stage=old get learning rate 0)
    engine.eval_step(batch) -> (Σ cross-entropy, target tokens)   this rank's share of a held-out batch
    engine.save(dir) / engine.load(dir)       optimizer (and engine) state, collectively
    engine.export_state_dict()                full model weights with their Hugging Face names
                                              (collective; rank 0 gets them all)

Every engine minimises the same objective (`models.loss`): the cross-entropy summed over the global
batch's target tokens and divided by their number, plus the aux coefficient times the mean aux loss
over micro-batches and data-parallel ranks. `TorchEngine` covers a single process and DDP,
`DeepSpeedEngine` ZeRO 0–3 and offload; pipeline and expert parallelism are further engines behind the
same interface. Model files know nothing of any of them: engines wrap the model from outside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.loss import count_targets

from . import optimizer_state
from .distributed import Topology
from .optim import build_optimizer

logger = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    """One optimizer step, over the whole global batch (the same on every rank)."""

    loss: float  # mean token cross-entropy of the global batch
    aux_loss: float | None  # mean load-balancing loss over micro-batches and replicas (MoE)
    grad_norm: float
    applied: bool  # False: the update was skipped (non-finite gradients)
    tokens: int  # input tokens of the global batch
    expert_counts: torch.Tensor | None = None  # (routers, experts) picks over the global batch (MoE)
    metrics: dict = field(default_factory=dict)  # what else the engine measured (logged as is)


class StepTotals:
    """Running sums of one step's micro-batch outputs on this rank (cross-entropy terms, aux losses,
    expert pick counts, tokens), packed into one tensor so that they are reduced over the data-parallel
    replicas in a single collective."""

    def __init__(self, device=None):
        self.cross_entropy = torch.zeros((), dtype=torch.float64, device=device)
        self.aux = None
        self.counts = None
        self.tokens = 0

    def add(self, out, tokens: int = 0) -> None:
        self.cross_entropy = self.cross_entropy.to(out.cross_entropy.device) + out.cross_entropy.detach().double()
        if out.aux_loss is not None:
            aux = out.aux_loss.detach().double()
            self.aux = aux if self.aux is None else self.aux + aux
        if out.expert_counts is not None:
            counts = out.expert_counts.double()
            self.counts = counts if self.counts is None else self.counts + counts
        self.tokens += tokens

    def pack(self, counts_shape, device) -> torch.Tensor:
        """[cross-entropy, tokens, aux, counts...] (zeros where this rank has none: a pipeline's early
        stages)."""
        size = counts_shape[0] * counts_shape[1] if counts_shape else 0
        flat = torch.zeros(3 + size, dtype=torch.float64, device=device)
        flat[0], flat[1] = self.cross_entropy, float(self.tokens)
        if self.aux is not None:
            flat[2] = self.aux
        if size and self.counts is not None:
            flat[3:] = self.counts.reshape(-1)
        return flat

    @staticmethod
    def unpack(flat: torch.Tensor, counts_shape, aux_shares: int, grad_norm: float, applied: bool,
               metrics: dict | None = None) -> StepResult:
        flat = flat.cpu()
        moe = counts_shape is not None
        return StepResult(float(flat[0]), float(flat[2]) / aux_shares if moe else None, grad_norm, applied,
                          int(flat[1]), flat[3:].reshape(counts_shape).float() if moe else None, metrics or {})


def global_targets(micro_batches: list[dict], topology: Topology) -> torch.Tensor:
    """Target tokens of the global batch: what each micro-batch's summed cross-entropy is divided by."""
    local = sum(int(count_targets(b["shift_labels"])) for b in micro_batches)
    (total,) = topology.dp_sum(local)
    return torch.tensor(max(total, 1.0), dtype=torch.float32, device=topology.device)


def _model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Engine:
    """The step logic shared by engines that run micro-batches one after another in this process
    (single process, DDP, ZeRO). Subclasses say how a micro-batch is run forward and backward, and how
    the optimizer steps."""

    topology: Topology
    module: nn.Module  # the unwrapped model
    model: nn.Module  # what is called (the wrapper, if any)
    precision: str = "fp32"

    def train_step(self, micro_batches: list[dict], lr: float, only_new: bool = False) -> StepResult:
        batches = [_model_inputs(b, self.topology.device) for b in micro_batches]
        targets = global_targets(batches, self.topology)
        shares = len(batches) * self.topology.dp_size
        totals = StepTotals(self.topology.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self._micro_step(last):
                out = self._forward(batch, num_items_in_batch=targets, aux_weight=1.0 / shares)
                self._backward(out.loss, len(batches), last)
            totals.add(out, batch["input_ids"].numel())
        grad_norm, applied = self._optimizer_step(lr, only_new)
        shape = self.module.router_stats_shape() if hasattr(self.module, "router_stats_shape") else None
        flat = self.topology.dp_all_reduce(totals.pack(shape, self.topology.device))
        return StepTotals.unpack(flat, shape, shares, grad_norm, applied)

    @torch.no_grad()
    def eval_step(self, batch: dict) -> tuple[float, int]:
        batch = _model_inputs(batch, self.topology.device)
        self.model.eval()
        try:
            out = self._forward(batch, num_items_in_batch=1)
        finally:
            self.model.train()
        return float(out.cross_entropy), int(count_targets(batch["shift_labels"]))

    def _forward(self, batch: dict, **objective):
        with autocast(self.topology.device, self.precision):
            return self.model(**batch, **objective)

    def _micro_step(self, last: bool):
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        raise NotImplementedError

    def _optimizer_step(self, lr: float, only_new: bool) -> tuple[float, bool]:
        raise NotImplementedError


class TorchEngine(Engine):
    """One process, or torch DDP over the process group. fp32 master weights; bf16 runs under autocast.
    With expert parallelism (`sharding`), DDP leaves the expert slices alone: their gradients are
    reduced over the ranks holding the same slice, and the gradient norm spans every slice."""

    def __init__(self, model: nn.Module, optim_cfg, precision: str, topology: Topology, sharding=None):
        self.module = model.to(topology.device)
        self.topology, self.precision, self.sharding = topology, precision, sharding
        self.grad_clip = optim_cfg.grad_clip
        self.optimizer = build_optimizer(self.module, optim_cfg, topology.device.type)
        if topology.dp_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            if sharding is not None:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.module, [n for n, _ in self.module.named_parameters() if sharding.is_expert(n)])
            ids = [topology.device.index] if topology.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids, process_group=topology.dp_group)
        else:
            self.model = self.module

    def _micro_step(self, last: bool):
        # DDP all-reduces gradients in the last micro-step's backward only
        if last or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        # DDP averages gradients over replicas; the objective is their sum
        (loss * self.topology.dp_size).backward()

    def _optimizer_step(self, lr: float, only_new: bool) -> tuple[float, bool]:
        set_learning_rates(self.optimizer, lr, only_new)
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.sharding is None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            self.sharding.reduce_gradients(self.module)
            norm = float(self.sharding.grad_norm(self.module))
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def _names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.module.named_parameters()}

    def save(self, directory: Path) -> None:
        """The AdamW state keyed by parameter name (not by position), so that a checkpoint still loads
        when the layout or the parameter groups change, or parameters are added (upcycling). Expert
        slices are gathered into full tensors (collective)."""
        names = self._names()
        state = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param in self.optimizer.state:
                    name = names[id(param)]
                    state[name] = self.optimizer.state[param]
                    if self.sharding is not None:
                        state[name] = self.sharding.gather_optimizer_state(name, state[name])
        if self.topology.is_main:  # the rest is replicated on every rank
            optimizer_state.write(directory, state)

    def load(self, directory: Path) -> None:
        if not (directory / optimizer_state.FILE).is_file() and (directory / "deepspeed").is_dir():
            raise RuntimeError(
                f"{directory.parent}: its optimizer state was written by DeepSpeed's ZeRO engine, which the torch "
                f"engine cannot read. Resume it with the same parallel group (e.g. parallel=zero2), or start from "
                f"its weights with +model.init_from={directory.parent}")
        saved = optimizer_state.read(directory, map_location=self.topology.device)
        if self.sharding is not None:
            saved = {name: self.sharding.slice_optimizer_state(name, s) for name, s in saved.items()}
        optimizer_state.load_into_torch(self.optimizer, self._names(), saved)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.module.state_dict()
        return state if self.sharding is None else self.sharding.full_state_dict(state)


def set_learning_rates(optimizer, lr: float, only_new: bool) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if only_new and group.get("stage") == "old" else lr


def deepspeed_config(parallel_cfg, trainer_cfg, optim_cfg, accumulation: int) -> dict:
    """The DeepSpeed JSON, from the run config: batch sizes are derived here once, not stated twice.
    `parallel.deepspeed` keys are merged last (a user's extra or overriding keys)."""
    zero = {"stage": parallel_cfg.zero_stage}
    if parallel_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if parallel_cfg.offload_param:
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(topology: Topology):
    """deepspeed, ready for this process: its CPU accelerator on CPU, no shared-memory comm op build,
    and a one-process rendezvous when no launcher started us (DeepSpeed would otherwise look for MPI
    and fail with `No module named 'mpi4py'`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if topology.device.type == "cuda" else "cpu")
    if topology.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed

    # The shared-memory comm op is a C++ build (~30 s) at every first start on CPU; gloo does the
    # same job here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stages 0–3, optional CPU offload) via `deepspeed.initialize`, with our AdamW
    and weight-decay groups as its client optimizer. With expert parallelism (`sharding`, ZeRO 0–2) the
    expert slices are DeepSpeed MoE parameters: reduced over the ranks holding the same slice, in MoE
    parameter groups of their own (DeepSpeed's classic MoE machinery)."""

    def __init__(self, model: nn.Module, optim_cfg, ds_config: dict, topology: Topology, sharding=None):
        deepspeed = import_deepspeed(topology)
        self.topology, self.sharding = topology, sharding
        self.module = model
        self.precision = "fp32"  # DeepSpeed's bf16 mode casts the model itself; no autocast on top
        if sharding is not None:
            from .expert_parallel import mark_for_deepspeed

            mark_for_deepspeed(model, sharding)
            optimizer = build_optimizer(model, optim_cfg, topology.device.type, moe_groups=True)
        else:
            optimizer = build_optimizer(model, optim_cfg, topology.device.type)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        self.stage = ds_config["zero_optimization"]["stage"]
        self._bad = False
        logger.info("deepspeed config: %s", json.dumps(ds_config))

    def _backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        # DeepSpeed divides by the accumulation steps and averages over ranks; the objective is the sum.
        if not torch.isfinite(loss.detach()).all():
            # Keep DeepSpeed's micro-step bookkeeping in step with zero gradients instead of NaNs.
            self._bad = True
            loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters() if p.requires_grad)
        self.engine.backward(loss * self.topology.dp_size * micro_batches)
        if not last:
            # DeepSpeed counts micro-steps in step(); it updates only at the accumulation boundary,
            # which `_optimizer_step` takes once the learning rate is set.
            self.engine.step()

    def _optimizer_step(self, lr: float, only_new: bool) -> tuple[float, bool]:
        bad = self.topology.any(self._bad)
        # A non-finite step cannot be skipped inside DeepSpeed without desynchronising it: it is
        # neutralised instead (zero gradients, zero learning rate).
        set_learning_rates(self.optimizer, 0.0 if bad else lr, only_new)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        self._bad = False
        return (float("nan"), False) if bad else (norm, math.isfinite(norm))

    def save(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (exact, fastest to write); with expert parallelism the name-keyed
        AdamW state instead (DeepSpeed's MoE checkpointing expects its own MoE layers), with full expert
        tensors, so that the run resumes under another expert-parallel size."""
        if self.sharding is None:
            self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)
            return
        optimizer_state.link_fragments(self.optimizer)
        state = {}
        for name, param in self.module.named_parameters():
            state[name] = self.sharding.gather_optimizer_state(name, optimizer_state.param_state(self.optimizer, param))
        if self.topology.is_main:
            optimizer_state.write(directory, state)

    def load(self, directory: Path) -> None:
        if (directory / "deepspeed").is_dir() and self.sharding is None:
            path, _ = self.engine.load_checkpoint(
                str(directory / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"{directory / 'deepspeed'}: DeepSpeed found no checkpoint to load")
            return
        if not (directory / optimizer_state.FILE).is_file():
            raise RuntimeError(
                f"{directory.parent}: its optimizer state is DeepSpeed's own, written without expert parallelism; "
                f"resume it with parallel.expert_parallel=1, or start from its weights with "
                f"+model.init_from={directory.parent}")
        # name-keyed state (torch engine, pipeline, upcycling, expert parallelism): through DeepSpeed's
        # per-parameter views of its partitions
        saved = optimizer_state.read(directory)
        if self.stage == 3:
            raise RuntimeError(f"{directory.parent}: ZeRO-3 cannot load optimizer state by parameter name; resume "
                               f"with parallel=zero2, or start from its weights with +model.init_from={directory.parent}")
        optimizer_state.link_fragments(self.optimizer, optimizer_state.saved_step(saved))
        for name, param in self.module.named_parameters():
            if name in saved:
                state = saved[name] if self.sharding is None else self.sharding.slice_optimizer_state(name, saved[name])
                optimizer_state.set_param_state(self.optimizer, param, state)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on every rank; under ZeRO-3 the partitions are gathered first, and with expert
        parallelism the expert slices."""
        module = self.engine.module
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in module.state_dict().items()}
        state = module.state_dict()
        return state if self.sharding is None else self.sharding.full_state_dict(state)


def build_engine(run, model: nn.Module, topology: Topology, accumulation: int):
    if topology.pp_size > 1:
        from .pipeline import PipelineEngine

        ds_config = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation)
        return PipelineEngine(model, run, ds_config, topology, accumulation)
    sharding = None
    if topology.ep_size > 1:
        from .expert_parallel import shard_experts

        sharding = shard_experts(model, topology)
    if run.parallel.engine == "deepspeed":
        ds_config = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation)
        return DeepSpeedEngine(model.to(topology.device), run.optim, ds_config, topology, sharding)
    return TorchEngine(model, run.optim, run.trainer.precision, topology, sharding)
