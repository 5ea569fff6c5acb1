"""Pipeline parallelism (DeepSpeed's PipelineEngine, 2 stages on 2 gloo processes) against a single
process on the same global batch, through `torchrun -m train`: every architecture's tiny preset with
document masking, the MoE aux loss across stages, tied embeddings, held-out evaluation, resume across
layouts and after SIGKILL, non-finite steps, SIGTERM, and the up-front refusals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.ranks import train_in_ranks
from train.config import RunConfigError, validate

from .conftest import (FAST, REPO, compose, losses, metrics, one_pick_aux_bound, one_process_reference, ranks_env,
                       run_train, train_env)

STEPS = 10
# 4 micro-batches of 2 rows per step, document masking on, held-out evaluation twice
COMMON = [*FAST, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "data.document_masking=true",
          "trainer.eval_every=5", "trainer.save_every=5", "scheduler.warmup=2"]
PIPE = ["parallel=zero1", "parallel.pipeline_stages=2"]
TOLERANCE = 2e-5


# doge-tiny-moe under COMMON: micro-batches of 2 x 64 tokens, 8 picks each, 4 micro-batches per step
AUX_AFTER_STEP_1 = TOLERANCE + one_pick_aux_bound(2 * 64, 8, 4)


def _compare(single, piped, keys=("loss", "aux_loss", "eval_loss"), tolerance=TOLERANCE):
    """fp32 sums in another order: `tolerance`; the aux loss after step 1 may also differ by a routing
    pick (conftest.one_pick_aux_bound)."""
    a = {r["step"]: r for r in metrics(single)}
    b = {r["step"]: r for r in metrics(piped)}
    assert sorted(a) == sorted(b)
    for step in a:
        for key in keys:
            if key in a[step] or key in b[step]:
                bound = AUX_AFTER_STEP_1 if key == "aux_loss" and step > 1 else tolerance
                assert abs(a[step][key] - b[step][key]) <= bound, (step, key, a[step][key], b[step][key])


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, cache_dir):
    """doge-tiny-moe (tied embeddings, router statistics across stages) in one process and in 2 stages."""
    env = train_env(cache_dir)
    root = tmp_path_factory.mktemp("pipeline-moe")
    train_in_ranks([*COMMON, "model=doge-tiny-moe", f"trainer.output_dir={root / 'single'}"], 1, env=ranks_env(cache_dir))
    proc = run_train([*COMMON, *PIPE, "model=doge-tiny-moe", f"trainer.output_dir={root / 'piped'}"], env, nproc=2)
    (root / "piped.stdout").write_text(proc.stdout)
    (root / "piped.stderr").write_text(proc.stderr)
    return root


def test_moe_pipeline_equals_one_process(moe_runs):
    _compare(moe_runs / "single", moe_runs / "piped")
    single, piped = metrics(moe_runs / "single"), metrics(moe_runs / "piped")
    # Routing is discrete: fp32 sums in another order (stage boundaries) can swap two near-tied
    # experts of one token once the weights have moved. The first step runs on equal weights, so its
    # picks are equal; later steps may differ by one pick: 8 x 64 tokens x 8 picks over 64 experts is
    # 64 picks per expert on average, so one pick moves the 2-router mean of the max share by 1/128.
    one_pick = 1 / (2 * 64)
    assert piped[0]["expert_load_max"] == single[0]["expert_load_max"]
    for a, b in zip(single, piped):
        assert abs(a["expert_load_max"] - b["expert_load_max"]) <= one_pick + 1e-9, (a["step"], a, b)
    last = piped[-1]
    assert len(last["expert_load"]) == 2  # both layers' routers, from both stages
    # the measured idle share (bubble, waiting on the other stage, the optimizer step): computing took some
    # of each step, and it is at least the schedule's own bubble, (P-1)/(M+P-1) = 1/5 for 4 micro-batches
    assert all(r["pipeline_bubble_theory"] == pytest.approx(0.2) for r in piped)
    assert all(0.2 * 0.5 < r["pipeline_idle"] < 0.95 for r in piped), [r["pipeline_idle"] for r in piped]
    assert losses(moe_runs / "piped")[STEPS] < losses(moe_runs / "piped")[1]


def test_pipeline_checkpoint_is_one_hugging_face_directory(moe_runs):
    import models

    single = models.from_pretrained(moe_runs / "single" / "checkpoints" / f"step-{STEPS}")
    piped = models.from_pretrained(moe_runs / "piped" / "checkpoints" / f"step-{STEPS}")
    differences = []
    for (name, a), (_, b) in zip(single.state_dict().items(), piped.state_dict().items()):
        # fp32 sums in another order give gradients equal to ~1e-7; Adam divides by sqrt(v), which for
        # weights with tiny gradients turns that into update differences of up to ~1e-5 over 10 steps,
        # and a few rows of an expert table read by a token whose near-tied picks swapped reach ~7e-5
        # (seen on an AVX-512 machine; the per-step losses above agree within 2e-5). A wrong stage or
        # shard would be off by ~lr = 1e-3 in whole tensors.
        assert torch.allclose(a, b, rtol=0, atol=2e-4), (name, float((a - b).abs().max()))
        differences.append((a - b).abs().flatten())
    assert float(torch.cat(differences).mean()) < 1e-6  # measured 4e-8: the bulk of the weights agree
    from train.engines import optimizer_state

    saved = optimizer_state.read_full(moe_runs / "piped" / "checkpoints" / f"step-{STEPS}" / "trainer_state")
    assert set(saved) == {n for n, _ in single.named_parameters()}


def test_a_pipeline_run_says_each_stage_once_and_nothing_raw(moe_runs):
    """Our one line per stage, and none of DeepSpeed's prints (seed settings, topology, the items of each
    stage) nor torch's warning at every backward about the tied embedding's in-place broadcast ("autograd
    kernel was not registered ... silently incorrect behavior"): the stages are built with autograd off,
    and the losses equal one process's (test_moe_pipeline_equals_one_process)."""
    out = (moe_runs / "piped.stdout").read_text() + (moe_runs / "piped.stderr").read_text()
    for stage in (0, 1):
        assert out.count(f"pipeline stage {stage}: ") == 1, out[-3000:]
    for raw in ("SEED_LAYERS=", "Using topology", "stage=0 layers=", "autograd kernel was not registered"):
        assert raw not in out, raw


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["doge-tiny", "glm4-tiny", "jetmoe-tiny"])
def test_every_architecture_in_two_stages_equals_one_process(preset, tmp_path, cache_dir):
    """On in-process ranks (tests/ranks.py), with document masking, for 10 steps; the doors of the pipeline
    are moe_runs and the resume and signal tests below. (test_layouts.py checks the MoE preset in the fast
    tier.)"""
    import os

    overrides = [*COMMON, f"model={preset}", "trainer.eval_every=0", "trainer.save_every=0"]
    train_in_ranks([*overrides, *PIPE, f"trainer.output_dir={tmp_path / 'piped'}"], 2, env=ranks_env(cache_dir))
    os.environ["SMOLPRETRAIN_CACHE"] = str(cache_dir)
    reference = one_process_reference([*overrides, f"trainer.output_dir={tmp_path / 'single'}"], 1, STEPS)
    records = {r["step"]: r for r in metrics(tmp_path / "piped")}
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(records[step]["loss"] - reference["loss"][step]) <= TOLERANCE, step
        if reference["aux_loss"][step] is not None:
            assert abs(records[step]["aux_loss"] - reference["aux_loss"][step]) <= TOLERANCE, step
    if preset == "glm4-tiny":  # untied: the head lives on the last stage only; transformers loads the result
        transformers = pytest.importorskip("transformers")
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "piped" / "checkpoints" / f"step-{STEPS}"))


