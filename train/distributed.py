"""Process-group set-up shared by every engine: ranks from the launcher's environment (torchrun,
the deepspeed launcher, Slurm via torchrun), gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over ranks (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(t).tolist()

    def any(self, flag: bool) -> bool:
        return self.sum(float(flag))[0] > 0


def setup(device: str = "auto", backend: str | None = None) -> Dist:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
