"""The typed schema of a run, registered with Hydra's ConfigStore as the base of every config.

configs/config.yaml composes `run_schema` (this module's `RunSchema`) first and the YAML groups on
top, so a preset states only what differs from the schema, Hydra/OmegaConf refuse an unknown key or a
wrong type while composing, and CLI overrides of any schema key need no `+`. `validate` is the one
validator: it merges a composed config into the schema, builds the typed objects (each group's
`__post_init__` checks its value domains: a learning rate > 0, betas in [0, 1), ...), builds the
model's config for its architecture (`models.make_config`), and checks what spans groups (layouts).
Every refusal is a `RunConfigError` naming the key and the fix, raised before any work starts.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

import models
from data import DataConfig, EvalConfig, SourceConfig, TokenizerConfig


class RunConfigError(ValueError):
    """A run configuration that cannot start; the message names the key and the fix."""


def require(condition: bool, key: str, value, rule: str) -> None:
    """Raise `key=value <rule>` unless `condition`."""
    if not condition:
        raise RunConfigError(f"{key}={value!r} {rule}")


def require_choice(key: str, value, choices) -> None:
    require(value in choices, key, value, f"is not one of {list(choices)}")


# ---------------------------------------------------------------------------------------------------
# Groups. The data package's own dataclasses (SourceConfig, TokenizerConfig, EvalConfig) are the
# schema of those parts: one definition, not two.


@dataclass
class DataSchema:
    sources: List[SourceConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 256
    mixture_by: str = "tokens"  # tokens | documents
    shuffle_buffer: int = 256
    document_masking: bool = False
    num_workers: int = 0
    read_batch: int = 64
    allow_new_order: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)
    # data=smollm: where local copies in the hub's layout are (interpolated into its sources' data_dir)
    smollm_corpus_dir: Optional[str] = None  # HuggingFaceTB/smollm-corpus
    finemath_dir: Optional[str] = None  # HuggingFaceTB/finemath

    def __post_init__(self):
        require(self.seq_len >= 1, "data.seq_len", self.seq_len, "must be >= 1 (tokens per row)")
        require_choice("data.mixture_by", self.mixture_by, ("tokens", "documents"))
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 0 (0: no shuffling)")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0 (0: load in-process)")
        require(self.read_batch >= 1, "data.read_batch", self.read_batch, "must be >= 1")
        require(self.tokenizer.vocab_size >= 1, "data.tokenizer.vocab_size", self.tokenizer.vocab_size, "must be >= 1")
        require(self.eval.holdout_documents >= 0, "data.eval.holdout_documents", self.eval.holdout_documents,
                "must be >= 0")
        require(self.eval.max_batches >= 1, "data.eval.max_batches", self.eval.max_batches, "must be >= 1")


@dataclass
class OptimSchema:
    name: str = "adamw"
    lr: float = 3e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Parameters that get no weight decay unless listed here: embeddings, norms, biases, residual
    # scales, Doge's A. Name any of "embeddings" to decay them anyway.
    decay_also: List[str] = field(default_factory=list)
    grad_clip: float = 1.0  # 0: no clipping
    fused: Optional[bool] = None  # torch AdamW's fused kernel (default: on for CUDA)
    # After upcycling: for this many steps from the upcycled checkpoint, only parameters whose names
    # contain one of `new_params` learn (the others get learning rate 0), then everything does.
    new_params_only_steps: int = 0
    new_params: List[str] = field(default_factory=lambda: ["router_gate", "down_embed", "up_embed"])

    def __post_init__(self):
        require_choice("optim.name", self.name, ("adamw",))
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0 (the peak learning rate, e.g. 3e-3)")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
                "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        require(self.eps > 0, "optim.eps", self.eps, "must be > 0 (e.g. 1e-8)")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0: no clipping)")
        require(self.new_params_only_steps >= 0, "optim.new_params_only_steps", self.new_params_only_steps,
                "must be >= 0")


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
    # ... or over this fraction of S (0.1: a branch from step 4000 decays over 400 steps), so that one
    # sweep over several checkpoints gives each branch a decay in proportion to its length.
    branch_decay_fraction: Optional[float] = None
    # The branch starts at <trainer.resume>/checkpoints/step-<branch_from_step> (trainer.resume names the
    # stable run's directory): sweep it, e.g. scheduler.branch_from_step=range(2000,10001,2000).
    branch_from_step: Optional[int] = None

    def __post_init__(self):
        require_choice("scheduler.name", self.name, ("wsd", "cosine", "constant"))
        require_choice("scheduler.warmup_type", self.warmup_type, ("linear", "cosine"))
        require_choice("scheduler.decay_type", self.decay_type, ("linear", "cosine", "1-sqrt"))
        require(self.warmup >= 0, "scheduler.warmup", self.warmup, "must be >= 0 (steps, or a fraction < 1 of the run)")
        require(self.decay >= 0, "scheduler.decay", self.decay, "must be >= 0 (steps, or a fraction < 1 of the run)")
        require(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.branch_decay_steps is None or self.branch_decay_steps >= 1, "scheduler.branch_decay_steps",
                self.branch_decay_steps, "must be >= 1 (or null)")
        require(self.branch_decay_fraction is None or 0 < self.branch_decay_fraction <= 1,
                "scheduler.branch_decay_fraction", self.branch_decay_fraction,
                "must be in (0, 1] (the decay's length as a fraction of the branch's start step; e.g. 0.1) or null")
        require(self.branch_decay_steps is None or self.branch_decay_fraction is None, "scheduler.branch_decay_fraction",
                self.branch_decay_fraction, f"and scheduler.branch_decay_steps={self.branch_decay_steps} both set the "
                "decay's length: set one of them")
        require(self.branch_from_step is None or self.branch_from_step >= 1, "scheduler.branch_from_step",
                self.branch_from_step, "must be >= 1 (a step the stable run saved a checkpoint at) or null")
        require(self.branch_from_step is None or self.branch_decay_steps is not None
                or self.branch_decay_fraction is not None, "scheduler.branch_from_step", self.branch_from_step,
                "starts a decay branch: also set scheduler.branch_decay_fraction (e.g. 0.1) or "
                "scheduler.branch_decay_steps")


@dataclass
class ParallelSchema:
    engine: str = "ddp"  # ddp (also a single process) | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    # Pipeline parallelism (DeepSpeed): the world is pipeline_stages x data-parallel replicas.
    pipeline_stages: int = 1
    # how layers are cut into stages (DeepSpeed's methods): layers (as many decoder layers per stage),
    # parameters (as many parameters), uniform (as many pipeline items, embedding and head included)
    pipeline_partition: str = "layers"
    # Expert parallelism: MoE experts split over groups of this many ranks.
    expert_parallel: int = 1
    backend: Optional[str] = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
    # how long a collective waits for a slow rank before the run aborts (NCCL's default is 10 minutes)
    timeout_minutes: float = 30
    # how long ranks wait in a barrier while rank 0 works alone (writing, hashing, lm-eval scoring a save)
    barrier_timeout_minutes: float = 240
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged last

    def __post_init__(self):
        require_choice("parallel.engine", self.engine, ("ddp", "deepspeed"))
        require_choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        require_choice("parallel.pipeline_partition", self.pipeline_partition, ("parameters", "uniform", "layers"))
        require(self.pipeline_stages >= 1, "parallel.pipeline_stages", self.pipeline_stages, "must be >= 1")
        require(self.expert_parallel >= 1, "parallel.expert_parallel", self.expert_parallel, "must be >= 1")
        require(self.timeout_minutes > 0, "parallel.timeout_minutes", self.timeout_minutes, "must be > 0")
        require(self.barrier_timeout_minutes > 0, "parallel.barrier_timeout_minutes", self.barrier_timeout_minutes,
                "must be > 0")
        require(self.zero_stage == 0 or self.engine == "deepspeed", "parallel.zero_stage", self.zero_stage,
                "needs parallel.engine=deepspeed (or choose parallel=zero1 / zero2 / zero3)")
        require(not self.offload_param or self.zero_stage == 3, "parallel.offload_param", self.offload_param,
                f"needs ZeRO stage 3 (parallel.zero_stage is {self.zero_stage}): use parallel=zero3-offload")
        require(not self.offload_optimizer or self.zero_stage >= 1, "parallel.offload_optimizer",
                self.offload_optimizer, "needs a ZeRO stage >= 1: use parallel=zero2-offload")


@dataclass
class TrainerSchema:
    output_dir: str = "outputs/run"
    max_steps: int = 1000
    global_batch_size: int = 8  # rows of seq_len tokens per optimizer step, over all ranks
    micro_batch_size: int = 8  # rows per forward pass per rank; accumulation is derived
    # auto: bf16 (autocast, fp32 master weights) on a GPU that has it, fp32 elsewhere | fp32 | bf16
    precision: str = "auto"
    # CUDA: fp32 matrix products and convolutions on tensor cores in TF32 (10-bit mantissa inputs, fp32
    # accumulation), as most training code allows; off: full fp32 products, several times slower
    tf32: bool = True
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    save_every: int = 0  # steps; 0: only at the end (and on preemption)
    keep_last: int = 3  # 0: keep every checkpoint
    resume: Optional[str] = None  # null | auto | path to a checkpoint or run directory
    # A fresh run (resume null) refuses an output_dir that holds another run's files; true: remove that
    # run's checkpoints, metrics.jsonl, status and plots first (the Hugging Face Trainer's key)
    overwrite_output_dir: bool = False
    eval_every: int = 0  # 0: no held-out evaluation
    log_every: int = 1
    compile: bool = False
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    peak_flops: Optional[float] = None  # per device, for MFU; default: measured at start
    progress: bool = True
    verify_checksums: bool = True
    plot: bool = True  # <output_dir>/plots.png at the end of the run (python -m train.plot)
    # Downstream scores (lm-eval, the `eval` extra) of every saved checkpoint, logged to metrics.jsonl
    eval_tasks: List[str] = field(default_factory=list)
    eval_tasks_limit: Optional[float] = None  # examples per task (or a fraction < 1)
    eval_tasks_include_path: List[str] = field(default_factory=list)  # directories of local task YAMLs
    eval_tasks_batch_size: int = 8

    def __post_init__(self):
        require_choice("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        require_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        require(self.max_steps >= 1, "trainer.max_steps", self.max_steps, "must be >= 1")
        require(self.global_batch_size >= 1, "trainer.global_batch_size", self.global_batch_size,
                "must be >= 1 (rows per optimizer step over all ranks)")
        require(self.micro_batch_size >= 1, "trainer.micro_batch_size", self.micro_batch_size,
                "must be >= 1 (rows per forward pass per rank)")
        require(self.micro_batch_size <= self.global_batch_size, "trainer.micro_batch_size", self.micro_batch_size,
                f"must not exceed trainer.global_batch_size={self.global_batch_size}")
        for key in ("save_every", "keep_last", "eval_every"):
            require(getattr(self, key) >= 0, f"trainer.{key}", getattr(self, key), "must be >= 0 (0: off)")
        require(self.log_every >= 1, "trainer.log_every", self.log_every, "must be >= 1")
        require(self.max_bad_steps >= 1, "trainer.max_bad_steps", self.max_bad_steps, "must be >= 1")
        require(self.peak_flops is None or self.peak_flops > 0, "trainer.peak_flops", self.peak_flops,
                "must be > 0 (FLOP/s per device) or null (measured)")
        require(bool(self.output_dir), "trainer.output_dir", self.output_dir, "must be a directory path")
        require(self.eval_tasks_limit is None or self.eval_tasks_limit > 0, "trainer.eval_tasks_limit",
                self.eval_tasks_limit, "must be > 0 (examples per task, or a fraction < 1) or null")
        require(self.eval_tasks_batch_size >= 1, "trainer.eval_tasks_batch_size", self.eval_tasks_batch_size,
                "must be >= 1")


@dataclass
class LoggerSchema:
    name: str = "jsonl"  # jsonl | wandb (metrics.jsonl is always written)
    mode: str = "offline"  # wandb: offline | online | disabled
    project: str = "smolpretrain"
    run_name: Optional[str] = None
    dir: Optional[str] = None

    def __post_init__(self):
        require_choice("logger.name", self.name, ("jsonl", "wandb"))
        require_choice("logger.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class RunSchema:
    # The architecture's own config (checked by models.make_config), plus `init_from`.
    model: Dict[str, Any] = field(default_factory=dict)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)


def register_configs() -> None:
    """Make `run_schema` available to configs/config.yaml's defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunSchema)


