"""JetMoE: a mixture of attention heads (MoA) and a mixture of MLP experts (MoE) in every layer.

    x = x + MoA(RMSNorm(x))
    x = x + MoE(RMSNorm(x))

MoA: keys and values come from one shared projection (`kv_proj`, Hkv heads). Each token picks k of E
attention experts; expert e owns a query projection (D -> Hkv·d) and an output projection back to D.
So each token has k·Hkv query heads (slot-major), all reading the same Hkv key/value heads: query head
h reads kv head h mod Hkv (transformers tiles K/V k times; we group the query heads under their kv head
instead, which computes the same dot products without copying K/V). The k outputs are combined with the
router's gates after their output projections, and one bias is added.

MoE: each token picks k of E SwiGLU experts (fused [gate; up] input projection); outputs are combined
with the gates, and one bias is added.

Routers: top-k of the logits, softmax over those k only. Expert compute groups the (token, slot) pairs
by expert with tensor ops (argsort, counts, cumsum) and runs one grouped GEMM per projection, so the
host does not wait for the device (transformers reads the group sizes back with `.tolist()`), except
where torch's grouped GEMM itself loops over the groups on CUDA (fp32, or GPUs other than sm90/sm100:
see models.moe._grouped_mm_fits).

Matches transformers 5.23's JetMoeForCausalLM (config.json, key names, logits, cross-entropy). One
deliberate difference: transformers lists the MoA router twice in `router_logits`, so its aux loss
counts that router double; ours counts every router once (tests/models/test_jetmoe.py shows both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .attention import VisibilityMask, attention, split_heads
from .base import CausalLM, DecoderLayer
from .configuration import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, activation, apply_rope_half
from .moe import (
    ExpertDispatch,
    ExpertDispatcher,
    Experts,
    TopKRouter,
    dispatch_dtype,
    load_balancing_loss,
    softmax_router_stats,
)

# transformers builds the two per-layer norms without passing eps, so they always use 1e-6;
# only the final norm reads rms_norm_eps.
LAYER_NORM_EPS = 1e-6


@dataclass
class JetMoeConfig(ModelConfig):
    model_type = "jetmoe"
    architecture = "JetMoeForCausalLM"
    runtime_fields = ("attn_implementation",)

    # transformers' JetMoeConfig fields and defaults (5.23)
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    use_cache: bool = True
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.01
    attention_dropout: float = 0.0
    # Run-time only (not written): attention kernel.
    attn_implementation: str = "sdpa"

    @classmethod
    def from_hf_dict(cls, values: dict) -> "JetMoeConfig":
        values = dict(values)
        values.pop("num_attention_heads", None)  # derived, see num_attention_heads
        if "head_dim" in values:  # transformers' alias of kv_channels
            values.setdefault("kv_channels", values.pop("head_dim"))
        return super().from_hf_dict(values)

    def validate(self) -> None:
        self.require(
            1 <= self.num_experts_per_tok <= self.num_local_experts,
            f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts={self.num_local_experts}]",
        )

    @property
    def num_attention_heads(self) -> int:
        """Query heads per token: Hkv per selected attention expert (transformers derives it the same way)."""
        return self.num_key_value_heads * self.num_experts_per_tok

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        out = super().to_hf_dict(dtype)
        out["num_attention_heads"] = self.num_attention_heads
        return out


# ---------------------------------------------------------------------------------------------------
# Mixture of attention heads


class MixtureOfAttentionExperts(nn.Module):
    """The per-expert query and output projections of the MoA (key names `self_attention.experts.*`)."""

    def __init__(self, config: JetMoeConfig):
        super().__init__()
        D, A, E = config.hidden_size, config.kv_channels * config.num_key_value_heads, config.num_local_experts
        self.num_experts = E
        self.router = TopKRouter(D, E, config.num_experts_per_tok)
        self.input_linear = Experts(E, D, A)
        self.output_linear = Experts(E, A, D)
        self.bias = nn.Parameter(torch.zeros(D))
        self.dispatcher = ExpertDispatcher()


class JetMoeAttention(nn.Module):
    def __init__(self, config: JetMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.scale = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.backend = config.attn_implementation
        self.experts = MixtureOfAttentionExperts(config)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.kv_channels * config.num_key_value_heads, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: VisibilityMask):
        B, L, D = x.shape
        cos, sin = rope
        k_slots, Hkv, hd = self.top_k, self.num_kv_heads, self.head_dim
        h = x.reshape(B * L, D)
        gates, chosen, logits = self.experts.router(h)
        plan = ExpertDispatch.plan(chosen, self.experts.num_experts)

        # Queries: one projection per (token, selected expert), back in (token, slot) order.
        q_sorted = self.experts.dispatcher(dispatch_dtype(h[plan.token]), plan, self.experts.input_linear)
        q = torch.empty_like(q_sorted).index_copy_(0, plan.order, q_sorted)  # (B*L*k, Hkv*hd)
        # (B, L, k, Hkv, hd) -> heads grouped under their kv head: (B, Hkv*k, L, hd)
        q = q.view(B, L, k_slots, Hkv, hd).permute(0, 3, 2, 1, 4).reshape(B, Hkv * k_slots, L, hd)
        key, value = self.kv_proj(x).chunk(2, dim=-1)
        key, value = split_heads(key, hd), split_heads(value, hd)
        q, key = apply_rope_half(q, cos, sin), apply_rope_half(key, cos, sin)
        out = attention(
            q, key, value, mask=mask, scale=self.scale,
            dropout_p=self.attention_dropout if self.training else 0.0, backend=self.backend,
        )  # (B, L, Hkv*k, hd)
        out = out.view(B, L, Hkv, k_slots, hd).transpose(2, 3).reshape(B * L * k_slots, Hkv * hd)

        # Output projections of the selected experts, gated, summed per token, one bias.
        y = self.experts.dispatcher(dispatch_dtype(out[plan.order]), plan, self.experts.output_linear)
        y = y * gates.reshape(-1)[plan.order, None]
        y = y.new_zeros(B * L, D).index_add_(0, plan.token, y)
        y = y.view(B, L, D) + self.experts.bias
        return y, softmax_router_stats(logits, chosen, mask.token_mask)


# ---------------------------------------------------------------------------------------------------
# Mixture of MLP experts


class JetMoeMoE(nn.Module):
    def __init__(self, config: JetMoeConfig):
        super().__init__()
        D, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.num_experts = E
        self.act = activation(config.activation_function)
        self.router = TopKRouter(D, E, config.num_experts_per_tok)
        self.input_linear = Experts(E, D, 2 * I)  # [gate; up]
        self.output_linear = Experts(E, I, D)
        self.bias = nn.Parameter(torch.zeros(D))
        self.dispatcher = ExpertDispatcher()

    def expert_mlp(self, rows: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        """The SwiGLU experts on rows sorted by expert."""
        gate, up = self.input_linear(rows, group_end).chunk(2, dim=-1)
        return self.output_linear(self.act(gate) * up, group_end)

    def forward(self, x: torch.Tensor, token_mask=None):
        B, L, D = x.shape
        h = x.reshape(B * L, D)
        gates, chosen, logits = self.router(h)
        plan = ExpertDispatch.plan(chosen, self.num_experts)
        y = self.dispatcher(dispatch_dtype(h[plan.token]), plan, self.expert_mlp) * gates.reshape(-1)[plan.order, None]
        y = y.new_zeros(B * L, D).index_add_(0, plan.token, y)
        return y.view(B, L, D) + self.bias, softmax_router_stats(logits, chosen, token_mask)


# ---------------------------------------------------------------------------------------------------
# Decoder


class JetMoeDecoderLayer(DecoderLayer):
    def __init__(self, config: JetMoeConfig, layer_index: int):
        # two routers per layer: the attention experts' (MoA) and the MLP experts' (MoE)
        super().__init__(
            layer_index,
            RotaryEmbedding(config.rope_parameters, config.kv_channels, config.max_position_embeddings),
            num_routers=2,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, LAYER_NORM_EPS)
        self.self_attention = JetMoeAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, LAYER_NORM_EPS)
        self.mlp = JetMoeMoE(config)

    def block(self, x, rope, mask: VisibilityMask):
        a, attention_stats = self.self_attention(self.input_layernorm(x), rope, mask)
        x = x + a
        y, mlp_stats = self.mlp(self.post_attention_layernorm(x), mask.token_mask)
        return x + y, [attention_stats, mlp_stats]


class JetMoeForCausalLM(CausalLM):
    config_class = JetMoeConfig

    def __init__(self, config: JetMoeConfig):
        super().__init__(config, layers=[JetMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

    @property
    def aux_loss_coef(self) -> float:
        return self.config.aux_loss_coef

    def active_parameters(self) -> int:
        total = super().active_parameters()
        experts = sum(m.weight.numel() for m in self.modules() if isinstance(m, Experts))
        c = self.config
        return total - experts + experts * c.num_experts_per_tok // c.num_local_experts

    def router_stats_shape(self):
        return 2 * self.config.num_hidden_layers, self.config.num_local_experts

    def aux_loss(self, router_stats):
        # Every router (MoA and MoE of each layer) once; f_e sums to k, as in transformers' JetMoe loss.
        return load_balancing_loss(router_stats, picks_per_token=1)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()  # includes expert weights ~ N(0, initializer_range)
        for layer in self.model.layers.values():
            layer.self_attention.experts.bias.zero_()
            layer.mlp.bias.zero_()