@pytest.mark.parametrize("direction", ["2->1", "1->2", "zero1->2"])
def test_resume_across_pipeline_layouts(direction, moe_runs, tmp_path, cache_dir):
    """Every layout writes the same name-keyed optimizer state, so a run continues under another one:
    ZeRO-1 without stages (DeepSpeed's flat partitions) into two stages as well. The checkpoints come from
    the door runs (moe_runs); the resumed runs are in-process ranks."""
    source, resumed_layout = ("piped", []) if direction == "2->1" else ("single", PIPE)
    source_dir = moe_runs / source
    if direction == "zero1->2":
        source_dir = tmp_path / "zero1"
        train_in_ranks([*COMMON, "parallel=zero1", "model=doge-tiny-moe", f"trainer.output_dir={source_dir}",
                        "trainer.max_steps=7"], 1, env=ranks_env(cache_dir))
    out = tmp_path / "resumed"
    train_in_ranks([*COMMON, *resumed_layout, "model=doge-tiny-moe", f"trainer.output_dir={out}", "trainer.max_steps=7",
                    f"trainer.resume={source_dir / 'checkpoints' / 'step-5'}"], 2 if resumed_layout else 1,
                   env=ranks_env(cache_dir))
    reference = losses(source_dir)
    resumed = losses(out)
    assert sorted(resumed) == [6, 7]
    for step in (6, 7):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])


