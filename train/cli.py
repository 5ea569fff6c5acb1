"""`python -m train [hydra overrides]`: the one entry point, for a single process, under torchrun and
under the deepspeed launcher. `python -m train --help` lists every config group and its presets.

Exit status: 0 done; 1 the run failed (a message says why); 2 the config or layout was refused
before any work; 75 stopped on request (SIGTERM / SIGINT) after saving a checkpoint: requeue it and
continue with trainer.resume=auto.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from hydra.errors import CompactHydraException

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

EXIT_REFUSED = 2


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


def _model_keys() -> set[str]:
    import dataclasses

    import models

    return {"init_from"} | {f.name for cls in models.ARCHITECTURES.values() for f in dataclasses.fields(cls.config_class)}


def with_list_indices_as_keys(argv: list[str]) -> list[str]:
    """`data.sources[0].path=x` -> `data.sources.0.path=x`: Hydra's override grammar has no brackets in a
    key (its lexer refuses them), but a list element written the Python way is what users type first."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and "[" in key and not arg.startswith("-"):
            key = re.sub(r"\[(\d+)\]", r".\1", key)
        out.append(key + eq + value)
    return out


def with_forced_model_keys(argv: list[str]) -> list[str]:
    """`model.key=value` -> `++model.key=value`: the model group is free-form for Hydra (each architecture
    has its own fields, checked by models.make_config), so a valid field that the preset does not list
    (model.hidden_dropout) is added rather than refused. Every other group is typed by the schema and
    takes plain overrides."""
    out = []
    for arg in argv:
        plain = not arg.startswith(("-", "+", "~")) and "=" in arg and arg.split("=", 1)[0].startswith("model.")
        out.append(f"++{arg}" if plain else arg)
    return out


def config_groups() -> dict[str, list[str]]:
    """configs/<group>/<preset>.yaml: every config group and its presets."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(CONFIG_DIR).iterdir() if d.is_dir()}


# Options that bring other config directories (and so other groups and presets) into Hydra's search path
_OTHER_CONFIGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "hydra.searchpath",
                  "+hydra.searchpath", "++hydra.searchpath")


def check_overrides(argv: list[str]) -> str | None:
    """Refuse, before Hydra composes, a misspelt group (optm.lr=1e-3) or preset (model=doge-tiyn), naming
    the closest one and the choices, and a misspelt key or a value of the wrong type in
    `group.key=value`, with the valid keys. The value check is the schema's own (OmegaConf merges the
    value into the typed node), so its verdict is Hydra's. With other config directories in the search
    path, groups and presets are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from .config import RunSchema, schema_fields, unknown_key_message

    candidates = [a for a in argv if "=" in a and not a.startswith(("-", "hydra", "+hydra", "~"))]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException as exc:
        return str(exc).splitlines()[0]
    schema = OmegaConf.structured(RunSchema)
    model_keys = _model_keys()
    groups = {} if any(a.split("=", 1)[0] in _OTHER_CONFIGS for a in argv) else config_groups()
    for override in overrides:
        key = override.key_or_group
        parts = key.split(".")
        if groups and override.package is None:
            problem = _check_group(override, parts, groups, set(schema_fields(RunSchema)))
            if problem:
                return problem
        if len(parts) < 2 or override.is_delete():
            continue  # a group choice (model=doge-20m): checked above
        if parts[0] == "model":
            if parts[1] not in model_keys:
                return unknown_key_message("model", parts[1], model_keys)
            continue
        if parts[0] not in ("data", "optim", "scheduler", "parallel", "trainer", "logger"):
            continue
        for value in _values(override):
            problem = _check_schema_value(schema, parts, value)
            if problem:
                return problem
    return None


def _values(override) -> list:
    """The values an override sets: one, or each of a sweep (optim.lr=1e-3,3e-3, range(...)); none for an
    interval or glob, whose values are drawn or matched later."""
    from hydra.errors import HydraException

    if not override.is_sweep_override():
        return [override.value()]
    if override.is_discrete_sweep():
        try:
            return list(override.sweep_iterator())
        except HydraException:
            return []
    return []


def _check_group(override, parts: list[str], groups: dict[str, list[str]], schema_keys: set[str]) -> str | None:
    """`group=preset` names a preset of configs/<group>/; `group.key=value` a group or schema key."""
    top = parts[0]
    written = override.input_line or ".".join(parts)
    if top not in groups and top not in schema_keys:
        return _unknown("config group", top, written, sorted(set(groups) | schema_keys), "Groups")
    if len(parts) > 1 or override.is_delete() or top not in groups:
        return None
    for value in _values(override):
        if value is not None and str(value) not in groups[top]:  # experiment=null: none
            return _unknown(f"{top} preset", str(value), written, groups[top], f"Presets of {top}")
    return None


