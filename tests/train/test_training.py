"""End-to-end training through `python -m train`: the quickstart, exact resume after SIGKILL (one
process bitwise, two ranks to 1e-6), checkpoints that transformers loads, corrupt checkpoints,
preemption, non-finite steps, init_from, decay branches, wandb offline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import FAST, REPO, losses, metrics, run_train


def test_quickstart_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path, env):
    out = tmp_path / "qs"
    proc = run_train([f"trainer.output_dir={out}", "trainer.max_steps=60", "trainer.save_every=30",
                      "trainer.eval_every=30", "trainer.progress=false", "trainer.peak_flops=1e11", "trainer.log_every=1"], env)
    history = losses(out)
    assert history[60] < history[1] - 1.0  # visibly lower
    records = metrics(out)
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu"):
        assert key in records[-1]
    assert "eval_loss" in records[-1] and "eval_ppl" in records[-1]
    # the data counters: every trained token of the source, and the held-out documents it skipped
    assert records[-1]["data/python-stdlib/tokens"] == records[-1]["tokens"]
    assert records[-1]["data/python-stdlib/skipped_heldout"] > 0 and records[-1]["data/python-stdlib/documents"] > 0
    # ... and the console says so at the end, with the same counts
    counts = {what: records[-1][f"data/python-stdlib/skipped_{key}"]
              for key, what in (("empty", "empty"), ("heldout", "held out"), ("fetch", "failed to fetch"))}
    line = f"documents skipped per source: { {'python-stdlib': {k: v for k, v in counts.items() if v}} }"
    assert line in proc.stderr, (line, proc.stderr[-3000:])
    final = out / "checkpoints" / "step-60"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-60"
    assert str(final.resolve()) in proc.stderr  # says where
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(final))
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
    import models

    with torch.no_grad():
        assert (model(ids).logits - models.from_pretrained(final)(ids).logits).abs().max() < 1e-4


def _interrupted_then_resumed(out: Path, env: dict, overrides: list[str], nproc: int):
    killed = run_train([f"trainer.output_dir={out}", *overrides], env, nproc=nproc, check=False,
                       module=["tests.train.faults", "kill-after-checkpoint", "4"])
    assert killed.returncode != 0  # SIGKILL right after the step-4 checkpoint
    assert (out / "checkpoints" / "step-4").is_dir() and not (out / "checkpoints" / "step-8").exists()
    run_train([f"trainer.output_dir={out}", "trainer.resume=auto", *overrides], env, nproc=nproc)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, env):
    overrides = [*FAST, "trainer.max_steps=8", "trainer.save_every=4", "model.hidden_dropout=0.1"]
    run_train([f"trainer.output_dir={tmp_path / 'straight'}", *overrides], env)
    _interrupted_then_resumed(tmp_path / "resumed", env, overrides, nproc=1)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == straight  # bitwise: the same floats


@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_resume_on_two_ranks(tmp_path, env, parallel):
    overrides = [*FAST, "trainer.max_steps=8", "trainer.save_every=4", f"parallel={parallel}"]
    run_train([f"trainer.output_dir={tmp_path / 'straight'}", *overrides], env, nproc=2)
    _interrupted_then_resumed(tmp_path / "resumed", env, overrides, nproc=2)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    for step in straight:
        assert abs(straight[step] - resumed[step]) <= 1e-6, step
    # the checkpoint root is a consolidated Hugging Face model, ZeRO-3 partitions included
    import models

    a = models.from_pretrained(tmp_path / "straight" / "checkpoints" / "step-8")
    b = models.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step-8")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-5), name


def test_corrupt_checkpoints_are_skipped_by_auto_and_refused_by_path(tmp_path, env):
    out = tmp_path / "run"
    run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=4", "trainer.save_every=2"], env)
    broken = out / "checkpoints" / "step-4" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=5", "trainer.resume=auto",
                      "trainer.keep_last=5"], env)
    assert "skipping checkpoint" in proc.stderr and "resumed from" in proc.stderr and "step-2" in proc.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    # the broken one was moved aside (kept for inspection, never resumed from or pruned)
    assert (out / "checkpoints" / "step-4.corrupt" / "model.safetensors").stat().st_size == 100
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2", "step-4.corrupt", "step-5"]
    (out / "checkpoints" / "step-2" / "trainer_state" / "optimizer" / "index.json").write_bytes(b"garbage")
    proc = run_train([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=6",
                      f"trainer.resume={out / 'checkpoints' / 'step-2'}"], env, check=False)
    assert proc.returncode == 2 and "optimizer/index.json" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", f"trainer.output_dir={out}", *FAST, "trainer.max_steps=100000"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]  # EX_TEMPFAIL: stopped, requeue me
    last = max(losses(out))
    assert (out / "checkpoints" / f"step-{last}").is_dir()
    assert f"stopped on request at step {last} of 100000; checkpoint: {out / 'checkpoints' / f'step-{last}'}" in stderr
    assert "done:" not in stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import models.base
    import train.loop as loop
    from train.config import validate

    from .conftest import compose

    real = models.base.linear_cross_entropy_sum
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 6 else value  # micro-steps 7+ (steps 4+) are NaN

    monkeypatch.setattr(models.base, "linear_cross_entropy_sum", poisoned)
    out = tmp_path / "run"
    run = validate(compose([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=20", "trainer.save_every=2",
                            "trainer.max_bad_steps=3"]))
    with pytest.raises(loop.TrainingStopped, match=r"3 non-finite steps in a row.*last good checkpoint is .*step-4"):
        loop.train(run)
    records = metrics(out)
    assert [r["skipped_steps"] for r in records if r["step"] >= 4][:3] == [1, 2, 3]
    # skipped updates leave the weights as they were: the checkpoint saved after step 4 is intact
    import models

    saved = models.from_pretrained(out / "checkpoints" / "step-4")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert not (out / "checkpoints" / "step-6").exists()


def test_init_from_starts_a_new_run_from_weights(tmp_path, env):
    first = tmp_path / "first"
    run_train([f"trainer.output_dir={first}", *FAST, "trainer.max_steps=3"], env)
    second = tmp_path / "second"
    run_train([f"trainer.output_dir={second}", *FAST, "trainer.max_steps=2",
               f"+model.init_from={first / 'checkpoints' / 'step-3'}"], env)
    assert sorted(losses(second)) == [1, 2]  # a new run: steps from 1
    assert losses(second)[1] < losses(first)[1] - 0.1  # starting from trained weights


def test_decay_branch_from_a_stable_checkpoint(tmp_path, env):
    main = tmp_path / "main"
    run_train([f"trainer.output_dir={main}", *FAST, "trainer.max_steps=40", "trainer.save_every=10",
               "scheduler.warmup=2", "scheduler.decay=0.1", "trainer.keep_last=5"], env)
    branch = tmp_path / "branch"
    proc = run_train([f"trainer.output_dir={branch}", *FAST, "trainer.max_steps=40", "scheduler.warmup=2",
                      f"trainer.resume={main / 'checkpoints' / 'step-20'}", "scheduler.branch_decay_steps=4"], env)
    assert "decay branch from step 20" in proc.stderr
    lrs = {m["step"]: m["lr"] for m in metrics(branch)}
    assert sorted(lrs) == [21, 22, 23, 24]
    # logged lr is the one of the step just taken: steps 20..23 -> 1 - p, p = 1/4 .. 4/4
    peak = 3e-3
    assert [lrs[s] for s in (21, 22, 23, 24)] == pytest.approx([0.75 * peak, 0.5 * peak, 0.25 * peak, 0.0])


def test_wandb_offline_resume_continues_the_run(tmp_path, env):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    common = [f"trainer.output_dir={out}", *FAST, "logger=wandb", "logger.mode=offline", f"logger.dir={tmp_path}"]
    run_train([*common, "trainer.max_steps=2", "trainer.save_every=2"], {**env, "WANDB_MODE": "offline"})
    run_id = json.loads((out / "checkpoints" / "step-2" / "trainer_state" / "state.json").read_text())["run_id"]
    run_train([*common, "trainer.max_steps=3", "trainer.resume=auto"], {**env, "WANDB_MODE": "offline"})
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # both processes logged to the same run id


@pytest.mark.parametrize("option,tolerance", [("trainer.activation_checkpointing=true", 1e-5),
                                              ("trainer.precision=bf16", 0.05)])
def test_options_train_the_same_run(tmp_path, cache_dir, monkeypatch, option, tolerance):
    """Activation checkpointing recomputes the same numbers; bf16 autocast stays close to fp32."""
    from train.config import validate
    from train.loop import train

    from .conftest import compose

    monkeypatch.setenv("SMOLPRETRAIN_CACHE", str(cache_dir))
    plain = train(validate(compose([*FAST, "trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'a'}"])))
    other = train(validate(compose([*FAST, "trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'b'}", option])))
    assert max(abs(a - b) for a, b in zip(plain["losses"], other["losses"])) <= tolerance


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_setting_up_stops_the_run_and_writes_nothing(tmp_path, env, signum):
    """A signal during set-up (here: while the BPE tokenizer trains on a cold cache) stops the run at once
    with the stopped status; nothing of the run is written."""
    out = tmp_path / "run"
    env = {**env, "SMOLPRETRAIN_CACHE": str(tmp_path / "cold-cache")}
    cmd = [sys.executable, "-m", "train", f"trainer.output_dir={out}", *FAST, "data.tokenizer.train_bytes=20000000"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until it is inside the set-up
        lines.append(line)
        if "training a byte-level BPE" in line:
            break
    proc.send_signal(signum)
    start = time.time()
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert time.time() - start < 30
    assert proc.returncode == 75, "".join(lines) + rest
    assert f"{signal.Signals(signum).name} received while setting up; stopped before the first step" in rest
    assert "Traceback" not in rest and not out.exists()


def test_deepspeed_in_one_process_without_a_launcher(tmp_path, env):
    run_train([f"trainer.output_dir={tmp_path}", *FAST, "trainer.max_steps=2", "parallel=zero2"], env)
    assert sorted(losses(tmp_path)) == [1, 2]
    # ZeRO writes the name-keyed optimizer state of every engine
    assert (tmp_path / "checkpoints" / "step-2" / "trainer_state" / "optimizer" / "index.json").is_file()


def test_a_one_step_run_states_its_schedule_and_warns_of_positions_beyond_the_model(tmp_path, env):
    proc = run_train([f"trainer.output_dir={tmp_path}", *FAST, "trainer.max_steps=1",
                      "model.max_position_embeddings=32"], env)
    assert "schedule: wsd: peak lr 0.003; no warmup; stable step 0; no decay; 1 step" in proc.stderr
    assert ("data.seq_len=64 exceeds the model's max_position_embeddings=32: positions beyond it are extrapolated "
            "(set model.max_position_embeddings, or a shorter data.seq_len)") in proc.stderr
    assert sorted(losses(tmp_path)) == [1]