# ---------------------------------------------------------------------------------------------------
# Messages for OmegaConf's refusals


def schema_fields(node_type) -> dict[str, Any]:
    return {f.name: f for f in fields(node_type)} if is_dataclass(node_type) else {}


def unknown_key_message(path: str, key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    prefix = f"{path}." if path else ""
    return f"unknown config key {prefix}{key}.{hint} Valid keys{' of ' + path if path else ''}: {sorted(valid)}"


def explain_omegaconf_error(exc: Exception) -> str:
    """OmegaConf's ConfigKeyError / ValidationError as one line naming the key and the fix."""
    from omegaconf.errors import ConfigKeyError

    full_key = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "")
    path, _, key = full_key.rpartition(".")
    if isinstance(exc, ConfigKeyError):
        valid = schema_fields(getattr(exc, "object_type", None)) or {}
        return unknown_key_message(path, key, valid)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{full_key}: {first}"


# ---------------------------------------------------------------------------------------------------
# Validation


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
    """A composed config (plain dict or DictConfig) -> RunConfig, or RunConfigError naming what is wrong."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunSchema), values)
        schema: RunSchema = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        # OmegaConf says data.sources[0].path; the override Hydra accepts is data.sources.0.path
        key = re.sub(r"\[(\d+)\]", r".\1", getattr(exc, "full_key", None) or str(exc))
        raise RunConfigError(f"{key} must be set (the chosen config leaves it open: ???); add {key}=... to the "
                             f"command") from None
    except (ConfigKeyError, ValidationError) as exc:
        raise RunConfigError(explain_omegaconf_error(exc)) from None
    schema.trainer.precision = resolve_precision(schema.trainer.precision, schema.trainer.device)
    model_values = dict(schema.model)
    init_from = model_values.pop("init_from", None)
    try:
        model_config = models.make_config(model_values)
    except models.ConfigError as exc:
        raise RunConfigError(f"model: {exc}") from None
    run = RunConfig(model=model_config, init_from=init_from, data=schema.data, optim=schema.optim,
                    scheduler=schema.scheduler, parallel=schema.parallel, trainer=schema.trainer,
                    logger=schema.logger)
    _check_across_groups(run)
    return run


def resolve_precision(precision: str, device: str) -> str:
    """trainer.precision=auto: bf16 where the run computes on a GPU with bf16 (Ampere and newer), else
    fp32 (a CPU without native bf16 runs bf16 products many times slower)."""
    if precision != "auto":
        return precision
    import torch

    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def _check_across_groups(run: RunConfig) -> None:
    t = run.trainer
    if run.optim.new_params_only_steps and is_unset(t.resume):
        raise RunConfigError(
            "optim.new_params_only_steps continues an upcycled checkpoint: set trainer.resume to the directory "
            "`python -m train.upcycle SRC DST ...` wrote"
        )
    if not run.data.sources:
        raise RunConfigError("data.sources is empty: choose a data group (e.g. data=builtin) or give sources")
    if t.overwrite_output_dir and not is_unset(t.resume):
        raise RunConfigError(
            f"trainer.overwrite_output_dir=true starts a fresh run, removing the files of the run in "
            f"trainer.output_dir; trainer.resume={t.resume} continues a run: set only one of them")
    if run.scheduler.branch_from_step is not None and is_unset(t.resume):
        raise RunConfigError(
            f"scheduler.branch_from_step={run.scheduler.branch_from_step} branches from a checkpoint of another run: "
            f"set trainer.resume to that run's directory (its checkpoints/step-{run.scheduler.branch_from_step} is "
            f"where the branch starts)")
    from .schedule import build_schedule, is_branch

    if not is_branch(run.scheduler):
        try:
            build_schedule(run.scheduler, run.optim.lr, t.max_steps)
        except ValueError as exc:
            raise RunConfigError(str(exc)) from None
    if is_unset(t.resume) and not run.init_from:
        # the architecture is the model group's; a resumed or init_from run checks the checkpoint's, once
        # it has read it (train.loop), still before any work
        check_layout(run, run.model)
        check_tokenizer_fits(run.data.tokenizer, run.model.vocab_size)


def is_unset(resume) -> bool:
    """trainer.resume says: start fresh."""
    return resume in (None, "", "none", "null")


def check_tokenizer_fits(tokenizer: TokenizerConfig, vocab_size: int, of: str = "the model's") -> None:
    """A BPE to be trained must fit the model's vocabulary: refused before it is trained (and cached),
    which takes a while. A pretrained tokenizer's size is known once it is loaded (data.check_vocab)."""
    if tokenizer.name_or_path == "bpe" and tokenizer.vocab_size > vocab_size:
        fix = "" if of != "the model's" else f"set model.vocab_size={tokenizer.vocab_size} (or larger), or "
        raise RunConfigError(
            f"data.tokenizer.vocab_size={tokenizer.vocab_size} (the BPE to train) is more than {of} vocab_size="
            f"{vocab_size}: {fix}set data.tokenizer.vocab_size={vocab_size} (or smaller)")


