"""Configs: every group and experiment composes on the typed schema and validates; bad keys, types and
value domains stop the run before any work, naming the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from train.cli import check_overrides, strip_launcher_arguments
from train.config import OptimSchema, RunConfigError, TrainerSchema, validate
from train.engines.deepspeed_engine import deepspeed_config

from .conftest import CONFIG_DIR, compose, run_train

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if "upcycle" not in p.stem)
PARALLEL = sorted(p.stem for p in (Path(CONFIG_DIR) / "parallel").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def test_default_config_is_the_quickstart():
    run = validate(compose([]))
    assert run.model.model_type == "doge" and run.data.sources[0].path == "builtin:python-stdlib"
    assert run.trainer.output_dir == "outputs/quickstart" and run.trainer.max_steps == 300


def test_presets_state_only_what_differs_from_the_schema():
    """A group preset that repeats a schema default is how two defaults drift apart; none does."""
    from train.config import LoggerSchema, ParallelSchema, SchedulerSchema

    schemas = {"optim": OptimSchema(), "trainer": TrainerSchema(), "parallel": ParallelSchema(),
               "scheduler": SchedulerSchema(), "logger": LoggerSchema()}
    for group, schema in schemas.items():
        for preset in (Path(CONFIG_DIR) / group).glob("*.yaml"):
            values = yaml.safe_load(preset.read_text()) or {}
            repeated = [k for k, v in values.items() if k != "name" and k != "engine" and getattr(schema, k) == v]
            assert not repeated, f"{preset}: {repeated} repeat the schema's defaults"


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
    if run.parallel.engine == "ddp":
        assert run.parallel.zero_stage == 0 and not run.parallel.offload_optimizer and not run.parallel.offload_param
        return
    ds = deepspeed_config(run.parallel, run.trainer, run.optim, accumulation=4)
    # batch sizes derived once from the trainer: 32 = 4 micro x 4 accumulation x 2 ranks
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
    assert ds["zero_optimization"]["stage"] == run.parallel.zero_stage == int(parallel[4])
    assert ("offload_optimizer" in ds["zero_optimization"]) == parallel.endswith("offload")
    assert ("offload_param" in ds["zero_optimization"]) == (parallel == "zero3-offload")


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
    assert "unknown config key optim.lrr. Did you mean lr?" in check_overrides(["optim.lrr=1"])
    assert "Valid keys of trainer: [" in check_overrides(["trainer.max_step=3"])
    assert "data.tokenizer.vocab" in check_overrides(["data.tokenizer.vocab=3"])
    assert "data.sources.0.wieght. Did you mean weight?" in check_overrides(["data.sources.0.wieght=3"])
    assert "model.hidden" in check_overrides(["model.hidden=3"])
    assert check_overrides(["optim.lr=1", "model=glm4-tiny", "data.sources.0.path=x", "+parallel.deepspeed.x=1",
                            "model.hidden_dropout=0.1", "optim.lr=1e-3,2e-3", "experiment=null"]) is None
    with pytest.raises(RunConfigError, match=r"unknown config key optim.lrr.*Did you mean lr"):
        validate({**compose([]), "optim": {"lrr": 1}})
    with pytest.raises(RunConfigError, match=r"model: unknown key 'hidden' in the 'doge' model config"):
        validate(compose(["+model.hidden=3"]))


@pytest.mark.parametrize("override,message", [
    ("parallel=zero4", "unknown parallel preset zero4 (parallel=zero4). Did you mean zero3? Presets of parallel: ddp, "
                       "zero1, zero2, zero2-offload, zero3, zero3-offload"),
    ("experiment=doge-20", "unknown experiment preset doge-20 (experiment=doge-20). Did you mean doge-20m?"),
    ("model=doge-tiny,glm4-tiyn", "unknown model preset glm4-tiyn (model=doge-tiny,glm4-tiyn). Did you mean glm4-tiny?"),
    ("+optm.lr=1e-3", "unknown config group optm (+optm.lr=1e-3). Did you mean optim? Groups: data, experiment, "),
    ("trainr=gpu", "unknown config group trainr (trainr=gpu). Did you mean trainer?"),
])
def test_misspelt_groups_and_presets_name_the_closest_and_the_choices(override, message, tmp_path, monkeypatch, capsys):
    status, stderr = _main_in_process([override, f"trainer.output_dir={tmp_path / 'out'}"], monkeypatch, capsys)
    assert status == 2 and stderr.strip().splitlines() == [stderr.strip()], stderr[-2000:]  # one line
    assert stderr.startswith(f"error: {message}"), stderr[-2000:]


def test_cli_refuses_a_misspelt_preset_or_group_in_one_line(env, tmp_path):
    for override, message in (
            ("model=doge-tiyn", "error: unknown model preset doge-tiyn (model=doge-tiyn). Did you mean doge-tiny? "
                                "Presets of model: doge-160m, doge-20m, "),
            ("optm.lr=1e-3", "error: unknown config group optm (optm.lr=1e-3). Did you mean optim? Groups: data, "
                             "experiment, logger, model, optim, parallel, scheduler, trainer")):
        proc = run_train([override, f"trainer.output_dir={tmp_path / 'out'}"], env, check=False, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_wrong_types_and_choices():
    assert "trainer.max_steps: Value 'many'" in check_overrides(["trainer.max_steps=many"])
    with pytest.raises(RunConfigError, match=r"trainer.precision='fp8' is not one of \['auto', 'fp32', 'bf16'\]"):
        validate(compose(["trainer.precision=fp8"]))
    with pytest.raises(RunConfigError, match=r"parallel.zero_stage=4 is not one of"):
        validate(compose(["parallel.zero_stage=4"]))


VALUE_DOMAINS = [
    ("optim.lr=-1", r"optim.lr=-1.0 must be > 0"),
    ("optim.lr=0", r"optim.lr=0.0 must be > 0"),
    ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ("optim.eps=0", r"optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be >= 0"),
    ("optim.grad_clip=-1", r"optim.grad_clip=-1.0 must be >= 0"),
    ("data.seq_len=0", r"data.seq_len=0 must be >= 1"),
    ("trainer.micro_batch_size=0", r"trainer.micro_batch_size=0 must be >= 1"),
    ("trainer.global_batch_size=0", r"trainer.global_batch_size=0 must be >= 1"),
    ("trainer.max_steps=0", r"trainer.max_steps=0 must be >= 1"),
    ("scheduler.min_lr_ratio=2", r"scheduler.min_lr_ratio=2.0 must be in \[0, 1\]"),
    ("scheduler.warmup=-5", r"scheduler.warmup=-5.0 must be >= 0"),
    ("trainer.max_steps=10 scheduler.warmup=8 scheduler.decay=4", r"\(8 steps\) \+ scheduler.decay=4 \(4 steps\) = 12 "
     r"steps: longer than the run \(trainer.max_steps=10\)"),
    ("scheduler=cosine trainer.max_steps=10 scheduler.warmup=12", r"scheduler.warmup=12 \(12 steps\): longer than"),
    ("scheduler=constant trainer.max_steps=10 scheduler.warmup=11", r"scheduler.warmup=11 \(11 steps\): longer than"),
    ("parallel.offload_param=true", r"parallel.offload_param=True needs ZeRO stage 3"),
    ("parallel.zero_stage=2", r"parallel.zero_stage=2 needs parallel.engine=deepspeed"),
]


@pytest.mark.parametrize("override,message", VALUE_DOMAINS)
def test_value_domains_are_checked_before_any_work(override, message):
    with pytest.raises(RunConfigError, match=message):
        validate(compose(override.split()))


def _main_in_process(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """train.cli.main as `python -m train` runs it, in this process: a refusal costs no interpreter start."""
    import logging
    import sys

    from train.cli import main

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # main's logging set-up must not outlive the test
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override,message", VALUE_DOMAINS)
def test_cli_main_refuses_each_value_domain_before_any_work(override, message, tmp_path, monkeypatch, capsys):
    status, stderr = _main_in_process([*override.split(), f"trainer.output_dir={tmp_path / 'out'}"], monkeypatch,
                                      capsys)
    last = stderr.strip().splitlines()[-1]
    assert status == 2 and last.startswith("error: ") and re.search(message, last), stderr[-2000:]
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_key_before_any_work(env, tmp_path):
    proc = run_train(["optim.lrr=1", f"trainer.output_dir={tmp_path / 'out'}"], env, check=False, timeout=60)
    assert proc.returncode == 2
    assert "unknown config key optim.lrr. Did you mean lr?" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=-1"], "error: optim.lr=-1.0 must be > 0 (the peak learning rate, e.g. 3e-3)"),
    (["optim.betas=[0.9,1.5]"], "error: optim.betas=[0.9, 1.5] must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
    (["trainer.micro_batch_size=0"], "error: trainer.micro_batch_size=0 must be >= 1"),
    (["scheduler=cosine", "trainer.max_steps=10", "scheduler.warmup=12"],
     "error: scheduler.warmup=12 (12 steps): longer than the run (trainer.max_steps=10); shorten them (fractions < 1 "
     "scale with the run) or lengthen the run"),
])
def test_cli_refuses_a_bad_value_with_one_message_and_writes_nothing(env, tmp_path, overrides, message):
    proc = run_train([*overrides, f"trainer.output_dir={tmp_path / 'out'}"], env, check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_help_lists_every_preset(env):
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "train", "--help"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for name in [*MODELS, *EXPERIMENTS, *PARALLEL]:
        assert name in proc.stdout, name


def test_launcher_local_rank_argument_is_accepted():
    import os
    from unittest import mock

    with mock.patch.dict(os.environ):  # the LOCAL_RANK it sets must not leak into other tests
        os.environ.pop("LOCAL_RANK", None)
        assert strip_launcher_arguments(["--local_rank=1", "optim.lr=1"]) == ["optim.lr=1"]
        assert os.environ["LOCAL_RANK"] == "1"
        assert strip_launcher_arguments(["--local_rank", "0", "x=1"]) == ["x=1"]


def test_list_elements_may_be_written_with_brackets(tmp_path, monkeypatch, capsys):
    """`data.sources[0].path=...` is how Python spells it; Hydra's lexer alone would refuse the key."""
    missing = tmp_path / "nowhere" / "x.txt"
    status, stderr = _main_in_process(["data=files", f"data.sources[0].path={missing}",
                                       f"trainer.output_dir={tmp_path / 'out'}"], monkeypatch, capsys)
    assert status == 2 and f"source 'files': no files match '{missing}'" in stderr, stderr[-2000:]
    status, stderr = _main_in_process(["data=files", "data.sources[0].wieght=2"], monkeypatch, capsys)
    assert status == 2 and "data.sources.0.wieght. Did you mean weight?" in stderr, stderr[-2000:]


def test_missing_source_path_names_the_override_hydra_accepts(env, tmp_path):
    proc = run_train(["data=files", f"trainer.output_dir={tmp_path / 'out'}"], env, check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.sources.0.path must be set" in proc.stderr and "add data.sources.0.path=... to the command" in proc.stderr
