"""Process groups: one `Topology` object knows the world and how it is split.

Ranks come from the launcher's environment (torchrun, the deepspeed launcher, Slurm via torchrun);
gloo on CPU, NCCL on CUDA. The world is laid out as DeepSpeed lays out its pipeline topology
(axes pipe × data, row-major): rank = stage · dp_size + dp_rank. So

  * dp_rank / dp_size / dp_group: the data-parallel replicas. The loader shards by dp_rank, and the
    loss of a step is normalised over the dp group's target tokens. Ranks of different pipeline
    stages with the same dp_rank see the same data.
  * pp_stage / pp_size: the pipeline stage of this rank (DeepSpeed's PipelineModule builds its own
    p2p groups from the same layout).
  * ep_size: ranks that share one set of experts (expert parallelism); all of them are data-parallel
    replicas for the rest of the model, so dp_size counts them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """A parallel layout that cannot run on this world; the message names the numbers and what works."""


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    pp_size: int = 1
    ep_size: int = 1
    dp_group: object = field(default=None, compare=False, repr=False)  # None: the whole world
    ep_group: object = field(default=None, compare=False, repr=False)  # ranks sharing one set of experts
    edp_group: object = field(default=None, compare=False, repr=False)  # ranks holding the same expert slice

    # ------------------------------------------------------------------ coordinates
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pp_size

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_size

    @property
    def pp_stage(self) -> int:
        return self.rank // self.dp_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Over the world."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    def dp_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (each pipeline stage has its own group)."""
        if self.dp_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over the world (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(t).tolist()

    def dp_sum(self, *values: float) -> list[float]:
        """Sum scalars over the data-parallel replicas (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.dp_all_reduce(t).tolist()

    def any(self, flag: bool) -> bool:
        return self.sum(float(flag))[0] > 0


def check_layout(world_size: int, pipeline_stages: int = 1, expert_parallel: int = 1) -> None:
    if pipeline_stages < 1 or world_size % pipeline_stages:
        raise LayoutError(
            f"parallel.pipeline_stages={pipeline_stages} does not divide the world of {world_size} processes; "
            f"use a divisor of {world_size} ({_divisors(world_size)}), or launch a multiple of {pipeline_stages} "
            f"processes")
    if expert_parallel < 1 or world_size % expert_parallel:
        raise LayoutError(
            f"parallel.expert_parallel={expert_parallel} does not divide the world of {world_size} processes; "
            f"use a divisor of {world_size} ({_divisors(world_size)}), or launch a multiple of {expert_parallel} "
            f"processes")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def world_from_environment() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LayoutError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu (or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto", backend: str | None = None, pipeline_stages: int = 1,
          expert_parallel: int = 1) -> Topology:
    rank, local_rank, world_size = world_from_environment()
    check_layout(world_size, pipeline_stages, expert_parallel)
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    topology = Topology(rank, local_rank, world_size, dev, pp_size=pipeline_stages, ep_size=expert_parallel)
    # every rank takes part in creating every group, in the same order (torch.distributed requires it)
    dp_group = ep_group = edp_group = None
    if pipeline_stages > 1 and topology.dp_size > 1:
        dp_group = _new_groups(stage_data_parallel_ranks(world_size, pipeline_stages), rank)
    if expert_parallel > 1:
        ep_ranks, edp_ranks = expert_parallel_ranks(world_size, expert_parallel)
        ep_group, edp_group = _new_groups(ep_ranks, rank), _new_groups(edp_ranks, rank)
    return Topology(rank, local_rank, world_size, dev, pp_size=pipeline_stages, ep_size=expert_parallel,
                    dp_group=dp_group, ep_group=ep_group, edp_group=edp_group)


def stage_data_parallel_ranks(world_size: int, pipeline_stages: int) -> list[list[int]]:
    """The data-parallel replicas of each pipeline stage: stage s holds ranks [s·D, (s+1)·D), D = world /
    stages (DeepSpeed's PipeDataParallelTopology: the pipe axis outermost)."""
    replicas = world_size // pipeline_stages
    return [list(range(stage * replicas, (stage + 1) * replicas)) for stage in range(pipeline_stages)]


def expert_parallel_ranks(world_size: int, expert_parallel: int) -> tuple[list[list[int]], list[list[int]]]:
    """(expert-parallel groups: consecutive ranks that together hold every expert, expert-data-parallel
    groups: the ranks holding the same slice of the experts, one per expert-parallel group), in
    DeepSpeed's layout (deepspeed.utils.groups, expert parallelism inside data parallelism)."""
    ep = [list(range(first, first + expert_parallel)) for first in range(0, world_size, expert_parallel)]
    edp = [list(range(index, world_size, expert_parallel)) for index in range(expert_parallel)]
    return ep, edp


def _new_groups(rank_lists: list[list[int]], rank: int):
    """Create every group (every rank must, in the same order); return the one holding `rank`."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