def test_pipeline_resumes_exactly_after_sigkill(moe_runs, tmp_path, env):
    out = tmp_path / "killed"
    killed = run_train([*COMMON, *PIPE, "model=doge-tiny-moe", f"trainer.output_dir={out}"], env, nproc=2,
                       check=False, module=["tests.train.faults", "kill-after-checkpoint", "5"])
    assert killed.returncode != 0 and (out / "checkpoints" / "step-5").is_dir()
    run_train([*COMMON, *PIPE, "model=doge-tiny-moe", f"trainer.output_dir={out}", "trainer.resume=auto"], env, nproc=2)
    straight, resumed = losses(moe_runs / "piped"), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in straight:
        assert abs(straight[step] - resumed[step]) <= 1e-6, step


def test_non_finite_steps_are_neutralised_then_stop_the_run(tmp_path, cache_dir):
    from tests.ranks import run_distributed

    from .faults import train_with_fault

    out = tmp_path / "nan"
    # 4 micro-batches per step: cross-entropies after the 12th (steps 4+) are NaN
    results = run_distributed(train_with_fault, 2, "nan-after", 12,
                              [*COMMON, *PIPE, "model=doge-tiny", f"trainer.output_dir={out}", "trainer.eval_every=0",
                               "trainer.save_every=2", "trainer.max_bad_steps=2", "trainer.max_steps=20"],
                              env=ranks_env(cache_dir), check=False)
    assert not any(r["ok"] for r in results)
    assert "2 non-finite steps in a row (last at step 5)" in results[0]["value"] + results[0]["log"], results[0]
    records = {r["step"]: r for r in metrics(out)}
    assert [records[s]["skipped_steps"] for s in (3, 4, 5)] == [0, 1, 2]
    import models

    saved = models.from_pretrained(out / "checkpoints" / "step-4")  # saved after a neutralised step: intact
    before = models.from_pretrained(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(saved.parameters(), before.parameters()))  # step 3 trained


