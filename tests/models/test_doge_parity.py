"""Doge against transformers 5.23 (the reference), through saved files, both directions:
our weights -> transformers, and transformers' weights -> ours. fp32, perturbed weights."""

from __future__ import annotations

import pytest
import torch

import models
from models import DogeConfig

from .helpers import batch, hf_load, perturb

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)
# keep_window_size 64 > seq 12: no sparsity; 5 < 12: top-k window active.
CASES = {
    "dense": dict(keep_window_size=64),
    "dense-window-biases-tied": dict(keep_window_size=5, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "dense-dynamic-rope-head_dim": dict(
        keep_window_size=7, head_dim=16, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0},
    ),
    "dense-sliding-window": dict(keep_window_size=64, sliding_window=4),
    "moe": dict(keep_window_size=64, is_moe=True, num_experts=16, num_experts_per_tok=4),
    "moe-window-k>K": dict(keep_window_size=5, is_moe=True, num_experts=16, num_experts_per_tok=6, tie_word_embeddings=True),
}
SEQ = 12


def _ours(case: str) -> models.CausalLM:
    config = DogeConfig(**{**BASE, **CASES[case]}, router_layout="transformers")
    model = models.build(config)
    perturb(model)
    return model


def _theirs(case: str):
    kwargs = {**BASE, **CASES[case]}
    head_dim = kwargs.pop("head_dim", None)
    config = transformers.DogeConfig(**kwargs)
    if head_dim is not None:
        config.head_dim = head_dim  # not a declared field; transformers honours the attribute
    model = transformers.DogeForCausalLM(config)
    perturb(model, seed=2)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (directory written by us, directory written by transformers)."""
    out = {}
    for case in CASES:
        ours_dir = tmp_path_factory.mktemp(f"ours-{case}")
        theirs_dir = tmp_path_factory.mktemp(f"theirs-{case}")
        _ours(case).save_pretrained(ours_dir)
        _theirs(case).save_pretrained(theirs_dir)
        out[case] = (ours_dir, theirs_dir)
    return out


def _compare(ours, theirs, config, padding):
    ids, mask, labels = batch(config.vocab_size, 2, SEQ, padding)
    with torch.no_grad():
        a = ours(ids, labels=labels, attention_mask=mask)  # the loss: chunked, without logits
        ours_logits = ours(ids, attention_mask=mask).logits
        b = theirs(ids, labels=labels, attention_mask=mask, output_router_logits=config.is_moe)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    # Padded query rows are garbage by construction (labels there are ignored); compare real tokens.
    assert (ours_logits - b.logits)[valid].abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    if config.is_moe:
        assert abs(a.aux_loss.item() - b.aux_loss.item()) <= TOL
        assert a.aux_loss.item() > 0
    else:
        assert a.aux_loss is None


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_our_checkpoint_in_transformers(saved, case, padding, backend):
    ours_dir, _ = saved[case]
    ours = models.from_pretrained(ours_dir, attn_implementation=backend).eval()
    theirs = hf_load(ours_dir, backend)
    _compare(ours, theirs, ours.config, padding)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_in_ours(saved, case, padding, backend):
    _, theirs_dir = saved[case]
    ours = models.from_pretrained(theirs_dir, attn_implementation=backend).eval()
    assert ours.config.router_layout == "transformers"  # config.json written by transformers
    theirs = hf_load(theirs_dir, backend)
    _compare(ours, theirs, ours.config, padding)


def test_saved_files_are_identical_after_round_trip(saved, tmp_path):
    """transformers' file -> ours -> saved again: same tensors, same names, bit for bit."""
    from safetensors.torch import load_file

    _, theirs_dir = saved["moe-window-k>K"]
    models.from_pretrained(theirs_dir).save_pretrained(tmp_path)
    a, b = load_file(theirs_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert "lm_head.weight" not in b  # tied: dropped from the file, as transformers does
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["dense-window-biases-tied", "moe-window-k>K", "moe"])
def test_gradients_match_transformers(saved, case, backend):
    # Right padding: every query sees a real key. (With left padding the fully masked query rows of
    # the pads are garbage by construction, and fused kernels differentiate them differently.)
    ours_dir, _ = saved[case]
    ours = models.from_pretrained(ours_dir, attn_implementation=backend)
    theirs = hf_load(ours_dir, backend).train()
    ids, mask, labels = batch(ours.config.vocab_size, 2, SEQ, "right")
    ours(ids, labels=labels, attention_mask=mask).loss.backward()
    theirs(ids, labels=labels, attention_mask=mask, output_router_logits=ours.config.is_moe).loss.backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs_grads[name].grad
        assert p.grad is not None and ref is not None, name
        assert (p.grad - ref).abs().max().item() <= TOL, name


def test_config_json_loads_in_transformers_with_every_field(saved):
    import json

    ours_dir, _ = saved["moe-window-k>K"]
    written = json.loads((ours_dir / "config.json").read_text())
    # every field transformers' DogeConfig declares (its own annotations, not the base class's)
    for key in transformers.DogeConfig.__annotations__:
        assert key in written, f"config.json lacks {key}"
    assert written["model_type"] == "doge" and written["architectures"] == ["DogeForCausalLM"]
    assert written["router_layout"] == "transformers"
    assert "attn_implementation" not in written


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["dense-window-biases-tied", "dense", "moe"])
def test_bf16_matches_transformers(saved, case, backend):
    """bf16 weights and activations: eager is bit-identical to transformers. Our SDPA path folds the
    dynamic-mask bias into the dot product (no [B, H, L, S] mask), a different rounding order, so it
    must stay within the spread between transformers' own eager and SDPA results."""
    from transformers import AutoModelForCausalLM

    ours_dir, _ = saved[case]
    ours = models.from_pretrained(ours_dir, dtype=torch.bfloat16, attn_implementation=backend).eval()

    def theirs(impl):
        model = AutoModelForCausalLM.from_pretrained(str(ours_dir), attn_implementation=impl, dtype=torch.bfloat16)
        with torch.no_grad():
            return model(ids).logits.float()

    ids, _, _ = batch(ours.config.vocab_size, 2, SEQ, None)
    with torch.no_grad():
        a = ours(ids).logits
    assert a.dtype == torch.bfloat16
    b = theirs(backend)
    if backend == "eager" or ours.config.keep_window_size < SEQ:
        assert torch.equal(a.float(), b)
    else:
        own_spread = (theirs("eager") - b).abs().max().item()
        assert (a.float() - b).abs().max().item() <= max(2 * own_spread, 1e-2)
