"""Every parallel layout against one process with the same global batch. Two gloo ranks run the real
entry point (torchrun -m train); the reference runs the same `train_step` in this process on the very
rows the two ranks drew (both ranks' loaders, each rank's micro-batches accumulated in turn)."""

from __future__ import annotations

import pytest
import torch

import models
from data import HeldOut, TokenLoader, build_tokenizer
from train.config import data_config, validate
from train.distributed import Topology
from train.engine import TorchEngine
from train.schedule import build_schedule

from .conftest import FAST, compose, losses, run_train

STEPS = 10
# MoE, so the aux loss and routing take part; 2 ranks x 2 micro-batches of 2 rows = 8 rows per step
OVERRIDES = [*FAST, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "model=doge-tiny-moe",
             "scheduler.warmup=2"]
TOLERANCE = 2e-5  # fp32; the layouts differ only in the order of floating-point sums


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    import os

    os.environ["SMOLPRETRAIN_CACHE"] = str(cache_dir)
    run = validate(compose([*OVERRIDES, f"trainer.output_dir={tmp_path_factory.mktemp('ref')}"]))
    t = run.trainer
    torch.manual_seed(t.seed)
    dcfg = data_config(run.data, t.micro_batch_size, t.seed)
    heldout = HeldOut(dcfg)
    tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.sources, heldout.exclude)
    model = models.build(run.model)
    accumulation = t.global_batch_size // (t.micro_batch_size * 2)
    loaders = [iter(TokenLoader(dcfg, tokenizer, rank, 2, heldout)) for rank in range(2)]
    engine = TorchEngine(model, run.optim, t.precision, Topology(0, 0, 1, torch.device("cpu")))
    schedule = build_schedule(run.scheduler, run.optim.lr, t.max_steps)
    out = {}
    for step in range(STEPS):
        micro = [next(loader) for loader in loaders for _ in range(accumulation)]
        out[step + 1] = engine.train_step(micro, schedule(step)).loss
    return out


@pytest.mark.parametrize("parallel", ["ddp", "zero1", "zero2", "zero3"])
def test_two_ranks_match_one_process(parallel, reference, tmp_path, env):
    run_train([*OVERRIDES, f"parallel={parallel}", f"trainer.output_dir={tmp_path}"], env, nproc=2)
    got = losses(tmp_path)
    assert sorted(got) == sorted(reference)
    for step, value in reference.items():
        assert abs(got[step] - value) <= TOLERANCE, (parallel, step, got[step], value)
    assert reference[STEPS] < reference[1]  # and it trained
