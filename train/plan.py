"""`python -m train.plan [the overrides of python -m train] plan.devices=64 plan.device_memory=80GB`: the
memory each rank of a run will need, before it is queued. Nothing is allocated and no process group is
started: the model is built on the meta device, and its activations are counted in one forward pass on
fake tensors (torch's FakeTensorMode: shapes and dtypes, no storage), with a hook on the tensors
autograd saves for the backward pass, so what is counted is what the model's own code keeps.

    python -m train.plan experiment=doge-320m plan.devices=8 plan.device_memory=80GB
    python -m train.plan model=jetmoe-8b parallel=zero3 plan.devices=64 trainer.micro_batch_size=2
    python -m train.plan model=doge-60m parallel=zero1 parallel.pipeline_stages=2 plan.device=cpu plan.devices=2

Per class of ranks that hold the same (all ranks, each pipeline stage; on CPU rank 0 apart, which
holds more) it prints the weights, gradients, optimizer state (by ZeRO stage, bf16 or fp32 master
weights), activations of the micro-batch (with and without activation checkpointing), the engine's
buffers, the runtime's own memory and the peak, whether that fits `plan.device_memory`, and the largest
micro-batch that does; then the pipeline's stage balance and bubble, the expert shards, and the bytes
each collective moves per optimizer step. A layout the trainer would refuse is refused with the
trainer's own message (the same checks: train.config, train.distributed, the gradient accumulation, the
pipeline partition), exit status 2. The config is composed exactly as `python -m train` composes it;
`plan.*` keys are the planner's and never reach the training config.

How each figure is derived is written next to it below (`rank_memory` and the engines' terms). On
CPU the runtime term (interpreter, libraries, data pipeline) was measured on this machine (see
`CPU_RUNTIME`); on CUDA the context and libraries are an estimate (`CUDA_RUNTIME`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXIT_REFUSED = 2
GiB, MiB = 1024**3, 1024**2

PLAN_KEYS = {
    "devices": "ranks of the run (default 1)",
    "device_memory": "memory of one device, e.g. 80GB, 24GiB, 512MB (GB = GiB here: what an 80 GB GPU "
                     "reports; default: 80GB on cuda, this machine's memory / devices on cpu)",
    "device": "cuda or cpu (default: cpu when trainer.device=cpu, else cuda)",
}

# ---------------------------------------------------------------------------------------------------
# The runtime's own memory per rank: what a rank holds besides the model's tensors.
#
# CPU: measured on this machine (2026-12-03; torch 2.13.0 CPU, deepspeed 0.19.8, Python 3.11) by
# `python -m train.plan --measure-runtime`: the peak resident memory of real runs of the tiniest presets
# (doge-tiny, 0.2M parameters; doge-tiny-moe for expert parallelism) with MEASURE_SETTINGS (data=builtin,
# 32 tokens per row, 2 steps, a checkpoint at the end), taken by `bench_parallel.run_with_rank_peaks`,
# less the planner's own figures for that model (a few MiB). A process that only imports what a run
# imports holds ~225 MiB (250 with DeepSpeed); a run holds more: the data pipeline (for the built-in
# corpus ~120 MiB to hold out its documents and ~140 MiB once the first rows are read; other sources
# differ), the kernels' working memory, DeepSpeed's engine (~50 MiB). Rank 0 holds ~100 MiB more than the
# others in its first step and ~55 MiB more after it (measured, not traced to one cause: its share of the
# documents, and what only rank 0 does: metrics, config, tokenizer). Measured with glibc's mmap
# threshold fixed at its default 128 KiB (MALLOC_MMAP_THRESHOLD_=131072): see CPU_HEAP_NOTE.
CPU_RUNTIME = {  # runtime kind -> (rank 0, other ranks), bytes
    "single": (568 * MiB, 568 * MiB),
    "ddp": (563 * MiB, 462 * MiB),
    "deepspeed": (630 * MiB, 533 * MiB),
    "pipeline": (620 * MiB, 620 * MiB),
    "expert": (589 * MiB, 491 * MiB),
}
CPU_HEAP_NOTE = (
    "on CPU, glibc's default malloc raises its mmap threshold after the first large free and then keeps "
    "freed heap pages: measured here, 4-18% more resident memory than with the threshold held (most where "
    "DeepSpeed flattens or partitions the model's tensors; ZeRO-3 gathers and frees them every pass). The "
    "plan is of the memory the run holds; MALLOC_MMAP_THRESHOLD_=131072 holds glibc's default threshold")
# CUDA: an estimate, not measured here (no GPU): the CUDA context with cuBLAS/cuDNN handles and workspaces
# takes 0.4-0.8 GiB of device memory on A100/H100-class GPUs, NCCL's communicator buffers 0.1-0.3 GiB;
# the caching allocator's fragmentation comes on top of the peak (a few percent, not counted here).
CUDA_RUNTIME = 1 * GiB


def parse_bytes(text: str) -> int:
    """'80GB', '24GiB', '512MB', '1.5T', or a number of bytes. GB and GiB are both 2**30: GPU makers' "80
    GB" is what the device reports as 80 GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text), re.I)
    if not match:
        raise ValueError(f"plan.device_memory={text!r} is not a size; write e.g. 80GB, 24GiB or 512MB")
    scale = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def show(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB else f"{nbytes / MiB:.0f} MiB"


# ---------------------------------------------------------------------------------------------------
# The command line: plan.* keys apart, the rest composed as `python -m train` composes it


class Refused(Exception):
    """What the trainer would refuse (or a bad plan.* key): one line, exit status 2."""


@dataclass
class Request:
    devices: int = 1
    device_memory: int | None = None
    device: str | None = None


def split_plan_arguments(argv: list[str]) -> tuple[Request, list[str]]:
    """`plan.key=value` arguments -> a Request; the others are the training overrides, untouched."""
    request, rest = Request(), []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~")
        if not bare.startswith("plan."):
            rest.append(arg)
            continue
        name = bare[len("plan."):]
        if name not in PLAN_KEYS or not eq:
            close = difflib.get_close_matches(name, list(PLAN_KEYS), n=1)
            raise Refused(f"unknown planner key {bare}{'' if eq else ' (no value)'}."
                          f"{f' Did you mean plan.{close[0]}?' if close else ''} Planner keys: "
                          + ", ".join(f"plan.{k}" for k in PLAN_KEYS))
        if name == "devices":
            if not value.isdigit() or int(value) < 1:
                raise Refused(f"plan.devices={value!r} must be a whole number >= 1 (the ranks of the run)")
            request.devices = int(value)
        elif name == "device_memory":
            try:
                request.device_memory = parse_bytes(value)
            except ValueError as exc:
                raise Refused(str(exc)) from None
        elif value not in ("cuda", "cpu"):
            raise Refused(f"plan.device={value!r} is not one of ['cuda', 'cpu']")
        else:
            request.device = value
    return request, rest


def compose(overrides: list[str]) -> dict:
    """The run's config as `python -m train` composes it (the same argument rewriting and early checks,
    then Hydra's compose API on the same config directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .cli import CONFIG_DIR, check_overrides, with_forced_model_keys, with_list_indices_as_keys
    from .config import register_configs

    argv = with_list_indices_as_keys(overrides)
    if any(a in ("-m", "--multirun") for a in argv):
        raise Refused("--multirun: the planner plans one run; give one value per key")
    problem = check_overrides(argv)
    if problem:
        raise Refused(problem)
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=with_forced_model_keys(argv))
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise Refused(str(exc).splitlines()[0]) from None


# ---------------------------------------------------------------------------------------------------
# The layout, checked as the trainer checks it


@dataclass
class Layout:
    run: object  # train.config.RunConfig
    model_config: object
    device: str
    devices: int
    device_memory: int
    precision: str
    pp: int
    ep: int
    dp: int
    accumulation: int
    memory_given: bool = True

    @property
    def on_deepspeed(self) -> bool:
        """DeepSpeed runs it: parallel.engine=deepspeed, or a pipeline (DeepSpeed's pipeline engine)."""
        return self.run.parallel.engine == "deepspeed" or self.pp > 1

    @property
    def weight_bytes(self) -> int:
        # DeepSpeed's bf16 mode casts the model; the torch engine keeps fp32 weights under autocast
        return 2 if self.on_deepspeed and self.precision == "bf16" else 4

    @property
    def engine_name(self) -> str:
        p = self.run.parallel
        if self.pp > 1:
            return f"DeepSpeed pipeline, {self.pp} stages, ZeRO-{p.zero_stage}"
        name = f"DeepSpeed ZeRO-{p.zero_stage}" if p.engine == "deepspeed" else ("DDP" if self.dp > 1 else
                                                                                 "one process")
        if p.offload_optimizer:
            name += ", optimizer offloaded to the CPU"
        if p.offload_param:
            name += ", parameters offloaded to the CPU"
        return name + (f", experts over {self.ep} ranks" if self.ep > 1 else "")


def layout_of(values: dict, request: Request) -> Layout:
    """The validated run and its layout on `request.devices` ranks, or Refused with the trainer's message."""
    import models

    from .config import RunConfigError, check_layout, check_tokenizer_fits, is_unset, validate
    from .distributed import LayoutError
    from .distributed import check_layout as check_world
    from .builders import gradient_accumulation

    trainer = values.setdefault("trainer", {})
    device = request.device or ("cpu" if trainer.get("device") == "cpu" else "cuda")
    if trainer.get("precision", "auto") == "auto":
        # the trainer resolves auto on the machine it runs on: bf16 on a GPU with bf16 (the planner assumes
        # one: Ampere or newer), fp32 on a CPU
        trainer["precision"] = "bf16" if device == "cuda" else "fp32"
    try:
        run = validate(values)
        model_config = run.model
        source = run.init_from or (None if is_unset(run.trainer.resume) or run.trainer.resume == "auto"
                                   else run.trainer.resume)
        if source and Path(source, "config.json").is_file():  # the architecture that will train (as train.loop)
            model_config = models.make_config(models.read_config_json(source))
        # validate() checks these for a fresh run; a resumed one (trainer=gpu resumes: auto) the trainer checks
        # once it has read the checkpoint's architecture, which the plan takes to be this one
        check_layout(run, model_config)
        check_tokenizer_fits(run.data.tokenizer, model_config.vocab_size)
        p = run.parallel
        check_world(request.devices, p.pipeline_stages, p.expert_parallel)
        dp = request.devices // p.pipeline_stages
        accumulation = gradient_accumulation(run, dp)
    except (RunConfigError, LayoutError, models.ConfigError) as exc:
        raise Refused(str(exc)) from None
    memory = request.device_memory
    if memory is None:
        memory = 80 * GiB if device == "cuda" else _host_memory() // request.devices
    return Layout(run, model_config, device, request.devices, memory, run.trainer.precision, p.pipeline_stages,
                  p.expert_parallel, dp, accumulation, request.device_memory is not None)


def _host_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


# ---------------------------------------------------------------------------------------------------
# The model: parameter counts from the meta-device build


@dataclass
class Census:
    model: object  # the model on the meta device
    params: list[tuple[str, int, bool]]  # (name, elements, is an expert tensor), each tensor once (tied: once)

    @property
    def total(self) -> int:
        return sum(n for _, n, _ in self.params)

    @property
    def experts(self) -> int:
        return sum(n for _, n, e in self.params if e)

    @property
    def largest(self) -> int:
        return max(n for _, n, _ in self.params)


def census(model_config) -> Census:
    import models

    from .engines.expert_parallel import expert_modules

    model = models.build(model_config, device="meta")
    expert_ids = {id(module.weight) for module in expert_modules(model)}
    seen, params = set(), []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append((name, p.numel(), id(p) in expert_ids))
    return Census(model, params)


@dataclass
class Stage:
    """A pipeline stage (or the whole model): what it holds, as DeepSpeed's PipelineModule cuts it."""

    index: int
    items: list[str]
    params: int
    layers: list[int]
    first: bool
    last: bool


def pipeline_stages(census_: Census, layout: Layout) -> list[Stage]:
    """The stages as the trainer's PipelineModule partitions its items (engines/pipeline.pipeline_items,
    DeepSpeed's partition_uniform / partition_balanced), refused where the trainer refuses the cut."""
    model = census_.model
    layers = [int(k) for k in model.model.layers]
    if layout.pp == 1:
        return [Stage(0, ["whole model"], census_.total, layers, True, True)]
    from deepspeed.runtime import utils as ds_utils
    from torch import nn

    from .distributed import LayoutError
    from .engines.pipeline import PARTITION_METHODS, LayerPipe, check_partition, pipeline_items

    items = pipeline_items(model, bool(model.config.tie_word_embeddings))
    pieces = [item if isinstance(item, nn.Module) else item.build() for item in items]  # TiedLayerSpec: built
    counts = [sum(p.numel() for p in piece.parameters() if p.requires_grad) for piece in pieces]
    method = PARTITION_METHODS[layout.run.parallel.pipeline_partition]
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(items), num_parts=layout.pp)
    elif method == "parameters":
        parts = ds_utils.partition_balanced(weights=counts, num_parts=layout.pp)
    else:  # type:<name>, as PipelineModule._find_layer_type matches it
        kind = method.split(":")[1]
        names = [type(i).__name__ if isinstance(i, nn.Module) else i.typename.__name__ for i in items]
        parts = ds_utils.partition_balanced(
            weights=[1 if re.search(kind, n, re.IGNORECASE) else 0 for n in names], num_parts=layout.pp)
    try:
        check_partition(parts, items, layout.run.parallel.pipeline_partition)
    except LayoutError as exc:
        raise Refused(str(exc)) from None
    stages = []
    for s in range(layout.pp):
        lo, hi = parts[s], parts[s + 1]
        names = [type(p).__name__.removesuffix("Pipe") + (f"({p.piece.layer_index})" if isinstance(p, LayerPipe)
                                                           else "") for p in pieces[lo:hi]]
        stages.append(Stage(s, names, sum(counts[lo:hi]),
                            [p.piece.layer_index for p in pieces[lo:hi] if isinstance(p, LayerPipe)],
                            s == 0, s == layout.pp - 1))
    return stages


# ---------------------------------------------------------------------------------------------------
# Activations: what autograd saves, counted on fake tensors


@dataclass
class Activations:
    """Bytes autograd keeps from the forward pass to the backward pass of one micro-batch, per decoder
    layer and for the rest (embedding, final norm, LM head and loss), each split into what grows with the
    micro-batch's rows and what does not: the bf16 copies of the weights that autocast makes and keeps
    for the backward pass, and the LM head's weight gradient, which the chunked loss computes in the
    forward pass."""

    seq_len: int
    layer_fixed: dict[int, int]
    layer_per_row: dict[int, int]
    layer_input_per_row: int  # one layer's input (the hidden states): what checkpointing keeps of a layer
    outside_fixed: int
    outside_per_row: int
    experts_per_row: int  # of the layers' bytes, saved inside CDMoE's rank-one experts
    loss_chunk_rows: int  # rows of the chunked loss's fp32 logits buffer (models.loss.chunk_rows)
    vocab_size: int

    def saved(self, rows: int, layers: list[int] | None = None, head: bool = True, checkpointing: bool = False,
              expert_parallel: int = 1) -> int:
        """Saved bytes of one micro-batch of `rows` rows on a rank holding `layers` (None: all) and, with
        `head`, the LM head. Checkpointed, each layer keeps only its input and the backward pass
        recomputes one layer at a time (that layer's bytes once, on top)."""
        layers = list(self.layer_per_row) if layers is None else layers
        per_row = {i: self.layer_per_row[i] + self.experts_extra(expert_parallel) for i in layers}
        if not layers:
            body = 0
        elif checkpointing:
            body = rows * (len(layers) * self.layer_input_per_row + max(per_row.values())) + max(
                self.layer_fixed[i] for i in layers)
        else:
            body = rows * sum(per_row.values()) + sum(self.layer_fixed[i] for i in layers)
        return body + (self.outside_fixed + rows * self.outside_per_row if head else 0)

    def experts_extra(self, expert_parallel: int) -> int:
        """Per layer and row: under expert parallelism CDMoE's experts run on the tokens of the whole expert
        group, all-gathered (N x the rows), so what they save grows N-fold. JetMoE's all-to-all leaves each
        rank about its own share of (token, expert) rows: no change."""
        if expert_parallel == 1 or not self.layer_per_row:
            return 0
        return (expert_parallel - 1) * self.experts_per_row // len(self.layer_per_row)

    def loss_buffer(self, rows: int) -> int:
        """The chunked loss's fp32 logits (and their gradient) for one chunk, alive in the head's forward."""
        return min(self.loss_chunk_rows, rows * self.seq_len) * self.vocab_size * 4


def _fp32_grouped_mm():
    """A dispatch mode for the fake forward pass. The meta kernel of torch's grouped GEMM (what fake
    tensors run) takes bf16 only, while the eager CPU and CUDA kernels take fp32 too: for fp32 operands the
    result's shape is computed in bf16 and handed back as fp32. What autograd saves is decided above this
    dispatch level, on the fp32 tensors, so the count is unchanged."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp32GroupedMM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float32:
                return func(args[0].to(torch.bfloat16), args[1].to(torch.bfloat16), *args[2:], **kwargs).float()
            return func(*args, **kwargs)

    return Fp32GroupedMM()


def activations(model_config, seq_len: int, mode: str, device: str, document_masking: bool) -> Activations:
    """`mode`: fp32, autocast (bf16 autocast over fp32 weights: the torch engine's bf16) or bf16 (a bf16
    model without autocast: DeepSpeed's bf16). Two fake forward passes (1 and 2 rows) give the part that
    grows with the rows and the part that does not."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import models
    from models.loss import chunk_rows
    from models.moe import RankOneExperts

    fake = FakeTensorMode()
    default_dtype = torch.get_default_dtype()
    try:  # construction only (no init needed); a bf16 model built so (fake tensors do not take .to(dtype))
        torch.set_default_dtype(torch.bfloat16 if mode == "bf16" else torch.float32)
        with fake:
            model = models.model_class(model_config.model_type)(model_config)
    finally:
        torch.set_default_dtype(default_dtype)
    owned = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    layers = {int(k): layer for k, layer in model.model.layers.items()}
    state = {"where": "outside", "experts": False}
    counts: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in owned and key not in counts:
            counts[key] = (state["where"], state["experts"], storage.nbytes())
        return t

    inputs: dict[int, int] = {}
    hooks = []
    for index, layer in layers.items():
        def enter(module, args, index=index):
            state["where"] = index
            inputs[index] = args[0].untyped_storage().nbytes()
        hooks += [layer.register_forward_pre_hook(enter),
                  layer.register_forward_hook(lambda *a: state.__setitem__("where", "outside"))]
    for module in model.modules():
        if isinstance(module, RankOneExperts):
            hooks += [module.register_forward_pre_hook(lambda *a: state.__setitem__("experts", True)),
                      module.register_forward_hook(lambda *a: state.__setitem__("experts", False))]

    def run(rows: int) -> dict:
        counts.clear()
        with fake, _fp32_grouped_mm():
            ids = torch.zeros(rows, seq_len, dtype=torch.long)
            # packed documents (data.document_masking): positions restart, so every layer builds a mask
            positions = None
            if document_masking:
                positions = (torch.arange(seq_len) % max(1, seq_len // 2)).expand(rows, seq_len)
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
                model(ids, shift_labels=ids, position_ids=positions)
        out = {"outside": 0, "experts": 0, **{i: 0 for i in layers}}
        for where, in_experts, nbytes in counts.values():
            out[where] += nbytes
            out["experts"] += nbytes if in_experts else 0
        out["inputs"] = dict(inputs)
        return out

    try:
        one, two = run(1), run(2)
    finally:
        for hook in hooks:
            hook.remove()
    per_row = {k: two[k] - one[k] for k in ("outside", "experts", *layers)}
    fixed = {k: one[k] - per_row[k] for k in ("outside", *layers)}
    return Activations(
        seq_len=seq_len, layer_fixed={i: fixed[i] for i in layers}, layer_per_row={i: per_row[i] for i in layers},
        layer_input_per_row=(max(two["inputs"].values()) - max(one["inputs"].values())) if layers else 0,
        outside_fixed=fixed["outside"], outside_per_row=per_row["outside"], experts_per_row=per_row["experts"],
        loss_chunk_rows=chunk_rows(model_config.vocab_size, device), vocab_size=model_config.vocab_size)


# ---------------------------------------------------------------------------------------------------
# Memory per rank


@dataclass
class Term:
    """A named amount of memory and the phase it belongs to: kept (through the whole step), backward
    (from the forward pass to the end of the backward pass), step (during the optimizer step) or save
    (while a checkpoint is written)."""

    group: str  # weights | grads | optimizer | buffers | activations
    what: str
    nbytes: int
    phase: str


@dataclass
class RankMemory:
    label: str
    ranks: list[int]
    stage: Stage
    terms: list[Term]
    runtime: int
    host: list[Term] = field(default_factory=list)  # offloaded state and checkpoint copies on a GPU run's host

    def phase(self, name: str) -> int:
        return sum(t.nbytes for t in self.terms if t.phase == name)

    @property
    def peaks(self) -> dict[str, int]:
        kept = self.runtime + self.phase("kept")
        return {"training (backward)": kept + self.phase("backward"), "optimizer step": kept + self.phase("step"),
                "checkpoint save": kept + self.phase("save"), "construction": self.runtime + self.phase("build")}

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def group(self, name: str) -> int:
        """The group's largest simultaneous amount (kept plus its largest phase)."""
        kept = sum(t.nbytes for t in self.terms if t.group == name and t.phase == "kept")
        phases = [sum(t.nbytes for t in self.terms if t.group == name and t.phase == p)
                  for p in ("backward", "step", "save")]
        return kept + max(phases)


def zero_settings(layout: Layout):
    """DeepSpeed's ZeRO settings of the run: the trainer's DeepSpeed JSON (engines/deepspeed_engine, user
    keys merged) read through DeepSpeed's own config class, so its defaults are DeepSpeed's."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from .engines.deepspeed_engine import deepspeed_config

    run = layout.run
    ds = deepspeed_config(run.parallel, run.trainer, run.optim, layout.accumulation)
    return DeepSpeedZeroConfig(**ds["zero_optimization"])


def held_params(layout: Layout, census_: Census, stage_params: int) -> tuple[int, int]:
    """(parameters a rank holds, of which expert slices): a pipeline rank its stage's (`stage_params`);
    otherwise the dense ones and its 1/ep of the experts."""
    experts = census_.experts // layout.ep if layout.pp == 1 else 0
    total = stage_params if layout.pp > 1 else census_.total - census_.experts + experts
    return total, experts


def rank_memory(layout: Layout, census_: Census, stage: Stage, acts: Activations, rows: int,
                checkpointing: bool, zero=None) -> list[Term]:
    """The terms of one rank holding `stage`, for micro-batches of `rows` rows. Derived from what each
    engine allocates (train/engines/*, DeepSpeed 0.19.8's stage_1_and_2.py / stage3.py /
    bf16_optimizer.py), named below; on CPU checked against measured runs (tests/train/test_plan.py)."""
    p = layout.run.parallel
    deepspeed, w = layout.on_deepspeed, layout.weight_bytes
    bf16 = layout.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    total, experts = held_params(layout, census_, stage.params)
    dense = total - experts
    n, n_experts = layout.dp, layout.devices // layout.ep  # ZeRO partitions: replicas; expert slices: their holders
    part = dense / n + experts / n_experts if deepspeed and p.zero_stage >= 1 else total
    largest = census_.largest
    terms: list[Term] = []

    def add(group, what, nbytes, phase):
        if nbytes:
            terms.append(Term(group, what, int(nbytes), phase))

    # ---- activations (backward phase): one micro-batch at a time, or a pipeline stage's in-flight ones
    if layout.pp > 1:
        from deepspeed.runtime.pipe.schedule import TrainSchedule

        in_flight = min(layout.pp - stage.index, layout.accumulation)  # 1F1B: forward passes awaiting their backward
        saved = acts.saved(rows, stage.layers, stage.last, checkpointing)
        add("activations", f"{in_flight} micro-batch(es) in flight x {show(saved)}", in_flight * saved, "backward")
        buffers = TrainSchedule(layout.accumulation, layout.pp, stage.index).num_pipe_buffers()
        hidden = rows * acts.seq_len * layout.model_config.hidden_size * act_bytes
        add("buffers", f"{buffers} pipeline buffers (stage input and output)", buffers * 2 * hidden, "backward")
    else:
        add("activations", "saved for the backward pass", acts.saved(rows, checkpointing=checkpointing,
                                                                   expert_parallel=layout.ep), "backward")
    if stage.last:
        add("activations", "the loss's logits chunk", acts.loss_buffer(rows), "backward")

    # ---- the model's state, by engine
    if not deepspeed:
        # TorchEngine: fp32 weights (bf16 runs under autocast), fp32 gradients, AdamW's two fp32 moments
        add("weights", "fp32", 4 * total, "kept")
        add("grads", "fp32", 4 * total, "backward")
        add("grads", "fp32", 4 * total, "step")
        add("optimizer", "AdamW moments (2 x fp32)", 8 * total, "kept")
        if layout.dp > 1:  # DDP copies gradients into flat fp32 buckets (expert slices are left out of DDP)
            add("buffers", "DDP gradient buckets", 4 * dense, "kept")
        if layout.device == "cpu":  # the single-tensor AdamW's temporaries (fused on CUDA: none)
            add("buffers", "AdamW temporaries (largest tensor)", 2 * 4 * largest, "step")
        add("weights", "the fp32 model as built", 4 * (census_.total if layout.device == "cpu" else total), "build")
        # a save writes the tensors of the part it writes as they are on CPU (each owns its storage); expert
        # slices are gathered whole, one tensor at a time, and the ones it writes kept until written. On a GPU
        # its part is copied to the host.
        if layout.device == "cpu":
            add("buffers", "checkpoint: gathered expert tensors it writes",
                4 * census_.experts / layout.ep if layout.ep > 1 else 0, "save")
        else:
            add("buffers", "checkpoint: copy of the part it writes", 12 * total / layout.dp, "host")
    elif p.zero_stage == 0:
        _zero0_terms(add, total, bf16, layout, zero)
    elif p.zero_stage in (1, 2):
        _zero12_terms(add, total, part, w, bf16, layout, zero, census_)
    else:
        _zero3_terms(add, total, part, w, layout, zero, census_)
    return terms


def _zero0_terms(add, total, bf16, layout, zero):
    """DeepSpeed without ZeRO. fp32: the client AdamW as is; the gradients are flattened per all-reduce
    bucket at the step. bf16: DeepSpeed's bf16 wrapper of the optimizer (DDP_BFLOAT16): bf16 weights and
    gradients, fp32 master weights, the fp32 gradients flattened at the step."""
    bucket = min(total, int(5e8))  # allreduce_bucket_size's default
    add("weights", "bf16" if bf16 else "fp32", (2 if bf16 else 4) * total, "kept")
    add("grads", "bf16 (bf16 accumulation)" if bf16 else "fp32", (2 if bf16 else 4) * total, "backward")
    add("grads", "as accumulated", (2 if bf16 else 4) * total, "step")
    add("optimizer", "AdamW moments (2 x fp32)" + (" + fp32 master weights" if bf16 else ""),
        (12 if bf16 else 8) * total, "kept")
    add("buffers", "flattened gradients (fp32)", 4 * (total if bf16 else bucket), "step")
    add("weights", "the fp32 model as built", 4 * total, "build")


def _zero12_terms(add, total, part, w, bf16, layout, zero, census_):
    """ZeRO-1/2 (stage_1_and_2.DeepSpeedZeroOptimizer), and ZeRO-1 under bf16 (BF16_Optimizer, which the
    trainer's fp32 gradient accumulation selects). The weights move into one flat buffer per parameter
    group; the optimizer steps an fp32 copy of this rank's partition of it (a clone even for an fp32
    model), with AdamW's moments for that partition only."""
    stage, pipeline = layout.run.parallel.zero_stage, layout.pp > 1
    bucket = min(total, int(zero.reduce_bucket_size))
    offload = layout.run.parallel.offload_optimizer
    where = "host" if offload else "kept"
    add("weights", f"{'bf16' if w == 2 else 'fp32'} flat buffer", w * total, "kept")
    add("optimizer", "fp32 master partition", 4 * part, where)
    add("optimizer", "AdamW moments of the partition (2 x fp32)", 8 * part, where)
    if stage == 1 and bf16:
        # BF16_Optimizer: every gradient accumulates into a full fp32 buffer; bf16 gradients come and go
        add("grads", "fp32 accumulation buffer (all parameters)", 4 * total, "kept")
        add("grads", "bf16, before accumulation", 2 * total, "backward")
    else:
        # The backward hooks copy each gradient into the reduction bucket (reduce_bucket_size elements,
        # fp32 under ZeRO-1, the weights' dtype under ZeRO-2) and the gradient becomes a view of it; the
        # bucket is reduced into this rank's fp32 partition of the gradients. Under a pipeline there are
        # no hooks: the gradients exist whole until the engine reduces them after the last micro-batch.
        bucket_bytes = (4 if stage == 1 else w) * bucket
        add("grads", "reduction bucket", bucket_bytes, "backward")
        add("grads", "reduction bucket", bucket_bytes, "step")
        if pipeline:
            add("grads", "whole, before the reduction", w * total, "backward")
        add("grads", "fp32 partition", 4 * part, "step")
        if stage == 2:  # ZeRO-2 reduces every micro-batch into it
            add("grads", "fp32 partition", 4 * part, "backward")
    # torch's single-tensor AdamW over one flat partition: sqrt and division temporaries of its size
    add("buffers", "AdamW temporaries (the flat partition)", 2 * 4 * part, "host" if offload else "step")
    # a save copies the views of the flat buffers this rank writes (train.sharded.owned_cpu_tensor):
    # its share of the weights, then its partition's optimizer state
    share = w * total / layout.dp
    state = (12 if w == 2 else 8) * part
    add("buffers", "checkpoint: copy of the part it writes", max(share, state),
        "save" if layout.device == "cpu" else "host")
    # the fp32 model as built (whole on CPU, and on every rank before a pipeline cuts it), then its flat copy;
    # bf16: the engine casts the model first, so the copy is no larger than the fp32 model
    built = 4 * (census_.total if layout.device == "cpu" or pipeline else total)
    add("weights", "the fp32 model as built + its flat copy", built + (4 * total if w == 4 else 0), "build")


def _zero3_terms(add, total, part, w, layout, zero, census_):
    """ZeRO-3 (stage3.DeepSpeedZeroOptimizer_Stage3): each rank keeps its partition of the weights (tensors
    below param_persistence_threshold elements whole), an fp32 master copy and AdamW's moments of it, an
    fp32 partition of the gradients and a reduction bucket. Forward and backward gather the weights; with
    DeepSpeed's defaults (stage3_max_reuse_distance 1e9) they stay gathered through the step up to
    stage3_max_live_parameters elements."""
    p = layout.run.parallel
    small = sum(numel for _, numel, _ in census_.params if numel < zero.param_persistence_threshold)
    bucket = min(total, int(zero.reduce_bucket_size))
    where = "host" if p.offload_optimizer else "kept"
    add("weights", f"{'bf16' if w == 2 else 'fp32'} partition (small tensors whole)",
        w * (part + small * (1 - 1 / layout.dp)), "host" if p.offload_param else "kept")
    add("optimizer", "fp32 master partition", 4 * part, where)
    add("optimizer", "AdamW moments of the partition (2 x fp32)", 8 * part, where)
    add("grads", "fp32 partition", 4 * part, where)
    add("grads", "reduction bucket", w * bucket, "kept")
    gathered = w * min(total, int(zero.max_live_parameters))
    add("buffers", "gathered weights", gathered, "backward")
    add("buffers", "gathered weights", gathered, "step")
    add("buffers", "AdamW temporaries (the flat partition)", 2 * 4 * part, "host" if p.offload_optimizer else "step")
    # the save gathers one tensor at a time and copies the ones this rank writes (train.checkpoint)
    add("buffers", "checkpoint: copy of the part it writes", w * total / layout.dp + w * census_.largest,
        "save" if layout.device == "cpu" else "host")
    # DeepSpeedEngine moves the whole fp32 model to the device before ZeRO-3 partitions it
    add("weights", "the whole fp32 model, before partitioning", 4 * total, "build")


def runtime_of(layout: Layout, rank: int) -> int:
    if layout.device == "cuda":
        return CUDA_RUNTIME
    p = layout.run.parallel
    kind = ("pipeline" if layout.pp > 1 else "deepspeed" if p.engine == "deepspeed" else "expert" if layout.ep > 1
            else "ddp" if layout.dp > 1 else "single")
    return CPU_RUNTIME[kind][0 if rank == 0 else 1]


def memory_of(layout: Layout, census_: Census, stage: Stage, acts: Activations, ranks: list[int], rows: int,
              checkpointing: bool, zero) -> RankMemory:
    terms = rank_memory(layout, census_, stage, acts, rows, checkpointing, zero)
    if layout.device == "cpu":  # "offloaded" state is in the same memory
        terms = [Term(t.group, t.what, t.nbytes, "kept") if t.phase == "host" else t for t in terms]
    label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    if layout.pp > 1:
        label = f"stage {stage.index}, {label}"
    return RankMemory(label, ranks, stage, [t for t in terms if t.phase != "host"], runtime_of(layout, ranks[0]),
                      [t for t in terms if t.phase == "host"])


def rank_classes(layout: Layout, stages: list[Stage]) -> list[tuple[Stage, list[int]]]:
    """Ranks that hold the same: each pipeline stage's replicas (rank = stage x replicas + replica, as
    train.distributed lays the world out); on CPU rank 0 apart (its runtime holds more)."""
    out = []
    for stage in stages:
        ranks = list(range(stage.index * layout.dp, (stage.index + 1) * layout.dp))
        if layout.device == "cpu" and ranks[0] == 0 and len(ranks) > 1:
            out += [(stage, [0]), (stage, ranks[1:])]
        else:
            out.append((stage, ranks))
    return out


def valid_micro_batches(layout: Layout) -> list[int]:
    """Rows per micro-batch the trainer takes: the global batch must split into micro-batches x replicas."""
    per_replica = layout.run.trainer.global_batch_size // layout.dp
    return [r for r in range(1, per_replica + 1) if per_replica % r == 0]


def largest_fitting(layout: Layout, census_: Census, stage: Stage, acts: Activations, ranks: list[int],
                    checkpointing: bool, zero) -> int | None:
    """The largest valid micro-batch whose peak fits the device (more rows: fewer accumulation steps)."""
    import dataclasses

    best = None
    for rows in valid_micro_batches(layout):
        trial = dataclasses.replace(layout, accumulation=layout.run.trainer.global_batch_size // (rows * layout.dp))
        if memory_of(trial, census_, stage, acts, ranks, rows, checkpointing, zero).peak <= layout.device_memory:
            best = rows
    return best


# ---------------------------------------------------------------------------------------------------
# Collectives: bytes each rank sends per optimizer step (ring algorithms: an all-reduce of B bytes over n
# ranks sends 2(n-1)/n B, a reduce-scatter or an all-gather (n-1)/n B, from each rank)


def collectives(layout: Layout, census_: Census, stages: list[Stage], acts: Activations) -> list[tuple[str, float]]:
    run, p = layout.run, layout.run.parallel
    t, m = run.trainer, layout.accumulation
    n = layout.dp
    bf16 = layout.precision == "bf16"
    deepspeed, w = layout.on_deepspeed, layout.weight_bytes
    act = 2 if bf16 else 4
    ring = (n - 1) / n if n > 1 else 0.0
    out = []
    held, experts = held_params(layout, census_, max(s.params for s in stages))
    dense = held - experts
    if not deepspeed:
        if n > 1:
            out.append(("all-reduce of the fp32 gradients (DDP, once per step)", 2 * ring * 4 * dense))
    elif p.zero_stage == 0:
        out.append(("all-reduce of the gradients (once per step)", 2 * ring * w * held))
    elif p.zero_stage == 1:
        out.append(("reduce-scatter of the gradients (fp32 accumulator, once per step)", ring * 4 * held))
        out.append(("all-gather of the updated weights", ring * w * held))
    elif p.zero_stage == 2:
        out.append((f"reduce-scatter of the gradients (every micro-batch: {m})", m * ring * w * held))
        out.append(("all-gather of the updated weights", ring * w * held))
    else:
        out.append((f"all-gather of the weights, forward and backward ({m} micro-batches; up to, as DeepSpeed "
                    f"keeps weights it will reuse soon)", m * 2 * ring * w * held))
        out.append((f"reduce-scatter of the gradients ({m} micro-batches)", m * ring * w * held))
    if layout.ep > 1:
        tokens = t.micro_batch_size * acts.seq_len * m
        c = layout.model_config
        nep = layout.ep
        replicas = layout.devices // nep
        if replicas > 1:
            out.append(("all-reduce of the expert gradients over their replicas",
                        2 * (replicas - 1) / replicas * 4 * experts))
        layers = c.num_hidden_layers
        if c.model_type == "jetmoe":
            k = c.num_experts_per_tok
            # (token, slot) rows of the hidden size to their experts' ranks and back, forward and backward, for
            # the MLP experts and the attention experts
            per = 2 * 2 * 2 * (nep - 1) / nep * tokens * k * c.hidden_size * act
            out.append((f"all-to-all of expert rows ({layers} layers x 2 expert kinds, forward and backward)",
                        layers * per))
        else:
            k = c.num_experts_per_tok
            # all-gather of the activations with their experts and weights (int32 + activation dtype per slot),
            # reduce-scatter of the fp32 partial outputs; the backward pass the mirror of both (docs/parallelism.md)
            per = 2 * (nep - 1) * tokens * c.hidden_size * (act + 4) + (nep - 1) * tokens * k * (4 + act)
            out.append((f"all-gather + reduce-scatter of CDMoE tokens ({layers} layers, forward and backward)",
                        layers * per))
    if layout.pp > 1:
        hidden = t.micro_batch_size * acts.seq_len * layout.model_config.hidden_size * act
        out.append((f"send/receive of activations and their gradients between stages ({m} micro-batches, per "
                    f"neighbour)", 2 * m * hidden))
        if layout.model_config.tie_word_embeddings:
            embed = layout.model_config.vocab_size * layout.model_config.hidden_size
            out.append(("all-reduce of the tied embedding's gradient (first and last stage)", 4 * embed))
    return out


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    layout: Layout
    census: Census
    stages: list[Stage]
    acts: Activations
    classes: list[RankMemory]
    largest: list[int | None]  # per class: the largest micro-batch that fits, as configured
    largest_checkpointed: list[int | None]  # ... with activation checkpointing
    collectives: list[tuple[str, float]]


def make_plan(overrides: list[str], request: Request) -> Plan:
    """The plan of `python -m train <overrides>` on `request`; Refused where the trainer would refuse."""
    layout = layout_of(compose(overrides), request)
    census_ = census(layout.model_config)
    stages = pipeline_stages(census_, layout)
    run = layout.run
    deepspeed = layout.on_deepspeed
    mode = "fp32" if layout.precision != "bf16" else ("bf16" if deepspeed else "autocast")
    try:
        acts = activations(layout.model_config, run.data.seq_len, mode, layout.device, run.data.document_masking)
    except Exception as exc:  # a model whose forward pass fake tensors cannot run: say so, do not guess
        raise RuntimeError(f"could not count the activations of {layout.model_config.model_type} on fake tensors "
                           f"({type(exc).__name__}: {exc})") from exc
    zero = zero_settings(layout) if deepspeed else None
    rows, checkpointing = run.trainer.micro_batch_size, run.trainer.activation_checkpointing
    classes, largest, largest_ac = [], [], []
    for stage, ranks in rank_classes(layout, stages):
        classes.append(memory_of(layout, census_, stage, acts, ranks, rows, checkpointing, zero))
        largest.append(largest_fitting(layout, census_, stage, acts, ranks, checkpointing, zero))
        largest_ac.append(largest_fitting(layout, census_, stage, acts, ranks, True, zero))
    return Plan(layout, census_, stages, acts, classes, largest, largest_ac,
                collectives(layout, census_, stages, acts))


def render(plan: Plan) -> str:
    lay, run, c = plan.layout, plan.layout.run, plan.layout.model_config
    t = run.trainer
    model = plan.census.model
    lines = [
        f"model: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}: "
        f"{plan.census.total / 1e6:.2f}M parameters ({model.active_parameters() / 1e6:.2f}M active"
        + (f", {plan.census.experts / 1e6:.2f}M in experts" if plan.census.experts else "") + "), "
        f"{model.flops_per_token(run.data.seq_len):.3g} FLOPs per token",
        f"world: {lay.devices} x {lay.device} with {show(lay.device_memory)} each"
        f"{'' if lay.memory_given else ' (by default: set plan.device_memory)'}; {lay.engine_name}; {lay.dp} "
        f"data-parallel replica(s); trainer.precision={lay.precision}",
        f"batch: {t.global_batch_size} rows of {run.data.seq_len} tokens per step = {lay.dp} replica(s) x "
        f"{lay.accumulation} micro-batch(es) x {t.micro_batch_size} rows; activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}",
        "",
        f"{'per rank':<22}{'weights':>11}{'grads':>11}{'optimizer':>11}{'buffers':>11}{'activations':>13}"
        f"{'runtime':>11}{'peak':>11}",
    ]
    for mem in plan.classes:
        lines.append(f"{mem.label:<22}" + "".join(f"{show(mem.group(g)):>11}" for g in
                                                  ("weights", "grads", "optimizer", "buffers"))
                     + f"{show(mem.group('activations')):>13}{show(mem.runtime):>11}{show(mem.peak):>11}")
    lines.append("")
    for mem, best, best_ac in zip(plan.classes, plan.largest, plan.largest_checkpointed):
        phase = max(mem.peaks, key=mem.peaks.get)
        fits = mem.peak <= lay.device_memory
        verdict = (f"{mem.label}: {'fits' if fits else 'does not fit'} ({show(mem.peak)} of {show(lay.device_memory)}, "
                   f"peak in the {phase}); ")
        if best is not None:
            verdict += f"largest micro-batch that fits: {best}"
        else:
            verdict += "no micro-batch fits"
        if not t.activation_checkpointing:
            verdict += (f"; with trainer.activation_checkpointing=true: {best_ac}" if best_ac is not None
                        else "; not even with activation checkpointing")
        lines.append(verdict)
    a, rows = plan.acts, t.micro_batch_size
    per_row = a.saved(1) - a.saved(0)
    per_row_checkpointed = a.saved(1, checkpointing=True) - a.saved(0, checkpointing=True)
    lines += ["", f"activations of one micro-batch ({rows} x {a.seq_len} tokens, whole model): "
                  f"{show(a.saved(rows, expert_parallel=lay.ep))}, with activation checkpointing "
                  f"{show(a.saved(rows, checkpointing=True, expert_parallel=lay.ep))}; per row {show(per_row)} "
                  f"(checkpointed {show(per_row_checkpointed)})"]
    first = plan.classes[0]
    lines.append("phases of " + first.label + ": " + ", ".join(f"{k} {show(v)}" for k, v in first.peaks.items()))
    if lay.pp > 1:
        params = [s.params for s in plan.stages]
        bubble = (lay.pp - 1) / (lay.accumulation + lay.pp - 1)
        lines += ["", f"pipeline ({run.parallel.pipeline_partition} partition): stage balance max/mean "
                      f"{max(params) / (sum(params) / len(params)):.2f}, bubble (P-1)/(M+P-1) = {100 * bubble:.0f}% "
                      f"({lay.pp} stages, {lay.accumulation} micro-batches)"]
        lines += [f"  stage {s.index}: {s.params / 1e6:.2f}M parameters: {' '.join(s.items)}" for s in plan.stages]
    if plan.census.experts:
        held = plan.census.experts // lay.ep
        rest = (plan.census.total - plan.census.experts) / 1e6
        lines += ["", f"experts: {plan.census.experts / 1e6:.2f}M parameters, " + (
            f"{held / 1e6:.2f}M per rank (1/{lay.ep}); the other {rest:.2f}M replicated" if lay.ep > 1 else
            f"not split (parallel.expert_parallel=1): every rank holds them, and the other {rest:.2f}M")]
    if plan.collectives:
        lines += ["", "collectives per optimizer step, bytes each rank sends:"]
        lines += [f"  {show(nbytes):>11}  {what}" for what, nbytes in plan.collectives]
    host = [(mem.label, t) for mem in plan.classes for t in mem.host]
    if host:
        lines += ["", "host memory (not on the device):"]
        lines += [f"  {label}: {t.what} {show(t.nbytes)}" for label, t in host]
    if lay.device == "cpu":
        lines += ["", f"note: {CPU_HEAP_NOTE}"]
    return "\n".join(lines)


def rank_peaks(plan: Plan) -> dict[int, int]:
    """{rank: planned peak bytes}."""
    return {rank: mem.peak for mem in plan.classes for rank in mem.ranks}


# ---------------------------------------------------------------------------------------------------
# Measuring the CPU runtime term, and the layouts the planner is validated on (tests/train/test_plan.py)

# The small settings, a checkpoint at the end (as every run saves one)
MEASURE_SETTINGS = [
    "data.seq_len=32", "trainer.micro_batch_size=1", "trainer.global_batch_size=4", "trainer.max_steps=2",
    "trainer.eval_every=0", "trainer.progress=false", "trainer.plot=false", "trainer.peak_flops=1e11",
    "data.tokenizer.train_bytes=1000000", "data.eval.holdout_documents=8", "data.shuffle_buffer=16",
]
# runtime kind -> (ranks, overrides of that layout, the tiniest preset that runs it)
MEASURE_LAYOUTS = {
    "single": (1, [], "doge-tiny"),
    "ddp": (2, ["parallel=ddp"], "doge-tiny"),
    "deepspeed": (2, ["parallel=zero2"], "doge-tiny"),
    "pipeline": (2, ["parallel=zero1", "parallel.pipeline_stages=2"], "doge-tiny"),
    "expert": (2, ["parallel=ddp", "parallel.expert_parallel=2"], "doge-tiny-moe"),
}


def measured_run_peaks(overrides: list[str], nproc: int, env: dict, output_dir: str) -> dict[int, int]:
    """Per-rank peak resident memory of `python -m train <overrides>` (under torchrun for nproc > 1),
    with glibc's mmap threshold fixed (CPU_HEAP_NOTE)."""
    from .bench_parallel import REPO, run_with_rank_peaks

    args = [*overrides, f"trainer.output_dir={output_dir}"]
    cmd = ([sys.executable, "-m", "train", *args] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
            "train", *args])
    proc, peaks = run_with_rank_peaks(cmd, {**env, "MALLOC_MMAP_THRESHOLD_": "131072"}, REPO)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return peaks


def measure_runtime() -> None:
    """Print CPU_RUNTIME for this machine: each runtime kind's tiniest run, measured, less its plan."""
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for kind, (nproc, layout, preset) in MEASURE_LAYOUTS.items():
        overrides = [f"model={preset}", *MEASURE_SETTINGS, *layout]
        with tempfile.TemporaryDirectory() as tmp:
            measured = measured_run_peaks(overrides, nproc, env, f"{tmp}/run")
        plan = make_plan(overrides, Request(devices=nproc, device="cpu"))
        planned = rank_peaks(plan)
        runtime = {rank: measured[rank] - (planned[rank] - runtime_of(plan.layout, rank)) for rank in measured}
        print(f'    "{kind}": ({runtime[0] // MiB} * MiB, {runtime[max(runtime)] // MiB} * MiB),', flush=True)


USAGE = """usage: python -m train.plan [overrides of python -m train] [plan.devices=N] [plan.device_memory=SIZE]
                          [plan.device=cuda|cpu]

The memory each rank of `python -m train [overrides]` needs on N devices, and whether it fits, without
allocating the model or starting a process group. Planner keys:
""" + "\n".join(f"  plan.{k:<14} {v}" for k, v in PLAN_KEYS.items()) + """

Exit status: 0 planned (fits or not: see the verdict lines), 1 failed, 2 refused (the trainer would refuse
the run or layout; the message says why).

  python -m train.plan experiment=doge-320m plan.devices=8 plan.device_memory=80GB
  python -m train.plan model=jetmoe-8b parallel=zero3 plan.devices=64 trainer.micro_batch_size=2"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    if argv == ["--measure-runtime"]:
        return measure_runtime()
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's helpers only: no device is touched
    try:
        request, overrides = split_plan_arguments(argv)
        plan = make_plan(overrides, request)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(render(plan))


if __name__ == "__main__":
    main()
