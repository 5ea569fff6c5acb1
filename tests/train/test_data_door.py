"""The data side of `python -m train`, used as a user would: loader workers whatever
TOKENIZERS_PARALLELISM says."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import FAST, metrics, run_train


def test_loader_workers_train_with_tokenizers_parallelism_on(tmp_path, env):
    """The parent uses the tokenizers thread pool (held-out encoding, BPE training) before forking
    the loader workers; with TOKENIZERS_PARALLELISM=true the workers used to wait on it forever."""
    out = tmp_path / "run"
    try:
        run_train([f"trainer.output_dir={out}", *FAST, "data.num_workers=2", "trainer.max_steps=3",
                   "trainer.eval_every=3"], {**env, "TOKENIZERS_PARALLELISM": "true"}, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("python -m train data.num_workers=2 with TOKENIZERS_PARALLELISM=true hung")
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3]
