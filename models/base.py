"""What every causal LM here shares: the decoder-layer contract, construction, the LM head and the
objective, tied embeddings, and Hugging Face checkpoint I/O. Architectures subclass `DecoderLayer`
(one block of their maths) and `CausalLM` (which layers, which routers).

The decoder-layer contract is tensors only, so a layer runs the same wherever it is placed (one
process, a pipeline stage, behind activation checkpointing or torch.compile):

    layer(hidden, position_ids, segment_ids=None, router_stats=None)
        -> (hidden, position_ids, segment_ids, router_stats)

The layer rebuilds its rotary tables and attention mask from the position and segment ids
(`models.attention`) and writes its routers' statistics into its rows of `router_stats`
(`models.moe`); the head turns all rows into the aux loss. Layers sit in a ModuleDict keyed by their
global index, and the embedding, final norm and LM head may be absent (a pipeline stage holds some
layers only): a stage's state_dict keys are the full model's keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .attention import VisibilityMask, layer_inputs
from .checkpoint import (
    CheckpointError,
    load_weights_into,
    read_config_json,
    read_weights,
    resolve_model_dir,
    save_model_dir,
)
from .configuration import ModelConfig
from .layers import CausalLMOutput, RMSNorm, RotaryEmbedding, init_normal
from .loss import (
    chunk_loss_and_grad_logits,
    count_targets,
    cross_entropy_sum,
    linear_cross_entropy_sum,
    objective,
    shift_labels_of,
)
from .moe import RouterStats, expert_counts, new_router_stats, record_router_stats

logger = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    """One decoder layer under the tensor-only contract (see the module docstring). Subclasses set
    `num_routers` (routers per layer, 0 for dense) and implement `block`, the layer's maths:

        block(x, rope=(cos, sin), mask=VisibilityMask) -> (x, [RouterStats of each router])
    """

    def __init__(self, layer_index: int, rotary_emb: RotaryEmbedding, sliding_window: int | None = None,
                 num_routers: int = 0):
        super().__init__()
        self.layer_index = layer_index
        # Each layer computes its own cos/sin from the position ids it is given (the frequencies are a
        # non-persistent buffer: nothing of it is in a checkpoint).
        self.rotary_emb = rotary_emb
        self.sliding_window = sliding_window
        self.num_routers = num_routers

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                router_stats: torch.Tensor | None = None):
        rope = self.rotary_emb(position_ids, hidden.dtype)
        mask = VisibilityMask(segment_ids=segment_ids, sliding_window=self.sliding_window)
        hidden, stats = self.block(hidden, rope, mask)
        for j, router in enumerate(stats):
            router_stats = record_router_stats(router_stats, self.layer_index * self.num_routers + j, router)
        return hidden, position_ids, segment_ids, router_stats

    def block(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: VisibilityMask
              ) -> tuple[torch.Tensor, list[RouterStats]]:
        raise NotImplementedError


def embed_inputs(embed_tokens: nn.Embedding, router_shape: tuple[int, int] | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
    """Token embeddings and the other inputs of the first decoder layer (position ids, segment ids, an
    empty router-statistics tensor for MoE models): (hidden, position_ids, segment_ids, router_stats)."""
    position_ids, segment_ids = layer_inputs(input_ids, attention_mask, position_ids)
    hidden = embed_tokens(input_ids)
    router_stats = None if router_shape is None else new_router_stats(*router_shape, device=hidden.device)
    return hidden, position_ids, segment_ids, router_stats


class DecoderModel(nn.Module):
    """The container of transformers' `model.*` keys: embed_tokens, layers (by global index), norm.
    `CausalLM` runs them; any of them may be absent on a pipeline stage."""

    def __init__(self, vocab_size: int, hidden_size: int, pad_token_id: int | None, layers: list[DecoderLayer],
                 norm_eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, pad_token_id)
        self.layers = nn.ModuleDict({str(layer.layer_index): layer for layer in layers})
        self.norm = RMSNorm(hidden_size, eps=norm_eps)


class LMHead(nn.Linear):
    """The LM head. Given targets it returns their summed cross-entropy computed chunk by chunk,
    without the full logits (`models.loss.linear_cross_entropy_sum`); it is called as a module either
    way, so hooks that gather the weight around a module's forward (DeepSpeed ZeRO-3) see the call.
    `chunk_fn` is the per-chunk maths, which `torch.compile` may replace (train/parallelize.py)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.chunk_fn = chunk_loss_and_grad_logits

    def forward(self, hidden: torch.Tensor, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
        if shift_labels is None:
            return super().forward(hidden)
        return linear_cross_entropy_sum(hidden, self.weight, shift_labels, chunk_fn=self.chunk_fn)


class CausalLM(nn.Module):
    """`self.model` (a `DecoderModel`) holds the embedding, the layers and the final norm;
    `self.lm_head` turns hidden states into logits. Key names follow transformers (`model.*`,
    `lm_head.*`). The forward pass is `head(decoder(*embed(...)))`; a pipeline stage calls the pieces
    it holds."""

    config_class: type[ModelConfig] = ModelConfig

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config.vocab_size, config.hidden_size, config.pad_token_id, layers,
                                  norm_eps=config.rms_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()

    # ------------------------------------------------------------------ subclass hooks
    @property
    def aux_loss_coef(self) -> float:
        return 0.0

    def router_stats_shape(self) -> tuple[int, int] | None:
        """(routers in the whole model, experts per router) for MoE architectures, else None."""
        return None

    def aux_loss(self, router_stats: torch.Tensor) -> torch.Tensor | None:
        """The load-balancing loss from all routers' statistics (MoE architectures)."""
        return None

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' init for this architecture. Subclasses add their own extras after this."""
        init_normal(self, self.config.initializer_range or 0.02)

    # ------------------------------------------------------------------ forward, in pieces
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None):
        """The first layer's inputs: (hidden, position_ids, segment_ids, router_stats)."""
        return embed_inputs(self.model.embed_tokens, self.router_stats_shape(), input_ids, attention_mask, position_ids)

    def decoder(self, hidden, position_ids, segment_ids=None, router_stats=None):
        """The layers this module holds, in order of their global index."""
        for layer in self.model.layers.values():
            hidden, position_ids, segment_ids, router_stats = layer(hidden, position_ids, segment_ids, router_stats)
        return hidden, position_ids, segment_ids, router_stats

    def head(self, hidden: torch.Tensor, router_stats: torch.Tensor | None = None,
             shift_labels: torch.Tensor | None = None, num_items_in_batch=None, aux_weight: float = 1.0,
             return_logits: bool | None = None) -> CausalLMOutput:
        """Final norm, logits, and (with labels) the objective of `models.loss`."""
        return self.output(self.model.norm(hidden), router_stats, shift_labels, num_items_in_batch, aux_weight,
                           return_logits)

    def output(self, normed: torch.Tensor, router_stats: torch.Tensor | None = None,
               shift_labels: torch.Tensor | None = None, num_items_in_batch=None, aux_weight: float = 1.0,
               return_logits: bool | None = None) -> CausalLMOutput:
        """The head after the final norm: logits, aux loss, and with labels the objective. With labels
        the cross-entropy is computed without full logits and `logits` is None unless return_logits."""
        if return_logits is None:
            return_logits = shift_labels is None
        logits = self.lm_head(normed) if return_logits else None
        aux = None if router_stats is None else self.aux_loss(router_stats)
        counts = None if router_stats is None else expert_counts(router_stats).detach()
        loss = cross_entropy = None
        if shift_labels is not None:
            if num_items_in_batch is None:
                num_items_in_batch = count_targets(shift_labels)
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(normed.device)
            summed = cross_entropy_sum(logits, shift_labels) if return_logits else self.lm_head(normed, shift_labels)
            cross_entropy = summed / num_items_in_batch
            loss = objective(cross_entropy, aux, self.aux_loss_coef, aux_weight)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux, cross_entropy=cross_entropy,
                              expert_counts=counts)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        aux_weight: float = 1.0,
        return_logits: bool | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, S); labels (B, S) unshifted, -100 = ignore, or shift_labels (B, S) already
        shifted (target of position t); attention_mask (B, S) 1 = real token; position_ids (B or 1, S),
        default 0..S-1 (restarting positions mark packed documents, which then do not attend to each
        other). With labels, `loss` is the objective of `models.loss` (cross-entropy over
        `num_items_in_batch` targets, default this batch's, plus aux_coef · aux_weight · aux_loss).
        `logits` are returned without labels, and with labels only if return_logits=True (the loss is
        then computed chunk by chunk, never holding all logits)."""
        if labels is not None and shift_labels is None:
            shift_labels = shift_labels_of(labels)
        hidden, _, _, router_stats = self.decoder(*self.embed(input_ids, attention_mask, position_ids))
        return self.head(hidden, router_stats, shift_labels, num_items_in_batch, aux_weight, return_logits)

    # ------------------------------------------------------------------ tied embeddings
    def tied_weight_keys(self) -> set[str]:
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def _empty(cls, config: ModelConfig, device=None, dtype=None) -> "CausalLM":
        # Build on the meta device, then allocate once on the target device in the target dtype:
        # no throw-away default init, so a 3B model costs one allocation, not two.
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype=dtype)
        model.to_empty(device=device or "cpu")
        model.tie_weights()  # to_empty gives each module its own tensor; re-share the tied pair
        return model

    @classmethod
    def build(cls, config: ModelConfig, device=None, dtype=None) -> "CausalLM":
        model = cls._empty(config, device, dtype)
        model.init_weights()
        return model

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device=None, dtype=torch.float32, **overrides
    ) -> "CausalLM":
        """Load a Hugging Face model directory (ours, transformers', or a hub id). `overrides` set
        run-time config fields such as `attn_implementation`. `dtype=None` keeps the stored dtype."""
        directory = resolve_model_dir(name_or_path)
        values = read_config_json(directory)
        if values.get("model_type") != cls.config_class.model_type:
            raise_wrong_type(directory, values.get("model_type"), [cls.config_class.model_type])
        config = cls.config_class.from_hf_dict({**values, **overrides})
        state = read_weights(directory)
        if dtype is None:
            floats = [t.dtype for t in state.values() if t.is_floating_point()]
            dtype = floats[0] if floats else torch.float32
        model = cls._empty(config, device, dtype)
        load_weights_into(model, state, directory)
        for module in model.modules():  # non-persistent buffers (rotary tables) are not in the file
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
        return model

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> Path:
        return save_model_dir(self, self.config, directory, max_shard_bytes)

    def active_parameters(self) -> int:
        """Parameters one token's forward pass multiplies by: all but the embedding lookup, the LM head
        included (even when tied). MoE architectures count only the experts a token uses."""
        total = sum(p.numel() for n, p in self.named_parameters() if "embed_tokens" not in n)
        if self.config.tie_word_embeddings:
            total += self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's MFU: 6 per active
        parameter plus 12 · layers · attention width · sequence length for the attention scores."""
        c = self.config
        head_dim = getattr(c, "head_dimension", None) or getattr(c, "head_dim", None) or getattr(c, "kv_channels")
        attention = 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
        return 6 * self.active_parameters() + attention

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def raise_wrong_type(directory: Path, model_type, supported) -> None:
    raise CheckpointError(
        f"{directory / 'config.json'}: model_type {model_type!r} is not supported here; supported: {sorted(supported)}"
    )
