"""`python -m train [hydra overrides]`: the one entry point, for a single process, under torchrun and
under the deepspeed launcher."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def strip_launcher_arguments(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; Hydra would take it for an override."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "0")
            skip = "=" not in arg
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def with_forced_keys(argv: list[str]) -> list[str]:
    """`group.key=value` -> `++group.key=value` for keys that `check_override_keys` has accepted, so a
    valid field that a preset YAML happens not to list (model.hidden_dropout, data.sources.0.fetch) can
    be set without Hydra's `+` prefix."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        plain = not arg.startswith(("-", "+", "~", "hydra")) and "=" in arg and "." in key
        out.append(f"++{arg}" if plain else arg)
    return out


def check_override_keys(argv: list[str]) -> str | None:
    """Catch a misspelt `group.key=value` before Hydra does, with the valid keys in the message."""
    import models

    from .config import RunSchema, unknown_key_message

    model_keys = {"init_from"} | {f.name for cls in models.ARCHITECTURES.values()
                                  for f in dataclasses.fields(cls.config_class)}
    hints = typing.get_type_hints(RunSchema)
    for arg in argv:
        if arg.startswith(("-", "+", "~", "hydra")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        parts = key.split(".")
        if len(parts) < 2:
            continue  # a group choice (model=doge-20m): Hydra checks those
        if parts[0] == "model":
            if parts[1] not in model_keys:
                return unknown_key_message("model", parts[1], model_keys)
            continue
        if parts[0] not in hints:
            continue
        node, path = hints[parts[0]], parts[0]
        for part in parts[1:]:
            origin = typing.get_origin(node)
            if origin is typing.Union:
                node = [a for a in typing.get_args(node) if a is not type(None)][0]
                origin = typing.get_origin(node)
            if origin in (list, typing.List):
                node = typing.get_args(node)[0]
                if part.isdigit():
                    path += f".{part}"
                    continue
            if origin in (dict, typing.Dict) or node is typing.Any:
                break
            if not dataclasses.is_dataclass(node):
                break
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                return unknown_key_message(path, part, fields)
            node, path = typing.get_type_hints(node)[part], f"{path}.{part}"
    return None


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[%(asctime)s] %(message)s" if rank == 0 else f"[%(asctime)s rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("datasets", "httpx", "huggingface_hub", "urllib3", "filelock", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_from_hydra(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .config import RunConfigError, validate
    from .loop import train

    from omegaconf.errors import MissingMandatoryValue

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        print(f"error: {key} must be set (the chosen config leaves it open: ???); add {key}=... to the command", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_cfg = HydraConfig.get()
    if str(hydra_cfg.mode) == "RunMode.MULTIRUN":  # each point of a sweep gets its own directory
        values["trainer"]["output_dir"] = str(Path(values["trainer"]["output_dir"]) / str(hydra_cfg.job.num))
    try:
        run = validate(values)
    except (RunConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return train(run, values)


def main() -> None:
    import hydra

    argv = strip_launcher_arguments(sys.argv[1:])
    problem = check_override_keys(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [sys.argv[0]] + with_forced_keys(argv)
    _setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_entry)()


def _entry(cfg) -> None:
    from .config import RunConfigError
    from .loop import TrainingStopped

    try:
        run_from_hydra(cfg)
    except (TrainingStopped, RunConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as exc:
        from data import DataError
        from models import CheckpointError, ConfigError

        if isinstance(exc, (DataError, CheckpointError, ConfigError)):
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