def _unknown(what: str, name: str, written: str, choices: list[str], listed: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"unknown {what} {name} ({written}).{hint} {listed}: {', '.join(choices)}"


def _check_schema_value(schema, parts: list[str], value) -> str | None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    from .config import schema_fields, unknown_key_message

    nested: dict = {}
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    try:
        OmegaConf.merge(schema, _lists_as_indices(nested))
    except ConfigKeyError as exc:
        bad = str(exc.key)
        where = parts.index(bad) if bad in parts else len(parts) - 1
        return unknown_key_message(".".join(parts[:where]), bad, schema_fields(exc.object_type))
    except ValidationError as exc:
        return f"{'.'.join(parts)}: {str(exc).splitlines()[0]}"
    return None


def _lists_as_indices(value):
    """`data.sources.0.path` parses as nested dicts; the digit keys become a list, so that OmegaConf
    checks the value against the list's element type."""
    if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
        items = [{} for _ in range(max(int(k) for k in value) + 1)]
        for k, v in value.items():
            items[int(k)] = _lists_as_indices(v)
        return items
    if isinstance(value, dict):
        return {k: _lists_as_indices(v) for k, v in value.items()}
    return value


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


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def run_from_hydra(cfg) -> dict:
    """One run. A point of a sweep run in this process (Hydra's basic launcher, submitit; the default
    torchrun launcher starts `python -m train` per point instead, which is a plain run here) writes to
    its point directory, is skipped when finished and resumed when it has a checkpoint (train.sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .config import validate
    from .loop import StoppedBeforeTraining, train

    values = OmegaConf.to_container(cfg, resolve=True)
    if not in_multirun():
        return train(validate(values), values)
    from . import sweep

    if sweep.in_submitit_job():
        sweep.submitit_distributed_environment()
        _setup_logging()  # main() did not run in submitit's worker; and this task's rank is known only now
    point_dir = Path(HydraConfig.get().runtime.output_dir)  # <hydra.sweep.dir>/<hydra.sweep.subdir>
    values["trainer"]["output_dir"] = str(point_dir)
    plan = sweep.plan_point(validate(values), point_dir)
    logging.getLogger("train").info(plan.describe(point_dir))
    if plan.skip:
        return {"skipped": True, "step": plan.last_step, "stopped": False}
    values["trainer"]["resume"] = plan.resume
    preemption = sweep.SubmititPreemption()
    try:
        summary = train(validate(values), values)
    except StoppedBeforeTraining:
        preemption.requeue()  # under submitit: requeued (rank 0 does not return); otherwise the sweep stops
        raise
    finally:
        preemption.restore()
    if summary.get("stopped"):
        preemption.requeue()
    return summary


class PointFailed(CompactHydraException):
    """A sweep point that failed or was refused; the sweep goes on with its other points. (Compact:
    Hydra prints the message, not a traceback.)"""


# How long a rank other than 0 that refuses waits for rank 0 to refuse too (its launcher then stops the
# other ranks) before it says why itself: a refusal that only this rank met.
_WAIT_FOR_RANK_0 = 20.0


def _refuse(message: str, status: int = EXIT_REFUSED):
    if status in (EXIT_REFUSED, 1) and in_multirun():
        # In a sweep run in this process, SystemExit would end the whole sweep: the point fails alone
        # (Hydra reports it with its overrides).
        raise PointFailed(message)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and status != 1:  # refused, or stopped before training
        # A refusal or a stop is met by every rank alike: rank 0 alone says it, once. The launcher
        # (torchrun, deepspeed) stops the other ranks as soon as one exits; were this rank to exit
        # first, rank 0 might be stopped before it could say why. So it waits to be stopped (quietly,
        # by the default action of SIGTERM), and speaks only if rank 0 has not refused meanwhile.
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if status == EXIT_REFUSED:
            time.sleep(_WAIT_FOR_RANK_0)
            print(f"error: (rank {rank}) {message}", file=sys.stderr)
        raise SystemExit(status)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main() -> None:
    import hydra

    from . import sweep

    argv = with_list_indices_as_keys(strip_launcher_arguments(sys.argv[1:]))
    problem = check_overrides(argv)
    if problem:
        _refuse(problem)
    if sweep.is_multirun(argv):
        if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1:
            _refuse("--multirun under torchrun (or any multi-process launcher): a sweep starts its own processes per "
                    "point. Run `python -m train --multirun ... hydra.launcher.nproc_per_node=N` in one plain process")
        argv = sweep.multirun_argv(argv)
    sys.argv = [sys.argv[0]] + with_forced_model_keys(argv)
    _setup_logging()
    from .config import register_configs

    register_configs()
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_entry)()


def _entry(cfg) -> dict:
    from data import DataError
    from models import CheckpointError, ConfigError

    from .config import RunConfigError
    from .distributed import LayoutError
    from .loop import EXIT_STOPPED, StoppedBeforeTraining, TrainingStopped

    try:
        summary = run_from_hydra(cfg)
    except (RunConfigError, LayoutError) as exc:
        _refuse(str(exc))
    except StoppedBeforeTraining as exc:
        _refuse(str(exc), EXIT_STOPPED)
    except (TrainingStopped, DataError, CheckpointError, ConfigError) as exc:
        _refuse(str(exc), 1)
    if summary.get("stopped"):
        raise SystemExit(EXIT_STOPPED)
    return summary


# A sweep's point directories are named by this resolver (configs/config.yaml, hydra.sweep.subdir); it
# must exist wherever Hydra resolves them, including submitit's workers, which import this module to
# unpickle the task function.
from . import sweep as _sweep  # noqa: E402

_sweep.register_resolvers()
