"""One process, or torch DDP over the process group, optionally with expert parallelism (a sharding
strategy: expert slices per rank, reduced over the ranks holding the same slice)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from ..distributed import Topology
from ..optim import build_optimizer
from ..sharded import owned_cpu_tensor
from . import compat, optimizer_state
from .base import MicroBatchEngine, WeightHolding, set_learning_rates
from .expert_parallel import NoSharding


class TorchEngine(MicroBatchEngine):
    """fp32 master weights; bf16 runs under autocast. With expert parallelism (`sharding`), DDP leaves the
    expert slices alone: their gradients are reduced over the ranks holding the same slice, and the
    gradient norm spans every slice."""

    def __init__(self, model: nn.Module, optim_cfg, precision: str, topology: Topology, sharding=None):
        self.module = model.to(topology.device)
        self.topology, self.precision = topology, precision
        self.sharding = sharding or NoSharding()
        self.grad_clip = optim_cfg.grad_clip
        self.optimizer = build_optimizer(self.module, optim_cfg, topology.device.type)
        if topology.dp_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            experts = [n for n, _ in self.module.named_parameters() if self.sharding.is_expert(n)]
            if experts:
                compat.ddp_ignore_parameters(self.module, experts)
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
        self.sharding.reduce_gradients(self.module)
        named = [(n, p.grad) for n, p in self.module.named_parameters() if p.grad is not None]
        norm = self.sharding.grad_norm(named, self.topology.device)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grads_with_norm_([p for p in self.module.parameters() if p.grad is not None], max_norm, norm)
        norm = float(norm)  # the step's one host sync: whether to apply it
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    # ------------------------------------------------------------------ checkpoints
    def weight_holdings(self) -> list[WeightHolding]:
        return module_holdings(self.module, self.sharding)

    def gather_weights(self, writers: dict[str, int]) -> dict[str, torch.Tensor]:
        return gather_module_weights(self.module, self.sharding, writers, self.topology.rank)

    def optimizer_chunks(self, step: float | None = None) -> list[optimizer_state.StateChunk]:
        return optimizer_state.torch_chunks(self.optimizer, self.named_parameters(), self.sharding, step)

    def save(self, directory: Path) -> None:
        optimizer_state.save(directory, self.optimizer_chunks(), optimizer_state.torch_step(self.optimizer),
                             self.topology)

    def load(self, directory: Path) -> None:
        optimizer_state.load(directory, self.optimizer_chunks, self.topology)


def module_holdings(module: nn.Module, sharding, holder: int = 0, tensors=None) -> list[WeightHolding]:
    """A whole model's tensors (expert tables at their full size), tied copies left out. `tensors`: the
    (name, tensor) pairs to list instead of the state dict's (ZeRO-3's partitioned parameters)."""
    tied = set(module.tied_weight_keys())
    out = []
    for name, tensor in module.state_dict().items() if tensors is None else tensors:
        if name in tied or not sharding.exports(name):
            continue
        numel = math.prod(sharding.full_shape(name, tensor))
        out.append(WeightHolding(name, holder, numel * tensor.element_size(), str(tensor.dtype)))
    return out


def gather_module_weights(module: nn.Module, sharding, writers: dict[str, int], rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in sorted(module.state_dict().items()):  # one order on every rank: the gathers pair up
        if name not in writers or not sharding.exports(name):
            continue
        full = sharding.full_tensor(name, tensor)
        if writers[name] == rank:
            out[name] = owned_cpu_tensor(full)
    return out
