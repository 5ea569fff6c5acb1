"""Hugging Face model directories: config.json + safetensors, read and written with transformers'
key names so that `transformers.AutoModelForCausalLM.from_pretrained` loads what we write and we load
what it writes (and what is published on the hub).

Weights are only ever read from safetensors; pickle files (`pytorch_model.bin`) are refused, never
unpickled. Every error names the file and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .configuration import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_OUR_WEIGHT_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
# what a hub download of a model directory needs (tokenizer files ride along for checkpoints)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


class CheckpointError(RuntimeError):
    """A model directory that cannot be read or written; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------------
# Locating a directory (local path or hub id)


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub repo id, fetched (or found in the local hub cache) with
    huggingface_hub. Offline or unreachable hub: a fast, clear error, never a hang."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith((".", "/"))
    if not looks_like_repo:
        raise CheckpointError(f"{text}: no such directory (and not a hub repo id of the form 'org/name')")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline mode, no network, missing repo, auth: all end here
        raise CheckpointError(
            f"{text}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline? Download the "
            f"model elsewhere (`hf download {text} --local-dir DIR`) and pass DIR, or set HF_HOME "
            f"to a cache that holds it."
        ) from exc


# ---------------------------------------------------------------------------------------------------
# Reading


def read_config_json(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a Hugging Face model directory")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(values).__name__}")
    return values


def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); it is corrupt or was "
            f"cut short while being written: re-save or re-download it"
        ) from exc


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: `model.safetensors`, or the shards listed in its index."""
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _load_safetensors_file(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_safetensors_file(directory / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index}: lists tensors its shards do not hold: {missing[:5]}")
        return state
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickles:
        raise CheckpointError(
            f"{directory}: has {pickles} but no {WEIGHTS_NAME}. Pickle files are never loaded (they can run "
            f"code). Convert once where you trust the file: transformers' "
            f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)` writes safetensors."
        )
    raise CheckpointError(f"{directory / WEIGHTS_NAME}: missing; no weights in {directory}")


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy `state` into `model` after checking names and shapes, with a precise error otherwise."""
    where = directory / (WEIGHTS_NAME if (directory / WEIGHTS_NAME).is_file() else WEIGHTS_INDEX_NAME)
    expected = model.state_dict()
    tied = set(getattr(model, "tied_weight_keys", lambda: {})())
    missing = sorted(k for k in expected if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors have the wrong shape for config.json: {wrong_shape[:5]}")
    if missing:
        problems.append(f"{len(missing)} tensors the config needs are missing: {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config does not use: {unexpected[:8]}")
    if problems:
        raise CheckpointError(
            f"{where}: does not match {directory / CONFIG_NAME}: " + "; ".join(problems)
            + ". The weights belong to a different model or config, or the file is incomplete."
        )
    with torch.no_grad():
        for key, target in expected.items():
            if key in state and key not in tied:
                target.copy_(state[key])


# ---------------------------------------------------------------------------------------------------
# Writing


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_model_dir(
    model: nn.Module,
    config: "ModelConfig",
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write config.json and safetensors weights (sharded above `max_shard_bytes`, as transformers
    does). Each file is written under a temporary name and renamed into place."""
    from safetensors.torch import save as save_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = set(getattr(model, "tied_weight_keys", lambda: {})())
    # transformers drops tied copies from the file and re-ties them on load.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in tied}
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype_name = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else None

    shards = _shards(state, max_shard_bytes)
    written = []
    if len(shards) == 1:
        _atomic_write_bytes(directory / WEIGHTS_NAME, save_bytes(shards[0], metadata={"format": "pt"}))
        written.append(WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = shard_name(i, len(shards))
            _atomic_write_bytes(directory / name, save_bytes(shard, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
            written.append(name)
        write_weight_index(directory, weight_map, sum(v.numel() * v.element_size() for v in state.values()))
        written.append(WEIGHTS_INDEX_NAME)
    # Stale weight files from an earlier save in this directory would be read instead of (or mixed
    # with) the new ones.
    for old in directory.iterdir():
        if _OUR_WEIGHT_FILES.match(old.name) and old.name not in written:
            old.unlink()
    write_config_files(config, directory, dtype_name)
    return directory


def shard_name(index: int, count: int) -> str:
    """The name transformers gives the index-th (1-based) of `count` weight files."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_weight_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which file holds each tensor (what transformers reads for sharded
    weights)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _atomic_write_bytes(directory / WEIGHTS_INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def write_config_files(config: "ModelConfig", directory: Path, dtype_name: str | None) -> None:
    """config.json (with the weights' dtype) and generation_config.json."""
    _atomic_write_bytes(directory / CONFIG_NAME, config.to_json_string(dtype=dtype_name).encode())
    generation = generation_config(config)
    if generation:
        _atomic_write_bytes(directory / GENERATION_CONFIG_NAME, (json.dumps(generation, indent=2) + "\n").encode())
    else:
        (directory / GENERATION_CONFIG_NAME).unlink(missing_ok=True)  # a stale one would stop generation wrongly


def generation_config(config: "ModelConfig") -> dict:
    """generation_config.json: the token ids transformers' generate() stops and pads with (padding falls
    back to EOS when the model has no pad token)."""
    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["eos_token_id"] is None:
        return {}
    if ids["pad_token_id"] is None:
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return {k: v for k, v in ids.items() if v is not None}
