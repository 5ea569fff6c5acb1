"""Helpers for trainer tests: run `python -m train` (or torchrun) in a subprocess, compose configs
with Hydra's API, read metrics. Small settings so each run takes seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(REPO / "configs")
FAST = [
    "data.seq_len=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.progress=false",
    "trainer.log_every=1", "data.eval.holdout_documents=8", "data.tokenizer.train_bytes=1000000",
    "data.shuffle_buffer=16", "trainer.peak_flops=1e11", "trainer.plot=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer cache for the whole session: the BPE is trained once."""
    return tmp_path_factory.mktemp("smolpretrain-cache")


def train_env(cache_dir) -> dict:
    """The environment of a `python -m train` subprocess in the tests (also for module-scoped runs)."""
    e = dict(os.environ)
    e.update(SMOLPRETRAIN_CACHE=str(cache_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu",
             PYTHONFAULTHANDLER="1")  # a crashing rank prints where it was
    return e


def ranks_env(cache_dir) -> dict:
    """What in-process ranks (tests/ranks.py) add to their environment: the session's tokenizer cache."""
    return {"SMOLPRETRAIN_CACHE": str(cache_dir)}


@pytest.fixture()
def env(cache_dir):
    return train_env(cache_dir)


def run_train(overrides: list[str], env: dict, nproc: int = 1, check: bool = True, timeout: int = 300,
              module: list[str] = ("train",)):
    """`python -m train` (or `module`, e.g. the kill-after-checkpoint wrapper) as a subprocess, under
    torchrun with `nproc` > 1."""
    if nproc == 1:
        cmd = [sys.executable, "-m", *module, *overrides]
    else:
        # --standalone: torchrun picks a free port itself (no race between choosing one and binding it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", *module, *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-20000:]}")
    return proc


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]


def losses(output_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(output_dir) if "loss" in m}


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def one_process_reference(overrides: list[str], world: int, steps: int) -> dict:
    """What a run of `world` data-parallel ranks must compute, in this process: the same TorchEngine
    step on the same rows (every rank's loader, each rank's micro-batches accumulated in turn).
    Returns per-step losses and aux losses and the final model."""
    import torch

    import models
    from data import HeldOut, TokenLoader, build_tokenizer
    from train.config import data_config, validate
    from train.distributed import Topology
    from train.engines.torch_engine import TorchEngine
    from train.schedule import build_schedule

    run = validate(compose(overrides))
    t = run.trainer
    torch.manual_seed(t.seed)
    dcfg = data_config(run.data, t.micro_batch_size, t.seed)
    heldout = HeldOut(dcfg)
    tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.sources, heldout.exclude)
    model = models.build(run.model)
    accumulation = t.global_batch_size // (t.micro_batch_size * world)
    loaders = [iter(TokenLoader(dcfg, tokenizer, rank, world, heldout)) for rank in range(world)]
    engine = TorchEngine(model, run.optim, t.precision, Topology(0, 0, 1, torch.device("cpu")))
    schedule = build_schedule(run.scheduler, run.optim.lr, t.max_steps)
    out = {"loss": {}, "aux_loss": {}, "model": model}
    for step in range(steps):
        micro = [next(loader) for loader in loaders for _ in range(accumulation)]
        result = engine.train_step(micro, schedule(step))
        out["loss"][step + 1], out["aux_loss"][step + 1] = result.loss, result.aux_loss
    return out


def one_pick_aux_bound(tokens_per_micro_batch: int, picks_per_token: int, shares: int) -> float:
    """How much the logged aux loss may differ between two layouts once routing can differ by one pick.

    Step 1 runs on equal weights, so both layouts route alike; later, fp32 sums in another order can
    swap a token's pick between two near-tied experts. The aux loss E·Σ_e f_e·p_e of a micro-batch then
    moves by E·(p_b - p_a)/(T·k) (one pick moved from expert a to b); with every mean router probability
    p_e within a factor 2 of uniform (|p_b - p_a| <= 1/E) that is at most 1/(T·k), and the logged aux is
    the mean over the step's micro-batches and replicas (`shares`)."""
    return 1.0 / (tokens_per_micro_batch * picks_per_token * shares)
