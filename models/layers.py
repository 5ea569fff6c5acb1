"""Layers shared by every architecture: activations, norm, rotary embeddings, the gated MLPs, the
model output and weight init. The attention core is in `models.attention`, the MoE pieces in
`models.moe`, the objective in `models.loss`.

Model files call these by name, so a model file reads like its paper and a numerical fix lands in one
place. Everything here follows transformers 5.23 to the bit where that matters for checkpoint parity
(tests/models check it against transformers itself); where we deliberately differ, the comment says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts

# ---------------------------------------------------------------------------------------------------
# Activations (the names transformers' ACT2FN uses in config.json)

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------------
# RMSNorm


class RMSNorm(nn.Module):
    """y = w * cast(x32 / rms(x32)). The cast back to the input dtype comes *before* the weight
    multiply (as in transformers; it matters for bit-exact bf16). No (1 + w) offset."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def validate_rope_parameters(rope: dict) -> None:
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported; choose one of {ROPE_TYPES}")
    missing = [k for k in _ROPE_REQUIRED[rope_type] if rope.get(k) is None]
    if missing:
        raise ValueError(f"rope_parameters for rope_type={rope_type!r} need {missing}; got {sorted(rope)}")


def _base_inv_freq(base, dim: int, device=None) -> torch.Tensor:
    # transformers' expression, with the arange made on `device` (not made on the host and copied: a
    # host-to-device copy waits for the device, and dynamic RoPE calls this in every layer's forward)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_frequencies(rope: dict, rotary_dim: int, max_position_embeddings: int, device=None):
    """Static inverse frequencies and the cos/sin scale for a rope type, computed as transformers 5.23's
    ROPE_INIT_FUNCTIONS do (same expressions, so the same fp32 bits). `dynamic` is recomputed per
    forward from the sequence length (see `RotaryEmbedding`)."""
    rope_type = rope.get("rope_type", "default")
    base = rope["rope_theta"]
    dim = rotary_dim
    if rope_type in ("default", "dynamic"):
        # dynamic at init (seq_len = max_position_embeddings) is exactly the default frequencies
        return _base_inv_freq(base, dim, device), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim, device) / rope["factor"], 1.0
    if rope_type == "llama3":
        inv_freq = _base_inv_freq(base, dim, device)
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        factor = rope["factor"]
        original = rope.get("original_max_position_embeddings") or max_position_embeddings
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

        def get_mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = rope.get("beta_fast") or 32
        beta_slow = rope.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extrapolation_factor = 1 - ramp
        inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
        return inv_freq, attention_factor
    raise ValueError(f"rope_type {rope_type!r} is not supported; choose one of {ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, as `cat(freqs, freqs)` over `rotary_dim`.

    `dynamic` (NTK) recomputes the base from max(position_ids)+1 on every call. transformers does the
    same but caches the largest length seen so far and keeps using it until a short sequence resets it,
    so its frequencies depend on call history; ours depend only on the current input (the two agree on
    any single forward of a fresh model)."""

    def __init__(self, rope: dict, rotary_dim: int, max_position_embeddings: int):
        super().__init__()
        validate_rope_parameters(rope)
        self.rope = dict(rope)
        self.rope_type = rope.get("rope_type", "default")
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Non-persistent buffer: recomputed after meta-device construction (`to_empty`) or loading.
        if self.inv_freq.is_meta:
            # nothing to compute on the meta device (and running the maths there costs torch's meta
            # kernels a ~3 s first import); the real tables come once the model has a device
            self.attention_scaling = 1.0
            return
        inv_freq, self.attention_scaling = rope_frequencies(
            self.rope, self.rotary_dim, self.max_position_embeddings, device=self.inv_freq.device
        )
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)

    def _apply(self, fn, recurse=True):
        # Frequencies stay fp32 whatever dtype the model is cast to (transformers keeps them fp32 too);
        # device moves still apply.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = torch.empty(self.inv_freq.shape, dtype=torch.float32, device=self.inv_freq.device)
            self.reset_parameters()
        return self

    def _dynamic_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        seq_len = torch.max(position_ids) + 1
        max_pos = self.max_position_embeddings
        factor, dim = self.rope["factor"], self.rotary_dim
        grown = seq_len.clamp(min=max_pos)  # max(seq_len, max_pos) on the device: no host sync
        base = self.rope["rope_theta"] * ((factor * grown / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        scaled = _base_inv_freq(base, dim, position_ids.device)
        return torch.where(seq_len > max_pos, scaled, self.inv_freq.float())

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = self._dynamic_inv_freq(position_ids) if self.rope_type == "dynamic" else self.inv_freq.float()
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation of (B, heads, S, d): frequency i turns the pair (i, i + d/2).
    cos/sin are (B or 1, S, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM-style partial rotation of (B, heads, S, d): frequency i turns the adjacent pair (2i, 2i+1)
    of the first rd dims (rd = cos.shape[-1]); the rest pass through. cos/sin are the `cat(freqs,
    freqs)` tables of `RotaryEmbedding(rotary_dim=rd)`. Same operations as transformers' Glm4, so the
    same bits."""
    cos = cos.unsqueeze(1)[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin.unsqueeze(1)[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


# ---------------------------------------------------------------------------------------------------
# MLP


class GatedMLP(nn.Module):
    """SwiGLU-style MLP: down(act(gate(x)) * up(x)), with transformers' key names."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """The same MLP with gate and up in one matrix, `gate_up_proj` = [gate; up] (GLM-4's layout)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


# ---------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # the training objective (see models.loss), when labels are given
    aux_loss: torch.Tensor | None = None  # the load-balancing loss (MoE models), unweighted
    cross_entropy: torch.Tensor | None = None  # the cross-entropy term of `loss`
    expert_counts: torch.Tensor | None = None  # (routers, experts) picks per expert, MoE models only


# ---------------------------------------------------------------------------------------------------
# Init


@torch.no_grad()
def init_normal(module: nn.Module, std: float) -> None:
    """transformers' base init: Linear, Embedding and expert weights ~ N(0, std) (plain, not
    truncated), biases 0, the padding row 0; norms to 1; rotary tables recomputed. Embeddings go last so that a
    tied lm_head (a Linear sharing the embedding's weight) cannot overwrite the zeroed padding row."""
    modules = list(module.modules())
    for m in modules:
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, Experts):  # expert weights: (E, out, in), one normal draw
            m.weight.normal_(0.0, std)
        elif isinstance(m, (RMSNorm, RotaryEmbedding)):
            m.reset_parameters()
    for m in modules:
        if isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
