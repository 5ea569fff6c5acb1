"""Upcycling a dense Doge into a CDMoE: exact function preservation at step 0 (ours and transformers'
checkpoints), the bad-input errors (DST untouched), and continued training without a loss spike."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import models
from train.upcycle import main as upcycle_main

from .conftest import FAST, losses, run_train

TINY = dict(model_type="doge", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, keep_window_size=8, tie_word_embeddings=True)


def _perturbed(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise if name.endswith(".A") else (p + 0.3 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5))
    return model


@pytest.fixture()
def dense_dir(tmp_path):
    model = _perturbed(models.build(TINY))
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_zero_init_upcycle_is_function_preserving(dense_dir, tmp_path, capsys):
    assert upcycle_main([str(dense_dir), str(tmp_path / "moe"), "--num-experts", "16", "--experts-per-token", "4"]) == 0
    assert "largest logit difference, dense vs upcycled = 0" in capsys.readouterr().out
    moe = models.from_pretrained(tmp_path / "moe")
    assert moe.config.is_moe and moe.config.num_experts == 16 and moe.config.router_layout == "per_token"
    ids = torch.randint(0, 64, (2, 20))
    dense = models.from_pretrained(dense_dir)
    assert torch.equal(_logits(moe, ids), _logits(dense, ids))
    for layer_moe, layer_dense in zip(moe.model.layers.values(), dense.model.layers.values()):
        assert torch.equal(layer_moe.mlp.gate_proj.weight, layer_dense.mlp.gate_proj.weight)  # shared expert = dense MLP
        assert layer_moe.mlp.up_embed.weight.abs().sum() == 0 and layer_moe.mlp.down_embed.weight.std() > 0
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert theirs.config.is_moe and (theirs(ids).logits - _logits(dense, ids)).abs().max() < 1e-5


def test_upcycle_a_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    kwargs = {k: v for k, v in TINY.items() if k != "model_type"}
    dense = _perturbed(transformers.DogeForCausalLM(transformers.DogeConfig(**kwargs))).eval()
    dense.save_pretrained(tmp_path / "hf-dense")
    assert upcycle_main([str(tmp_path / "hf-dense"), str(tmp_path / "moe"), "--num-experts", "64",
                         "--experts-per-token", "8"]) == 0
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        reference = dense(ids).logits
    assert (models.from_pretrained(tmp_path / "moe")(ids).logits - reference).abs().max() < 1e-5


def test_random_init_reports_the_difference(dense_dir, tmp_path, capsys):
    assert upcycle_main([str(dense_dir), str(tmp_path / "moe"), "--num-experts", "16", "--experts-per-token", "4",
                         "--init", "random"]) == 0
    out = capsys.readouterr().out
    difference = float(out.split("dense vs upcycled = ")[1].split()[0])
    assert difference > 0


@pytest.mark.parametrize("problem", ["not-doge", "already-moe", "not-square", "negative", "k-too-large", "k-zero",
                                     "dst-taken", "corrupt", "missing"])
def test_bad_input_gives_its_error_and_leaves_dst_untouched(problem, dense_dir, tmp_path, capsys):
    src, dst = dense_dir, tmp_path / "dst"
    args = ["--num-experts", "16", "--experts-per-token", "4"]
    expected = {
        "not-doge": "upcycling needs a Doge model", "already-moe": "already a mixture of experts",
        "not-square": "must be a perfect square", "k-too-large": "--experts-per-token 17",
        "negative": "--num-experts -16 must be a positive perfect square",
        "k-zero": "--experts-per-token 0", "dst-taken": "exists and is not empty",
        "corrupt": "not a readable safetensors file", "missing": "no such directory",
    }[problem]
    if problem == "not-doge":
        src = tmp_path / "glm"
        models.build(dict(model_type="glm4", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=None)).save_pretrained(src)
    elif problem == "already-moe":
        src = tmp_path / "moe-src"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.build({**TINY, "is_moe": True, "num_experts": 16, "num_experts_per_tok": 2}).save_pretrained(src)
    elif problem == "not-square":
        args = ["--num-experts", "15", "--experts-per-token", "4"]
    elif problem == "negative":
        args = ["--num-experts", "-16", "--experts-per-token", "4"]
    elif problem == "k-too-large":
        args = ["--num-experts", "16", "--experts-per-token", "17"]
    elif problem == "k-zero":
        args = ["--num-experts", "16", "--experts-per-token", "0"]
    elif problem == "dst-taken":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif problem == "corrupt":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    elif problem == "missing":
        src = tmp_path / "nowhere"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert upcycle_main([str(src), str(dst), *args]) == 2
    assert expected in capsys.readouterr().err
    if problem == "dst-taken":
        assert (dst / "keep.txt").read_text() == "mine" and sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    else:
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary leftovers


def test_overwrite_replaces_a_taken_dst(dense_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    assert upcycle_main([str(dense_dir), str(dst), "--num-experts", "16", "--experts-per-token", "4", "--overwrite"]) == 0
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").is_file()


def test_dense_training_then_moe_continues_without_a_spike(tmp_path, env):
    # dense doge-tiny for 30 steps of a 60-step WSD run (decay starts at step 54): a stable checkpoint
    common = [*FAST, "trainer.max_steps=60", "scheduler.warmup=5", "scheduler.decay=6", "trainer.eval_every=10"]
    dense = tmp_path / "dense"
    run_train([f"trainer.output_dir={dense}", *common, "trainer.save_every=30", "trainer.keep_last=5"], env)
    stable = dense / "checkpoints" / "step-30"
    assert upcycle_main([str(stable), str(tmp_path / "moe-start"), "--num-experts", "64", "--experts-per-token", "8"]) == 0
    state = json.loads((tmp_path / "moe-start" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 30 and state["upcycled_at"] == 30 and state["optimizer_state"]

    # ~20 more steps, dense and upcycled, on the same data (the schedule is the same 60-step WSD)
    more = [*common, "trainer.max_steps=50", "trainer.save_every=0"]
    more[more.index("trainer.max_steps=60")] = "trainer.max_steps=50"
    run_train([f"trainer.output_dir={tmp_path / 'dense-more'}", *more, f"trainer.resume={stable}"], env)
    run_train([f"trainer.output_dir={tmp_path / 'moe'}", *more, f"trainer.resume={tmp_path / 'moe-start'}"], env)
    dense_more, moe = losses(tmp_path / "dense-more"), losses(tmp_path / "moe")
    assert sorted(moe) == list(range(31, 51))
    assert moe[31] == dense_more[31]  # the same function at the switch: the same first loss, exactly
    for step in (31, 32, 33):
        assert abs(moe[step] - dense_more[step]) < 0.05  # no spike
    dense_losses = losses(dense)
    before = sum(dense_losses[s] for s in range(21, 31)) / 10
    after = sum(moe[s] for s in range(41, 51)) / 10
    assert after < before - 0.1  # the loss keeps falling after the switch (10-step means: batches are noisy)
    moe_eval = [m["eval_loss"] for m in _metrics(tmp_path / "moe") if "eval_loss" in m][-1]
    dense_eval = [m["eval_loss"] for m in _metrics(tmp_path / "dense-more") if "eval_loss" in m][-1]
    assert moe_eval < dense_eval + 0.02  # and the held-out loss is no worse than the dense run's
    final = models.from_pretrained(tmp_path / "moe" / "checkpoints" / "step-50")
    start = models.from_pretrained(tmp_path / "moe-start")
    for layer, initial in zip(final.model.layers.values(), start.model.layers.values()):
        assert layer.mlp.up_embed.weight.abs().sum() > 0  # experts received gradient
        assert not torch.equal(layer.mlp.down_embed.weight, initial.mlp.down_embed.weight)
        assert not torch.equal(layer.mlp.router_gate.weight, initial.mlp.router_gate.weight)
    last = _metrics(tmp_path / "moe")[-1]
    assert "aux_loss" in last and "expert_load_max" in last and "experts_idle" in last


def _metrics(directory):
    return [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines() if x]


def test_staged_schedule_trains_only_the_new_experts_first(tmp_path, env):
    dense = tmp_path / "dense"
    run_train([f"trainer.output_dir={dense}", *FAST, "trainer.max_steps=10", "scheduler.warmup=2",
               "scheduler.decay=2"], env)
    assert upcycle_main([str(dense / "checkpoints" / "step-10"), str(tmp_path / "moe-start"), "--num-experts", "16",
                         "--experts-per-token", "4"]) == 0
    run_train([f"trainer.output_dir={tmp_path / 'moe'}", *FAST, "trainer.max_steps=13", "scheduler.warmup=2",
               "scheduler.decay=0", f"trainer.resume={tmp_path / 'moe-start'}", "optim.new_params_only_steps=3"], env)
    start = models.from_pretrained(tmp_path / "moe-start").state_dict()
    after = models.from_pretrained(tmp_path / "moe" / "checkpoints" / "step-13").state_dict()
    for name, tensor in start.items():
        new = any(k in name for k in ("router_gate", "down_embed", "up_embed"))
        assert torch.equal(tensor, after[name]) != new, name  # only the new experts moved
    shutil.rmtree(tmp_path / "moe")
    run_train([f"trainer.output_dir={tmp_path / 'moe'}", *FAST, "trainer.max_steps=15", "scheduler.warmup=2",
               "scheduler.decay=0", f"trainer.resume={tmp_path / 'moe-start'}", "optim.new_params_only_steps=3"], env)
    later = models.from_pretrained(tmp_path / "moe" / "checkpoints" / "step-15").state_dict()
    assert not torch.equal(start["model.layers.0.mlp.gate_proj.weight"], later["model.layers.0.mlp.gate_proj.weight"])


def test_cli_refuses_a_negative_expert_count(dense_dir, tmp_path, env):
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "train.upcycle", str(dense_dir), str(tmp_path / "dst"), "--num-experts",
                           "-16", "--experts-per-token", "4"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --num-experts -16 must be a positive perfect square" in proc.stderr
    assert not (tmp_path / "dst").exists()
