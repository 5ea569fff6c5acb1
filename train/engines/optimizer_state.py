"""AdamW state by Hugging Face parameter name: one format for every engine, written by every rank in
parallel and read back under any layout (pipeline stages, expert-parallel size, ZeRO stage 0-2, world
size), and after parameters were added (upcycling).

    trainer_state/optimizer/index.json               {"format": "adamw-sharded", "version": 1, "step": S,
                                                       "params": {name: {"shape": [...], "keys": [...],
                                                         "chunks": [[file, start, stop], ...]}}}
    trainer_state/optimizer/rank-00003-001.safetensors   flat ranges, "<name>/<key>/<start>"

Every parameter's state is seen flat (row-major): a replica holds [0, numel); an expert-parallel rank the
rows of its experts (one contiguous range); a ZeRO-1/2 rank the fragment its flat partition holds. Each
engine hands `StateChunk`s (live views of those ranges) to `save` and `load`. Saving, the ranges are
offered and `train.sharded` picks one writer for each (replicas share the work), so no rank holds more
than its own state; loading, each rank reads only the ranges it holds, from whichever files hold them
(safetensors slices are read lazily), so resuming reads what the new layout needs, not the whole state.

`optimizer.pt` ("adamw-by-name", one file written by rank 0 with full tensors) is what earlier versions
wrote; it still loads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import sharded
from . import compat

logger = logging.getLogger(__name__)

DIRECTORY = "optimizer"
INDEX = "index.json"
FORMAT = "adamw-sharded"
LEGACY_FILE = "optimizer.pt"
LEGACY_FORMAT = "adamw-by-name"
STATE_KEYS = ("exp_avg", "exp_avg_sq")
FILE_BYTES = 2 << 30  # per file: bounds the host memory a rank needs to write its share


@dataclass
class StateChunk:
    """Elements [start, stop) of the flattened parameter `name` (full shape `shape`) and live 1-D views of
    their state: exp_avg, exp_avg_sq and, where the optimizer keeps fp32 master weights apart from the
    model's (DeepSpeed bf16), fp32_param. Writing into the views writes the optimizer's state."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int
    tensors: dict[str, torch.Tensor]
    holder: int = 0  # pipeline stage: of copies held by several stages (a tied embedding) the lowest is saved


def has_state(directory: Path) -> bool:
    return (directory / DIRECTORY / INDEX).is_file() or (directory / LEGACY_FILE).is_file()


# ---------------------------------------------------------------------------------------------------
# Saving


