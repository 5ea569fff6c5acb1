"""JetMoE against transformers 5.23 (the reference), through saved files, both directions."""

from __future__ import annotations

import pytest
import torch

import models
from models.loss import causal_lm_loss

from .helpers import batch, future_token_changes_past, hf_load, perturb, save_pairs

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SEQ = 12
BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2,
    kv_channels=8, num_local_experts=4, num_experts_per_tok=2,
)
CASES = {
    "default": {},  # tied embeddings
    # rms_norm_eps only reaches the final norm (the layer norms use 1e-6 in transformers too)
    "untied-k3-eps": dict(tie_word_embeddings=False, num_experts_per_tok=3, rms_norm_eps=1e-2, aux_loss_coef=0.1),
    "k1-single-kv-head": dict(num_key_value_heads=1, kv_channels=16, num_experts_per_tok=1),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_pairs(tmp_path_factory, "jetmoe", transformers.JetMoeForCausalLM, transformers.JetMoeConfig, BASE, CASES)


def aux_loss_from_transformers_router_logits(router_logits, config, attention_mask):
    """transformers' own load-balancing function on its own router logits, with each router once.
    5.23 records the attention router twice per layer: [MoA, MoA (again), MoE]."""
    from transformers.models.jetmoe.modeling_jetmoe import load_balancing_loss_func

    assert len(router_logits) == 3 * config.num_hidden_layers
    for layer in range(config.num_hidden_layers):
        assert torch.equal(router_logits[3 * layer], router_logits[3 * layer + 1])
    once = tuple(t for i, t in enumerate(router_logits) if i % 3 != 1)
    return load_balancing_loss_func(once, config.num_local_experts, config.num_experts_per_tok, attention_mask)


@pytest.mark.parametrize("direction", ["ours->transformers", "transformers->ours"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(saved, case, padding, backend, direction):
    directory = saved[case][0 if direction == "ours->transformers" else 1]
    ours = models.from_pretrained(directory, attn_implementation=backend).eval()
    theirs = hf_load(directory, backend)
    config = ours.config
    ids, mask, labels = batch(config.vocab_size, 2, SEQ, padding)
    with torch.no_grad():
        a = ours(ids, labels=labels, attention_mask=mask)  # the loss: chunked, without logits
        ours_logits = ours(ids, attention_mask=mask).logits
        cross_entropy = theirs(ids, labels=labels, attention_mask=mask, output_router_logits=False).loss
        with_routers = theirs(ids, attention_mask=mask, output_router_logits=True)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert (ours_logits - with_routers.logits)[valid].abs().max().item() <= TOL
    assert abs((a.loss - config.aux_loss_coef * a.aux_loss).item() - cross_entropy.item()) <= TOL
    expected_aux = aux_loss_from_transformers_router_logits(with_routers.router_logits, config, mask)
    assert abs(a.aux_loss.item() - expected_aux.item()) <= TOL
    # and it differs from transformers' own aux loss, which counts the attention router twice
    assert abs(a.aux_loss.item() - with_routers.aux_loss.item()) > 1e-4


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["default", "untied-k3-eps"])
def test_cross_entropy_gradients_match_transformers(saved, case, backend):
    directory = saved[case][0]
    ours = models.from_pretrained(directory, attn_implementation=backend)
    theirs = hf_load(directory, backend).train()
    ids, mask, labels = batch(64, 2, SEQ, "right")
    causal_lm_loss(ours(ids, attention_mask=mask).logits, labels).backward()
    theirs(ids, labels=labels, attention_mask=mask, output_router_logits=False).loss.backward()
    reference = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        ref = reference[name].grad  # routers included: the gates carry the cross-entropy's gradient
        assert ref is not None and p.grad is not None, name
        assert (p.grad - ref).abs().max().item() <= TOL, name


def test_aux_loss_trains_the_routers(saved):
    ours = models.from_pretrained(saved["default"][0])
    ids = torch.randint(0, 64, (2, SEQ))
    ours(ids).aux_loss.backward()
    for layer in ours.model.layers.values():
        assert layer.mlp.router.layer.weight.grad.abs().sum() > 0
        assert layer.self_attention.experts.router.layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_causal(backend):
    model = models.build({"model_type": "jetmoe", **BASE, "attn_implementation": backend}).eval()
    perturb(model)
    # Not bit-exact zero: when a future token changes experts, the other tokens move within the
    # expert-sorted batch, and a grouped GEMM may round a row differently at another position. No
    # information flows backwards: the change is float noise (the changed positions move by O(1)).
    assert future_token_changes_past(model, 64) < 1e-5


def test_expert_compute_never_reads_back_from_the_device(monkeypatch):
    """Forward and backward with every host read-back of a tensor made to fail (.item, .tolist,
    bool(), int(), float(), .numpy()): routing and expert compute use tensor ops only."""
    model = models.build({"model_type": "jetmoe", **BASE})
    perturb(model)
    ids = torch.randint(0, 64, (2, SEQ))

    def refuse(*_args, **_kwargs):
        raise AssertionError("host synchronisation in the hot path")

    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    out = model(ids, labels=ids)
    out.loss.backward()
    monkeypatch.undo()
    assert out.loss.item() > 0


def test_expert_layout_is_experts_out_in(saved):
    model = models.from_pretrained(saved["default"][0])
    mlp = model.model.layers["0"].mlp
    assert tuple(mlp.input_linear.weight.shape) == (4, 48, 32)  # (E, 2I, D)
    assert tuple(mlp.output_linear.weight.shape) == (4, 32, 24)  # (E, D, I)
    attn = model.model.layers["0"].self_attention.experts
    assert tuple(attn.input_linear.weight.shape) == (4, 16, 32)  # (E, Hkv*d, D)


def test_8b_preset_has_the_published_shapes():
    import yaml
    from pathlib import Path

    values = yaml.safe_load((Path(__file__).parents[2] / "configs/model/jetmoe-8b.yaml").read_text())
    model = models.build(values, device="meta")
    hf = {k: v for k, v in model.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        reference = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(**hf))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert 8.4e9 < model.num_parameters() < 8.6e9
