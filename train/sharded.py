"""Writing one checkpoint from many ranks: who writes what, and in which file.

Each rank offers the pieces it holds (a tensor of the model, a flat range of a parameter's optimizer
state); `assign_writers` picks one writer per piece, identically on every rank from one exchange of
these small descriptions, so that no rank gathers another's data and each writes about its share:

  * of the copies of a tensor held by different pipeline stages (a tied embedding on the first and the
    last), the lowest stage's is written;
  * replicas of a piece (data-parallel ranks) share the writing by bytes, largest pieces first.

`plan_files` then cuts each writer's pieces into files of bounded size, numbered over all writers, the
way transformers shards a model (`model-00001-of-00004.safetensors`), so every rank knows every file's
name and rank 0 can write the index without a second exchange.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Offer:
    """A piece this rank can write: `key` identifies its bytes (equal keys: equal bytes), `group` the
    tensor it belongs to, `holder` which copy of that tensor (pipeline stage)."""

    key: Hashable
    group: str
    holder: int
    nbytes: int


def exchange(items: list, topology) -> list[list]:
    """Every rank's list (a collective of small objects, on the host group: under NCCL the objects would
    be staged on the device, and callers wait here for each other's host work, e.g. hashing files)."""
    if topology.world_size == 1:
        return [items]
    gathered: list = [None] * topology.world_size
    dist.all_gather_object(gathered, items, group=topology.host_group)
    return gathered


def assign_writers(offers: list[list[Offer]]) -> dict[Hashable, int]:
    """offers[rank] -> {piece key: the rank that writes it}."""
    lowest: dict[str, int] = {}
    for items in offers:
        for offer in items:
            lowest[offer.group] = min(lowest.get(offer.group, offer.holder), offer.holder)
    candidates: dict[Hashable, tuple[int, list[int]]] = {}
    for rank, items in enumerate(offers):
        for offer in items:
            if offer.holder == lowest[offer.group]:
                candidates.setdefault(offer.key, (offer.nbytes, []))[1].append(rank)
    load = [0] * len(offers)
    writers = {}
    for key in sorted(candidates, key=lambda k: (-candidates[k][0], repr(k))):
        nbytes, ranks = candidates[key]
        writer = min(ranks, key=lambda r: (load[r], r))
        writers[key] = writer
        load[writer] += nbytes
    return writers


def plan_files(writers: dict[Hashable, int], sizes: dict[Hashable, int], max_bytes: int,
               name_of) -> dict[Hashable, str]:
    """{piece key: file name}: each writer's pieces (in key order) in files of at most `max_bytes` (a
    larger piece gets a file of its own), numbered over all writers in rank order. `name_of(index,
    count)` names the index-th of `count` files (1-based)."""
    by_rank: dict[int, list] = {}
    for key, rank in writers.items():
        by_rank.setdefault(rank, []).append(key)
    files: list[list] = []
    for rank in sorted(by_rank):
        current, size = [], 0
        for key in sorted(by_rank[rank], key=repr):
            if current and size + sizes[key] > max_bytes:
                files.append(current)
                current, size = [], 0
            current.append(key)
            size += sizes[key]
        if current:
            files.append(current)
    return {key: name_of(i, len(files)) for i, keys in enumerate(files, 1) for key in keys}


def owned_cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its bytes: a view of a larger storage (a ZeRO flat buffer) is
    copied, since safetensors refuses tensors that share storage and pickling a view would carry the
    whole buffer."""
    tensor = tensor.detach().to("cpu")
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write and fsync (the checkpoint directory is renamed into place only once every file is on disk)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    fsync(path)


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
