"""Layers shared by every architecture: norm, rotary embeddings, the attention core, the gated MLP,
the causal-LM loss and weight init.

Model files call these by name, so a model file reads like its paper and a numerical fix lands in one
place. Everything here follows transformers 5.23 to the bit where that matters for checkpoint parity
(see ../shared/spec/models.md §0); where we deliberately differ, the comment says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


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
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
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
        grown = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
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


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, heads * d) -> (B, heads, S, d)."""
    B, S, _ = x.shape
    return x.view(B, S, -1, head_dim).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# Attention


@dataclass
class VisibilityMask:
    """Which keys each query may see, kept in factored form so that backends need not build a
    [B, H, L, S] tensor: causal (always), optional key padding, optional sliding window.

    key_padding: (B, S) bool, True for real tokens (the usual 2-D `attention_mask`).
    sliding_window: a query sees at most this many most-recent keys, itself included.
    segment_ids: (B, S) int, packed documents: a query sees only keys of its own segment."""

    key_padding: torch.Tensor | None = None
    sliding_window: int | None = None
    segment_ids: torch.Tensor | None = None

    def is_plain_causal(self, q_len: int, kv_len: int) -> bool:
        return (
            self.key_padding is None
            and self.segment_ids is None
            and q_len == kv_len
            and (self.sliding_window is None or self.sliding_window >= kv_len)
        )

    def dense(self, q_len: int, kv_len: int, device) -> torch.Tensor:
        """(B or 1, 1, L, S) bool, True where key j is visible from query i."""
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        visible = k_pos <= q_pos
        if self.sliding_window is not None:
            visible = visible & (k_pos > q_pos - self.sliding_window)
        visible = visible[None, None]
        if self.key_padding is not None:
            visible = visible & self.key_padding[:, None, None, :kv_len].bool()
        if self.segment_ids is not None:
            seg = self.segment_ids
            visible = visible & (seg[:, None, kv_len - q_len :, None] == seg[:, None, None, :kv_len])
        return visible


def segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed documents: a new segment starts wherever the position does not continue by one (as
    transformers detects packed sequences). (B, S) -> (B, S) segment index."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).long()
    return torch.cumsum(starts, dim=1)


