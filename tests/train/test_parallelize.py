"""What the trainer applies from outside the model files: activation checkpointing really recomputes
(and saves fewer activations), and the results do not change."""

from __future__ import annotations

import pytest
import torch
import yaml

import models
from train.engines.parallelize import apply_activation_checkpointing, apply_compile

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


# compiling takes tens of seconds per architecture: glm4-tiny (layers and the loss chunk) in the fast tier
@pytest.mark.parametrize("preset", [pytest.param("doge-tiny-moe", marks=pytest.mark.slow), "glm4-tiny",
                                    pytest.param("jetmoe-tiny", marks=pytest.mark.slow)])
def test_compiled_layers_and_loss_match_eager(preset):
    """trainer.compile: every decoder layer and (as on CUDA) the loss's chunk maths run as compiled graphs (counted
    by dynamo), and the loss and every gradient equal eager's (fp32, up to inductor's reordered sums)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    values = yaml.safe_load(open(f"{CONFIG_DIR}/model/{preset}.yaml"))
    # (2, 64): the shape of the test below, whose doge-tiny-moe layer graphs are then inductor cache hits
    ids = torch.randint(0, values["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = models.build(values)
    torch.manual_seed(0)
    compiled = models.build(values)
    # the compiled loss chunk is CUDA's default (on CPU it stays eager); its graph is the same for every
    # architecture, so one of them checks it
    compile_loss = preset == "glm4-tiny"
    apply_compile(compiled, compile_loss=compile_loss)
    results = []
    for model in (eager, compiled):
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    compiled_frames = {key for key in counters["stats"] if key == "unique_graphs"}
    assert compiled_frames and counters["stats"]["unique_graphs"] >= 1 + compile_loss  # a layer graph (and the loss chunk's)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_layers_are_checkpointed_and_still_compiled():
    """trainer.compile with trainer.activation_checkpointing: both change what runs. The layers run as
    compiled graphs (dynamo counts them; with torch's checkpoint wrapper outside the compiled module it
    traced none and everything ran eager), and they keep only their inputs for the backward pass (the
    activations saved for it shrink as in eager checkpointing)."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from train.engines.parallelize import parallelize

    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    loss, grads, *_ = _step(_model(), ids)
    results = {}
    for checkpointing in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        parallelize(model, SimpleNamespace(trainer=SimpleNamespace(compile=True, activation_checkpointing=checkpointing)),
                    "cpu")
        results[checkpointing] = _step(model, ids)
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["stats"])
    assert results[True][4] < 0.6 * results[False][4]  # measured 0.32: the layers keep only their inputs
    for loss_compiled, grads_compiled, *_ in results.values():
        assert abs(loss_compiled - loss) <= 1e-5
        for name, grad in grads.items():
            torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)
