"""Every parallel layout against one process on the same global batches, with the trainer running on two
in-process gloo ranks (tests/ranks.py: forked from a process that has imported everything, so a layout
costs its training steps, not two interpreter starts and a torchrun). The fast tier's layout check; the
door tests start the same layouts through `torchrun -m train` (test_pipeline.py, test_expert_parallel.py,
test_parallel.py, test_launch.py).

The reference draws the rows of both data ranks and accumulates them in one TorchEngine step."""

from __future__ import annotations

import os

import pytest

from tests.ranks import train_in_ranks

from .conftest import FAST, metrics, one_pick_aux_bound, one_process_reference

STEPS = 3
COMMON = [*FAST, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "scheduler.warmup=1",
          "trainer.eval_every=0"]
TOLERANCE = 2e-5  # fp32: the layouts differ in the order of floating-point sums only
PIPE = ["parallel=zero1", "parallel.pipeline_stages=2"]
EP = ["parallel.expert_parallel=2"]
# picks per token, for the aux loss's one-pick bound (conftest.one_pick_aux_bound)
PICKS = {"doge-tiny-moe": 8, "jetmoe-tiny": 2}

LAYOUTS = {
    "ddp": ("doge-tiny-moe", ["parallel=ddp"]),
    "zero1": ("doge-tiny-moe", ["parallel=zero1"]),
    "zero2": ("doge-tiny-moe", ["parallel=zero2"]),
    "zero3": ("doge-tiny", ["parallel=zero3"]),
    "pipeline-doge-moe": ("doge-tiny-moe", PIPE),
    "ep-jetmoe": ("jetmoe-tiny", ["parallel=ddp", *EP]),
    "ep-doge-moe": ("doge-tiny-moe", ["parallel=ddp", *EP]),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir):
    os.environ["SMOLPRETRAIN_CACHE"] = str(cache_dir)
    out = {}
    for preset, layout in LAYOUTS.values():
        dp = 1 if layout is PIPE else 2
        if (preset, dp) not in out:
            out[preset, dp] = one_process_reference(
                [*COMMON, f"model={preset}", f"trainer.output_dir={tmp_path_factory.mktemp('ref')}"], dp, STEPS)
    return out


# One preset per layout (the fast tier). Every architecture's pipeline: test_pipeline.py; expert
# parallelism under ZeRO-1/2 for both MoE families: test_expert_parallel.py (both in the full suite).
@pytest.mark.parametrize("name", LAYOUTS)
def test_two_ranks_equal_one_process(name, references, tmp_path, cache_dir):
    preset, layout = LAYOUTS[name]
    dp = 1 if layout is PIPE else 2
    train_in_ranks([*COMMON, *layout, f"model={preset}", f"trainer.output_dir={tmp_path}"], 2,
                   env={"SMOLPRETRAIN_CACHE": str(cache_dir)})
    reference = references[preset, dp]
    records = {r["step"]: r for r in metrics(tmp_path)}
    assert sorted(records) == list(range(1, STEPS + 1))
    accumulation = 8 // (2 * dp)  # FAST's 8 rows per step, 2 per micro-batch
    for step in range(1, STEPS + 1):
        assert abs(records[step]["loss"] - reference["loss"][step]) <= TOLERANCE, (step, records[step]["loss"])
        if reference["aux_loss"][step] is not None:
            bound = TOLERANCE if step == 1 else TOLERANCE + one_pick_aux_bound(2 * 64, PICKS[preset], accumulation * dp)
            assert abs(records[step]["aux_loss"] - reference["aux_loss"][step]) <= bound, step
    assert records[STEPS]["loss"] < records[1]["loss"]


def test_zero3_resumes_another_layouts_checkpoint_and_its_own_resumes_elsewhere(references, tmp_path, cache_dir):
    """ZeRO-3 reads and writes the name-keyed optimizer state of every engine: a DDP checkpoint continues
    under ZeRO-3, and that run's checkpoint under DDP, each equal to the uninterrupted DDP run."""
    env = {"SMOLPRETRAIN_CACHE": str(cache_dir)}
    common = [*COMMON, "model=doge-tiny", "trainer.save_every=1", "trainer.keep_last=0"]
    train_in_ranks([*common, "parallel=ddp", f"trainer.output_dir={tmp_path / 'ddp'}"], 2, env=env)
    train_in_ranks([*common, "parallel=zero3", "trainer.max_steps=2", f"trainer.output_dir={tmp_path / 'zero3'}",
                    f"trainer.resume={tmp_path / 'ddp' / 'checkpoints' / 'step-1'}"], 2, env=env)
    train_in_ranks([*common, "parallel=ddp", f"trainer.output_dir={tmp_path / 'back'}",
                    f"trainer.resume={tmp_path / 'zero3' / 'checkpoints' / 'step-2'}"], 2, env=env)
    straight = {r["step"]: r["loss"] for r in metrics(tmp_path / "ddp")}
    resumed = {**{r["step"]: r["loss"] for r in metrics(tmp_path / "zero3")},
               **{r["step"]: r["loss"] for r in metrics(tmp_path / "back")}}
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert abs(resumed[step] - straight[step]) <= TOLERANCE, (step, resumed[step], straight[step])


def engines_left_after_training(overrides: list[str]) -> list[str]:
    """One rank: train, then name the DeepSpeed engines, optimizers and models still alive."""
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine

    from models.base import CausalLM
    from tests.ranks import train_ranks

    train_ranks(overrides)
    gc.collect()
    return sorted({type(o).__name__ for o in gc.get_objects()
                   if isinstance(o, (DeepSpeedEngine, CausalLM)) or type(o).__name__.startswith("DeepSpeedZero")})


def test_a_finished_zero3_run_leaves_no_model_alive(tmp_path, cache_dir):
    """A model that outlives the run keeps its process groups alive (ZeRO-3's parameters hold the group
    they gather over), and a group that ends during interpreter shutdown aborts the process after its last
    line (SIGABRT, seen in CI). DeepSpeed keeps a ZeRO-3 model in two module-level places
    (compat.zero3_release_module); once released, nothing of the run is left."""
    from tests.ranks import run_distributed

    results = run_distributed(engines_left_after_training, 2,
                              [*COMMON, "model=doge-tiny", "parallel=zero3", f"trainer.output_dir={tmp_path}"],
                              env={"SMOLPRETRAIN_CACHE": str(cache_dir)})
    assert [r["value"] for r in results] == [[], []]


def test_a_checkpoint_without_checksums_lists_sizes_and_resumes(tmp_path, cache_dir):
    """trainer.verify_checksums=false: rank 0 writes the manifest from the files' sizes alone (no rank
    hashes), and a resume checks the sizes."""
    import json

    env = {"SMOLPRETRAIN_CACHE": str(cache_dir)}
    common = [*COMMON, "model=doge-tiny", "parallel=ddp", "trainer.verify_checksums=false", "trainer.save_every=1",
              f"trainer.output_dir={tmp_path}"]
    train_in_ranks([*common, "trainer.max_steps=2"], 2, env=env)
    files = json.loads((tmp_path / "checkpoints" / "step-2" / "MANIFEST.json").read_text())["files"]
    assert files and all(set(entry) == {"size"} for entry in files.values()), files
    train_in_ranks([*common, "trainer.resume=auto"], 2, env=env)
    assert sorted({r["step"] for r in metrics(tmp_path)}) == [1, 2, 3]
