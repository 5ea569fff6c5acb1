"""The memory planner (`python -m train.plan`): its arithmetic against hand computations on tiny models,
its door (a subprocess as a user runs it), and its predictions against measured per-rank peaks of real
runs (slow).

Tiny models keep the unit tests fast: doge-tiny (2 layers, hidden 64, vocab 2048). The validation uses
doge-60m with model.vocab_size=2048 (the built-in corpus's BPE size: no 32768-token BPE to train first)
and doge-20m-moe likewise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import models
from train import plan as planner

from .conftest import REPO, train_env

TINY = ["model=doge-tiny", *planner.MEASURE_SETTINGS]


def make(overrides, devices=1, device="cpu", memory=None):
    return planner.make_plan(overrides, planner.Request(devices=devices, device=device, device_memory=memory))


def real_parameters(preset: str) -> int:
    """The hand count: every distinct parameter of the model built for real, on CPU."""
    import yaml

    values = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
    model = models.build(values)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def group(plan, name, cls=0):
    return plan.classes[cls].group(name)


# ---------------------------------------------------------------------------------------------------
# Arithmetic


def test_weights_gradients_and_adam_by_engine_and_zero_stage():
    P = real_parameters("doge-tiny")
    single = make(TINY)
    assert single.census.total == P
    assert (group(single, "weights"), group(single, "grads"), group(single, "optimizer")) == (4 * P, 4 * P, 8 * P)
    ddp = make(TINY + ["parallel=ddp"], devices=2)
    assert group(ddp, "buffers") >= 4 * P  # DDP's fp32 gradient buckets
    zero1 = make(TINY + ["parallel=zero1"], devices=2)
    # flat fp32 weights; fp32 master partition (4 bytes) + AdamW moments (8) of half the parameters
    assert group(zero1, "weights") == 4 * P
    assert group(zero1, "optimizer") == pytest.approx(12 * P / 2, abs=1)
    zero2 = make(TINY + ["parallel=zero2", "trainer.precision=bf16"], devices=4)
    assert group(zero2, "weights") == 2 * P  # DeepSpeed's bf16 mode casts the model
    assert group(zero2, "optimizer") == pytest.approx(12 * P / 4, abs=1)
    zero3 = make(TINY + ["parallel=zero3"], devices=2)
    threshold = 100_000  # DeepSpeed's stage3_param_persistence_threshold: smaller tensors stay whole
    small = sum(p.numel() for p in models.build(zero3.layout.model_config).parameters() if p.numel() < threshold)
    assert group(zero3, "weights") == pytest.approx(4 * (P / 2 + small / 2), abs=1)
    assert group(zero3, "optimizer") == pytest.approx(12 * P / 2, abs=1)
    # every ZeRO stage holds less optimizer state per rank than DDP, and ZeRO-3 the fewest weights
    assert group(zero1, "optimizer") < group(ddp, "optimizer") and group(zero3, "weights") < group(zero1, "weights")


def test_pipeline_stage_balance_and_bubble_by_hand():
    """doge-tiny on 2 stages cut by decoder layers: stage 0 the embedding and layer 0, stage 1 layer 1, the
    final norm and the tied embedding again (DeepSpeed's TiedLayerSpec on both ends)."""
    plan = make(TINY + ["parallel=zero1", "parallel.pipeline_stages=2", "trainer.global_batch_size=8"], devices=2)
    model = models.build(plan.layout.model_config)
    embed = model.model.embed_tokens.weight.numel()
    layer = [sum(p.numel() for p in model.model.layers[str(i)].parameters()) for i in range(2)]
    norm = model.model.norm.weight.numel()
    assert [s.params for s in plan.stages] == [embed + layer[0], layer[1] + norm + embed]
    assert [s.layers for s in plan.stages] == [[0], [1]]
    text = planner.render(plan)
    assert f"bubble (P-1)/(M+P-1) = {round(100 * 1 / (8 + 1))}%" in text  # 2 stages, 8 micro-batches
    # each stage holds its own parameters: its optimizer state is that of its stage
    assert group(plan, "optimizer", 0) == 12 * plan.stages[0].params
    assert plan.classes[-1].stage.index == 1 and group(plan, "optimizer", -1) == 12 * plan.stages[1].params


@pytest.mark.parametrize("preset", ["doge-tiny", "doge-tiny-moe", "jetmoe-tiny", "glm4-tiny"])
def test_activations_counted_on_fake_tensors_equal_a_real_forward(preset):
    """What the planner counts without allocating is what a real forward pass saves for the backward pass
    (unique storages, the model's own parameters left out), byte for byte."""
    import yaml

    config = models.make_config(yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text()))
    rows, seq = 3, 48
    counted = planner.activations(config, seq, "fp32", "cpu", document_masking=True)
    model = models.build(config)
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (rows, seq))
    positions = (torch.arange(seq) % (seq // 2)).expand(rows, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, shift_labels=ids, position_ids=positions)
    assert counted.saved(rows) == sum(saved.values())
    assert counted.saved(rows, checkpointing=True) < counted.saved(rows)


def test_largest_micro_batch_that_fits_is_the_largest_valid_one_under_the_memory():
    plan = make(TINY + ["trainer.global_batch_size=16"], devices=1)
    mem = plan.classes[0]
    one_row = planner.memory_of(plan.layout, plan.census, mem.stage, plan.acts, mem.ranks, 1, False, None).peak
    eight = planner.memory_of(plan.layout, plan.census, mem.stage, plan.acts, mem.ranks, 8, False, None).peak
    squeezed = make(TINY + ["trainer.global_batch_size=16"], memory=(one_row + eight) // 2)
    # 16 rows per replica: micro-batches of 1, 2, 4, 8, 16 rows are valid; 8 does not fit, 4 does
    assert squeezed.largest == [4]
    assert make(TINY, memory=one_row - 1).largest == [None]


def test_plan_keys_never_reach_the_training_config_and_bad_ones_are_refused():
    request, rest = planner.split_plan_arguments(["model=doge-tiny", "plan.devices=64", "plan.device_memory=80GB"])
    assert rest == ["model=doge-tiny"] and request.devices == 64 and request.device_memory == 80 * 1024**3
    with pytest.raises(planner.Refused, match="Did you mean plan.devices"):
        planner.split_plan_arguments(["plan.device=cuda", "plan.devics=8"])
    with pytest.raises(planner.Refused, match="plan.device_memory='lots' is not a size"):
        planner.split_plan_arguments(["plan.device_memory=lots"])


# ---------------------------------------------------------------------------------------------------
# The door


def run_plan(args, env):
    return subprocess.run([sys.executable, "-m", "train.plan", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def plan_env(tmp_path_factory):
    return train_env(tmp_path_factory.mktemp("plan-cache"))


def test_door_one_verdict_per_rank_class_with_the_largest_micro_batch(plan_env):
    """A pipeline of 2 stages x 2 replicas on CPU: rank 0 (its runtime holds more), rank 1, stage 1's ranks
    2-3: one verdict line each; a memory too small for any micro-batch says so."""
    args = [*TINY, "parallel=zero1", "parallel.pipeline_stages=2", "trainer.global_batch_size=8", "plan.devices=4",
            "plan.device=cpu"]
    proc = run_plan([*args, "plan.device_memory=64GB"], plan_env)
    assert proc.returncode == 0, proc.stderr
    verdicts = [line for line in proc.stdout.splitlines() if "fits" in line and "largest micro-batch" in line]
    assert [v.split(":")[0] for v in verdicts] == ["stage 0, rank 0", "stage 0, rank 1", "stage 1, ranks 2-3"]
    assert all(": fits (" in v and "largest micro-batch that fits: 4" in v for v in verdicts), verdicts
    assert "stage 0:" in proc.stdout and "bubble" in proc.stdout and "collectives per optimizer step" in proc.stdout
    small = run_plan([*args, "plan.device_memory=100MB"], plan_env)
    assert small.returncode == 0, small.stderr
    assert small.stdout.count("does not fit") == 3 and "no micro-batch fits" in small.stdout


def test_door_a_layout_the_trainer_refuses_is_refused_with_its_message(plan_env):
    proc = run_plan([*TINY, "parallel=zero2", "parallel.pipeline_stages=2", "plan.devices=4"], plan_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: parallel.pipeline_stages=2 with ZeRO stage 2: DeepSpeed's pipeline engine supports ZeRO stages 0 and 1")


@pytest.mark.parametrize("args, message", [
    (["parallel.expert_parallel=2", "model=doge-tiny-moe", "plan.devices=3"],
     "parallel.expert_parallel=2 does not divide the world of 3 processes"),  # train.distributed's check
    (["trainer.global_batch_size=6", "plan.devices=4"],
     "trainer.global_batch_size=6 is not a multiple of micro_batch_size x data-parallel replicas"),  # the loop's
    (["optm.lr=1e-3"], "unknown config group optm"),  # python -m train's early check
])
def test_refusals_are_the_trainers(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        planner.main([*TINY, *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_help(capsys):
    planner.main(["--help"])
    out = capsys.readouterr().out
    assert "plan.devices" in out and "plan.device_memory" in out


# ---------------------------------------------------------------------------------------------------
# Validation: predictions against measured per-rank peaks of real runs on this machine

VALIDATED = {  # layout -> (ranks, overrides)
    "single": (1, ["model=doge-60m", "model.vocab_size=2048"]),
    "ddp": (2, ["model=doge-60m", "model.vocab_size=2048", "parallel=ddp"]),
    "zero1": (2, ["model=doge-60m", "model.vocab_size=2048", "parallel=zero1"]),
    "zero2": (2, ["model=doge-60m", "model.vocab_size=2048", "parallel=zero2"]),
    "zero3": (2, ["model=doge-60m", "model.vocab_size=2048", "parallel=zero3"]),
    "pipeline 2": (2, ["model=doge-60m", "model.vocab_size=2048", "parallel=zero1", "parallel.pipeline_stages=2"]),
    "doge-20m-moe ep 2": (2, ["model=doge-20m-moe", "model.vocab_size=2048", "parallel.expert_parallel=2"]),
}
TOLERANCE = 0.15  # the issue's


@pytest.mark.slow
def test_predicted_peaks_within_15_percent_of_measured(tmp_path, cache_dir):
    """Each layout runs for real (2 steps and the final checkpoint, the issue's settings) with its per-rank
    peak resident memory measured by bench_parallel.run_with_rank_peaks (glibc's mmap threshold fixed at
    its default: the planner plans live memory, see planner.CPU_HEAP_NOTE), and is planned for the same
    ranks on CPU. About 4 minutes here."""
    env = {**train_env(cache_dir), "DS_ACCELERATOR": "cpu"}
    report, failures = [], []
    for name, (nproc, layout) in VALIDATED.items():
        overrides = [*layout, *planner.MEASURE_SETTINGS]
        measured = planner.measured_run_peaks(overrides, nproc, env, str(tmp_path / name.replace(" ", "-")))
        predicted = planner.rank_peaks(make(overrides, devices=nproc))
        assert sorted(measured) == list(range(nproc)), f"{name}: ranks measured {sorted(measured)}"
        for rank in range(nproc):
            ratio = predicted[rank] / measured[rank]
            report.append(f"{name:<18} rank {rank}: predicted {predicted[rank] / 2**20:6.0f} MiB, measured "
                          f"{measured[rank] / 2**20:6.0f} MiB, ratio {ratio:.2f}")
            if abs(ratio - 1) > TOLERANCE:
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "\n".join(report)
