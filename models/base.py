"""What every causal LM here shares: construction, the LM head and loss, tied embeddings, and
Hugging Face checkpoint I/O. Architectures subclass `CausalLM` and supply the decoder stack."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    load_weights_into,
    read_config_json,
    read_weights,
    resolve_model_dir,
    save_model_dir,
)
from .configuration import ModelConfig
from .layers import (
    CausalLMOutput,
    RMSNorm,
    RotaryEmbedding,
    RouterStats,
    VisibilityMask,
    causal_lm_loss,
    init_normal,
    segments_from_positions,
)

logger = logging.getLogger(__name__)


class DecoderModel(nn.Module):
    """embed_tokens -> decoder layers -> norm, with transformers' key names (`model.*`).

    Builds what every layer needs once per forward: the rotary cos/sin tables and the visibility mask.
    Each layer is called as `layer(x, cos, sin, mask, token_mask)` and returns `(x, router_stats)`, a
    (possibly empty) list of `RouterStats` from its routers."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        pad_token_id: int | None,
        layers: list[nn.Module],
        norm_eps: float,
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, pad_token_id)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps=norm_eps)
        self.rotary_emb = rotary_emb
        self.sliding_window = sliding_window

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> tuple[torch.Tensor, list[RouterStats]]:
        x = self.embed_tokens(input_ids)
        segments = None
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        elif attention_mask is None:
            # Packed documents, as transformers treats them without a cache: positions that restart
            # start a new segment, and attention stays within segments.
            segments = segments_from_positions(position_ids.expand(input_ids.shape[0], -1))
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        padding = None if attention_mask is None else attention_mask.bool()
        # One host sync per forward (not per layer): an all-ones mask would otherwise cost every layer
        # the SDPA causal fast path.
        if padding is not None and bool(padding.all()):
            padding = None
        mask = VisibilityMask(key_padding=padding, sliding_window=self.sliding_window, segment_ids=segments)
        stats: list[RouterStats] = []
        for layer in self.layers:
            x, layer_stats = layer(x, cos, sin, mask, attention_mask)
            stats.extend(layer_stats)
        return self.norm(x), stats


class CausalLM(nn.Module):
    """`self.model` (a `DecoderModel`) returns hidden states and router statistics; `self.lm_head`
    turns hidden states into logits. Key names follow transformers (`model.*`, `lm_head.*`)."""

    config_class: type[ModelConfig] = ModelConfig

    def __init__(
        self,
        config: ModelConfig,
        layers: list[nn.Module],
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.model = DecoderModel(
            config.vocab_size, config.hidden_size, config.pad_token_id, layers,
            norm_eps=config.rms_norm_eps, rotary_emb=rotary_emb, sliding_window=sliding_window,
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    # ------------------------------------------------------------------ subclass hooks
    @property
    def aux_loss_coef(self) -> float:
        return 0.0

    def aux_loss(self, stats: list[RouterStats]) -> torch.Tensor | None:
        """The load-balancing loss from all routers' statistics (MoE architectures)."""
        return None

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' init for this architecture. Subclasses add their own extras after this."""
        init_normal(self, self.config.initializer_range or 0.02)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, S); labels (B, S) unshifted, -100 = ignore, or shift_labels (B, S) already
        shifted (target of position t); attention_mask (B, S) 1 = real token; position_ids (B or 1, S),
        default 0..S-1 (restarting positions mark packed documents, which then do not attend to each
        other). `loss` includes `aux_loss_coef * aux_loss` when the model has one."""
        hidden, stats = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        aux_loss = self.aux_loss(stats) if stats else None
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)
            if aux_loss is not None and self.aux_loss_coef:
                loss = loss + self.aux_loss_coef * aux_loss.to(loss.device)
        counts = torch.stack([s.expert_counts for s in stats]).detach() if stats else None
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, expert_counts=counts)

    # ------------------------------------------------------------------ tied embeddings
    def tied_weight_keys(self) -> set[str]:
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
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
