"""The expert GEMMs and what is handed to the experts, on the paths a GPU takes: groups padded to a
multiple of 8 rows for torch's grouped GEMM (forced here on the CPU), fp32 on torch's grouped GEMM
rather than the masked E/k fallback, and expert inputs in the autocast dtype (half the bytes for
expert parallelism)."""

from __future__ import annotations

import pytest
import torch

import models
import models.jetmoe
from models.moe import GROUP_ALIGN_ROWS, ExpertDispatcher, RankOneExperts, _grouped_mm_fits, grouped_linear
from tests.models.helpers import perturb, preset_values

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def run_grouped_linear(x, weight, group_end, upstream, align_rows):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = grouped_linear(x, weight, group_end, align_rows=align_rows)
    (out.float() * upstream).sum().backward()
    return out, x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_padded_to_8_rows_give_the_unpadded_result(dtype):
    """Group sizes 0, 1, 7, 8, 9, 13, 0, 5: empty, below, at and above a multiple of 8. Padding changes
    only which rows share a GEMM, so the two results may differ by the summation order of the fp32
    accumulation (≤ 2·n·u·Σ|terms| for n-term sums, u the fp32 unit roundoff) and, for bf16 outputs,
    by the one rounding to bf16 that such a difference can flip."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 1, 7, 8, 9, 13, 0, 5])
    group_end = torch.cumsum(counts, 0).to(torch.int32)
    rows, experts, d_in, d_out = int(counts.sum()), len(counts), 16, 24
    x = torch.randn(rows, d_in, generator=g).to(dtype)
    weight = (torch.randn(experts, d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    upstream = torch.randn(rows, d_out, generator=g)
    padded = run_grouped_linear(x, weight, group_end, upstream, GROUP_ALIGN_ROWS)
    plain = run_grouped_linear(x, weight, group_end, upstream, 1)

    owner = torch.repeat_interleave(torch.arange(experts), counts)
    terms = {  # Σ|terms| of each result's entries, and the number of terms n
        "output": ((x.float().abs()[:, None, :] * weight.float().abs()[owner]).sum(-1), d_in),
        "x.grad": ((upstream.abs()[:, :, None] * weight.float().abs()[owner]).sum(1), d_out),
        "weight.grad": (torch.zeros(experts, d_out, d_in).index_add_(
            0, owner, upstream.abs()[:, :, None] * x.float().abs()[:, None, :]), rows),
    }
    for (name, (magnitude, n)), a, b in zip(terms.items(), padded, plain):
        assert a.dtype == b.dtype == dtype, name
        bound = 2 * n * UNIT_ROUNDOFF[torch.float32] * magnitude + UNIT_ROUNDOFF[dtype] * 2 * b.float().abs()
        assert ((a.float() - b.float()).abs() <= bound).all(), f"{name}: padded and unpadded groups differ"


def test_eager_fp32_takes_the_grouped_gemm_on_every_device():
    """fp32 experts run torch's grouped GEMM, whose CUDA kernel takes fp32 through one mm per expert
    group, not the masked fallback that computes every expert for every row (E/k times the FLOPs).
    Shown on the meta device, which stands for any device that is not the CPU: the rule must not
    depend on the device. Compiled graphs keep the fallback for fp32 (the meta kernel compile traces
    with takes bf16 only)."""
    for device in ("cpu", "meta"):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.empty(10, 16, dtype=dtype, device=device)
            weight = torch.empty(4, 32, 16, dtype=dtype, device=device)
            assert _grouped_mm_fits(x, weight), (device, dtype)


def record_expert_inputs(monkeypatch) -> list[torch.dtype]:
    seen = []
    dispatch, rank_one = ExpertDispatcher.forward, RankOneExperts.forward

    def record_dispatch(self, rows, plan, expert_fn):
        seen.append(rows.dtype)
        return dispatch(self, rows, plan, expert_fn)

    def record_rank_one(self, h, *args):
        seen.append(h.dtype)
        return rank_one(self, h, *args)

    monkeypatch.setattr(ExpertDispatcher, "forward", record_dispatch)
    monkeypatch.setattr(RankOneExperts, "forward", record_rank_one)
    return seen


@pytest.mark.parametrize("name", ["jetmoe-tiny", "doge-tiny-moe"])
@pytest.mark.parametrize("autocast", [True, False])
def test_experts_receive_their_inputs_in_the_autocast_dtype(name, autocast, monkeypatch):
    """What expert parallelism sends between ranks (the inputs of ExpertDispatcher / RankOneExperts,
    the modules it swaps) is bf16 under bf16 autocast, and fp32 without autocast."""
    model = models.build(preset_values(name))
    seen = record_expert_inputs(monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(ids, labels=ids).loss.backward()
    assert seen and set(seen) == {torch.bfloat16 if autocast else torch.float32}, seen


def test_jetmoe_results_under_autocast_do_not_change_with_the_cast(monkeypatch):
    """JetMoE's experts cast their inputs to the autocast dtype first anyway: handing them over cast
    changes neither the loss nor any gradient, bit for bit."""
    results = []
    for cast in (True, False):
        if not cast:
            monkeypatch.setattr(models.jetmoe, "dispatch_dtype", lambda rows: rows)
        model = models.build(preset_values("jetmoe-tiny"))
        perturb(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (cast_loss, cast_grads), (plain_loss, plain_grads) = results
    assert torch.equal(cast_loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(cast_grads[name], grad), name
