"""What the trainer applies from outside the model files: activation checkpointing really recomputes
(and saves fewer activations), and the results do not change."""

from __future__ import annotations

import torch
import yaml

import models
from train.parallelize import apply_activation_checkpointing

from .conftest import CONFIG_DIR


def _model():
    values = yaml.safe_load(open(f"{CONFIG_DIR}/model/doge-tiny-moe.yaml"))
    torch.manual_seed(0)
    return models.build(values)


def _step(model, ids):
    calls = {"n": 0}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
             for layer in model.model.layers.values()]
    saved = {"n": 0}

    def pack(tensor):
        saved["n"] += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    forward_calls = calls["n"]
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, forward_calls, calls["n"], saved["n"]


def test_activation_checkpointing_recomputes_each_layer_and_saves_less():
    ids = torch.randint(0, 2048, (2, 64))
    plain = _model()
    loss, grads, fwd, total, saved = _step(plain, ids)
    assert (fwd, total) == (2, 2)  # two layers, each run once

    checkpointed = _model()
    apply_activation_checkpointing(checkpointed)
    loss_ac, grads_ac, fwd_ac, total_ac, saved_ac = _step(checkpointed, ids)
    assert (fwd_ac, total_ac) == (2, 4)  # each layer's forward runs again in the backward pass
    assert saved_ac < 0.6 * saved  # the layers keep only their inputs (the head and loss keep theirs)
    assert loss_ac == loss
    for name, grad in grads.items():
        assert torch.allclose(grads_ac[name], grad, atol=1e-6), name
