"""Training checkpoints: `<output_dir>/checkpoints/step-<N>/` is a Hugging Face model directory
(config.json, model.safetensors or model-0000i-of-0000n.safetensors with model.safetensors.index.json,
tokenizer files) with the training state beside it:

    trainer_state/state.json        step, tokens seen, schedule, run identity (wandb id), counters
    trainer_state/optimizer/        AdamW state by parameter name, in flat ranges (engines/optimizer_state.py)
    trainer_state/deepspeed/        DeepSpeed's own files (earlier versions of this trainer; still read)
    trainer_state/rank-<r>.pt       per rank: data loader state and RNG states
    trainer_state/config.json       the run's resolved config (names what changed when a resume is refused)
    MANIFEST.json                   every file with its size and SHA-256, written last

Every rank writes its part: the weights each by one of the ranks that hold them, the optimizer state
each rank's own ranges (`train.sharded` plans who writes what), the ranks share the hashing, and no
rank gathers the model or the optimizer state. A resume under any other layout reads the weights and
only the optimizer ranges it holds.

A checkpoint is assembled under a temporary name and renamed into place, then `latest` is updated:
it appears complete or not at all. `resume=auto` follows `latest`; a broken checkpoint it has to skip
is moved aside as `step-N.corrupt`. Pruning keeps the newest complete checkpoints of the run that is
saving (checkpoints of other runs in the same directory are left alone). An explicit path that fails
its manifest is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from data import DataError
from models.checkpoint import WEIGHTS_NAME, shard_name, write_config_files, write_weight_index

from . import sharded
from .config import RunConfigError

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


def write_manifest(directory: Path, checksums: bool, topology=None) -> None:
    """MANIFEST.json: every file's size and SHA-256. With a topology (collective), the ranks share the
    hashing by bytes and rank 0 writes the manifest: no rank reads the whole checkpoint."""
    shared = topology is not None and topology.world_size > 1
    if shared and not checksums and not topology.is_main:
        return  # sizes only: rank 0 reads them alone
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in paths}
    hashes = _hashes(directory, sizes, topology if shared else None) if checksums else {}
    if shared and not topology.is_main:
        return
    files = {name: {"size": size, **({"sha256": hashes[name]} if checksums else {})} for name, size in sizes.items()}
    data = json.dumps({"files": files}, indent=1).encode()
    with open(directory / MANIFEST, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _hashes(directory: Path, sizes: dict[str, int], topology=None) -> dict[str, str]:
    """Every file's SHA-256; with a topology (collective), each rank hashes its share of the bytes."""
    if topology is None:
        return {name: _sha256(directory / name) for name in sizes}
    writers = sharded.assign_writers([[sharded.Offer(name, name, 0, size) for name, size in sizes.items()]]
                                     * topology.world_size)
    mine = {name: _sha256(directory / name) for name in sizes if writers[name] == topology.rank}
    return {name: digest for part in sharded.exchange(mine, topology) for name, digest in part.items()}


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


