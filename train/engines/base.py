"""The engine interface: how a parallel layout runs an optimizer step and saves its state. The loop
and the checkpoint code hold an `Engine` and never branch on which one; they never count micro-steps or
enter DDP's no_sync themselves.

Every engine minimises the same objective (`models.loss`): the cross-entropy summed over the global
batch's target tokens and divided by their number, plus the aux coefficient times the mean aux loss
over micro-batches and data-parallel ranks. Engines (this package): `TorchEngine` (one process, DDP),
`DeepSpeedEngine` (ZeRO 0-3, offload), `PipelineEngine` (DeepSpeed's pipeline, ZeRO 0/1); expert
parallelism is a sharding strategy any of the first two takes (`expert_parallel.py`). Model files know
nothing of any of them: engines wrap the model from outside (`parallelize.py` for what is applied per
layer).

One non-finite-step policy for all: a step whose loss (on any rank) or gradient norm is not finite is
not applied (`StepResult.applied` is False) and leaves weights and optimizer moments as they were. The
torch engine skips its optimizer step; DeepSpeed's engines cannot skip a step without desynchronising
their own bookkeeping, so they run it with zero gradients and learning rate 0 (`zero_gradients_and_lr`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from models.loss import count_targets

from ..distributed import Topology


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


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass(frozen=True)
class WeightHolding:
    """A model tensor this rank can contribute to a checkpoint: its Hugging Face name, which copy of it
    the rank holds (`holder`: the pipeline stage; the lowest holder's copy is written) and its size in
    the checkpoint. Ranks holding the same name and holder hold the same values (replicas), or take part
    in the same gather (expert slices, ZeRO-3 partitions)."""

    name: str
    holder: int
    nbytes: int
    dtype: str


@runtime_checkable
class Engine(Protocol):
    """What the loop and the checkpoint code may call. Methods marked collective are called by every rank
    in the same order."""

    topology: Topology
    module: nn.Module  # this rank's model (a pipeline stage's: the head model); its config and tied keys

    def train_step(self, micro_batches: list[dict], lr: float, only_new: bool = False) -> "StepResult":
        """One optimizer step over this rank's micro-batches (only_new: the parameter groups tagged
        stage=old get learning rate 0). Collective."""

    def eval_step(self, batch: dict) -> tuple[float, int]:
        """(summed cross-entropy, target tokens) of this rank's share of a held-out batch. Collective."""

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters under their Hugging Face names (a tied weight once)."""

    def weight_holdings(self) -> list[WeightHolding]:
        """The checkpoint tensors this rank holds (tied copies left out)."""

    def gather_weights(self, writers: dict[str, int]) -> dict[str, torch.Tensor]:
        """Full tensors, on the CPU, of the names this rank writes (`writers[name] == rank`); expert
        slices and ZeRO-3 partitions are gathered one tensor at a time. Collective."""

    def save(self, directory: Path) -> None:
        """Optimizer state into `directory` (each rank its own part). Collective."""

    def load(self, directory: Path) -> None:
        """Optimizer state from `directory`, whatever layout wrote it; each rank reads its part. Collective."""

    def close(self) -> None:
        """Let go of what would keep the engine (and the process groups it holds) alive past the run, so
        that `distributed.teardown` can end the groups. Once, after the last step and save."""


def zero_gradients_and_lr(parameters, optimizer) -> None:
    """The non-finite policy where the step cannot be skipped: no update, no moment change."""
    for param in parameters:
        if param.grad is not None:
            param.grad.zero_()
    set_learning_rates(optimizer, 0.0, False)


def set_learning_rates(optimizer, lr: float, only_new: bool) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if only_new and group.get("stage") == "old" else lr


class MicroBatchEngine:
    """The step logic shared by engines that run micro-batches one after another in this process
    (single process, DDP, ZeRO). Subclasses say how a micro-batch is run forward and backward, and how
    the optimizer steps."""

    topology: Topology
    module: nn.Module  # the unwrapped model
    model: nn.Module  # what is called (the wrapper, if any)
    precision: str = "fp32"

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.named_parameters())

    def close(self) -> None:
        """Nothing to let go of: the model and a DDP wrapper are freed with the engine."""

    def train_step(self, micro_batches: list[dict], lr: float, only_new: bool = False) -> StepResult:
        targets = global_targets(micro_batches, self.topology)  # counted on the host: no device sync
        batches = [model_inputs(b, self.topology.device) for b in micro_batches]
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
        targets = int(count_targets(batch["shift_labels"]))
        batch = model_inputs(batch, self.topology.device)
        self.model.eval()
        try:
            out = self._forward(batch, num_items_in_batch=1)
        finally:
            self.model.train()
        return float(out.cross_entropy), targets

    def _forward(self, batch: dict, **objective):
        with autocast(self.topology.device, self.precision):
            return self.model(**batch, **objective)

    def _micro_step(self, last: bool):
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        raise NotImplementedError

    def _optimizer_step(self, lr: float, only_new: bool) -> tuple[float, bool]:
        raise NotImplementedError