ATTENTION_BACKENDS = ("eager", "sdpa")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: VisibilityMask,
    scale: float,
    key_bias: torch.Tensor | None = None,
    key_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "sdpa",
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias + mask) · v with grouped-query attention.

    q: (B, H, L, d); k, v: (B, Hkv, S, d) with H a multiple of Hkv; query head h reads kv head
    h // (H / Hkv). Optional additive terms:
      key_bias (B, Hkv, S): a learned per-key logit bias (Doge's dynamic mask), added to visible keys;
      key_keep (B, Hkv, L, S) bool: a per-query key selection (Doge's top-k window), ANDed with `mask`.
    Masked entries get finfo.min added (not -inf), as transformers does, so a query row with no
    visible key (left padding) averages uniformly instead of producing NaN.
    Returns (B, L, H, d).

    New kernels (flex attention, flash-sparse-attn) plug in here as another `backend`, with the
    same arguments; model files do not change.
    """
    if backend == "eager":
        return _eager_attention(q, k, v, mask, scale, key_bias, key_keep, dropout_p)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, mask, scale, key_bias, key_keep, dropout_p)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


def _additive_mask(allowed: torch.Tensor, key_bias: torch.Tensor | None, dtype) -> torch.Tensor:
    # transformers' order: the bias is the value at allowed entries; masked entries are exactly MIN.
    min_value = torch.finfo(dtype).min
    if key_bias is None:
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), min_value)
    return torch.where(allowed, key_bias.to(dtype), min_value)


def _eager_attention(q, k, v, mask, scale, key_bias, key_keep, dropout_p):
    B, H, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    # Group query heads under their kv head instead of repeating k/v (no copy of K/V per head).
    qg = q.view(B, Hkv, rep, L, d)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, rep, L, S)
    allowed = mask.dense(L, S, q.device).unsqueeze(2)  # (B|1, 1, 1, L, S)
    if key_keep is not None:
        allowed = allowed & key_keep.unsqueeze(2)
    bias = None if key_bias is None else key_bias[:, :, None, None, :]
    scores = scores + _additive_mask(allowed, bias, scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v.unsqueeze(2))  # (B, Hkv, rep, L, d)
    return out.reshape(B, H, L, d).transpose(1, 2)


def _sdpa_attention(q, k, v, mask, scale, key_bias, key_keep, dropout_p):
    B, H, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    gqa = H != Hkv
    if key_keep is not None:
        # A per-query key selection is inherently (B, Hkv, L, S); expand it to H heads for SDPA.
        allowed = mask.dense(L, S, q.device) & key_keep
        additive = _additive_mask(allowed, None if key_bias is None else key_bias[:, :, None, :], q.dtype)
        if gqa:
            additive = additive.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if key_bias is not None:
        # A bias that depends on the key only is folded into the dot product, so no [L, S] bias tensor
        # is built and SDPA can still use its causal fast path:
        #   [q, 1]·[k, b/scale] * scale = q·k*scale + b.
        # The extra channel is padded to 8 so fused GPU kernels keep an aligned head dim; v is padded
        # alike because flash kernels want equal q/k/v head dims.
        pad = 8
        q = torch.cat([q, q.new_ones(B, H, L, 1), q.new_zeros(B, H, L, pad - 1)], dim=-1)
        k = torch.cat([k, (key_bias / scale).to(k.dtype).unsqueeze(-1), k.new_zeros(B, Hkv, S, pad - 1)], dim=-1)
        v = torch.cat([v, v.new_zeros(B, Hkv, S, pad)], dim=-1)
    if mask.is_plain_causal(L, S):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    else:
        additive = _additive_mask(mask.dense(L, S, q.device), None, q.dtype)  # (B|1, 1, L, S), broadcast over heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out[..., :d].transpose(1, 2)


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
# Mixture of experts: parameters, routing, dispatch, load balancing
#
# Kept as separate functions so an expert-parallel engine can put a rank's slice of `Experts.weight`
# (experts are the leading dim) between `dispatch` and the combine step without touching model files.


class Experts(nn.Module):
    """E linear maps stored as one (E, out, in) tensor, the layout of transformers' checkpoints and of
    grouped-GEMM kernels. Expert e computes F.linear(x, weight[e])."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def forward(self, x_sorted: torch.Tensor, dispatch: "ExpertDispatch") -> torch.Tensor:
        return grouped_linear(x_sorted, self.weight, dispatch)


class TopKRouter(nn.Module):
    """logits = W h (in the model dtype, then fp32); keep the top k; softmax over those k only."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, h: torch.Tensor):
        logits = self.layer(h).float()  # (N, E)
        top_logits, experts = logits.topk(self.top_k, dim=-1)
        gates = torch.softmax(top_logits, dim=-1).type_as(h)
        return gates, experts, logits


@dataclass
class ExpertDispatch:
    """(token, slot) pairs sorted by expert, found with tensor ops only (argsort + counts + cumsum):
    nothing is read back to the host, so the step never waits on the device.

    order: (N*k,) flat pair index (token * k + slot) in expert order
    token: (N*k,) the token of each sorted pair
    expert: (N*k,) the expert of each sorted pair (ascending)
    group_end: (E,) int32, cumulative pair counts: expert e owns sorted rows [group_end[e-1], group_end[e])
    """

    order: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    group_end: torch.Tensor

    @classmethod
    def plan(cls, experts: torch.Tensor, num_experts: int) -> "ExpertDispatch":
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return cls(order, order // experts.shape[-1], flat[order], torch.cumsum(counts, 0, dtype=torch.int32))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's CPU backward rejects the
    stride-0 gradients that `.sum()` and broadcasts produce."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    aligned = all((n * x.element_size()) % 16 == 0 for n in weight.shape[1:])
    if x.device.type == "cpu":
        return aligned
    # CUDA kernels take bf16 (sm80+); other dtypes use the fallback below.
    return aligned and x.dtype == weight.dtype == torch.bfloat16


def grouped_linear(x_sorted: torch.Tensor, weight: torch.Tensor, dispatch: ExpertDispatch) -> torch.Tensor:
    """Row r of `x_sorted` (sorted by expert) times weight[expert_r]ᵀ, with no host synchronisation.

    Uses torch's grouped GEMM (one kernel over jagged groups, offsets stay on the device). Where that
    kernel does not apply (e.g. fp32 on CUDA), falls back to one dense matmul per expert over all rows,
    masked: E/k times the FLOPs, still sync-free; fine for the small E of JetMoE-style layers."""
    if torch.is_autocast_enabled(x_sorted.device.type):
        dtype = torch.get_autocast_dtype(x_sorted.device.type)
        x_sorted, weight = x_sorted.to(dtype), weight.to(dtype)
    else:
        x_sorted = x_sorted.to(weight.dtype)
    if _grouped_mm_fits(x_sorted, weight):
        return _ContiguousGrad.apply(F.grouped_mm(x_sorted, weight.transpose(1, 2), offs=dispatch.group_end))
    out = x_sorted.new_zeros(x_sorted.shape[0], weight.shape[1])
    for e in range(weight.shape[0]):
        mine = (dispatch.expert == e).unsqueeze(-1)
        out = torch.where(mine, F.linear(x_sorted, weight[e]), out)
    return out


@dataclass
class RouterStats:
    """One router's contribution to a load-balancing loss (summed over routers).

    expert_counts: (E,) picks per expert (padding excluded); expert_prob_sum: (E,) Σ over tokens of the
    router's probability for each expert; num_tokens: () tokens counted."""

    expert_counts: torch.Tensor
    expert_prob_sum: torch.Tensor
    num_tokens: torch.Tensor


def count_picks(experts: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None):
    """Per-expert pick counts of (N, k) expert ids and the number of tokens counted, padding excluded
    when a (B, S) token mask is given (tokens flattened batch-major, as the router sees them)."""
    weights = torch.ones(experts.shape, dtype=torch.float32, device=experts.device)
    if token_mask is None:
        num_tokens = torch.tensor(float(experts.shape[0]), device=experts.device)
    else:
        m = token_mask.reshape(-1).to(device=experts.device, dtype=torch.float32)
        weights = weights * m[:, None]
        num_tokens = m.sum()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=experts.device)
    return counts.scatter_add_(0, experts.reshape(-1), weights.reshape(-1)), num_tokens


def softmax_router_stats(logits: torch.Tensor, experts: torch.Tensor, token_mask: torch.Tensor | None) -> RouterStats:
    """Statistics of a plain softmax router: probabilities over all E experts, picks = `experts`."""
    probs = torch.softmax(logits.float(), dim=-1)
    if token_mask is not None:
        probs = probs * token_mask.reshape(-1, 1).to(probs)
    counts, num_tokens = count_picks(experts, logits.shape[-1], token_mask)
    return RouterStats(counts, probs.sum(0), num_tokens)


def load_balancing_loss(stats: list[RouterStats], num_experts: int, picks_per_token: int) -> torch.Tensor:
    """Switch-transformer load balancing over all routers: E · Σ_e f_e · p_e, where p_e is the mean
    router probability of expert e and f_e = picks of e / (tokens · picks_per_token). With
    picks_per_token = k the f_e sum to 1 (Doge's convention); with 1 they sum to k (JetMoE's)."""
    counts = torch.stack([s.expert_counts for s in stats]).sum(0)
    probs = torch.stack([s.expert_prob_sum for s in stats]).sum(0)
    tokens = torch.stack([s.num_tokens.to(counts.device) for s in stats]).sum()
    return num_experts * torch.sum((counts / (tokens * picks_per_token)) * (probs / tokens))


# ---------------------------------------------------------------------------------------------------
# Loss and outputs


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # (routers, experts) picks per expert, MoE models only


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token t predicts labels[t + 1] (or shift_labels[t], already shifted, as packed rows provide);
    fp32 cross-entropy over non-ignored tokens. With `num_items_in_batch` the sum is divided by it
    (exact gradient accumulation across micro-batches)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.float().reshape(-1, logits.shape[-1])
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, shift_labels, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


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
        elif isinstance(m, Experts):
            m.weight.normal_(0.0, std)
        elif isinstance(m, (RMSNorm, RotaryEmbedding)):
            m.reset_parameters()
    for m in modules:
        if isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
