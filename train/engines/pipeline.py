"""Pipeline parallelism with DeepSpeed's PipelineModule / PipelineEngine, as one more engine behind
`engine.train_step`.

The stage list is built here, from the model's own modules (the model files know nothing of it):

    embed_tokens -> decoder layer 0 .. L-1 -> final norm -> LM head

each wrapped as a pipeline item (`PipeItem`) that keeps the piece and its Hugging Face key prefix, so
a stage's weights and optimizer state are exported under the full model's names. Between stages only
tensors travel, as the decoder-layer contract has it: (hidden, position_ids, segment_ids[,
router_stats]); the MoE routers' statistics ride along with the activations and reach the last stage,
where the head turns them into the aux loss, so the objective and its gradients are the single-process
ones. A tied embedding is one DeepSpeed `TiedLayerSpec` on the first and the last stage (DeepSpeed
all-reduces its gradient between the two). The objective (`models.loss`, through `CausalLM.output`) is
the PipelineModule's loss function on the last stage.

Checkpoints stay one Hugging Face directory plus name-keyed AdamW state (the torch engine's format),
so a pipeline run resumes under another number of stages, or none.
"""

from __future__ import annotations

import contextlib
import io
import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.base import embed_inputs

from models.loss import count_targets

from ..distributed import LayoutError, Topology
from ..optim import build_optimizer
from ..sharded import exchange, owned_cpu_tensor
from . import compat, optimizer_state
from .base import (StepResult, StepTotals, WeightHolding, global_targets, model_inputs, set_learning_rates,
                   zero_gradients_and_lr)
from .expert_parallel import NoSharding

logger = logging.getLogger(__name__)

PARTITION_METHODS = {"parameters": "parameters", "uniform": "uniform", "layers": "type:LayerPipe"}


# ---------------------------------------------------------------------------------------------------
# What crosses a stage boundary: tensors only, "no segments" as a one-element placeholder


def _placeholder(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.long, device=device)


def pack(hidden, position_ids, segment_ids, router_stats) -> tuple:
    out = (hidden, position_ids, _placeholder(hidden.device) if segment_ids is None else segment_ids)
    return out if router_stats is None else (*out, router_stats)


def unpack(inputs: tuple):
    hidden, position_ids, segment_ids = inputs[:3]
    return hidden, position_ids, (None if segment_ids.dim() == 1 else segment_ids), \
        (inputs[3] if len(inputs) > 3 else None)


# ---------------------------------------------------------------------------------------------------
# Pipeline items: pieces of the model with their Hugging Face names


class PipeItem(nn.Module):
    def __init__(self, piece: nn.Module, hf_prefix: str):
        super().__init__()
        self.piece = piece
        self.hf_prefix = hf_prefix

    def hf_named_parameters(self):
        for name, param in self.piece.named_parameters():
            yield self.hf_prefix + name, param

    def hf_state_dict(self) -> dict:
        return {self.hf_prefix + k: v for k, v in self.piece.state_dict().items()}


class EmbedPipe(PipeItem):
    """(input_ids, position_ids or placeholder) -> the first layer's inputs."""

    def __init__(self, embed_tokens: nn.Embedding, router_shape):
        super().__init__(embed_tokens, "model.embed_tokens.")
        self.router_shape = router_shape

    def forward(self, inputs):
        input_ids, position_ids = inputs
        position_ids = None if position_ids.dim() == 1 else position_ids
        return pack(*embed_inputs(self.piece, self.router_shape, input_ids, None, position_ids))


class LayerPipe(PipeItem):
    def __init__(self, layer: nn.Module):
        super().__init__(layer, f"model.layers.{layer.layer_index}.")

    def forward(self, inputs):
        return pack(*self.piece(*unpack(inputs)))


class NormPipe(PipeItem):
    def __init__(self, norm: nn.Module):
        super().__init__(norm, "model.norm.")

    def forward(self, inputs):
        return (self.piece(inputs[0]), *inputs[1:])


