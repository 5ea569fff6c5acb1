"""GLM-4 (the GLM-4-0414 family): a pre-norm GQA transformer with "sandwich" norms.

Per decoder layer, each sub-block's output is normalised again before it joins the residual stream:
    x = x + RMSNorm_post_self_attn( Attn( RMSNorm_input(x) ) )
    x = x + RMSNorm_post_mlp( MLP( RMSNorm_post_attention(x) ) )

Attention has q/k/v biases (o_proj none) and rotates only part of each head: the first
`head_dim * partial_rotary_factor` dims (half by default), in adjacent pairs (2i, 2i+1) rather than
NeoX halves. The MLP is SwiGLU with gate and up fused in one matrix.

Matches transformers 5.23's Glm4ForCausalLM (config.json, key names, logits; tests/models/test_glm4.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .attention import VisibilityMask, attention, split_heads
from .base import CausalLM, DecoderLayer
from .configuration import ModelConfig
from .layers import FusedGatedMLP, RMSNorm, RotaryEmbedding, apply_rope_interleaved

logger = logging.getLogger(__name__)

GLM4_PAD_TOKEN_ID = 151329


@dataclass
class Glm4Config(ModelConfig):
    model_type = "glm4"
    architecture = "Glm4ForCausalLM"
    runtime_fields = ("attn_implementation",)

    # transformers' Glm4Config fields and defaults (5.23)
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1.5625e-7
    use_cache: bool = True
    tie_word_embeddings: bool = False
    # transformers' Glm4Config adds partial_rotary_factor 0.5 to configs that do not say (back-compat)
    rope_parameters: dict = field(default_factory=dict)
    pad_token_id: Optional[int] = GLM4_PAD_TOKEN_ID
    eos_token_id: Any = field(default_factory=lambda: [151329, 151336, 151338])
    bos_token_id: Optional[int] = None
    attention_bias: bool = True
    # Run-time only (not written): attention kernel.
    attn_implementation: str = "sdpa"

    rope_defaults = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}

    def validate(self) -> None:
        factor = self.rope_parameters["partial_rotary_factor"]
        rotary = int(self.head_dim * factor)
        self.require(
            rotary % 2 == 0 and 0 < rotary <= self.head_dim,
            f"head_dim * partial_rotary_factor = {self.head_dim} * {factor} must give an even number of rotary "
            f"dims in (0, head_dim]",
        )
        self.require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} must be a multiple of num_key_value_heads="
            f"{self.num_key_value_heads}",
        )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            self.require(
                self.pad_token_id == GLM4_PAD_TOKEN_ID,
                f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size}); set it "
                f"to a token id below {self.vocab_size} or to null",
            )
            # The GLM-4 default pad id only exists in GLM-4's 151552-token vocabulary. transformers
            # asserts on smaller vocabularies; a smaller model simply has no padding row.
            logger.info("glm4: vocab_size=%d has no token %d; pad_token_id set to None", self.vocab_size, self.pad_token_id)
            self.pad_token_id = None
            if self.eos_token_id == [151329, 151336, 151338]:
                self.eos_token_id = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters["partial_rotary_factor"])


class Glm4Attention(nn.Module):
    def __init__(self, config: Glm4Config):
        super().__init__()
        H, Hkv, hd, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.head_dim = hd
        self.scale = hd**-0.5
        self.attention_dropout = config.attention_dropout
        self.backend = config.attn_implementation
        self.q_proj = nn.Linear(D, H * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: VisibilityMask) -> torch.Tensor:
        B, L, _ = x.shape
        cos, sin = rope
        q = apply_rope_interleaved(split_heads(self.q_proj(x), self.head_dim), cos, sin)
        k = apply_rope_interleaved(split_heads(self.k_proj(x), self.head_dim), cos, sin)
        v = split_heads(self.v_proj(x), self.head_dim)
        out = attention(
            q, k, v, mask=mask, scale=self.scale,
            dropout_p=self.attention_dropout if self.training else 0.0, backend=self.backend,
        )
        return self.o_proj(out.reshape(B, L, -1))


class Glm4DecoderLayer(DecoderLayer):
    def __init__(self, config: Glm4Config, layer_index: int):
        super().__init__(
            layer_index, RotaryEmbedding(config.rope_parameters, config.rotary_dim, config.max_position_embeddings)
        )
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Glm4Attention(config)
        self.mlp = FusedGatedMLP(D, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_self_attn_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.post_mlp_layernorm = RMSNorm(D, eps)

    def block(self, x, rope, mask: VisibilityMask):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), rope, mask))
        x = x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))
        return x, []


class Glm4ForCausalLM(CausalLM):
    config_class = Glm4Config

    def __init__(self, config: Glm4Config):
        super().__init__(config, layers=[Glm4DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
