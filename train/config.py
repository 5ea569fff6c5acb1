"""The typed schema of a run. Hydra composes the YAML groups in configs/; this module checks the
result against dataclasses before any work starts: an unknown key or a wrong type stops the run with
the key's full name and the valid choices. The `model` group is checked against the chosen
architecture's config (models.make_config)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import models
from data import DataConfig, EvalConfig, SourceConfig, TokenizerConfig


class RunConfigError(ValueError):
    """A run configuration that cannot start; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------------
# Groups


# The data package's own dataclasses are the schema of these parts (one definition, not two).
SourceSchema = SourceConfig
TokenizerSchema = TokenizerConfig
EvalSchema = EvalConfig


@dataclass
class DataSchema:
    sources: List[SourceSchema] = field(default_factory=list)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    seq_len: int = 256
    mixture_by: str = "tokens"
    shuffle_buffer: int = 256
    document_masking: bool = False
    num_workers: int = 0
    read_batch: int = 64
    allow_new_order: bool = False
    eval: EvalSchema = field(default_factory=EvalSchema)


@dataclass
class OptimSchema:
    name: str = "adamw"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Parameters that get no weight decay unless listed here: embeddings, norms, biases, residual
    # scales, Doge's A. Name any of "embeddings" to decay them anyway.
    decay_also: List[str] = field(default_factory=list)
    grad_clip: float = 1.0
    fused: Optional[bool] = None  # torch AdamW's fused kernel (default: on for CUDA)
    # After upcycling: for this many steps from the upcycled checkpoint, only parameters whose names
    # contain one of `new_params` learn (the others get learning rate 0), then everything does.
    new_params_only_steps: int = 0
    new_params: List[str] = field(default_factory=lambda: ["router_gate", "down_embed", "up_embed"])


@dataclass
class SchedulerSchema:
    name: str = "wsd"  # wsd | cosine | constant
    warmup: float = 0.1  # >= 1: steps; < 1: fraction of the run
    decay: float = 0.1  # wsd only: as warmup
    warmup_type: str = "linear"  # linear | cosine
    decay_type: str = "linear"  # linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.0
    # A decay branch (WSD): on resume from a stable-phase checkpoint at step S, decay over this many
    # steps starting at S; the run ends at S + branch_decay_steps.
    branch_decay_steps: Optional[int] = None


@dataclass
class ParallelSchema:
    engine: str = "ddp"  # ddp (also a single process) | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    backend: Optional[str] = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged last


@dataclass
class TrainerSchema:
    output_dir: str = "outputs/quickstart"
    max_steps: int = 100
    global_batch_size: int = 8  # rows of seq_len tokens per optimizer step, over all ranks
    micro_batch_size: int = 8  # rows per forward pass per rank; accumulation is derived
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    save_every: int = 0  # steps; 0: only at the end (and on preemption)
    keep_last: int = 3
    resume: Optional[str] = None  # null | auto | path to a checkpoint
    eval_every: int = 0
    log_every: int = 1
    compile: bool = False
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    peak_flops: Optional[float] = None  # per device, for MFU; default: measured at start
    progress: bool = True
    verify_checksums: bool = True


@dataclass
class LoggerSchema:
    name: str = "jsonl"  # jsonl | wandb (metrics.jsonl is always written)
    mode: str = "offline"  # wandb: offline | online | disabled
    project: str = "smolpretrain"
    run_name: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class RunSchema:
    model: Dict[str, Any]
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)


CHOICES = {
    "optim.name": ("adamw",),
    "scheduler.name": ("wsd", "cosine", "constant"),
    "scheduler.warmup_type": ("linear", "cosine"),
    "scheduler.decay_type": ("linear", "cosine", "1-sqrt"),
    "parallel.engine": ("ddp", "deepspeed"),
    "parallel.zero_stage": (0, 1, 2, 3),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "logger.name": ("jsonl", "wandb"),
    "logger.mode": ("offline", "online", "disabled"),
    "data.mixture_by": ("tokens", "documents"),
}


# ---------------------------------------------------------------------------------------------------
# Validation


def _check_type(value, annotation, path: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], path)
    if dataclasses.is_dataclass(annotation):
        return parse_dataclass(annotation, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise RunConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise RunConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RunConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise RunConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def unknown_key_message(path: str, key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    prefix = f"{path}." if path else ""
    return f"unknown config key {prefix}{key}.{hint} Valid keys{' of ' + path if path else ''}: {sorted(valid)}"


def parse_dataclass(cls, values, path: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RunConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise RunConfigError(unknown_key_message(path, key, names))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            sub = f"{path}.{f.name}" if path else f.name
            kwargs[f.name] = _check_type(values[f.name], hints[f.name], sub)
            choices = CHOICES.get(sub)
            if choices is not None and kwargs[f.name] not in choices:
                raise RunConfigError(f"{sub}={kwargs[f.name]!r} is not one of {list(choices)}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RunConfigError(f"{path + '.' if path else ''}{f.name} is required")
    return cls(**kwargs)


@dataclass
class RunConfig:
    """A validated run: every group typed, and the model's config built for its architecture."""

    model: models.ModelConfig
    init_from: Optional[str]
    data: DataSchema
    optim: OptimSchema
    scheduler: SchedulerSchema
    parallel: ParallelSchema
    trainer: TrainerSchema
    logger: LoggerSchema


def validate(values: dict) -> RunConfig:
    """The composed config (plain dict) -> RunConfig, or RunConfigError naming what is wrong."""
    values = dict(values)
    model_values = dict(values.get("model") or {})
    init_from = model_values.pop("init_from", None)
    schema = parse_dataclass(RunSchema, {**values, "model": model_values})
    try:
        model_config = models.make_config(model_values)
    except models.ConfigError as exc:
        raise RunConfigError(f"model: {exc}") from None
    t = schema.trainer
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise RunConfigError("trainer.micro_batch_size and trainer.global_batch_size must be >= 1")
    if t.max_steps < 1:
        raise RunConfigError(f"trainer.max_steps={t.max_steps} must be >= 1")
    if schema.optim.new_params_only_steps and schema.trainer.resume in (None, "", "none", "null"):
        raise RunConfigError(
            "optim.new_params_only_steps continues an upcycled checkpoint: set trainer.resume to the directory "
            "`python -m train.upcycle SRC DST ...` wrote"
        )
    if not schema.data.sources:
        raise RunConfigError("data.sources is empty: choose a data group (e.g. data=builtin) or give sources")
    return RunConfig(
        model=model_config, init_from=init_from, data=schema.data, optim=schema.optim, scheduler=schema.scheduler,
        parallel=schema.parallel, trainer=schema.trainer, logger=schema.logger,
    )


def data_config(schema: DataSchema, micro_batch_size: int, seed: int) -> DataConfig:
    """The data package's config; the batch size comes from the trainer (stated once)."""

    return DataConfig(
        sources=list(schema.sources),
        tokenizer=schema.tokenizer,
        seq_len=schema.seq_len,
        batch_size=micro_batch_size,
        mixture_by=schema.mixture_by,
        shuffle_buffer=schema.shuffle_buffer,
        document_masking=schema.document_masking,
        num_workers=schema.num_workers,
        read_batch=schema.read_batch,
        seed=seed,
        allow_new_order=schema.allow_new_order,
        eval=schema.eval,
    )
