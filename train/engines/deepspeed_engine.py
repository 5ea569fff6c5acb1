"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) via `deepspeed.initialize`, with our AdamW and
weight-decay groups as its client optimizer; optionally with expert parallelism (ZeRO 0-2)."""

from __future__ import annotations

import json
import logging
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
from .torch_engine import gather_module_weights, module_holdings

logger = logging.getLogger(__name__)

NATIVE_DIR = "deepspeed"  # DeepSpeed's own checkpoint files (what earlier versions of this trainer wrote)


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
    if trainer_cfg.precision == "bf16" and parallel_cfg.zero_stage >= 1:
        # DeepSpeed's default accumulates micro-batch gradients (and reduces them) in the model's dtype; in
        # fp32, as the torch engine's autocast path does (ZeRO-1 then runs DeepSpeed's BF16_Optimizer).
        # Without ZeRO, DeepSpeed 0.19.8 has no fp32 accumulation for a bf16 model (it refuses the mix).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(config, dict(parallel_cfg.deepspeed))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _partition_onto(model: nn.Module, device: torch.device, ds_config: dict) -> None:
    """ZeRO-3: the host model's parameters partitioned onto the device one at a time (DeepSpeed's zero.Init
    converting an existing module), instead of the whole model moved there first (deepspeed.initialize
    would: the full fp32 model on every GPU before partitioning, which defeats zero3-offload for a model
    that only fits partitioned). A bf16 run's parameters are cast on the host first (DeepSpeed checks a
    partitioned model's dtype instead of casting it); buffers (rotary tables) keep theirs and are moved."""
    import deepspeed

    if ds_config["bf16"]["enabled"]:
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    # deepspeed.comm must wrap our process group first: zero.Init reads the world size from it, and
    # without it takes a world of 1 and refuses the batch arithmetic
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))  # a registered buffer stays one (persistence kept)


class _Zero3Shapes(NoSharding):
    """ZeRO-3's parameters are this rank's partitions; their full shape is the one DeepSpeed records."""

    def full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        return tuple(getattr(param, "ds_shape", param.shape))


class DeepSpeedEngine(MicroBatchEngine):
    """With expert parallelism (`sharding`, ZeRO 0-2) the expert slices are DeepSpeed MoE parameters:
    reduced over the ranks holding the same slice, in MoE parameter groups of their own (DeepSpeed's
    classic MoE machinery).

    Optimizer state: the name-keyed sharded format of every engine (optimizer_state.py) for every ZeRO
    stage, each rank its own fragments or partitions, so a ZeRO run resumes under another layout and
    another layout's checkpoint under ZeRO."""

    def __init__(self, model: nn.Module, optim_cfg, ds_config: dict, topology: Topology, sharding=None):
        deepspeed = compat.import_deepspeed(topology.device, topology.world_size)
        self.topology = topology
        self.sharding = sharding or NoSharding()
        self.module = model
        self.precision = "fp32"  # DeepSpeed's bf16 mode casts the model itself; no autocast on top
        if sharding is not None:
            from .expert_parallel import mark_for_deepspeed

            mark_for_deepspeed(model, sharding)
        self.stage = ds_config["zero_optimization"]["stage"]
        if self.stage == 3:
            _partition_onto(model, topology.device, ds_config)
        else:
            model.to(topology.device)
        optimizer = build_optimizer(model, optim_cfg, topology.device.type, moe_groups=sharding is not None)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        self._bad = False
        logger.info("deepspeed config: %s", json.dumps(ds_config))
        if ds_config["bf16"]["enabled"] and "data_types" not in ds_config:
            logger.warning("DeepSpeed without ZeRO runs a bf16 model with bf16 gradient accumulation (its only mode); "
                           "parallel=ddp (fp32 weights under bf16 autocast) or parallel=zero1 (fp32 accumulation) keep "
                           "fp32 gradients")

    def _backward(self, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        # DeepSpeed divides by the accumulation steps and averages over ranks; the objective is the sum.
        # A non-finite loss is swapped for a zero-gradient graph before any gradient exists (ZeRO-2 reduces
        # during the backward): that decision needs the loss on the host, one sync per micro-batch.
        if not torch.isfinite(loss.detach()).all():
            self._bad = True
            loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters() if p.requires_grad)
        self.engine.backward(loss * self.topology.dp_size * micro_batches)
        if not last:
            # DeepSpeed counts micro-steps in step(); it updates only at the accumulation boundary,
            # which `_optimizer_step` takes once the learning rate is set.
            self.engine.step()

    def _optimizer_step(self, lr: float, only_new: bool) -> tuple[float, bool]:
        bad = self.topology.any(self._bad)
        # The non-finite policy (engines/base.py): the step runs with zero gradients (the swapped loss)
        # and learning rate 0.
        set_learning_rates(self.optimizer, 0.0 if bad else lr, only_new)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        self._bad = False
        return (float("nan"), False) if bad else (norm, math.isfinite(norm))

    # ------------------------------------------------------------------ checkpoints
    def weight_holdings(self) -> list[WeightHolding]:
        if self.stage != 3:
            return module_holdings(self.module, self.sharding)
        return module_holdings(self.module, _Zero3Shapes(), tensors=self._zero3_tensors())

    def gather_weights(self, writers: dict[str, int]) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return gather_module_weights(self.module, self.sharding, writers, self.topology.rank)
        import deepspeed

        # one parameter at a time: a rank never holds more than its partitions plus one full tensor
        out = {}
        for name, tensor in sorted(self._zero3_tensors()):
            if name not in writers:
                continue
            partitioned = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=partitioned):
                if writers[name] == self.topology.rank:
                    # a copy: the gathered storage is given back when the context ends
                    out[name] = owned_cpu_tensor(tensor.detach().clone() if tensor.device.type == "cpu" else tensor)
        return out

    def _zero3_tensors(self) -> list[tuple[str, torch.Tensor]]:
        module = self.engine.module
        persistent = set(module.state_dict())
        return list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n in persistent]

    def optimizer_chunks(self, step: float | None = None) -> list[optimizer_state.StateChunk]:
        if self.stage == 3:
            return optimizer_state.zero3_chunks(self.optimizer, self.named_parameters(), step)
        return optimizer_state.deepspeed_chunks(self.optimizer, self.named_parameters(), self.sharding, step)

    def close(self) -> None:
        # DeepSpeed's optimizer hooks every parameter's gradient accumulation, closures that hold the
        # optimizer: a cycle through C++ that the garbage collector cannot see, so the engine and its
        # process groups would live until the process exits. destroy() removes the hooks.
        self.engine.destroy()
        if self.stage == 3:
            compat.zero3_release_module(self.engine.module)

    def save(self, directory: Path) -> None:
        optimizer_state.save(directory, self.optimizer_chunks(), optimizer_state.deepspeed_step(self.optimizer),
                             self.topology)

    def load(self, directory: Path) -> None:
        if (directory / NATIVE_DIR).is_dir() and not optimizer_state.has_state(directory):
            # written by an earlier version of this trainer (DeepSpeed's own files), which only the same
            # layout reads
            if self.sharding.ep_size > 1:
                raise RuntimeError(
                    f"{directory.parent}: its optimizer state is DeepSpeed's own, written without expert parallelism; "
                    f"resume it with parallel.expert_parallel=1, or start from its weights with "
                    f"+model.init_from={directory.parent}")
            self._load_native(directory)
            return
        optimizer_state.load(directory, self.optimizer_chunks, self.topology)

    def _load_native(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / NATIVE_DIR), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{directory / NATIVE_DIR}: DeepSpeed found no checkpoint to load")
