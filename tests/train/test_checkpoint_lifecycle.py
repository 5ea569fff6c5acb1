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
    run_id = _state(out / "checkpoints" / "step-6")["run_id"]
    # the run continued from its step 2 again (another learning rate): step 4 is saved anew, `latest` names
    # it, and step 6 (of the abandoned continuation) is left alone
    before = (out / "checkpoints" / "step-6" / "model.safetensors").read_bytes()
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=4", "trainer.save_every=2",
                      "trainer.keep_last=1", "optim.lr=1e-3", f"trainer.resume={out / 'checkpoints' / 'step-2'}"], env)
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert (out / "checkpoints" / "step-6" / "model.safetensors").read_bytes() == before
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=5", "trainer.resume=auto",
                      "optim.lr=1e-3"], env)
    assert f"resumed from {out / 'checkpoints' / 'step-4'} at step 4" in proc.stderr
    assert _state(out / "checkpoints" / "step-5")["run_id"] == run_id
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    # a directory that holds checkpoints of two runs (as one written before runs refused each other's
    # directories could), without `latest`: nothing says which run to continue. Refused, naming the runs
    (out / "checkpoints" / "latest").unlink()
    state = out / "checkpoints" / "step-6" / "trainer_state" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "run_id": "0123456789ab"}))
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=6", "trainer.resume=auto"], env,
                     check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds checkpoints of 2 runs" in proc.stderr and "checkpoints/latest does not say which to continue" \
        in proc.stderr and "pass trainer.resume=<a checkpoint directory>" in proc.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_another_runs_files_are_never_changed(tmp_path, env):
    """A fresh run refuses a directory that holds another run, unless told to overwrite it; a run that
    continues a checkpoint of another directory refuses one that holds another run's checkpoints (it
    would write its metrics.jsonl, status and checkpoints over that run's)."""
    first, second = tmp_path / "first", tmp_path / "second"
    steps = [*FAST, "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=2"]
    run_train([f"trainer.output_dir={first}", *steps], env)
    run_train([f"trainer.output_dir={second}", *steps, "trainer.seed=1"], env)
    first_id = _state(first / "checkpoints" / "step-2")["run_id"]
    kept = _files(first)

    proc = run_train([f"trainer.output_dir={first}", *steps, "trainer.seed=1"], env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: trainer.output_dir={first} holds another run (run {first_id}: checkpoints step-1, step-2; "
        f"metrics.jsonl; status finished). Continue it with trainer.resume=auto, choose another "
        f"trainer.output_dir, or set trainer.overwrite_output_dir=true to remove that run's files and start afresh")
    assert _files(first) == kept

    proc = run_train([f"trainer.output_dir={first}", *steps, f"trainer.resume={second / 'checkpoints' / 'step-1'}"],
                     env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"holds checkpoints of another run (step-1 of run {first_id}, step-2 of run {first_id}) and this run "
            f"continues {second / 'checkpoints' / 'step-1'}, of another directory") in proc.stderr
    assert "Traceback" not in proc.stderr and _files(first) == kept

    proc = run_train([f"trainer.output_dir={first}", *steps, "trainer.seed=1", "trainer.overwrite_output_dir=true"],
                     env)
    assert f"trainer.overwrite_output_dir=true: removed the earlier run's files from {first} (run {first_id}" \
        in proc.stderr
    new_id = _state(first / "checkpoints" / "step-2")["run_id"]
    assert new_id != first_id and _names(first) == ["latest", "step-1", "step-2"]
    assert _state(first / "checkpoints" / "step-1")["run_id"] == new_id
    assert sorted(losses(first)) == [1, 2] and metrics(first)[0]["loss"] != json.loads(
        kept["metrics.jsonl"].decode().splitlines()[0])["loss"]  # this run's metrics, not appended to the other's


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
    ("model.vocab_size=100", "data.tokenizer.vocab_size=2048 (the BPE to train) is more than the model's "
                             "vocab_size=100: set model.vocab_size=2048 (or larger), or set data.tokenizer.vocab_size=100"),
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


def test_a_bpe_that_cannot_fit_the_model_is_refused_before_it_is_trained(tmp_path, env):
    """Training a BPE takes a while and caches it: the sizes are compared first."""
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    proc = run_train([f"trainer.output_dir={out}", *FAST, "model.vocab_size=1000"],
                     {**env, "SMOLPRETRAIN_CACHE": str(cache)}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: data.tokenizer.vocab_size=2048 (the BPE to train) is more than the model's vocab_size=1000")
    assert "training a byte-level BPE" not in proc.stderr and not list(cache.glob("tokenizers/*/tokenizer.json"))
    assert not out.exists()
