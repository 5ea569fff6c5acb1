"""CDMoE routing: causality of our default layout, the documented non-causality of transformers'
layout, and the sub-linear product-key search against full enumeration."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models import DogeConfig
from models.doge import CrossDomainMoE, product_key_topk

from .helpers import perturb

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, keep_window_size=5,
)


def _future_changes_past(model, seq_len=12) -> tuple[float, float]:
    """Largest change of row 0's logits at positions < t when token t of row 0 changes, in a batch
    of one row; and of row 1's logits when that token changes in a batch of two rows."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, seq_len), generator=g)
    t = seq_len - 2
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 64
    with torch.no_grad():
        past = (model(ids[:1]).logits[0, :t] - model(changed[:1]).logits[0, :t]).abs().max().item()
        other_row = (model(ids).logits[1] - model(changed).logits[1]).abs().max().item()
    return past, other_row


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("is_moe", [False, True])
def test_default_model_is_causal(is_moe, backend):
    config = DogeConfig(**TINY, is_moe=is_moe, num_experts=16, num_experts_per_tok=4, attn_implementation=backend)
    assert config.router_layout == "per_token"
    model = models.build(config).eval()
    perturb(model)
    past, other_row = _future_changes_past(model)
    assert past == 0.0
    assert other_row == 0.0
    # the probe does change something (otherwise the test proves nothing)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 64
    with torch.no_grad():
        assert (model(ids).logits[0, 10:] - model(changed).logits[0, 10:]).abs().max() > 0


def test_transformers_router_layout_is_not_causal():
    """Documents transformers' behaviour we keep only for checkpoint parity: `view(2, N, K)` routes a
    token with other tokens' router logits, so a future token (and another batch row) changes the
    past's logits."""
    config = DogeConfig(**TINY, is_moe=True, num_experts=16, num_experts_per_tok=4, router_layout="transformers")
    model = models.build(config).eval()
    perturb(model)
    past, other_row = _future_changes_past(model)
    assert past > 1e-4
    assert other_row > 1e-4


def _full_enumeration(sx, sy, k):
    all_scores = (sx[:, :, None] + sy[:, None, :]).flatten(1)  # expert a*K + b
    return all_scores.topk(k, dim=-1)


@pytest.mark.parametrize("num_keys,k", [(4, 1), (4, 3), (4, 4), (4, 6), (4, 16), (8, 8), (32, 16), (128, 64)])
def test_product_key_search_selects_the_same_experts_as_full_enumeration(num_keys, k):
    g = torch.Generator().manual_seed(num_keys * 100 + k)
    sx, sy = torch.randn(64, num_keys, generator=g), torch.randn(64, num_keys, generator=g)
    scores, experts = product_key_topk(sx, sy, k)
    ref_scores, ref_experts = _full_enumeration(sx, sy, k)
    assert torch.equal(scores, ref_scores)
    assert torch.equal(experts.sort(-1).values, ref_experts.sort(-1).values)


def test_cdmoe_layer_matches_dense_reference_computation():
    """Our CDMoE (k×k search, embedding_bag) against a direct transcription of the maths with the
    full K² enumeration and explicit gathers."""
    config = DogeConfig(**TINY, is_moe=True, num_experts=64, num_experts_per_tok=12)
    layer = CrossDomainMoE(config)
    torch.nn.init.normal_(layer.down_embed.weight)
    torch.nn.init.normal_(layer.up_embed.weight)
    x = torch.randn(2, 7, 32)
    out, stats = layer(x)
    h = x.reshape(-1, 32)
    logits = layer.router_gate(h)
    K = math.isqrt(64)
    scores, experts = _full_enumeration(logits[:, :K], logits[:, K:], 12)
    w = torch.softmax(scores, -1)
    gate = torch.nn.functional.silu((layer.down_embed.weight[experts] * h[:, None]).sum(-1)) * w
    routed = (gate[..., None] * layer.up_embed.weight[experts]).sum(1)
    shared = layer.down_proj(torch.nn.functional.silu(layer.gate_proj(h)) * layer.up_proj(h))
    assert torch.allclose(out.reshape(-1, 32), shared + routed, atol=1e-5)
    # aux-loss statistics: counts sum to N*k, probabilities of all K² experts sum to N
    assert stats.expert_counts.sum().item() == 14 * 12
    p_ref = torch.softmax((logits[:, :K, None] + logits[:, None, K:]).flatten(1), -1).sum(0)
    assert torch.allclose(stats.expert_prob_sum, p_ref, atol=1e-5)


def test_moe_experts_receive_gradient():
    config = DogeConfig(**TINY, is_moe=True, num_experts=16, num_experts_per_tok=4)
    model = models.build(config)
    ids = torch.randint(0, 64, (2, 12))
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers.values():
        for p in (layer.mlp.router_gate.weight, layer.mlp.down_embed.weight, layer.mlp.up_embed.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
