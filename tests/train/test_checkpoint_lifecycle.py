"""Checkpoints over a run's life, through `python -m train`: resume follows `latest`, pruning never
deletes the checkpoint a run depends on, broken and half-written checkpoints are moved aside or
removed, and a refused run writes nothing."""

from __future__ import annotations

import json

import pytest

from .conftest import FAST, losses, metrics, run_train


def _names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _state(checkpoint):
    return json.loads((checkpoint / "trainer_state" / "state.json").read_text())


def test_resume_auto_follows_latest_not_the_highest_step(tmp_path, env):
    out = tmp_path / "run"
    run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=6", "trainer.save_every=2",
               "trainer.keep_last=5"], env)
    old_run = _state(out / "checkpoints" / "step-6")["run_id"]
    # a new run in the same directory: its checkpoints sit beside the old run's, `latest` names its own
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=4", "trainer.save_every=2",
                      "trainer.keep_last=1", "optim.lr=1e-3"], env)
    assert "also holds checkpoints of other runs (step-2, step-4, step-6)" in proc.stderr
    new_run = _state(out / "checkpoints" / "step-4")["run_id"]
    assert new_run != old_run and (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert _state(out / "checkpoints" / "step-6")["run_id"] == old_run  # the old run's are left alone
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=5", "trainer.resume=auto",
                      "optim.lr=1e-3"], env)
    assert f"resumed from {out / 'checkpoints' / 'step-4'} at step 4" in proc.stderr
    assert _state(out / "checkpoints" / "step-5")["run_id"] == new_run
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    # without `latest` nothing says which run to continue: refused, naming the runs and the fix
    (out / "checkpoints" / "latest").unlink()
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=6", "trainer.resume=auto"], env,
                     check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds checkpoints of 2 runs" in proc.stderr and "checkpoints/latest does not say which to continue" \
        in proc.stderr and "pass trainer.resume=<a checkpoint directory>" in proc.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]


def test_pruning_keeps_the_checkpoint_the_run_resumed_from(tmp_path, env):
    out = tmp_path / "run"
    run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=4", "trainer.save_every=2"], env)
    (out / "checkpoints" / "step-4" / "model.safetensors").write_bytes(b"broken")
    stale = out / "checkpoints" / ".step-7.tmp"  # what a kill in the middle of a save leaves (a step not saved again)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=3", "trainer.save_every=1",
                      "trainer.keep_last=2", "trainer.resume=auto"], env)
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in proc.stderr
    assert "moved the broken checkpoint" in proc.stderr
    assert f"removing {stale}, left by an interrupted save" in proc.stderr and not stale.exists()  # at the start
    # step 2 is kept (only one complete checkpoint supersedes it so far); the broken one is set aside
    assert _names(out) == ["latest", "step-2", "step-3", "step-4.corrupt"]
    run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=5", "trainer.save_every=1",
               "trainer.keep_last=2", "trainer.resume=auto"], env)
    assert _names(out) == ["latest", "step-4", "step-4.corrupt", "step-5"]


def test_keep_last(tmp_path, env):
    out = tmp_path / "run"
    run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=5", "trainer.save_every=1",
               "trainer.keep_last=2"], env)
    assert _names(out) == ["latest", "step-4", "step-5"]


def test_refused_resume_leaves_the_run_as_it_was(tmp_path, env):
    out = tmp_path / "run"
    run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=2"], env)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=4", "trainer.resume=auto",
                      "data.seq_len=32"], env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.seq_len: 64 -> 32" in proc.stderr and "data.allow_new_order=true" in proc.stderr
    assert "fingerprint" not in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _names(out) == ["latest", "step-2"]


@pytest.mark.parametrize("override,message", [
    ("trainer.global_batch_size=10", "trainer.global_batch_size=10 is not a multiple of micro_batch_size"),
    ("trainer.resume=/nowhere/step-3", "trainer.resume=/nowhere/step-3: no such checkpoint or run directory"),
    ("model.vocab_size=100", "produces 2048 token ids but the model's vocab_size is 100"),
    ("trainer.device=cuda", "trainer.device=cuda but no CUDA device is visible"),
])
def test_refused_runs_write_nothing(tmp_path, env, override, message):
    out = tmp_path / "run"
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=2", override], env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, env):
    taken = tmp_path / "file"
    taken.write_text("mine")
    proc = run_train([f"trainer.output_dir={taken}", *FAST], env, check=False)
    assert proc.returncode == 2
    assert f"trainer.output_dir={taken} is a file, not a directory; choose another path" in proc.stderr
    assert taken.read_text() == "mine"