def check_layout(run: RunConfig, model) -> None:
    """The parallel layout against the architecture that will train (`model`: its config)."""
    if run.parallel.pipeline_stages > 1:
        check_pipeline_layout(run, model)
    if run.parallel.expert_parallel > 1:
        check_expert_layout(run, model)


def check_pipeline_layout(run: RunConfig, model) -> None:
    """What DeepSpeed's pipeline engine can run, refused up front with what works instead."""
    p, layers = run.parallel, model.num_hidden_layers
    if p.engine != "deepspeed":
        raise RunConfigError(
            f"parallel.pipeline_stages={p.pipeline_stages} runs on DeepSpeed's pipeline engine: add parallel=zero1 "
            f"(ZeRO-1, the stage pipelines support) or parallel.engine=deepspeed")
    if p.zero_stage > 1:
        raise RunConfigError(
            f"parallel.pipeline_stages={p.pipeline_stages} with ZeRO stage {p.zero_stage}: DeepSpeed's pipeline engine "
            f"supports ZeRO stages 0 and 1 only; use parallel=zero1 (or pipeline_stages=1 for ZeRO-2/3)")
    if run.trainer.precision == "bf16" and p.zero_stage == 0:
        raise RunConfigError(
            "parallel.pipeline_stages>1 with trainer.precision=bf16 and ZeRO stage 0: DeepSpeed 0.19.8 cannot load "
            "the checkpoints this combination writes (KeyError in its BF16_Optimizer); use parallel=zero1")
    if p.pipeline_stages > layers:
        raise RunConfigError(
            f"parallel.pipeline_stages={p.pipeline_stages} is more than the model's {layers} decoder layers; every "
            f"stage needs at least one: use pipeline_stages <= {layers}")
    if p.expert_parallel > 1:
        raise RunConfigError("parallel.pipeline_stages>1 together with parallel.expert_parallel>1 is not supported; "
                             "choose one of them")


def check_expert_layout(run: RunConfig, model) -> None:
    """What expert parallelism can run, refused up front with what works instead."""
    p, m = run.parallel, model
    experts = getattr(m, "num_local_experts", None) if m.model_type == "jetmoe" else (
        m.num_experts if getattr(m, "is_moe", False) else None)
    if experts is None:
        raise RunConfigError(
            f"parallel.expert_parallel={p.expert_parallel} needs a mixture-of-experts model; {m.model_type} "
            f"{'(is_moe: false) ' if m.model_type == 'doge' else ''}has no experts. Use an MoE preset "
            f"(model=jetmoe-tiny, model=doge-tiny-moe, ...) or parallel.expert_parallel=1")
    if experts % p.expert_parallel:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0 and d <= 64]
        raise RunConfigError(
            f"parallel.expert_parallel={p.expert_parallel} does not divide the model's {experts} experts; use one of "
            f"{divisors}")
    if p.engine == "deepspeed" and p.zero_stage == 3:
        raise RunConfigError(
            f"parallel.expert_parallel={p.expert_parallel} with ZeRO stage 3: DeepSpeed refuses its MoE parameter "
            f"groups under ZeRO-3; use parallel=zero1, parallel=zero2 or parallel=ddp with expert parallelism")


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