class HeadPipe(PipeItem):
    """Holds the LM head on the last stage; the objective applies it (see `PipelineObjective`)."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__(lm_head, "lm_head.")

    def forward(self, inputs):
        return inputs


def _pass_through(module, inputs):
    return inputs


def pipeline_items(model, tied: bool) -> list:
    """The model's modules as the pipeline's ordered items (DeepSpeed LayerSpecs for the tied ends)."""
    from deepspeed.pipe import TiedLayerSpec

    router_shape = model.router_stats_shape()
    embed = model.model.embed_tokens
    layers = [LayerPipe(layer) for layer in model.model.layers.values()]
    if tied:
        first = TiedLayerSpec("embed", EmbedPipe, embed, router_shape, tied_weight_attr=["piece.weight"])
        last = TiedLayerSpec("embed", EmbedPipe, embed, router_shape, forward_fn=_pass_through,
                             tied_weight_attr=["piece.weight"])
    else:
        first, last = EmbedPipe(embed, router_shape), HeadPipe(model.lm_head)
    return [first, *layers, NormPipe(model.model.norm), last]


def _without_layers(model: nn.Module) -> nn.Module:
    """`model` sharing every module but its decoder layers, which it has none of."""
    head, inner = copy.copy(model), copy.copy(model.model)
    head._modules, inner._modules = dict(model._modules), dict(model.model._modules)
    inner._modules["layers"] = nn.ModuleDict()
    head._modules["model"] = inner
    return head


def check_partition(parts: list[int], items, method: str) -> None:
    """Refuse a cut (DeepSpeed's `parts`: stage s holds items[parts[s]:parts[s+1]]) that leaves a stage
    without a decoder layer, with what works instead (the planner checks its layouts with this too)."""
    names = [type(i).__name__ if isinstance(i, nn.Module) else f"Tied{i.typename.__name__}" for i in items]
    for stage in range(len(parts) - 1):
        if "LayerPipe" not in names[parts[stage]:parts[stage + 1]]:
            raise LayoutError(
                f"parallel.pipeline_partition={method} leaves pipeline stage {stage} without a decoder layer (it "
                f"holds {names[parts[stage]:parts[stage + 1]] or 'nothing'}); use parallel.pipeline_partition=layers, "
                f"or fewer stages")


# ---------------------------------------------------------------------------------------------------
# The objective on the last stage


class PipelineObjective:
    """The PipelineModule's loss function: `CausalLM.output` (LM head + cross-entropy + aux loss, the one
    objective of models.loss) on the last stage's normed hidden states. It keeps the step's sums for the
    StepResult. `scale` undoes DeepSpeed's averaging over micro-batches and replicas."""

    def __init__(self, head_model):
        self.head_model = head_model
        self.scale = 1.0
        self.reset()

    def reset(self):
        self.totals = StepTotals()
        self.nonfinite = None  # a device flag, read once per step (not a host sync per micro-batch)

    def __call__(self, outputs, labels):
        hidden, _, _, router_stats = unpack(outputs)
        shift_labels, num_items, aux_weight = labels
        out = self.head_model.output(hidden, router_stats, shift_labels, num_items, aux_weight)
        self.totals.add(out, shift_labels.numel())
        bad = ~torch.isfinite(out.loss.detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        return out.loss * self.scale

    def saw_nonfinite(self) -> bool:
        return self.nonfinite is not None and bool(self.nonfinite)


# ---------------------------------------------------------------------------------------------------
# The engine


class PipelineEngine:
    """DeepSpeed's PipelineEngine (ZeRO 0/1) behind the engine interface (engines/base.py)."""

    def __init__(self, model, run, ds_config: dict, topology: Topology, accumulation: int):
        deepspeed = compat.import_deepspeed(topology.device, topology.world_size)
        from deepspeed.pipe import PipelineModule

        p = run.parallel
        self.topology = topology
        self.accumulation = accumulation
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
        tied = bool(model.config.tie_word_embeddings)
        items = pipeline_items(model, tied)
        # Built with autograd off and its prints dropped. (1) It broadcasts the tied embedding from the first
        # stage in place (_synchronize_tied_weights); with autograd on, torch's fallback for c10d::broadcast_
        # hooks the weight and warns at every backward ("autograd kernel was not registered ... silently
        # incorrect"). Harmless there (a leaf's gradient is that of its uses after the copy, which autograd
        # computes), but a false alarm; under no_grad no hook is made. (2) It prints its seed settings, the
        # topology and the items of each stage on stdout; _log_stages says the stages in one line each.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            pipe = PipelineModule(layers=items, num_stages=p.pipeline_stages, loss_fn=None,
                                  partition_method=PARTITION_METHODS[p.pipeline_partition])
        check_partition(pipe.parts, items, p.pipeline_partition)
        # The stage now holds its own items; drop this process's references to the others (they were
        # built on every rank from one full model, so that every layout starts from the same weights).
        compat.pipeline_keep_own_specs(pipe, lambda spec: not isinstance(spec, PipeItem) or spec in pipe.forward_funcs)
        self.items = [m for m in [*pipe.forward_funcs, *pipe.tied_modules.values()] if isinstance(m, PipeItem)]
        # The head model: the CausalLM minus its layers, whose lm_head (or tied embedding) and norm are the
        # last stage's items; the objective runs its `output`. A shallow copy: the caller's model stays whole
        # (the builder lets go of it, so the other stages' layers are freed).
        self.module = _without_layers(model)
        self.objective = PipelineObjective(self.module)
        pipe.loss_fn = self.objective
        self._named = self._hf_named_parameters()
        optimizer = build_optimizer(self._named, run.optim, topology.device.type)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        self.pipe = pipe
        self.stage = self.engine.stage_id
        self.last_stage_rank = self.engine.grid.stage_to_global(stage_id=self.engine.num_stages - 1)
        self._shape = None
        self._bad_step = False
        self._wrap_final_reductions()
        self._busy = 0.0
        self._time_compute()
        self._log_stages()

    # ------------------------------------------------------------------ construction helpers
    def _hf_named_parameters(self) -> list:
        seen, out = set(), []
        for item in self.items:
            for name, param in item.hf_named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    out.append((name, param))
        return out

    def _wrap_final_reductions(self) -> None:
        """A step whose loss is not finite cannot be skipped inside DeepSpeed without desynchronising it;
        as in DeepSpeedEngine it is neutralised: before the step's gradient reductions every rank learns
        whether the last stage saw a non-finite loss, and if so the gradients are zeroed and the learning
        rate is 0."""
        from deepspeed.runtime.pipe import schedule

        def checked(original, engine, *args, **kwargs):
            self._bad_step = self.topology.any(self.objective.saw_nonfinite())
            if self._bad_step:
                zero_gradients_and_lr(self.pipe.parameters(), self.optimizer)
            return original(engine, *args, **kwargs)

        compat.wrap_pipeline_instruction(self.engine, schedule.ReduceTiedGrads, checked)

    def _log_stages(self) -> None:
        mine = (self.stage, [type(i).__name__ + (f"({i.piece.layer_index})" if isinstance(i, LayerPipe) else "")
                             for i in self.items], sum(p.numel() for _, p in self._named))
        for stage, items, count in sorted({s[0]: s for s in exchange(mine, self.topology)}.values()):
            logger.info("pipeline stage %d: %s, %d parameters", stage, " ".join(items), count)

    def _time_compute(self) -> None:
        """Time spent computing (forward and backward passes) per step, so that the pipeline's idle share
        (bubble and waiting on the neighbouring stages) can be measured against the theoretical one."""
        from deepspeed.runtime.pipe import schedule

        # On CUDA a pass returns once its kernels are queued: the device is synchronised around it so that
        # the time is the pass's execution, not its launch (this costs the overlap of one pass's launch
        # with the previous one's tail, which the pipeline's blocking p2p transfers forgo anyway).
        sync = torch.cuda.synchronize if self.topology.device.type == "cuda" else (lambda: None)

        def timed(original, engine, *args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return original(engine, *args, **kwargs)
            finally:
                sync()
                self._busy += time.perf_counter() - start

        for instruction in (schedule.ForwardPass, schedule.BackwardPass):
            compat.wrap_pipeline_instruction(self.engine, instruction, timed)

    # ------------------------------------------------------------------ steps
    def _batches(self, micro_batches: list[dict], targets: torch.Tensor, aux_weight: float):
        device = self.topology.device
        for batch in micro_batches:
            batch = model_inputs(batch, device)
            position_ids = batch.get("position_ids", _placeholder(device))
            labels = (batch["shift_labels"], targets, torch.full((), aux_weight, dtype=torch.float32, device=device))
            yield (batch["input_ids"], position_ids), labels

    def _same_shapes(self, batch: dict) -> None:
        shape = tuple(batch["input_ids"].shape)
        if shape != self._shape:  # DeepSpeed caches the activation shapes it receives
            self.engine.reset_activation_shape()
            self._shape = shape

    def train_step(self, micro_batches: list[dict], lr: float, only_new: bool = False) -> StepResult:
        self._same_shapes(micro_batches[0])
        targets = global_targets(micro_batches, self.topology)
        shares = len(micro_batches) * self.topology.dp_size
        set_learning_rates(self.optimizer, lr, only_new)
        self.objective.reset()
        # DeepSpeed divides the loss by the micro-batches and averages gradients over replicas; the
        # objective is the sum over both
        self.objective.scale = shares
        self._busy, start = 0.0, time.perf_counter()
        self.engine.train_batch(data_iter=self._batches(micro_batches, targets, 1.0 / shares))
        idle = torch.tensor([1.0 - self._busy / (time.perf_counter() - start)], device=self.topology.device)
        idle = float(self.topology.all_reduce(idle)) / self.topology.world_size
        stages, m = self.engine.num_stages, len(micro_batches)
        pipeline_metrics = {"pipeline_idle": idle, "pipeline_bubble_theory": (stages - 1) / (m + stages - 1)}
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        result = StepTotals.unpack(self._from_last_stage(self.objective.totals), self.module.router_stats_shape(),
                                   shares, norm, math.isfinite(norm), pipeline_metrics)
        if self._bad_step:
            result.loss, result.grad_norm, result.applied = float("nan"), float("nan"), False
        return result

    def _from_last_stage(self, totals: StepTotals) -> torch.Tensor:
        """The last stage's sums of this step, summed over replicas and sent to every stage."""
        flat = totals.pack(self.module.router_stats_shape(), self.topology.device)
        if self.engine.is_last_stage():
            self.topology.dp_all_reduce(flat)
        dist.broadcast(flat, src=self.last_stage_rank, group=self.engine.grid.get_pipe_parallel_group())
        return flat

    @torch.no_grad()
    def eval_step(self, batch: dict) -> tuple[float, int]:
        self._same_shapes(batch)
        self.objective.reset()
        self.objective.scale = 1.0
        one = torch.ones((), dtype=torch.float32, device=self.topology.device)
        self.engine.eval_batch(iter(self._batches([batch], one, 1.0)), return_logits=False, compute_loss=True,
                               reduce_output=None, bcast_loss=False, num_micro_batches=1)
        self.engine.train()
        flat = self.objective.totals.pack(None, self.topology.device)  # not summed over replicas: the loop does
        dist.broadcast(flat, src=self.last_stage_rank, group=self.engine.grid.get_pipe_parallel_group())
        return float(flat[0]), int(count_targets(batch["shift_labels"]))

    # ------------------------------------------------------------------ checkpoints
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self._named)

    def weight_holdings(self) -> list[WeightHolding]:
        """This stage's tensors; the tied embedding is held by the first and the last stage (the first
        stage's copy is written)."""
        return [WeightHolding(name, self.stage, t.numel() * t.element_size(), str(t.dtype))
                for item in self.items for name, t in item.hf_state_dict().items()]

    def gather_weights(self, writers: dict[str, int]) -> dict[str, torch.Tensor]:
        return {name: owned_cpu_tensor(t) for item in self.items for name, t in item.hf_state_dict().items()
                if writers.get(name) == self.topology.rank}

    def optimizer_chunks(self, step: float | None = None) -> list[optimizer_state.StateChunk]:
        return optimizer_state.deepspeed_chunks(self.optimizer, self._named, NoSharding(), step, holder=self.stage)

    def close(self) -> None:
        self.engine.destroy()  # as DeepSpeedEngine.close: its optimizer's hooks hold the engine
        compat.pipeline_release_groups()

    def save(self, directory: Path) -> None:
        """The name-keyed optimizer state of every engine (fp32 master weights too when DeepSpeed keeps
        them apart from a bf16 model); each rank writes its own ranges."""
        optimizer_state.save(directory, self.optimizer_chunks(), optimizer_state.deepspeed_step(self.optimizer),
                             self.topology)

    def load(self, directory: Path) -> None:
        if not optimizer_state.has_state(directory):
            raise RuntimeError(
                f"{directory.parent}: no optimizer state by parameter name (DeepSpeed's own ZeRO-3 files?); start "
                f"from its weights with +model.init_from={directory.parent}")
        optimizer_state.load(directory, self.optimizer_chunks, self.topology)