def save(directory: Path, chunks: list[StateChunk], step: float, topology) -> None:
    """Collective: every rank writes the ranges it is assigned; rank 0 writes the index."""
    offers = [sharded.Offer((c.name, c.start, c.stop), c.name, c.holder,
                            sum(t.numel() * t.element_size() for t in c.tensors.values())) for c in chunks]
    described = [(o, c.shape, sorted(c.tensors)) for o, c in zip(offers, chunks)]
    everyone = sharded.exchange(described, topology)
    writers = sharded.assign_writers([[o for o, _, _ in items] for items in everyone])
    sizes = {o.key: o.nbytes for items in everyone for o, _, _ in items}
    files = sharded.plan_files(writers, sizes, FILE_BYTES, lambda i, n: f"part-{i:05d}-of-{n:05d}.safetensors")
    out = directory / DIRECTORY
    out.mkdir(parents=True, exist_ok=True)
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for chunk in chunks:
        key = (chunk.name, chunk.start, chunk.stop)
        if writers.get(key) == topology.rank:
            tensors = mine.setdefault(files[key], {})
            for state_key, view in chunk.tensors.items():
                tensors[f"{chunk.name}/{state_key}/{chunk.start}"] = sharded.owned_cpu_tensor(view)
    for name, tensors in mine.items():
        sharded.write_safetensors(out / name, tensors)
    if topology.is_main:
        # a range several ranks hold (replicas) is described by each, and written by one: once in the index
        described_once = {offer.key: (shape, keys) for items in everyone for offer, shape, keys in items}
        params: dict[str, dict] = {}
        for key in writers:
            name, start, stop = key
            shape, keys = described_once[key]
            entry = params.setdefault(name, {"shape": list(shape), "keys": keys, "chunks": []})
            entry["chunks"].append([files[key], start, stop])
        for name, entry in params.items():
            entry["chunks"].sort(key=lambda c: c[1])
            _check_cover(name, entry)
        index = {"format": FORMAT, "version": 1, "step": float(step), "params": dict(sorted(params.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")


def _check_cover(name: str, entry: dict) -> None:
    """The written ranges of a parameter tile it exactly (else the plan, not the data, is wrong)."""
    numel, at = math.prod(entry["shape"]), 0
    for _, start, stop in entry["chunks"]:
        if start != at:
            raise RuntimeError(f"optimizer state of {name}: saved ranges leave a gap or overlap at element {at}")
        at = stop
    if at != numel:
        raise RuntimeError(f"optimizer state of {name}: saved ranges cover {at} of {numel} elements")


# ---------------------------------------------------------------------------------------------------
# Loading


class SavedState:
    """A checkpoint's optimizer state, read range by range."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / DIRECTORY / INDEX
        self._open: dict[str, object] = {}
        if index.is_file():
            try:
                data = json.loads(index.read_text())
            except json.JSONDecodeError as exc:
                raise RuntimeError(f"{index}: unreadable ({exc}); the checkpoint is corrupt") from None
            if data.get("format") != FORMAT:
                raise RuntimeError(f"{index}: not an optimizer state this trainer wrote")
            self.step, self.params, self._legacy = data["step"], data["params"], None
        else:
            saved = torch.load(directory / LEGACY_FILE, map_location="cpu", weights_only=True)
            if saved.get("format") != LEGACY_FORMAT:
                raise RuntimeError(f"{directory / LEGACY_FILE}: not an optimizer state this trainer wrote")
            self._legacy = saved["state"]
            steps = [s["step"] for s in self._legacy.values() if "step" in s]
            self.step = float(max(steps, key=float)) if steps else None
            self.params = {name: {"shape": list(next(v for k, v in s.items() if k in STATE_KEYS).shape),
                                  "keys": sorted(k for k in s if k != "step")} for name, s in self._legacy.items()}

    def names(self) -> set[str]:
        return set(self.params)

    def read(self, name: str, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of `name`'s flattened state `key` (CPU)."""
        if self._legacy is not None:
            return self._legacy[name][key].reshape(-1)[start:stop]
        pieces = []
        for file, first, last in self.params[name]["chunks"]:
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                pieces.append(self._file(file).get_slice(f"{name}/{key}/{first}")[lo - first:hi - first])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _file(self, name: str):
        if name not in self._open:
            from safetensors import safe_open

            path = self.directory / DIRECTORY / name
            try:
                self._open[name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise RuntimeError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the checkpoint is corrupt") from None
        return self._open[name]


def load(directory: Path, chunks_for, topology) -> None:
    """Collective. `chunks_for(step)`: the engine's chunks with its state created (zeros at the saved
    step where the checkpoint has none: parameters added by upcycling start with zero moments, damped
    like the others rather than taking a full bias-corrected step)."""
    saved = SavedState(directory)
    chunks = chunks_for(saved.step)
    held = set().union(*sharded.exchange(sorted({c.name for c in chunks}), topology))
    unknown = sorted(saved.names() - held)
    if unknown:
        raise RuntimeError(f"{directory}: optimizer state for parameters this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for chunk in chunks:
            entry = saved.params.get(chunk.name)
            if entry is None:
                continue
            if tuple(entry["shape"]) != tuple(chunk.shape):
                raise RuntimeError(f"{directory}: optimizer state of {chunk.name} has shape {tuple(entry['shape'])}, "
                                   f"the model's parameter {tuple(chunk.shape)}")
            for key, view in chunk.tensors.items():
                if key in entry["keys"]:
                    view.copy_(saved.read(chunk.name, key, chunk.start, chunk.stop).to(view.dtype))


def read_full(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's whole state {name: {key: tensor of the parameter's shape}} (for tools and tests,
    not for training: it holds everything at once)."""
    saved = SavedState(directory)
    out = {}
    for name, entry in saved.params.items():
        numel = math.prod(entry["shape"])
        out[name] = {key: saved.read(name, key, 0, numel).reshape(entry["shape"]) for key in entry["keys"]}
    return out


# ---------------------------------------------------------------------------------------------------
# Chunks of the optimizers we drive


def _new_step(step: float, param: torch.Tensor, group: dict) -> torch.Tensor:
    """AdamW's step count where torch's AdamW keeps it: on the parameter's device for the fused and
    capturable kernels (they read it there), on the CPU otherwise (torch.optim.adam's _init_group)."""
    device = param.device if group.get("fused") or group.get("capturable") else "cpu"
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _param_groups(optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def torch_chunks(optimizer, named_parameters, sharding, step: float | None = None, holder: int = 0) -> list[StateChunk]:
    """A torch AdamW's state; with `step`, missing state is created first (zeros at that count)."""
    groups = _param_groups(optimizer)
    chunks = []
    for name, param in named_parameters:
        if id(param) not in groups:
            continue
        state = optimizer.state[param]
        if step is not None and not state:
            state.update(step=_new_step(step, param, groups[id(param)]),
                         exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                         exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format))
        if not state:
            continue  # before the first step: nothing to save
        if step is not None and torch.is_tensor(state.get("step")):
            state["step"].fill_(float(step))
        start = sharding.flat_offset(name, param)
        chunks.append(StateChunk(name, sharding.full_shape(name, param), start, start + param.numel(),
                                 {k: state[k].view(-1) for k in STATE_KEYS if k in state}, holder))
    return chunks


def torch_step(optimizer) -> float:
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def deepspeed_chunks(optimizer, named_parameters, sharding, step: float | None = None,
                     holder: int = 0) -> list[StateChunk]:
    """A DeepSpeed optimizer's state below ZeRO-3 (the engine and the pipeline engine): the flat ZeRO-1/2
    partitions, or at stage 0 the torch AdamW it wraps."""
    if compat.is_zero_partitioned(optimizer):
        return zero_chunks(optimizer, named_parameters, sharding, step, holder)
    return torch_chunks(_unwrapped(optimizer), named_parameters, sharding, step, holder)


def deepspeed_step(optimizer) -> float:
    """The step count of a DeepSpeed optimizer (kept by the torch AdamW it wraps, at every ZeRO stage)."""
    return torch_step(_unwrapped(optimizer))


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def zero_chunks(optimizer, named_parameters, sharding, step: float | None = None, holder: int = 0) -> list[StateChunk]:
    """DeepSpeed ZeRO-1/2 (and its bf16 optimizer): this rank's fragments of the flat fp32 partitions.
    DeepSpeed creates no state before the first step and links its per-parameter views lazily: missing
    state is created (zeros at `step`, or 0 for a save before any step) and the views linked again."""
    _create_flat_state(optimizer, step)
    compat.zero_link_fragments(optimizer)
    chunks = []
    for name, param in named_parameters:
        fragment = compat.zero_fragment(param)
        if fragment is None or fragment.numel == 0:
            continue
        tensors = {k: fragment.view(k) for k in STATE_KEYS}
        if param.dtype != torch.float32:
            tensors["fp32_param"] = fragment.view(None)
        start = sharding.flat_offset(name, param) + fragment.start
        chunks.append(StateChunk(name, sharding.full_shape(name, param), start, start + fragment.numel, tensors, holder))
    return chunks


def _create_flat_state(optimizer, step: float | None, flats=None) -> None:
    """DeepSpeed's ZeRO optimizers create no state before their first step: zeros at `step` (or 0, for a
    save before any step) for every flat fp32 partition (`flats`, default: those in the inner AdamW's
    parameter groups), where the inner AdamW keeps it."""
    inner = optimizer.optimizer
    count = step if step is not None else deepspeed_step(optimizer)
    listed = [(group, flat) for group in inner.param_groups for flat in group["params"]] if flats is None else \
        [(inner.param_groups[0], flat) for flat in flats]  # ZeRO-3: one AdamW setting (fused or not) for all
    for group, flat in listed:
        state = inner.state[flat]
        if not state:
            state.update(step=_new_step(count, flat, group), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
        elif step is not None and torch.is_tensor(state.get("step")):
            state["step"].fill_(float(step))


def zero3_chunks(optimizer, named_parameters, step: float | None = None) -> list[StateChunk]:
    """DeepSpeed ZeRO-3: this rank's partition of every parameter's flat fp32 state (the parameters are
    partitioned alike: rank r holds elements [r·P, (r+1)·P) of each flattened parameter)."""
    _create_flat_state(optimizer, step, compat.zero3_flat_partitions(optimizer))
    chunks = []
    for name, param in named_parameters:
        partition = compat.zero3_partition(optimizer, param)
        if partition is None:
            continue
        start, numel = partition
        tensors = {k: compat.zero3_state_view(optimizer, param, k)[:numel] for k in STATE_KEYS}
        if param.dtype != torch.float32:
            tensors["fp32_param"] = compat.zero3_state_view(optimizer, param, None)[:numel]
        chunks.append(StateChunk(name, tuple(param.ds_shape), start, start + numel, tensors))
    return chunks