def read_state(directory: Path) -> dict | None:
    """A checkpoint's trainer_state/state.json, or None when it is missing or unreadable."""
    try:
        return json.loads((directory / "trainer_state" / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_id_of(directory: Path) -> str | None:
    state = read_state(directory)
    return state.get("run_id") if state else None


def latest(output_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names (the last one a run finished saving), if any."""
    pointer = output_dir / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    return output_dir / "checkpoints" / name if STEP_DIR.match(name) else None


def find_resumable(output_dir: Path, checksums: bool = True) -> tuple[Path | None, list[Path]]:
    """The checkpoint `resume=auto` continues, and the broken checkpoints it skipped (to be moved aside).

    `latest` is followed: it names the last checkpoint the run writing into this directory finished,
    which is not always the highest step (a new run in a used directory starts again from step 1).
    When `latest` is broken, the newest complete checkpoint of the same run is taken instead, with a
    warning. A directory whose runs cannot be told apart is refused, naming its checkpoints."""
    pointed = latest(output_dir)
    candidates = list_checkpoints(output_dir)
    if pointed is None and not candidates:
        return None, []
    corrupt: list[Path] = []
    if pointed is not None and pointed.is_dir():
        try:
            verify(pointed, checksums)
            return pointed, []
        except CheckpointCorrupt as exc:
            logger.warning("skipping checkpoint %s (checkpoints/latest): %s", pointed, exc)
            corrupt.append(pointed)
    elif pointed is not None:
        logger.warning("checkpoints/latest names %s, which does not exist", pointed.name)
    run_ids = {c: run_id_of(c) for c in candidates if c not in corrupt}
    wanted = run_id_of(pointed) if pointed is not None and pointed.is_dir() else None
    if wanted is None:
        known = {r for r in run_ids.values() if r is not None}
        if len(known) > 1:
            listing = "; ".join(f"run {r}: " + ", ".join(c.name for c, i in run_ids.items() if i == r) for r in sorted(known))
            raise CheckpointCorrupt(
                f"{output_dir / 'checkpoints'} holds checkpoints of {len(known)} runs ({listing}) and checkpoints/latest "
                f"does not say which to continue; pass trainer.resume=<a checkpoint directory>")
        wanted = known.pop() if known else None
    for candidate in reversed(candidates):
        if candidate in corrupt or (wanted is not None and run_ids.get(candidate) != wanted):
            continue
        try:
            verify(candidate, checksums)
            return candidate, corrupt
        except CheckpointCorrupt as exc:
            logger.warning("skipping checkpoint %s: %s", candidate, exc)
            corrupt.append(candidate)
    return None, corrupt


def quarantine(paths: list[Path]) -> list[Path]:
    """Move broken checkpoints aside as `step-N.corrupt` (kept for inspection, never resumed from,
    counted or pruned)."""
    moved = []
    for path in paths:
        if not path.is_dir():
            continue
        target = path.with_name(f"{path.name}.corrupt")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{n}")
        os.replace(path, target)
        logger.warning("moved the broken checkpoint %s aside to %s", path, target.name)
        moved.append(target)
    return moved


def clean_stale(output_dir: Path) -> None:
    """Remove what an interrupted save leaves behind (`.step-N.tmp`, `.step-N.old`, `.latest.tmp`)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return
    for path in root.iterdir():
        if re.match(r"^\.(step-\d+\.(tmp|old)|latest\.tmp)$", path.name):
            logger.info("removing %s, left by an interrupted save", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                  for k, v in zip(("kind", "keys", "pos", "has_gauss", "cached"), np.random.get_state())},
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    # CUDA: this rank's device alone (the current one, train.distributed.resolve_device), not every GPU it
    # sees: a resume that sees fewer GPUs (another node, per-task GPU binding) could not restore the others
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # written before: every visible GPU's, this rank's at its device index
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)  # the current device: this rank's


def save(output_dir: Path, step: int, engine, model_config, tokenizer, loader, trainer_state: dict, topology,
         keep_last: int, checksums: bool = True, run_config: dict | None = None) -> Path:
    """Collective: every rank calls it."""
    started = time.perf_counter()
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if topology.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer_state").mkdir(parents=True)
    topology.barrier()
    write_weights(tmp, engine, with_token_ids(model_config, tokenizer), topology)
    engine.save(tmp / "trainer_state")
    torch.save({"data": loader.state_dict(), "rng": rng_state()}, tmp / "trainer_state" / f"rank-{topology.rank}.pt")
    if topology.is_main:
        tokenizer.save(tmp)
        (tmp / "trainer_state" / "state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if run_config is not None:
            (tmp / "trainer_state" / "config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    topology.barrier()
    write_manifest(tmp, checksums, topology)
    if topology.is_main:
        if final.exists():  # the same step saved again (e.g. a preempted run resumed at it)
            trash = root / f".step-{step}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        sharded.fsync(root)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        prune(root, keep_last, final, trainer_state.get("run_id"))
        logger.info("checkpoint saved: %s (%.1f s)", final, time.perf_counter() - started)
    topology.barrier()
    return final


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def with_token_ids(config, tokenizer):
    """The model config as a checkpoint exports it: with the special token ids of the tokenizer it was
    trained with, so that transformers' generate() stops at EOS and pads batched prompts (config.json
    and generation_config.json). A pad id only changes the embedding's padding row, which the training
    data never contains, so the exported model computes what was trained."""
    pad = tokenizer.pad_id
    changes = {"eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id,
               "pad_token_id": pad if pad is not None and pad != tokenizer.eos_id and pad < config.vocab_size else None}
    return config.replace(**{k: v for k, v in changes.items() if hasattr(config, k)})


def write_weights(directory: Path, engine, model_config, topology, max_file_bytes: int = 5 << 30) -> None:
    """The model as a Hugging Face directory, written by every rank in parallel (collective): each tensor
    by one of the ranks that hold it (`train.sharded` plans who), expert slices and ZeRO-3 partitions
    gathered one tensor at a time, never the whole model on one rank. One file: `model.safetensors`;
    more: `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, which transformers
    loads as it loads its own sharded checkpoints."""
    everyone = sharded.exchange(engine.weight_holdings(), topology)
    writers = sharded.assign_writers([[sharded.Offer(h.name, h.name, h.holder, h.nbytes) for h in items]
                                      for items in everyone])
    holdings = {h.name: h for items in everyone for h in items}
    sizes = {name: holdings[name].nbytes for name in writers}
    files = sharded.plan_files(writers, sizes, max_file_bytes, shard_name)
    if len(set(files.values())) == 1:
        files = dict.fromkeys(files, WEIGHTS_NAME)
    mine = engine.gather_weights(writers)
    for file in sorted({files[name] for name in mine}):
        sharded.write_safetensors(directory / file, {k: v for k, v in mine.items() if files[k] == file})
    if topology.is_main:
        dtypes = {holdings[name].dtype for name in writers if holdings[name].dtype in _FLOAT_DTYPES}
        write_config_files(model_config, directory, next(iter(dtypes)).removeprefix("torch.") if len(dtypes) == 1 else None)
        if len(set(files.values())) > 1:
            write_weight_index(directory, files, sum(sizes.values()))


_FLOAT_DTYPES = ("torch.float32", "torch.bfloat16", "torch.float16")


def prune(root: Path, keep_last: int, newest: Path, run_id: str | None) -> None:
    """Keep the `keep_last` newest complete checkpoints of this run, up to the one just saved. Only a
    complete checkpoint counts as superseding an older one; checkpoints of other runs in the same
    directory, and of steps past `newest` (an abandoned continuation, replaced when the step is saved
    again), are left alone."""
    if keep_last <= 0:
        return
    ours = [p for p in list_checkpoints(root.parent) if step_of(p) <= step_of(newest) and run_id_of(p) == run_id
            and (p / MANIFEST).is_file()]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(directory: Path, engine, loader, topology, run_config: dict | None = None) -> dict:
    """Restore engine, data loader and RNG state; returns state.json. The caller has checked the
    checkpoint (`verify` / `find_resumable`): hashing it again would read every file twice."""
    state = json.loads((directory / "trainer_state" / "state.json").read_text())
    per_rank = _rank_state(directory, topology.rank)
    data_state, all_ranks = (per_rank or _rank_state(directory, 0))["data"], None
    if data_state["world_size"] != topology.dp_size:
        # another data-parallel size (allowed by data.allow_new_order): this rank carries the token
        # counters of saved data ranks dp_rank, dp_rank + W, ... so that the run's totals stay exact
        all_ranks = _saved_data_states(directory, data_state["world_size"], topology.dp_rank, topology.dp_size)
    try:
        loader.load_state_dict(data_state, all_ranks=all_ranks)
    except DataError as exc:
        # a refused resume: said in terms of the config keys that changed, when the checkpoint has its config
        changed = _changed_data_keys(directory, run_config)
        if changed:
            raise RunConfigError(
                f"cannot resume {directory} with another data configuration: {'; '.join(changed)}. Resume with the "
                f"checkpoint's data settings, or set data.allow_new_order=true to start a fresh data order "
                f"(documents seen before may be seen again)") from None
        raise RunConfigError(str(exc)) from None
    if state.get("optimizer_state", True):
        engine.load(directory / "trainer_state")
    else:
        logger.warning("%s carries no optimizer state (see its state.json): the optimizer starts fresh", directory)
    if per_rank is not None:
        set_rng_state(per_rank["rng"])
    return state


def _rank_state(directory: Path, rank: int) -> dict | None:
    path = directory / "trainer_state" / f"rank-{rank}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _saved_data_states(directory: Path, saved_dp_size: int, dp_rank: int, dp_size: int) -> list[dict | None]:
    """The saved data-loader states in data-rank order, loaded only where this rank takes them over (ranks
    of other pipeline stages saved copies of the same states: the first one of each data rank is used)."""
    wanted = [r % dp_size == dp_rank for r in range(saved_dp_size)]
    out: list[dict | None] = [None] * saved_dp_size
    for path in sorted((directory / "trainer_state").glob("rank-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
        data = torch.load(path, map_location="cpu", weights_only=True)["data"]
        data_rank = data.get("rank", int(path.stem.split("-")[1]))
        if data_rank < saved_dp_size and wanted[data_rank] and out[data_rank] is None:
            out[data_rank] = data
    return out


# what the data order depends on (the loader's fingerprint and layout)
_DATA_ORDER_KEYS = ("sources", "seq_len", "mixture_by", "tokenizer", "eval.holdout_documents", "num_workers")


def _changed_data_keys(directory: Path, run_config: dict | None) -> list[str]:
    saved_path = directory / "trainer_state" / "config.json"
    if run_config is None or not saved_path.is_file():
        return []
    saved = _flatten(json.loads(saved_path.read_text()).get("data", {}), "data")
    now = _flatten(run_config.get("data", {}), "data")
    wanted = tuple(f"data.{k}" for k in _DATA_ORDER_KEYS)
    keys = sorted(k for k in set(saved) | set(now) if k.startswith(wanted) and saved.get(k) != now.get(k))
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys]


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}
