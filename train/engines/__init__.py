"""Engines: how a parallel layout runs an optimizer step and saves its state, behind one interface
(`base.Engine`). `build_engine` picks one from the run config:

    pipeline_stages > 1        PipelineEngine    DeepSpeed's pipeline engine (ZeRO 0/1)
    engine=deepspeed           DeepSpeedEngine   ZeRO 0-3, offload; expert parallelism with ZeRO 0-2
    otherwise                  TorchEngine       one process or DDP; expert parallelism

Expert parallelism is a sharding strategy (`expert_parallel.ExpertSharding`, or `NoSharding`) the
torch and DeepSpeed engines take. Every private name of DeepSpeed or torch they touch is in `compat`.
"""

from __future__ import annotations

from torch import nn

from ..distributed import Topology
from .base import Engine, StepResult, StepTotals, WeightHolding
from .parallelize import parallelize as parallelize_model


def uses_deepspeed(run) -> bool:
    """Whether the engine `build_engine` builds for this run uses DeepSpeed: its engines, and expert
    parallelism (AutoEP's collectives through deepspeed.comm) under any engine."""
    p = run.parallel
    return p.pipeline_stages > 1 or p.engine == "deepspeed" or p.expert_parallel > 1


def build_engine(run, model: nn.Module, topology: Topology, accumulation: int) -> Engine:
    """The engine for the run's layout, with the run's model-level options (activation checkpointing,
    compile) applied first. The engine takes the model over: do not use `model` afterwards."""
    parallelize_model(model, run, topology.device)
    if topology.pp_size > 1:
        from .deepspeed_engine import deepspeed_config
        from .pipeline import PipelineEngine

        return PipelineEngine(model, run, deepspeed_config(run.parallel, run.trainer, run.optim, accumulation),
                              topology, accumulation)
    sharding = None
    if topology.ep_size > 1:
        from .expert_parallel import shard_experts

        sharding = shard_experts(model, topology)
    if run.parallel.engine == "deepspeed":
        from ..distributed import use_cores_for_offloaded_optimizer
        from .deepspeed_engine import DeepSpeedEngine, deepspeed_config

        use_cores_for_offloaded_optimizer(topology.device, run.parallel.offload_optimizer)

        ds_config = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation)
        return DeepSpeedEngine(model, run.optim, ds_config, topology, sharding)
    from .torch_engine import TorchEngine

    return TorchEngine(model, run.optim, run.trainer.precision, topology, sharding)


__all__ = ["Engine", "StepResult", "StepTotals", "WeightHolding", "build_engine", "uses_deepspeed"]
