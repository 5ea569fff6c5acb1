"""Masked attention with grouped-query heads is handed to SDPA in a form a fused CUDA kernel accepts.

torch 2.13's CUDA SDPA (sdp_utils.cpp) tries flash, then memory-efficient, then math. Flash refuses
any attn_mask; memory-efficient refuses grouped-query attention (k/v with fewer heads than q,
`enable_gqa=True`); math materialises fp32 (B, H, L, S) scores. So a call with a mask must give k and v
as many heads as q. The CPU build has no memory-efficient kernel (`sdpa_kernel([EFFICIENT_ATTENTION])`
finds no viable backend here), so the arguments the attention code hands to
F.scaled_dot_product_attention are checked instead, for every way a mask arises: packed documents,
padding, a sliding window, and Doge's top-k key window (keep_window_size < sequence length)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from tests.models.helpers import preset_values

SEQ = 16


def inputs(case: str, vocab: int):
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    if case == "documents":  # two packed documents per row: positions restart
        return dict(input_ids=ids, position_ids=torch.cat([torch.arange(6), torch.arange(SEQ - 6)])[None])
    if case == "padding":
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        return dict(input_ids=ids, attention_mask=mask)
    return dict(input_ids=ids)


CASES = [
    ("doge-tiny", {}, "documents"),
    ("doge-tiny", {}, "padding"),
    ("doge-tiny", {"sliding_window": 4}, "plain"),
    ("doge-tiny", {"keep_window_size": 8}, "plain"),  # the per-query key selection of Doge
    ("doge-tiny-moe", {}, "padding"),
    ("glm4-tiny", {}, "documents"),
    ("glm4-tiny", {}, "padding"),
    ("jetmoe-tiny", {}, "documents"),
    ("jetmoe-tiny", {}, "padding"),
]


@pytest.mark.parametrize("name,overrides,case", CASES)
def test_masked_grouped_query_attention_is_eligible_for_the_memory_efficient_kernel(name, overrides, case,
                                                                                      monkeypatch):
    model = models.build({**preset_values(name), **overrides})
    original = F.scaled_dot_product_attention
    calls = []

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q.shape[1], k.shape[1], v.shape[1], attn_mask is not None, enable_gqa))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    batch = inputs(case, model.config.vocab_size)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    masked = [c for c in calls if c[3]]
    assert len(masked) == model.config.num_hidden_layers, f"expected one masked call per layer: {calls}"
    assert calls[0][0] > model.config.num_key_value_heads, "the case needs grouped-query attention"
    for q_heads, k_heads, v_heads, _, enable_gqa in masked:
        assert (k_heads, v_heads, enable_gqa) == (q_heads, q_heads, False), (
            f"masked SDPA call with {q_heads} query heads, {k_heads}/{v_heads} key/value heads, "
            f"enable_gqa={enable_gqa}: CUDA would run the math kernel")


def test_unmasked_grouped_query_attention_keeps_the_kv_heads_for_flash(monkeypatch):
    """Plain causal bf16 attention stays grouped: flash reads the Hkv heads itself, without copies."""
    model = models.build(preset_values("glm4-tiny"))
    original = F.scaled_dot_product_attention
    calls = []

    def record(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("attn_mask") is not None, kwargs.get("enable_gqa")))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert calls and all(c == (4, 2, False, True) for c in calls), calls