def test_sigterm_saves_and_stops_a_pipeline_run(tmp_path, env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           *COMMON, *PIPE, "model=doge-tiny", f"trainer.output_dir={out}", "trainer.max_steps=100000",
           "trainer.eval_every=0"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, stderr = proc.communicate(timeout=180)
    last = max(losses(out))
    assert (out / "checkpoints" / f"step-{last}" / "MANIFEST.json").is_file(), stderr[-3000:]
    assert f"stopped on request at step {last}" in stderr


@pytest.mark.slow
def test_bf16_with_activation_checkpointing_trains_in_two_stages(tmp_path, cache_dir):
    overrides = [*FAST, "model=doge-tiny", "trainer.max_steps=2", "trainer.micro_batch_size=4"]
    train_in_ranks([*overrides, f"trainer.output_dir={tmp_path / 'fp32'}"], 1, env=ranks_env(cache_dir))
    train_in_ranks([*overrides, *PIPE, "trainer.precision=bf16", "trainer.activation_checkpointing=true",
                    f"trainer.output_dir={tmp_path / 'bf16'}"], 2, env=ranks_env(cache_dir))
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert sorted(bf16) == [1, 2] and all(abs(fp32[s] - bf16[s]) < 0.05 for s in (1, 2))


@pytest.mark.parametrize("overrides,message", [
    (["parallel=zero2", "parallel.pipeline_stages=2"], r"supports ZeRO stages 0 and 1 only; use parallel=zero1"),
    (["parallel=zero3", "parallel.pipeline_stages=2"], r"supports ZeRO stages 0 and 1 only"),
    (["parallel.pipeline_stages=2"], r"runs on DeepSpeed's pipeline engine: add parallel=zero1"),
    (["parallel=zero1", "parallel.pipeline_stages=3"], r"pipeline_stages=3 is more than the model's 2 decoder layers"),
    (["parallel.engine=deepspeed", "parallel.pipeline_stages=2", "trainer.precision=bf16"],
     r"bf16 and ZeRO stage 0: DeepSpeed 0.19.8 cannot load the checkpoints .* use parallel=zero1"),
    (["model=jetmoe-tiny", "parallel=zero1", "parallel.pipeline_stages=2", "parallel.expert_parallel=2"],
     r"pipeline_stages>1 together with parallel.expert_parallel>1 is not supported"),
])
def test_layouts_that_cannot_work_are_refused_up_front(overrides, message):
    with pytest.raises(RunConfigError, match=message):
        validate(compose(overrides))


def test_a_partition_that_leaves_a_stage_without_a_decoder_layer_is_refused():
    """parallel.pipeline_partition=parameters (or uniform) can give a stage only the embedding or the
    head: such a stage is refused with what works instead (the check runs once DeepSpeed has cut)."""
    from train.distributed import LayoutError
    from train.engines.pipeline import EmbedPipe, HeadPipe, LayerPipe, NormPipe, check_partition

    items = [object.__new__(cls) for cls in (EmbedPipe, LayerPipe, LayerPipe, NormPipe, HeadPipe)]
    check_partition([0, 2, 5], items, "layers")  # a layer on each stage
    with pytest.raises(LayoutError, match=r"pipeline_partition=parameters leaves pipeline stage 0 without a decoder "
                                          r"layer \(it holds \['EmbedPipe'\]\); use parallel.pipeline_partition=layers"):
        check_partition([0, 1, 5], items, "parameters")


def test_refusals_through_the_door_write_nothing(tmp_path, env):
    proc = run_train([*FAST, "parallel=zero1", "parallel.pipeline_stages=2", "trainer.global_batch_size=6",
                      f"trainer.output_dir={tmp_path / 'run'}"], env, nproc=2, check=False)
    assert "trainer.global_batch_size=6 is not a multiple of micro_batch_size x data-parallel replicas = 4 x 1" \
        in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run_train([*FAST, "parallel=zero1", "parallel.pipeline_stages=2", f"trainer.output_dir={tmp_path / 'one'}"],
                     env, check=False)
    assert proc.returncode == 2 and "parallel.pipeline_stages=2 does not divide the world of 1 processes" in proc.stderr
    assert not (tmp_path / "one").exists()


@pytest.mark.slow
def test_a_pipeline_stage_needs_no_more_memory_than_a_zero1_replica(tmp_path, env):
    """Each stage of a 2-stage pipeline holds about half the layers, so its peak memory (training and
    saving) must not exceed a ZeRO-1 replica's on the same preset by more than 20%. The checkpoint once
    pickled every parameter as a view of DeepSpeed's flat buffer, so each of a stage's ~60 tensors carried
    the whole buffer: doge-20m's stage 0 peaked at 9.2 GiB against 0.9 GiB without the pipeline."""
    from train.bench_parallel import run_with_rank_peaks

    # doge-20m's layers (the flat buffer the bug multiplied) with the tests' 2k vocabulary; a save at the end
    common = [*FAST, "model=doge-20m", "model.vocab_size=2048", "data.seq_len=32", "trainer.micro_batch_size=1",
              "trainer.global_batch_size=4", "trainer.max_steps=2", "trainer.eval_every=0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train"]
    peaks = {}
    for name, layout in (("replicas", ["parallel=zero1"]), ("stages", PIPE)):
        proc, peaks[name] = run_with_rank_peaks([*torchrun, *common, *layout, f"trainer.output_dir={tmp_path / name}"],
                                                env, REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(peaks["stages"].values()) <= 1.2 * max(peaks["replicas"].values()), peaks
