"""Training checkpoints: `<output_dir>/checkpoints/step-<N>/` is a Hugging Face model directory
(config.json, model.safetensors, tokenizer files) with the training state beside it:

    trainer_state/state.json        step, tokens seen, schedule, run identity (wandb id), counters
    trainer_state/optimizer.pt      optimizer state (single process / DDP)
    trainer_state/deepspeed/        DeepSpeed engine files (when DeepSpeed runs)
    trainer_state/rank-<r>.pt       per rank: data loader state and RNG states
    MANIFEST.json                   every file with its size and SHA-256, written last

A checkpoint is assembled under a temporary name and renamed into place, then `latest` is updated:
it appears complete or not at all. `resume=auto` takes the newest checkpoint whose manifest checks
out and warns about any it skips; an explicit path that fails the check is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import save_model_dir

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "MANIFEST.json"


class CheckpointCorrupt(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, checksums: bool) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(path)
        files[str(path.relative_to(directory))] = entry
    data = json.dumps({"files": files}, indent=1).encode()
    with open(directory / MANIFEST, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def verify(directory: Path, checksums: bool = True) -> None:
    """Raise CheckpointCorrupt unless every file of the manifest is there, with its size and hash."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointCorrupt(f"{directory}: no {MANIFEST} (the checkpoint was not finished)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointCorrupt(f"{manifest}: unreadable ({exc})") from exc
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointCorrupt(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']}")
        if checksums and "sha256" in entry and _sha256(path) != entry["sha256"]:
            raise CheckpointCorrupt(f"{path}: contents differ from the manifest's SHA-256 (corrupt)")


def step_of(directory: Path) -> int:
    match = STEP_DIR.match(directory.name)
    if not match:
        raise ValueError(f"{directory} is not a step-<N> checkpoint directory")
    return int(match.group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def find_resumable(output_dir: Path, checksums: bool = True) -> Path | None:
    """The newest complete checkpoint; broken ones are skipped with a warning."""
    for candidate in reversed(list_checkpoints(output_dir)):
        try:
            verify(candidate, checksums)
            return candidate
        except CheckpointCorrupt as exc:
            logger.warning("skipping checkpoint %s: %s", candidate, exc)
    return None


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                  for k, v in zip(("kind", "keys", "pos", "has_gauss", "cached"), np.random.get_state())},
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: Path, step: int, engine, model_config, tokenizer, loader, trainer_state: dict, dist,
         keep_last: int, checksums: bool = True) -> Path:
    """Collective: every rank calls it."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer_state").mkdir(parents=True)
    dist.barrier()
    weights = engine.export_state_dict()  # collective under ZeRO-3
    if dist.is_main:
        save_model_dir(_StateView(weights, engine.module), model_config, tmp)
        tokenizer.save(tmp)
    engine.save(tmp / "trainer_state")
    torch.save({"data": loader.state_dict(), "rng": rng_state()}, tmp / "trainer_state" / f"rank-{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        (tmp / "trainer_state" / "state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        write_manifest(tmp, checksums)
        if final.exists():  # the same step saved again (e.g. a preempted run resumed at it)
            trash = root / f".step-{step}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        _prune(root, keep_last, keep=final)
        logger.info("checkpoint saved: %s", final)
    dist.barrier()
    return final


class _StateView:
    """What save_model_dir needs from a model: its (possibly gathered) state dict and tied keys."""

    def __init__(self, state: dict, module):
        self._state, self._module = state, module

    def state_dict(self):
        return self._state

    def tied_weight_keys(self):
        return self._module.tied_weight_keys()


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    if keep_last <= 0:
        return
    checkpoints = [p for p in sorted(root.iterdir(), key=lambda p: step_of(p) if STEP_DIR.match(p.name) else -1)
                   if STEP_DIR.match(p.name)]
    for old in checkpoints[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def load(directory: Path, engine, loader, dist) -> dict:
    """Restore engine, data loader and RNG state; returns state.json. The caller has checked the
    checkpoint (`verify` / `find_resumable`): hashing it again would read every file twice."""
    state = json.loads((directory / "trainer_state" / "state.json").read_text())
    if state.get("optimizer_state", True):
        engine.load(directory / "trainer_state")
    else:
        logger.warning("%s carries no optimizer state (see its state.json): the optimizer starts fresh", directory)
    rank_file = directory / "trainer_state" / f"rank-{dist.rank}.pt"
    if rank_file.is_file():
        per_rank = torch.load(rank_file, map_location="cpu", weights_only=True)
        loader.load_state_dict(per_rank["data"])
        set_rng_state(per_rank["rng"])
    else:
        # saved with fewer ranks: the data loader decides whether a fresh order is allowed
        loader.load_state_dict(torch.load(directory / "trainer_state" / "rank-0.pt", weights_only=True)["data"])
    return state


