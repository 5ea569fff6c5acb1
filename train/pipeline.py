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

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.base import embed_inputs

from .distributed import LayoutError, Topology
from .engine import StepResult, _model_inputs, global_targets, import_deepspeed, set_learning_rates
from .optim import build_optimizer

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
        self.cross_entropy = torch.zeros((), dtype=torch.float64)
        self.aux = None
        self.counts = None
        self.finite = True

    def __call__(self, outputs, labels):
        hidden, _, _, router_stats = unpack(outputs)
        shift_labels, num_items, aux_weight = labels
        out = self.head_model.output(hidden, router_stats, shift_labels, num_items, aux_weight)
        self.cross_entropy = self.cross_entropy.to(hidden.device) + out.cross_entropy.detach().double()
        if out.aux_loss is not None:
            aux = out.aux_loss.detach().double()
            self.aux = aux if self.aux is None else self.aux + aux
        if out.expert_counts is not None:
            counts = out.expert_counts.double()
            self.counts = counts if self.counts is None else self.counts + counts
        self.finite = self.finite and bool(torch.isfinite(out.loss.detach()))
        return out.loss * self.scale


# ---------------------------------------------------------------------------------------------------
# The engine


class PipelineEngine:
    """DeepSpeed's PipelineEngine (ZeRO 0/1) behind the engine interface of train/engine.py."""

    def __init__(self, model, run, ds_config: dict, topology: Topology, accumulation: int):
        deepspeed = import_deepspeed(topology)
        from deepspeed.pipe import PipelineModule

        p = run.parallel
        self.topology = topology
        self.accumulation = accumulation
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
        tied = bool(model.config.tie_word_embeddings)
        items = pipeline_items(model, tied)
        pipe = PipelineModule(layers=items, num_stages=p.pipeline_stages, loss_fn=None,
                              partition_method=PARTITION_METHODS[p.pipeline_partition])
        self._check_partition(pipe, items, p.pipeline_partition)
        # The stage now holds its own items; drop this process's references to the others (they were
        # built on every rank from one full model, so that every layout starts from the same weights).
        pipe._layer_specs = [s if not isinstance(s, PipeItem) or s in pipe.forward_funcs else None
                             for s in pipe._layer_specs]
        self.items = [m for m in [*pipe.forward_funcs, *pipe.tied_modules.values()] if isinstance(m, PipeItem)]
        # The head model: the CausalLM minus its layers, whose lm_head (or tied embedding) and norm are the
        # last stage's items; the objective runs its `output`.
        model.model.layers = nn.ModuleDict()
        self.module = model
        self.objective = PipelineObjective(model)
        pipe.loss_fn = self.objective
        self.named_parameters = self._hf_named_parameters()
        optimizer = build_optimizer(self.named_parameters, run.optim, topology.device.type)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        self.pipe = pipe
        self.stage = self.engine.stage_id
        self.last_stage_rank = self.engine.grid.stage_to_global(stage_id=self.engine.num_stages - 1)
        self._shape = None
        self._bad_step = False
        self._wrap_final_reductions()
        counts = [sum(p.numel() for _, p in self.named_parameters)]
        logger.info("pipeline stage %d of %d: items %s, %.3fM parameters", self.stage, self.engine.num_stages,
                    [type(i).__name__ + (f"({i.piece.layer_index})" if isinstance(i, LayerPipe) else "")
                     for i in self.items], counts[0] / 1e6)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_partition(pipe, items, method: str) -> None:
        parts = pipe.parts
        names = [type(i).__name__ if isinstance(i, nn.Module) else f"Tied{i.typename.__name__}" for i in items]
        for stage in range(len(parts) - 1):
            if "LayerPipe" not in names[parts[stage]:parts[stage + 1]]:
                raise LayoutError(
                    f"parallel.pipeline_partition={method} leaves pipeline stage {stage} without a decoder layer (it "
                    f"holds {names[parts[stage]:parts[stage + 1]] or 'nothing'}); use parallel.pipeline_partition=layers, "
                    f"or fewer stages")

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
        reduce_tied = self.engine._exec_reduce_tied_grads

        def checked(*args, **kwargs):
            self._bad_step = self.topology.any(not self.objective.finite)
            if self._bad_step:
                for param in self.pipe.parameters():
                    if param.grad is not None:
                        param.grad.zero_()
                set_learning_rates(self.optimizer, 0.0, False)
            return reduce_tied(*args, **kwargs)

        self.engine._exec_reduce_tied_grads = checked

    # ------------------------------------------------------------------ steps
    def _batches(self, micro_batches: list[dict], targets: torch.Tensor, aux_weight: float):
        device = self.topology.device
        for batch in micro_batches:
            batch = _model_inputs(batch, device)
            position_ids = batch.get("position_ids", _placeholder(device))
            labels = (batch["shift_labels"], targets, torch.tensor(aux_weight, dtype=torch.float32, device=device))
            yield (batch["input_ids"], position_ids), labels

    def _same_shapes(self, batch: dict) -> None:
        shape = tuple(batch["input_ids"].shape)
        if shape != self._shape:  # DeepSpeed caches the activation shapes it receives
            self.engine.reset_activation_shape()
            self._shape = shape

    def train_step(self, micro_batches: list[dict], lr: float, only_new: bool = False) -> StepResult:
        self._same_shapes(micro_batches[0])
        targets = global_targets(micro_batches, self.topology)
        aux_weight = 1.0 / (len(micro_batches) * self.topology.dp_size)
        set_learning_rates(self.optimizer, lr, only_new)
        self.objective.reset()
        # DeepSpeed divides the loss by the micro-batches and averages gradients over replicas; the
        # objective is the sum over both
        self.objective.scale = len(micro_batches) * self.topology.dp_size
        self.engine.train_batch(data_iter=self._batches(micro_batches, targets, aux_weight))
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        tokens = sum(b["input_ids"].numel() for b in micro_batches)
        values = self._from_last_stage(tokens)
        aux = values["aux"] / (len(micro_batches) * self.topology.dp_size) if values["aux"] is not None else None
        if self._bad_step:
            return StepResult(float("nan"), aux, float("nan"), False, values["tokens"], values["counts"])
        return StepResult(values["cross_entropy"], aux, norm, math.isfinite(norm), values["tokens"], values["counts"])

    def _from_last_stage(self, tokens: int) -> dict:
        """The last stage's sums of this step, summed over replicas and sent to every stage."""
        shape = self.module.router_stats_shape()
        size = 3 + (shape[0] * shape[1] if shape else 0)
        flat = torch.zeros(size, dtype=torch.float64, device=self.topology.device)
        if self.engine.is_last_stage():
            flat[0] = self.objective.cross_entropy
            flat[1] = float(tokens)
            if self.objective.aux is not None:
                flat[2] = self.objective.aux
                flat[3:] = self.objective.counts.reshape(-1)
            self.topology.dp_all_reduce(flat)
        dist.broadcast(flat, src=self.last_stage_rank, group=self.engine.grid.get_pipe_parallel_group())
        flat = flat.cpu()
        return {"cross_entropy": float(flat[0]), "tokens": int(flat[1]),
                "aux": float(flat[2]) if shape else None,
                "counts": flat[3:].reshape(shape).float() if shape else None}

    @torch.no_grad()
    def eval_step(self, batch: dict) -> tuple[float, int]:
        self._same_shapes(batch)
        self.objective.reset()
        self.objective.scale = 1.0
        one = torch.ones((), dtype=torch.float32, device=self.topology.device)
        self.engine.eval_batch(iter(self._batches([batch], one, 1.0)), return_logits=False, compute_loss=True,
                               reduce_output=None, bcast_loss=False, num_micro_batches=1)
        self.engine.train()
        from models.loss import count_targets

        values = torch.zeros(1, dtype=torch.float64, device=self.topology.device)
        if self.engine.is_last_stage():
            values[0] = self.objective.cross_entropy
        dist.broadcast(values, src=self.last_stage_rank, group=self.engine.grid.get_pipe_parallel_group())
        return float(values[0]), int(count_targets(batch["shift_labels"]))

    # ------------------------------------------------------------------ checkpoints
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's weights under their Hugging Face names, gathered on rank 0 (others get {})."""
        mine = {}
        if self.topology.dp_rank == 0:
            for item in self.items:
                mine.update({k: v.detach().cpu() for k, v in item.hf_state_dict().items()})
        return _gather_on_rank0(mine, self.topology)

    def save(self, directory: Path) -> None:
        """AdamW state keyed by Hugging Face parameter name, the torch engine's format (fp32 master
        weights too when DeepSpeed keeps them apart from the bf16 model)."""
        _link_optimizer_fragments(self.optimizer)
        state = {name: _optimizer_state(self.optimizer, param) for name, param in self.named_parameters}
        if self.topology.dp_rank != 0:
            state = {}
        merged = _gather_on_rank0(state, self.topology)
        if self.topology.is_main:
            torch.save({"format": "adamw-by-name", "state": merged}, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        if not (directory / "optimizer.pt").is_file():
            raise RuntimeError(
                f"{directory.parent}: no optimizer state by parameter name (optimizer.pt); a checkpoint written by "
                f"DeepSpeed's ZeRO engine cannot seed a pipeline. Start from its weights with "
                f"+model.init_from={directory.parent}")
        saved = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        if saved.get("format") != "adamw-by-name":
            raise RuntimeError(f"{directory / 'optimizer.pt'}: not an optimizer state this trainer wrote")
        state = saved["state"]
        steps = [s["step"] for s in state.values() if "step" in s]
        _link_optimizer_fragments(self.optimizer, max(steps, key=float) if steps else None)
        unknown = sorted(set(state) - {n for n, _ in self.named_parameters}) if self.engine.num_stages == 1 else []
        if unknown:
            raise RuntimeError(f"optimizer state for parameters this model does not have: {unknown[:5]}")
        for name, param in self.named_parameters:
            if name in state:
                _set_optimizer_state(self.optimizer, param, state[name])


def _gather_on_rank0(obj: dict, topology: Topology) -> dict:
    if topology.world_size == 1:
        return obj
    gathered = [None] * topology.world_size if topology.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    if not topology.is_main:
        return {}
    out = {}
    for part in gathered:
        for key, value in part.items():
            out.setdefault(key, value)  # a tied weight comes from the first and the last stage: keep one
    return out


def _link_optimizer_fragments(optimizer, step=None) -> None:
    """Make DeepSpeed's per-parameter views of its flat optimizer state complete. ZeRO-1/2 and the bf16
    optimizer link them once, right after the first step of the first parameter group, so the views of
    the other groups stay empty (DeepSpeed 0.19.8); before any step there is no state at all to view.
    Create what is missing (zero moments at `step`, for loading) and link again."""
    relink = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if relink is None:
        return
    inner = optimizer.optimizer
    for group in inner.param_groups:
        for flat in group["params"]:
            state = inner.state[flat]
            if not state:
                count = step if step is not None else 0.0
                state["step"] = count.clone().float() if torch.is_tensor(count) else torch.tensor(float(count))
                state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    optimizer._hp_optimizer_states_linked = False
    relink()


def _optimizer_state(optimizer, param) -> dict:
    """One parameter's AdamW state (exp_avg, exp_avg_sq, step), assembled from DeepSpeed's partitions
    (collective over the data-parallel group under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "_hp_mapping"):  # ZeRO-1 / bf16: fragments of flat fp32 partitions
        state = {key: safe_get_full_optimizer_state(param, key).cpu() for key in ("exp_avg", "exp_avg_sq")}
        state["step"] = _step_count(optimizer)
        if param.dtype != torch.float32:
            state["fp32_param"] = safe_get_full_fp32_param(param).cpu()
        return state
    inner = getattr(optimizer, "optimizer", optimizer)
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in inner.state.get(param, {}).items()}


def _set_optimizer_state(optimizer, param, state: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "_hp_mapping"):
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                safe_set_full_optimizer_state(param, state[key].to(param.device), key)
        if "fp32_param" in state:
            safe_set_full_fp32_param(param, state["fp32_param"].to(param.device))
        _set_step_count(optimizer, state.get("step"))
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in state.items()}


def _inner_states(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner.state.values()


def _step_count(optimizer):
    for state in _inner_states(optimizer):
        if "step" in state:
            step = state["step"]
            return step.clone().cpu() if torch.is_tensor(step) else step
    return torch.tensor(0.0)


def _set_step_count(optimizer, step) -> None:
    if step is None:
        return
    for state in _inner_states(optimizer):
        if "step" in state:
            state["step"] = step.clone().to(state["step"].device) if torch.is_tensor(state["step"]) else float(step)
