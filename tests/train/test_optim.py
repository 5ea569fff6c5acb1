"""AdamW's weight-decay groups: what is decayed and what is not, by parameter name."""

from __future__ import annotations

import pytest
import torch
import yaml

import models
from train.config import OptimSchema
from train.optim import build_optimizer, parameter_groups

from .conftest import CONFIG_DIR


def _model(name):
    return models.build(yaml.safe_load(open(f"{CONFIG_DIR}/model/{name}.yaml")))


def _decayed_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return ({names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]},
            {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]})


def test_doge_groups():
    model = _model("doge-tiny-moe")
    decayed, plain = _decayed_names(model, parameter_groups(model, 0.1))
    assert "model.embed_tokens.weight" in plain  # tied with lm_head: appears once, undecayed
    assert "lm_head.weight" not in decayed | plain
    for name in plain - {"model.embed_tokens.weight"}:
        assert any(k in name for k in ("norm", "residual", ".A")), name
    assert {"model.layers.0.self_attn.A", "model.layers.0.input_residual", "model.norm.weight",
            "model.layers.0.self_attn.q_norm.weight"} <= plain
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.down_embed.weight", "model.layers.0.mlp.router_gate.weight"} <= decayed
    # every trainable parameter is in exactly one group
    assert len(decayed) + len(plain) == len({id(p) for p in model.parameters()})


def test_biases_and_untied_head():
    jet, glm = _model("jetmoe-tiny"), _model("glm4-tiny")
    _, plain = _decayed_names(jet, parameter_groups(jet, 0.1))
    assert {"model.layers.0.mlp.bias", "model.layers.0.self_attention.experts.bias"} <= plain
    decayed, plain = _decayed_names(glm, parameter_groups(glm, 0.1))
    assert "lm_head.weight" in decayed  # an untied head is a projection
    assert "model.layers.0.self_attn.q_proj.bias" in plain


def test_decay_also_and_new_params_stage_tags():
    model = _model("doge-tiny-moe")
    decayed, _ = _decayed_names(model, parameter_groups(model, 0.1, decay_also=["embeddings", "norms"]))
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= decayed
    groups = parameter_groups(model, 0.1, new_params=["router_gate", "down_embed", "up_embed"])
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        new = [any(k in names[id(p)] for k in ("router_gate", "down_embed", "up_embed")) for p in group["params"]]
        assert all(new) if group["stage"] == "new" else not any(new)
    with pytest.raises(ValueError, match="optim.decay_also has \\['weights'\\]"):
        parameter_groups(model, 0.1, decay_also=["weights"])


def test_optimizer_uses_the_configured_values():
    model = _model("doge-tiny")
    opt = build_optimizer(model, OptimSchema(lr=1e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.05), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
