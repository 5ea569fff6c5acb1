"""The attention core every architecture calls: which keys a query may see (`VisibilityMask`), and
softmax(q·kᵀ·scale + bias + mask)·v with grouped-query attention on the eager or SDPA backend.

Visibility is carried between layers as tensors only (position ids and optional segment ids), so a
layer can rebuild it wherever it runs, a pipeline stage included:
  * segment_ids None: plain causal attention (with an optional sliding window);
  * segment_ids >= 0: packed documents, a query sees only keys of its own segment;
  * segment_ids < 0: padding. A padded key is seen by no query; a padded query sees every real key
    before it (transformers' key-padding semantics, which leave query rows alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("eager", "sdpa")
PADDING_SEGMENT = -1


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, heads * d) -> (B, heads, S, d)."""
    B, S, _ = x.shape
    return x.view(B, S, -1, head_dim).transpose(1, 2)


def segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed documents: a new segment starts wherever the position does not continue by one (as
    transformers detects packed sequences). (B, S) -> (B, S) segment index, from 1."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).long()
    return torch.cumsum(starts, dim=1)


def layer_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (position_ids, segment_ids) every decoder layer takes, from a model's usual inputs.

    Positions default to 0..S-1. Restarting positions without an attention mask are packed documents
    (as transformers treats them without a cache); a 2-D attention mask marks padding. An all-ones
    mask is dropped, at the cost of one host sync per forward (not per layer), so that every layer
    keeps the SDPA causal fast path."""
    B, S = input_ids.shape
    if attention_mask is not None:
        real = attention_mask.bool()
        if not bool(real.all()):
            segments = torch.where(real, 0, PADDING_SEGMENT).to(torch.long)
            if position_ids is None:
                position_ids = torch.arange(S, device=input_ids.device)[None]
            return position_ids, segments
    if position_ids is None:
        return torch.arange(S, device=input_ids.device)[None], None
    if attention_mask is None:
        return position_ids, segments_from_positions(position_ids.expand(B, -1))
    return position_ids, None


@dataclass
class VisibilityMask:
    """Which keys each query may see, kept in factored form so that backends need not build a
    [B, H, L, S] tensor: causal (always), optional sliding window, optional segments (see the module
    docstring for their meaning)."""

    segment_ids: torch.Tensor | None = None
    sliding_window: int | None = None

    def is_plain_causal(self, q_len: int, kv_len: int) -> bool:
        return (
            self.segment_ids is None
            and q_len == kv_len
            and (self.sliding_window is None or self.sliding_window >= kv_len)
        )

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, S) bool, True for real (unpadded) tokens; None when no token is padding."""
        return None if self.segment_ids is None else self.segment_ids >= 0

    def dense(self, q_len: int, kv_len: int, device) -> torch.Tensor:
        """(B or 1, 1, L, S) bool, True where key j is visible from query i."""
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        visible = k_pos <= q_pos
        if self.sliding_window is not None:
            visible = visible & (k_pos > q_pos - self.sliding_window)
        visible = visible[None, None]
        if self.segment_ids is not None:
            keys = self.segment_ids[:, None, None, :kv_len]
            queries = self.segment_ids[:, None, kv_len - q_len :, None]
            visible = visible & (keys >= 0) & ((queries == keys) | (queries < 0))
        return visible


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
    if key_keep is not None:
        # A per-query key selection is inherently (B, Hkv, L, S); expand it to H heads for SDPA.
        allowed = mask.dense(L, S, q.device) & key_keep
        additive = _additive_mask(allowed, None if key_bias is None else key_bias[:, :, None, :], q.dtype)
        if H != Hkv:
            additive = additive.repeat_interleave(H // Hkv, dim=1)
        return _sdpa(q, k, v, additive, dropout_p, scale).transpose(1, 2)
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
        out = _sdpa(q, k, v, None, dropout_p, scale)
    else:
        additive = _additive_mask(mask.dense(L, S, q.device), None, q.dtype)  # (B|1, 1, L, S), broadcast over heads
        out = _sdpa(q, k, v, additive, dropout_p, scale)
    return out[..., :d].transpose(1, 2)


def _sdpa(q, k, v, attn_mask, dropout_p, scale):
    """F.scaled_dot_product_attention (causal when there is no `attn_mask`), with the grouped-query
    heads handed over so that a fused CUDA kernel stays eligible. torch 2.13's CUDA kernels
    (sdp_utils.cpp): flash reads Hkv heads itself (enable_gqa) but refuses any attn_mask and fp32;
    memory-efficient takes a mask and fp32 but not GQA; what neither takes falls to the math kernel,
    which materialises fp32 (B, H, L, S) scores and keeps the probabilities for backward. So where
    flash cannot run (a mask, or fp32 on CUDA) K and V are repeated to all H heads, which makes the
    call eligible for memory-efficient: (B, H, S, d) copies, small next to the (B, H, L, S) scores they
    avoid. The CPU's fused kernel takes masks with GQA, but the rule is kept device-independent for
    masks so that the CPU tests exercise the call CUDA makes."""
    H, Hkv = q.shape[1], k.shape[1]
    flash_eligible = attn_mask is None and (q.dtype in (torch.float16, torch.bfloat16) or q.device.type != "cuda")
    if H != Hkv and not flash_eligible:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=attn_mask is None, scale=scale, enable_gqa=k.shape[1] != H)
