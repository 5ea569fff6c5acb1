"""Doge: Dynamic Mask Attention (DMA) and Cross Domain Mixture of Experts (CDMoE).

Per decoder layer, with learnable per-channel scales on the residual stream:
    x = input_residual ⊙ x + DMA(RMSNorm(x))
    x = post_attention_residual ⊙ x + MLP_or_CDMoE(RMSNorm(x))

DMA is grouped-query attention with q/k RMSNorm and RoPE, plus a learned bias on every key computed
from that key's value vector, bias_j = exp(A · softplus(dt_proj(v_j))). When there are more keys than
`keep_window_size`, each query keeps only the W visible keys with the largest bias.

CDMoE is the dense SwiGLU MLP (the shared expert) plus many rank-1 experts: expert e reads
<down_embed[e], h> and writes along up_embed[e]. Experts are found by product-key retrieval: the router
scores K sub-keys twice (K = √E), and expert a·K + b scores s_x[a] + s_y[b].

Matches transformers 5.23's DogeForCausalLM (config.json, key names, logits), with two deliberate
improvements (docs/models.md, "Where we differ from transformers, on purpose"):
  * `router_layout="per_token"` (our default) splits each token's own router logits into its two
    halves. transformers reshapes the whole batch's logits with `view(2, N, K)`, so token i is routed with
    other tokens' logits (future tokens, other batch rows): not causal. `router_layout="transformers"`
    reproduces that, for checkpoints trained with it (config.json files without the field).
  * The top-k over the K² sums only needs the pairs of sorted ranks with (i + 1)(j + 1) ≤ k: ~k·ln k
    candidates, not K².
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import VisibilityMask, attention, split_heads
from .base import CausalLM, DecoderLayer
from .configuration import ModelConfig
from .layers import GatedMLP, RMSNorm, RotaryEmbedding, activation, apply_rope_half
from .moe import RankOneExperts, RouterStats, count_picks, dispatch_dtype, load_balancing_loss

ROUTER_LAYOUTS = ("per_token", "transformers")


@dataclass
class DogeConfig(ModelConfig):
    model_type = "doge"
    architecture = "DogeForCausalLM"
    runtime_fields = ("attn_implementation",)

    # transformers' DogeConfig fields and defaults (5.23)
    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    hidden_dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    keep_window_size: int = 2048
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    # Not a declared transformers field, but honoured by it when present in config.json.
    head_dim: Optional[int] = None
    # Ours: see the module docstring. Written to config.json (transformers ignores it).
    router_layout: str = "per_token"
    # Run-time only (not written): attention kernel.
    attn_implementation: str = "sdpa"

    @classmethod
    def hf_defaults_for_missing(cls, values: dict) -> dict:
        # A config.json without the field was trained with transformers' routing.
        return {} if "router_layout" in values else {"router_layout": "transformers"}

    def validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.require(
            self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
            f"change one of them or set head_dim",
        )
        self.require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} must be a multiple of num_key_value_heads="
            f"{self.num_key_value_heads}",
        )
        self.require(self.router_layout in ROUTER_LAYOUTS, f"router_layout={self.router_layout!r}; choose one of {ROUTER_LAYOUTS}")
        self.require(self.keep_window_size >= 1, f"keep_window_size={self.keep_window_size} must be >= 1")
        if self.is_moe:
            keys = math.isqrt(self.num_experts)
            self.require(
                keys * keys == self.num_experts,
                f"num_experts={self.num_experts} must be a perfect square for product-key routing "
                f"(e.g. {keys * keys} or {(keys + 1) ** 2})",
            )
            self.require(
                1 <= self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]",
            )

    @property
    def head_dimension(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        # For a MoE, output_router_logits stays as configured (false by default): the exported model is
        # ready for inference (transformers' batched generate() with padding fails in its load-balancing
        # loss otherwise); pass output_router_logits=True to transformers to get the aux loss.
        out = super().to_hf_dict(dtype)
        if out["head_dim"] is None:
            del out["head_dim"]  # transformers reads a present head_dim even when null
        return out

    def to_json_string(self, dtype: str | None = None) -> str:
        # The warning belongs to writing config.json (an export transformers will load), not to
        # to_hf_dict, which also serves comparisons (the trainer's on resume) where nothing is exported.
        if self.is_moe and self.router_layout == "per_token":
            warnings.warn(
                "exporting a Doge MoE with router_layout='per_token': transformers routes with its own "
                "view(2, N, K) layout and will compute different logits from these weights",
                stacklevel=2,
            )
        return super().to_json_string(dtype)


# ---------------------------------------------------------------------------------------------------
# Dynamic Mask Attention


class DynamicMaskAttention(nn.Module):
    def __init__(self, config: DogeConfig):
        super().__init__()
        H, Hkv, hd, D = config.num_attention_heads, config.num_key_value_heads, config.head_dimension, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, hd
        self.scale = hd**-0.5
        self.keep_window_size = config.keep_window_size
        self.attention_dropout = config.attention_dropout
        self.backend = config.attn_implementation
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * hd, bias=bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=bias)
        self.A = nn.Parameter(torch.zeros(Hkv))
        self.dt_proj = nn.Linear(Hkv * hd, Hkv, bias=bias)
        self.o_proj = nn.Linear(H * hd, D, bias=bias)
        self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: VisibilityMask) -> torch.Tensor:
        B, L, _ = x.shape
        cos, sin = rope
        # q/k RMSNorm per head (over head_dim), before RoPE
        q = self.q_norm(split_heads(self.q_proj(x), self.head_dim))
        k = self.k_norm(split_heads(self.k_proj(x), self.head_dim))
        v = split_heads(self.v_proj(x), self.head_dim)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)

        # The dynamic mask: one bias per key and kv head, from that key's values (all kv heads of the
        # token, concatenated head-major). At init A = 0, so the bias is a constant 1.
        dt = self.dt_proj(v.transpose(1, 2).reshape(B, v.shape[2], -1))  # (B, S, Hkv)
        key_bias = torch.exp(self.A * F.softplus(dt)).transpose(1, 2)  # (B, Hkv, S)
        key_keep = self.keep_top_window(key_bias, mask, L)

        out = attention(
            q, k, v, mask=mask, scale=self.scale, key_bias=key_bias, key_keep=key_keep,
            dropout_p=self.attention_dropout if self.training else 0.0, backend=self.backend,
        )
        return self.o_proj(out.reshape(B, L, -1))

    def keep_top_window(self, key_bias: torch.Tensor, mask: VisibilityMask, q_len: int) -> torch.Tensor | None:
        """With more than W keys, each query keeps the W visible keys with the largest bias.
        Returns (B, Hkv, L, S) bool, or None when every key fits in the window (no sparsity)."""
        S = key_bias.shape[-1]
        if S <= self.keep_window_size:
            return None
        visible = mask.dense(q_len, S, key_bias.device)  # (B|1, 1, L, S)
        candidates = torch.where(visible, key_bias[:, :, None, :], torch.finfo(key_bias.dtype).min)
        top = torch.topk(candidates, self.keep_window_size, dim=-1, largest=True, sorted=False).indices
        return torch.zeros_like(candidates, dtype=torch.bool).scatter(-1, top, True)


# ---------------------------------------------------------------------------------------------------
# Cross Domain Mixture of Experts


def product_key_topk(scores_x: torch.Tensor, scores_y: torch.Tensor, k: int):
    """Top-k of s_x[a] + s_y[b] over all K² pairs, returning (scores, expert ids a·K + b), sorted.

    With both halves sorted (ranks i and j), the pair (i, j) is beaten by every pair (i' ≤ i, j' ≤ j):
    (i + 1)(j + 1) − 1 others. So only pairs with (i + 1)(j + 1) ≤ k can be in the top k, about
    k·ln k of them (303 for k = 64, instead of K² = 16384 or the k² = 4096 of the top-k of each half).
    Same experts as the full enumeration (up to ties)."""
    num_keys = scores_x.shape[-1]
    kk = min(k, num_keys)
    top_x, idx_x = scores_x.topk(kk, dim=-1)  # sorted, best first
    top_y, idx_y = scores_y.topk(kk, dim=-1)
    candidates, experts = [], []
    for first, last, width in _dominance_blocks(kk, k):  # ranks first..last-1 of x, each with the top `width` of y
        candidates.append((top_x[:, first:last, None] + top_y[:, None, :width]).flatten(1))
        experts.append((idx_x[:, first:last, None] * num_keys + idx_y[:, None, :width]).flatten(1))
    scores, position = torch.cat(candidates, 1).topk(k, dim=-1)
    return scores, torch.cat(experts, 1).gather(-1, position)


def _dominance_blocks(kk: int, k: int) -> list[tuple[int, int, int]]:
    """Runs of x-ranks i that pair with the same number min(kk, k // (i + 1)) of y-ranks: static
    slices (no index tensors, nothing data-dependent), about 2·√k of them."""
    blocks: list[list[int]] = []
    for i in range(kk):
        width = min(kk, k // (i + 1))
        if blocks and blocks[-1][2] == width:
            blocks[-1][1] = i + 1
        else:
            blocks.append([i, i + 1, width])
    return [tuple(b) for b in blocks]


class CrossDomainMoE(GatedMLP):
    """The dense MLP's weights are the shared expert (same key names), so a dense checkpoint's MLP
    carries over unchanged when a model is upcycled."""

    def __init__(self, config: DogeConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.num_experts = config.num_experts
        self.num_keys = math.isqrt(config.num_experts)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router_layout = config.router_layout
        self.router_gate = nn.Linear(config.hidden_size, 2 * self.num_keys, bias=False)
        self.down_embed = nn.Embedding(config.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(config.num_experts, config.hidden_size)
        self.experts = RankOneExperts(activation(config.hidden_act))

    def router_scores(self, h: torch.Tensor):
        """Sub-key scores (s_x, s_y), each (N, K), for h of shape (N, D)."""
        logits = self.router_gate(h)  # (N, 2K)
        if self.router_layout == "per_token":
            return logits[:, : self.num_keys], logits[:, self.num_keys :]
        # transformers: view(2, N, K) of the row-major (N, 2K) block (mixes tokens; see module docstring)
        mixed = logits.reshape(2, h.shape[0], self.num_keys)
        return mixed[0], mixed[1]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        B, S, D = x.shape
        h = x.reshape(B * S, D)
        scores_x, scores_y = self.router_scores(h)
        scores, experts = product_key_topk(scores_x, scores_y, self.top_k)
        weights = torch.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # Rank-1 experts: gate_e = act(<down_embed[e], h>) * w_e, output Σ_e gate_e · up_embed[e].
        # h in the autocast dtype (see models.moe.dispatch_dtype): expert parallelism all-gathers it
        routed = self.experts(dispatch_dtype(h), experts, weights, self.down_embed.weight, self.up_embed.weight)
        out = super().forward(x) + routed.view(B, S, D).to(x.dtype)
        return out, self.router_stats(scores_x, scores_y, experts, token_mask)

    def router_stats(self, scores_x, scores_y, experts, token_mask) -> RouterStats:
        # The softmax over all K² sums s_x[a] + s_y[b] factorises: P(a·K+b) = softmax(s_x)[a]·softmax(s_y)[b],
        # so summing it over tokens is a (K, N) @ (N, K) product instead of an (N, K²) tensor.
        px = torch.softmax(scores_x.float(), dim=-1)
        py = torch.softmax(scores_y.float(), dim=-1)
        if token_mask is not None:
            px = px * token_mask.reshape(-1, 1).to(px)
        counts, num_tokens = count_picks(experts, self.num_experts, token_mask)
        return RouterStats(counts, (px.transpose(0, 1) @ py).reshape(-1), num_tokens)


# ---------------------------------------------------------------------------------------------------
# Decoder


class DogeDecoderLayer(DecoderLayer):
    def __init__(self, config: DogeConfig, layer_index: int):
        super().__init__(
            layer_index,
            RotaryEmbedding(config.rope_parameters, config.head_dimension, config.max_position_embeddings),
            sliding_window=config.sliding_window,
            num_routers=1 if config.is_moe else 0,
        )
        D = config.hidden_size
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(D, eps=config.rms_norm_eps)
        self.self_attn = DynamicMaskAttention(config)
        self.input_residual = nn.Parameter(torch.ones(D))
        self.post_attention_layernorm = RMSNorm(D, eps=config.rms_norm_eps)
        if config.is_moe:
            self.mlp = CrossDomainMoE(config)
        else:
            self.mlp = GatedMLP(D, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.post_attention_residual = nn.Parameter(torch.ones(D))

    def block(self, x, rope, mask: VisibilityMask):
        a = self.self_attn(self.input_layernorm(x), rope, mask)
        x = self.input_residual * x + F.dropout(a, self.hidden_dropout, self.training)
        h = self.post_attention_layernorm(x)
        stats = []
        if isinstance(self.mlp, CrossDomainMoE):
            y, router = self.mlp(h, mask.token_mask)
            stats.append(router)
        else:
            y = self.mlp(h)
        x = self.post_attention_residual * x + F.dropout(y, self.hidden_dropout, self.training)
        return x, stats


class DogeForCausalLM(CausalLM):
    config_class = DogeConfig

    def __init__(self, config: DogeConfig):
        super().__init__(config, layers=[DogeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

    @property
    def aux_loss_coef(self) -> float:
        return self.config.router_aux_loss_coef

    def active_parameters(self) -> int:
        total = super().active_parameters()
        if self.config.is_moe:  # a token reads k rows of each expert table, not all E
            c = self.config
            total -= c.num_hidden_layers * 2 * (c.num_experts - c.num_experts_per_tok) * c.hidden_size
        return total

    def router_stats_shape(self):
        return (self.config.num_hidden_layers, self.config.num_experts) if self.config.is_moe else None

    def aux_loss(self, router_stats):
        # transformers 5.23: f_e is the share of all (layer, token, slot) picks, so it sums to 1
        return load_balancing_loss(router_stats, self.config.num_experts_per_tok)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        for layer in self.model.layers.values():
            layer.self_attn.A.zero_()
            layer.input_residual.fill_(1.0)
            layer.post_attention_residual.fill_(1.0)
