"""Layouts that need more than two ranks: pipeline x data parallel, expert parallel x data parallel, four
expert-parallel ranks and ZeRO-3 over four ranks, each equal to one process on the same global batches,
and each checkpoint resumed under another layout equal to the uninterrupted run.

The data order depends on the data-parallel size (the loader shards by data rank), so each layout is
compared with a one-process reference that draws the rows of as many data ranks. Four gloo ranks share
the two cores: the ranks run in-process (tests/ranks.py); one door test starts the same through torchrun."""

from __future__ import annotations

import os

import pytest
import torch

import models
from tests.ranks import train_in_ranks

from .conftest import FAST, losses, metrics, one_process_reference, run_train

pytestmark = pytest.mark.slow  # nine four-rank runs: the full suite's, not the fast tier's

STEPS = 6
COMMON = [*FAST, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=1", "scheduler.warmup=2",
          "trainer.save_every=3", "trainer.keep_last=0"]
# fp32, the same rows: the layouts differ in the order of floating-point sums (one process: 2e-5 over 10
# steps in the two-rank tests); routing picks of near-tied experts may swap after the first steps, which
# the MoE comparisons allow for below
TOLERANCE = 2e-5
LAYOUTS = {
    # name: (overrides, ranks, data-parallel size, preset)
    "pp2xdp2-zero1": (["parallel=zero1", "parallel.pipeline_stages=2"], 4, 2, "doge-tiny"),
    "ep2xdp2-ddp": (["parallel=ddp", "parallel.expert_parallel=2"], 4, 4, "jetmoe-tiny"),
    "ep2xdp2-zero2": (["parallel=zero2", "parallel.expert_parallel=2"], 4, 4, "jetmoe-tiny"),
    "ep4-ddp": (["parallel=ddp", "parallel.expert_parallel=4"], 4, 4, "jetmoe-tiny"),
    "zero3": (["parallel=zero3"], 4, 4, "doge-tiny"),  # dense: no routing pick can flip between layouts
}
# each checkpoint at step 3 continued under another layout with the same data-parallel size
RESUMED_UNDER = {
    "pp2xdp2-zero1": (["parallel=ddp"], 2),
    "ep2xdp2-ddp": (["parallel=ddp", "parallel.expert_parallel=4"], 4),
    "ep2xdp2-zero2": (["parallel=zero2"], 4),
    "ep4-ddp": (["parallel=zero1", "parallel.expert_parallel=2"], 4),
    "zero3": (["parallel=zero2"], 4),
}


@pytest.fixture(scope="module", autouse=True)
def _cache(cache_dir):
    os.environ["SMOLPRETRAIN_CACHE"] = str(cache_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("four")
    env = {"SMOLPRETRAIN_CACHE": str(cache_dir)}
    for name, (layout, ranks, _, preset) in LAYOUTS.items():
        train_in_ranks([*COMMON, *layout, f"model={preset}", f"trainer.output_dir={root / name}"], ranks, env=env,
                       timeout=900)
    return root


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for name, (_, _, dp, preset) in LAYOUTS.items():
        if (preset, dp) not in out:
            out[preset, dp] = one_process_reference(
                [*COMMON, f"model={preset}", f"trainer.output_dir={tmp_path_factory.mktemp('ref')}"], dp, STEPS)
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_four_ranks_equal_one_process(name, runs, references):
    _, _, dp, preset = LAYOUTS[name]
    reference = references[preset, dp]
    records = {r["step"]: r for r in metrics(runs / name)}
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(records[step]["loss"] - reference["loss"][step]) <= TOLERANCE, (step, records[step]["loss"])
    final = models.from_pretrained(runs / name / "checkpoints" / f"step-{STEPS}")
    expected = reference["model"].state_dict()
    for key, tensor in final.state_dict().items():
        assert torch.allclose(tensor, expected[key], rtol=0, atol=1e-4), key  # a wrong shard is off by ~lr = 3e-3
    assert records[STEPS]["loss"] < records[1]["loss"]


@pytest.mark.parametrize("name", sorted(RESUMED_UNDER))
def test_a_four_rank_checkpoint_resumes_under_another_layout(name, runs, tmp_path, cache_dir):
    layout, ranks = RESUMED_UNDER[name]
    preset = LAYOUTS[name][3]
    out = tmp_path / "resumed"
    train_in_ranks([*COMMON, *layout, f"model={preset}", f"trainer.output_dir={out}",
                    f"trainer.resume={runs / name / 'checkpoints' / 'step-3'}"], ranks,
                   env={"SMOLPRETRAIN_CACHE": str(cache_dir)}, timeout=900)
    straight, resumed = losses(runs / name), losses(out)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        # the same state, the same rows: only the order of sums differs between the two layouts
        assert abs(resumed[step] - straight[step]) <= TOLERANCE, (step, resumed[step], straight[step])


@pytest.mark.slow
def test_pipeline_by_data_parallel_through_torchrun(runs, tmp_path, env):
    """The door: `torchrun --nproc_per_node 4 -m train` with 2 stages x 2 replicas gives what the in-process
    ranks gave."""
    layout, ranks, _, preset = LAYOUTS["pp2xdp2-zero1"]
    run_train([*COMMON, *layout, f"model={preset}", f"trainer.output_dir={tmp_path}"], env, nproc=ranks)
    for step, value in losses(runs / "pp2xdp2-zero1").items():
        assert losses(tmp_path)[step] == pytest.approx(value, abs=1e-6)
