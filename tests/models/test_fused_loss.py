"""The chunked LM head + cross-entropy (models.loss.linear_cross_entropy_sum) against the plain path:
full logits from nn.Linear, then F.cross_entropy. Same loss and gradients, in every way it is called."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.loss import IGNORE_INDEX, chunk_loss_and_grad_logits, chunk_rows, linear_cross_entropy_sum
from tests.models.helpers import perturb, preset_model


def plain_sum(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def inputs(tokens=37, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("rows", [1, 8, 37, 64])  # one row, uneven chunks, exactly one chunk, larger than the input
def test_loss_and_gradients_equal_the_plain_path(rows):
    hidden, weight, targets = inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = linear_cross_entropy_sum(h1, w1, targets, rows=rows)
    plain = plain_sum(h2, w2, targets)
    # a non-unit upstream gradient: the backward scales the gradients computed in the forward
    (fused * 0.37).backward()
    (plain * 0.37).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden, weight, targets = inputs()
    targets[:] = IGNORE_INDEX
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, weight, targets, rows=8)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0


def test_a_second_backward_is_refused_not_scaled_twice():
    hidden, weight, targets = inputs()
    loss = linear_cross_entropy_sum(hidden.clone().requires_grad_(), weight, targets, rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be backpropagated twice"):
        loss.backward()


def test_no_tokens_give_zero_loss_and_gradients():
    hidden, weight, targets = inputs(tokens=0)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy_sum(hidden.requires_grad_(), w, targets, rows=8)
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().max().item() == 0.0


def test_no_grad_computes_no_gradients():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden.requires_grad_(), weight, targets, rows=8)
    torch.testing.assert_close(loss, plain_sum(hidden.detach(), weight, targets))
    assert not loss.requires_grad


def test_bf16_autocast_is_as_accurate_as_an_autocast_linear():
    """Under bf16 autocast both paths run bf16 matmuls; measured against fp32, the chunked one (which
    accumulates the weight gradient in fp32) is no less accurate than nn.Linear + cross-entropy."""
    hidden, weight, targets = inputs(tokens=64, dim=32, vocab=300)
    grads = {}
    for name, bf16 in [("fused", True), ("plain", True), ("fp32", False)]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (linear_cross_entropy_sum(h, w, targets, rows=16) if name == "fused" else plain_sum(h, w, targets))
        loss.backward()
        grads[name] = (loss.detach(), h.grad, w.grad)
    assert grads["fused"][1].dtype == torch.float32 and grads["fused"][2].dtype == torch.float32
    for i in range(3):
        fused_error = (grads["fused"][i] - grads["fp32"][i]).abs().max()
        plain_error = (grads["plain"][i] - grads["fp32"][i]).abs().max()
        assert fused_error <= 1.5 * plain_error + 1e-6, (i, fused_error, plain_error)


@pytest.mark.parametrize("preset", ["doge-tiny", "doge-tiny-moe", "glm4-tiny", "jetmoe-tiny"])
def test_model_loss_and_parameter_gradients_equal_the_logits_path(preset):
    """model(labels=...) (chunked, tied embeddings included) against the same model asked for its logits."""
    model = preset_model(preset)
    perturb(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    fused = model(ids, labels=labels)
    assert fused.logits is None
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain = model(ids, labels=labels, return_logits=True)
    assert plain.logits.shape == (2, 12, model.config.vocab_size)
    plain.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_weight_gradient_sums_every_chunk_product_in_fp32():
    """Under bf16 autocast each chunk's weight gradient grad_logitsᵀ·h (bf16 operands) is added to the
    fp32 accumulator without first being rounded to bf16. Reference: the same bf16 chunk gradients
    (chunk_loss_and_grad_logits, as the loss computes them), their products summed in fp64. A product
    of two bf16 values is exact in fp32, so the only error left is fp32 summation over the n tokens:
    at most about n·u·Σ|terms| (u = 2⁻²⁴); a bf16-rounded chunk product is off by up to 2⁻⁹ of itself."""
    hidden, weight, targets = inputs(tokens=64, dim=32, vocab=300)
    rows = 8
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy_sum(hidden, w, targets, rows=rows).backward()
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    reference = torch.zeros(weight.shape, dtype=torch.float64)
    magnitude = torch.zeros(weight.shape, dtype=torch.float64)
    for start in range(0, hidden.shape[0], rows):
        _, grad_logits = chunk_loss_and_grad_logits(h16[start:start + rows], w16, targets[start:start + rows], True)
        reference += grad_logits.double().t() @ h16[start:start + rows].double()
        magnitude += grad_logits.double().abs().t() @ h16[start:start + rows].double().abs()
    bound = 2 * hidden.shape[0] * 2.0**-24 * magnitude
    assert ((w.grad.double() - reference).abs() <= bound).all()


def test_chunks_are_larger_on_cuda_than_on_cpu():
    """On CUDA the chunk budget is larger (fewer, larger GEMMs); the CPU keeps its measured one."""
    for vocab in (2048, 32768, 151552):
        assert chunk_rows(vocab, "cuda") > chunk_rows(vocab, "cpu")
    assert chunk_rows(151552, "cpu") == 512 and chunk_rows(32768, "cuda") == 4096
