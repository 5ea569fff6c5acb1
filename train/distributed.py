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

import gc
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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
    # barriers: a gloo group beside NCCL, so that waiting for rank 0's long work (writing, hashing, scoring a
    # checkpoint) is not a device collective under NCCL's watchdog; None: the world group (gloo already)
    host_group: object = field(default=None, compare=False, repr=False)

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
        """Wait for every rank (on the host: no device work is queued)."""
        if self.world_size > 1:
            dist.barrier(group=self.host_group)

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
        # LOCAL_RANK counts the ranks of a node, but a rank does not always see every GPU of its node: under
        # per-task GPU binding (Slurm's --gpus-per-task / --gpu-bind, submitit's gpus_per_task) each task
        # sees only its own, as device 0, and cuda:LOCAL_RANK would be an invalid device ordinal
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def local_world_size() -> int:
    """The ranks on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, else one
    rank per visible GPU (or 1)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


def use_cores_for_offloaded_optimizer(device: torch.device, offload_optimizer: bool) -> int | None:
    """With the optimizer offloaded to the CPU (parallel=zero2-offload / zero3-offload) on a CUDA run, let
    torch's intra-op thread pool use this rank's share of the node's cores: the number of threads set,
    or None when left as it was.

    Why: torchrun (when OMP_NUM_THREADS is unset) and launch/deepspeed.sh start each rank with one
    thread, right for a GPU rank whose host thread only queues kernels. Offloaded, though, AdamW steps
    this rank's fp32 partition of the weights and moments on the CPU, every step: arithmetic over
    gigabytes that takes seconds on one thread. The ranks of a node share its cores, so each takes the
    cores this process may run on (os.sched_getaffinity: Slurm's --cpus-per-task and cgroups) divided by
    the ranks on the node. A larger thread count already set (OMP_NUM_THREADS) is left alone."""
    if not offload_optimizer or device.type != "cuda":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_world_size())
    if threads <= torch.get_num_threads():
        return None
    logger.info("optimizer offloaded to the CPU: %d threads per rank for its step (%d cores, %d ranks on this node; "
                "was %d)", threads, cores, local_world_size(), torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def setup(device: str = "auto", backend: str | None = None, pipeline_stages: int = 1,
          expert_parallel: int = 1, timeout_minutes: float = 30, barrier_timeout_minutes: float = 240,
          deepspeed: bool = False) -> Topology:
    """The world of this process. `timeout_minutes`: how long a collective may wait for a rank before the
    run is aborted (NCCL's own default, 10 minutes, is short for a slow filesystem at a save);
    `barrier_timeout_minutes`: how long ranks wait in a barrier for rank 0's work alone (saving and
    hashing a checkpoint, lm-eval scoring), which runs on a gloo group beside NCCL. `deepspeed`: the
    run's engine uses DeepSpeed (imported before the world exists: see `_import_before_the_world`)."""
    rank, local_rank, world_size = world_from_environment()
    check_layout(world_size, pipeline_stages, expert_parallel)
    dev = resolve_device(device, local_rank)
    host_group = None
    if world_size > 1 and not dist.is_initialized():
        _import_before_the_world(dev, world_size, deepspeed)
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None, timeout=timedelta(minutes=timeout_minutes))
    if world_size > 1 and dist.get_backend() != "gloo":
        host_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=barrier_timeout_minutes))
    topology = Topology(rank, local_rank, world_size, dev, pp_size=pipeline_stages, ep_size=expert_parallel)
    # every rank takes part in creating every group, in the same order (torch.distributed requires it)
    dp_group = ep_group = edp_group = None
    if pipeline_stages > 1 and topology.dp_size > 1:
        dp_group = _new_groups(stage_data_parallel_ranks(world_size, pipeline_stages), rank)
    if expert_parallel > 1:
        ep_ranks, edp_ranks = expert_parallel_ranks(world_size, expert_parallel)
        ep_group, edp_group = _new_groups(ep_ranks, rank), _new_groups(edp_ranks, rank)
    return Topology(rank, local_rank, world_size, dev, pp_size=pipeline_stages, ep_size=expert_parallel,
                    dp_group=dp_group, ep_group=ep_group, edp_group=edp_group, host_group=host_group)


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


def _import_before_the_world(device: torch.device, world_size: int, deepspeed: bool) -> None:
    """Import the modules whose functions take the world group as a default argument (`group=group.WORLD`:
    evaluated once, at import) before init_process_group. Imported after it, they hold the world group
    for good: destroy_process_group cannot end it, and its gloo threads outlive the interpreter (see
    `teardown`). Imported before, their default is None, which means the world at call time: the same
    group. torch's are torch.distributed.nn.functional's (imported by DDP and torch.compile); DeepSpeed's
    are its comm backend's barriers."""
    import torch.distributed.nn.functional  # noqa: F401

    if deepspeed:
        from .engines.compat import import_deepspeed

        import_deepspeed(device, world_size)
        import deepspeed.comm  # noqa: F401


def teardown() -> None:
    """End every process group here, after the run's last collective and while the interpreter is whole:
    a group ends when its last reference goes, and its destructor then waits for its gloo worker threads.
    A worker lets go of a finished collective's tensors a moment after the collective returns; if that
    moment falls in interpreter shutdown (a group still referenced, the process already exiting), freeing
    a tensor Python created needs the GIL from a thread the dying interpreter no longer admits, and the
    process aborts after its last line ("terminate called without an active exception", SIGABRT). The
    references that outlive the run are DeepSpeed's (its module-level groups: released by its own
    destroy_process_group; its engine: released by `Engine.close`, then collected here) and the world-group
    defaults of `_import_before_the_world`."""
    if not dist.is_initialized():
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()  # torch's, plus DeepSpeed's own references to its groups
    else:
        dist.destroy_process_group()
    gc.collect()  # engines hold groups in reference cycles
