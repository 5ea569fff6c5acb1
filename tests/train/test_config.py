"""Configs: every group and experiment composes and validates; bad keys and types stop the run before
any work, naming the key and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.cli import check_override_keys, strip_launcher_arguments
from train.config import RunConfigError, validate
from train.engine import deepspeed_config

from .conftest import CONFIG_DIR, compose, run_train

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if "upcycle" not in p.stem)
PARALLEL = sorted(p.stem for p in (Path(CONFIG_DIR) / "parallel").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def test_default_config_is_the_quickstart():
    run = validate(compose([]))
    assert run.model.model_type == "doge" and run.data.sources[0].path == "builtin:python-stdlib"
    assert run.trainer.output_dir == "outputs/quickstart"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_and_validate(experiment):
    run = validate(compose([f"experiment={experiment}"]))
    assert run.trainer.precision == "bf16" and run.data.seq_len == 2048
    assert run.optim.betas == [0.9, 0.95] and run.optim.weight_decay == 0.01 and run.optim.grad_clip == 1.0
    assert run.scheduler.name == "wsd" and run.scheduler.warmup == 0.1 and run.scheduler.decay == 0.1


def test_upcycling_experiment():
    with pytest.raises(RunConfigError, match=r"set trainer.resume to the directory `python -m train.upcycle"):
        validate(compose(["experiment=doge-20m-moe-upcycle"]))
    run = validate(compose(["experiment=doge-20m-moe-upcycle", "trainer.resume=somewhere"]))
    assert run.model.is_moe and run.model.num_experts == 1024 and run.model.num_experts_per_tok == 16
    assert run.optim.new_params_only_steps == 200 and run.scheduler.warmup == 800 and run.optim.lr == 8e-3


def test_doge_recipes_as_published():
    published = {"doge-20m": (8000, 256, 8e-3), "doge-60m": (16000, 512, 6e-3),
                 "doge-160m": (24000, 768, 4e-3), "doge-320m": (32000, 1024, 2e-3)}
    for name, (steps, rows, lr) in published.items():
        run = validate(compose([f"experiment={name}"]))
        assert (run.trainer.max_steps, run.trainer.global_batch_size, run.optim.lr) == (steps, rows, lr)
        assert run.model.hidden_size == {"doge-20m": 256, "doge-60m": 512, "doge-160m": 768, "doge-320m": 1024}[name]


@pytest.mark.parametrize("parallel", PARALLEL)
def test_parallel_groups_and_the_generated_deepspeed_json(parallel):
    run = validate(compose([f"parallel={parallel}", "trainer.global_batch_size=32", "trainer.micro_batch_size=4"]))
    if run.parallel.engine == "deepspeed":
        ds = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation=4)
        # batch sizes derived once from the trainer: 32 = 4 micro x 4 accumulation x 2 ranks
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
        assert ds["zero_optimization"]["stage"] == run.parallel.zero_stage


def test_extra_deepspeed_keys_are_merged_last():
    run = validate(compose(["parallel=zero2", "+parallel.deepspeed.zero_optimization.reduce_bucket_size=1000",
                            "+parallel.deepspeed.gradient_clipping=0.5"]))
    ds = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation=1)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_composes(model):
    assert validate(compose([f"model={model}"])).model.model_type in ("doge", "glm4", "jetmoe")


def test_unknown_keys_name_the_key_and_the_choices():
    assert "unknown config key optim.lrr. Did you mean lr?" in check_override_keys(["optim.lrr=1"])
    assert "Valid keys of trainer: [" in check_override_keys(["trainer.max_step=3"])
    assert "data.tokenizer.vocab" in check_override_keys(["data.tokenizer.vocab=3"])
    assert "model.hidden" in check_override_keys(["model.hidden=3"])
    assert check_override_keys(["optim.lr=1", "model=glm4-tiny", "data.sources.0.path=x", "+foo=1"]) is None
    with pytest.raises(RunConfigError, match=r"unknown config key optim.lrr.*Did you mean lr"):
        validate(compose(["+optim.lrr=1"]))
    with pytest.raises(RunConfigError, match=r"model: unknown key 'hidden' in the 'doge' model config"):
        validate(compose(["+model.hidden=3"]))


def test_wrong_types_and_choices():
    with pytest.raises(RunConfigError, match=r"trainer.max_steps: expected an integer, got 'many'"):
        validate(compose(["trainer.max_steps=many"]))
    with pytest.raises(RunConfigError, match=r"trainer.precision='fp8' is not one of \['fp32', 'bf16'\]"):
        validate(compose(["trainer.precision=fp8"]))
    with pytest.raises(RunConfigError, match=r"parallel.zero_stage=4 is not one of"):
        validate(compose(["parallel.zero_stage=4"]))


def test_cli_refuses_a_bad_key_before_any_work(env):
    proc = run_train(["optim.lrr=1"], env, check=False, timeout=60)
    assert proc.returncode == 2
    assert "unknown config key optim.lrr. Did you mean lr?" in proc.stderr


def test_launcher_local_rank_argument_is_accepted(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_arguments(["--local_rank=1", "optim.lr=1"]) == ["optim.lr=1"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_launcher_arguments(["--local_rank", "0", "x=1"]) == ["x=1"]
