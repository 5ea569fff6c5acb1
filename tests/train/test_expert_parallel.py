"""Expert parallelism on 2 gloo processes, through `torchrun -m train` (ep_runs, the killed run, upcycling) and
on in-process ranks (tests/ranks.py; the ZeRO variants and the resumed runs): JetMoE (MLP and attention
experts) and Doge CDMoE (expert tables) with their experts split over 2 ranks equal one process on the
same global batch (losses, aux losses, final weights), with DDP, ZeRO-1 and ZeRO-2; each rank holds only
its slice; checkpoints resume across expert-parallel sizes and after SIGKILL; upcycled checkpoints
train under it; layouts that cannot work are refused up front."""

from __future__ import annotations

import os

import pytest
import torch

import models
from tests.ranks import train_in_ranks
from train.config import RunConfigError, validate

from .conftest import FAST, compose, losses, metrics, one_process_reference, ranks_env, run_train, train_env

STEPS = 10
COMMON = [*FAST, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "scheduler.warmup=2",
          "trainer.save_every=5", "trainer.keep_last=5"]
EP = ["parallel.expert_parallel=2"]
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def references(cache_dir, tmp_path_factory):
    os.environ["SMOLPRETRAIN_CACHE"] = str(cache_dir)
    out = {}
    for preset in ("jetmoe-tiny", "doge-tiny-moe"):
        out[preset] = one_process_reference(
            [*COMMON, f"model={preset}", f"trainer.output_dir={tmp_path_factory.mktemp('ref')}"], 2, STEPS)
    return out


@pytest.fixture(scope="module")
def ep_runs(cache_dir, tmp_path_factory):
    """ep=2 with DDP for both families (reused by the resume tests)."""
    env = train_env(cache_dir)
    root = tmp_path_factory.mktemp("ep")
    for preset in ("jetmoe-tiny", "doge-tiny-moe"):
        proc = run_train([*COMMON, *EP, f"model={preset}", f"trainer.output_dir={root / preset}"], env, nproc=2)
        (root / f"{preset}.stderr").write_text(proc.stderr)
    return root


def _check_against_reference(run_dir, reference):
    records = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(records[step]["loss"] - reference["loss"][step]) <= TOLERANCE, step
        assert abs(records[step]["aux_loss"] - reference["aux_loss"][step]) <= TOLERANCE, step
    # the checkpoint is one full model: every expert slice gathered back
    final = models.from_pretrained(run_dir / "checkpoints" / f"step-{STEPS}")
    expected = reference["model"].state_dict()
    for name, tensor in final.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=TOLERANCE), name
    assert records[STEPS]["loss"] < records[1]["loss"]


@pytest.mark.parametrize("preset", ["jetmoe-tiny", "doge-tiny-moe"])
def test_ddp_expert_parallel_equals_one_process(preset, references, ep_runs):
    _check_against_reference(ep_runs / preset, references[preset])


@pytest.fixture(scope="module")
def zero2_jetmoe_run(cache_dir, tmp_path_factory):
    """jetmoe-tiny at ep=2 under ZeRO-2 on in-process ranks (reused by the resume test)."""
    out = tmp_path_factory.mktemp("ep-zero2") / "jetmoe-tiny"
    train_in_ranks([*COMMON, *EP, "parallel=zero2", "model=jetmoe-tiny", f"trainer.output_dir={out}"], 2,
                   env=ranks_env(cache_dir))
    return out


@pytest.mark.slow
def test_zero2_expert_parallel_equals_one_process(references, zero2_jetmoe_run):
    _check_against_reference(zero2_jetmoe_run, references["jetmoe-tiny"])


@pytest.mark.slow
@pytest.mark.parametrize("parallel,preset", [("zero2", "doge-tiny-moe"), ("zero1", "jetmoe-tiny")])
def test_zero_expert_parallel_equals_one_process(parallel, preset, references, tmp_path, cache_dir):
    train_in_ranks([*COMMON, *EP, f"parallel={parallel}", f"model={preset}", f"trainer.output_dir={tmp_path}"], 2,
                   env=ranks_env(cache_dir))
    _check_against_reference(tmp_path, references[preset])


@pytest.mark.slow
def test_zero2_expert_parallel_checkpoint_resumes_without_expert_parallelism(zero2_jetmoe_run, tmp_path, cache_dir):
    """DeepSpeed's ZeRO-2 partitions hold the expert slices at ep=2 and whole experts at ep=1: the
    name-keyed optimizer state carries a run across, through DeepSpeed's fragment API both ways."""
    out = tmp_path / "resumed"
    train_in_ranks([*COMMON, "parallel=zero2", "model=jetmoe-tiny", f"trainer.output_dir={out}", "trainer.max_steps=7",
                    f"trainer.resume={zero2_jetmoe_run / 'checkpoints' / 'step-5'}"], 2, env=ranks_env(cache_dir))
    reference, resumed = losses(zero2_jetmoe_run), losses(out)
    assert sorted(resumed) == [6, 7]
    for step in (6, 7):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])


@pytest.mark.parametrize("preset,expert_params", [("jetmoe-tiny", 65536), ("doge-tiny-moe", 8192)])
def test_each_rank_holds_its_slice(preset, expert_params, ep_runs):
    """The full model's expert tensors, and what rank 0 says it holds: the rest plus half the experts."""
    model = models.from_pretrained(ep_runs / preset / "checkpoints" / f"step-{STEPS}")
    total = model.num_parameters()
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if any(k in n for k in ("input_linear", "output_linear", "down_embed", "up_embed")))
    assert experts == 2 * expert_params
    line = f"this rank holds {total - expert_params} of {total} parameters ({expert_params} expert parameters, 1/2"
    assert line in (ep_runs / f"{preset}.stderr").read_text()


@pytest.mark.parametrize("direction", ["ep2->ep1", "ep1->ep2"])
def test_resume_across_expert_parallel_sizes(direction, ep_runs, tmp_path, cache_dir):
    """The ep=2 checkpoint of the door run (ep_runs) continued without expert parallelism, and the other way;
    the resumed runs on in-process ranks."""
    preset = "jetmoe-tiny"
    if direction == "ep2->ep1":
        source, resumed_layout = ep_runs / preset, []
    else:
        source, resumed_layout = tmp_path / "ep1", EP
        train_in_ranks([*COMMON, f"model={preset}", f"trainer.output_dir={source}", "trainer.max_steps=7"], 2,
                       env=ranks_env(cache_dir))
    out = tmp_path / "resumed"
    train_in_ranks([*COMMON, *resumed_layout, f"model={preset}", f"trainer.output_dir={out}", "trainer.max_steps=7",
                    f"trainer.resume={source / 'checkpoints' / 'step-5'}"], 2, env=ranks_env(cache_dir))
    reference, resumed = losses(source), losses(out)
    assert sorted(resumed) == [6, 7]
    for step in (6, 7):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])


def test_killed_expert_parallel_run_resumes_exactly(ep_runs, tmp_path, env):
    preset = "doge-tiny-moe"
    out = tmp_path / "killed"
    killed = run_train([*COMMON, *EP, f"model={preset}", f"trainer.output_dir={out}"], env, nproc=2, check=False,
                       module=["tests.train.faults", "kill-after-checkpoint", "5"])
    assert killed.returncode != 0 and (out / "checkpoints" / "step-5").is_dir()
    run_train([*COMMON, *EP, f"model={preset}", f"trainer.output_dir={out}", "trainer.resume=auto"], env, nproc=2)
    straight, resumed = losses(ep_runs / preset), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in straight:
        assert abs(straight[step] - resumed[step]) <= 1e-6, step


def test_upcycled_checkpoint_trains_under_expert_parallelism(tmp_path, env):
    from train.upcycle import main as upcycle_main

    dense = tmp_path / "dense"
    run_train([*FAST, "trainer.max_steps=3", f"trainer.output_dir={dense}"], env)
    assert upcycle_main([str(dense / "checkpoints" / "step-3"), str(tmp_path / "moe"), "--num-experts", "16",
                         "--experts-per-token", "4"]) == 0
    # trained in one process, continued on two: the data order cannot go on token for token, so the run is
    # refused, in the keys the user set (data.num_workers=0, not the one stream per rank the state records)
    continued = [*FAST, *EP, "trainer.max_steps=5", f"trainer.output_dir={tmp_path / 'run'}",
                 f"trainer.resume={tmp_path / 'moe'}"]
    proc = run_train(continued, env, nproc=2, check=False)
    assert proc.returncode != 0 and not (tmp_path / "run").exists(), proc.stderr[-3000:]
    assert ("error: cannot resume the data stream exactly: saved with 1 data-parallel rank(s), data.num_workers=0 or "
            "1, data fingerprint ") in proc.stderr, proc.stderr[-3000:]
    assert "; now 2 data-parallel rank(s), data.num_workers=0, fingerprint " in proc.stderr
    assert "or set data.allow_new_order=true to start a fresh data order" in proc.stderr
    # with a new data order it trains (the optimizer state carries over)
    proc = run_train([*continued, "data.allow_new_order=true"], env, nproc=2)
    assert sorted(losses(tmp_path / "run")) == [4, 5]
    # the per_token layout's export warning: once, where config.json is written (rank 0's save at step 5),
    # not also where the resumed architecture is compared with the model group's
    assert proc.stderr.count("exporting a Doge MoE with router_layout='per_token'") == 1, proc.stderr[-3000:]
    trained = models.from_pretrained(tmp_path / "run" / "checkpoints" / "step-5")
    assert trained.config.is_moe and trained.model.layers["0"].mlp.up_embed.weight.abs().sum() > 0


@pytest.mark.parametrize("overrides,message", [
    (["model=doge-tiny", *EP], r"needs a mixture-of-experts model; doge \(is_moe: false\) has no experts"),
    (["model=glm4-tiny", *EP], r"needs a mixture-of-experts model; glm4 has no experts"),
    (["model=jetmoe-tiny", "parallel.expert_parallel=3"], r"does not divide the model's 4 experts; use one of \[1, 2, 4\]"),
    (["model=jetmoe-tiny", "parallel=zero3", *EP], r"DeepSpeed refuses its MoE parameter groups under ZeRO-3; use "
                                                   r"parallel=zero1, parallel=zero2 or parallel=ddp"),
])
def test_layouts_that_cannot_work_are_refused_up_front(overrides, message):
    with pytest.raises(RunConfigError, match=message):
        validate(compose(overrides))


def test_expert_parallel_size_must_divide_the_world(tmp_path, env):
    proc = run_train([*FAST, "model=jetmoe-tiny", "parallel.expert_parallel=2", f"trainer.output_dir={tmp_path}/run"],
                     env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parallel.expert_parallel=2 does not divide the world of 1 processes; use a divisor of 1 ([1])" in proc.stderr
    assert not (tmp_path / "run").exists()


def _cdmoe_slot_work(preset: str) -> dict:
    """One rank: doge's CDMoE sharded over every rank, one forward and backward of the same batch on each;
    the slots this rank computed and the slots of the group's tokens."""
    import models
    from train.distributed import setup, teardown
    from train.engines.expert_parallel import ShardedRankOneExperts, shard_experts

    from .conftest import compose

    topology = setup("cpu", expert_parallel=int(os.environ["WORLD_SIZE"]))
    try:
        torch.manual_seed(0)
        model = models.build(validate(compose([f"model={preset}"])).model)
        shard_experts(model, topology)
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(topology.rank))
        model(ids, labels=ids).loss.backward()
        experts = [m for m in model.modules() if isinstance(m, ShardedRankOneExperts)]
        return {"computed": sum(m.slots_computed for m in experts), "seen": sum(m.slots_seen for m in experts)}
    finally:
        teardown()


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_cdmoe_rank_computes_only_its_experts_slots(ranks, cache_dir):
    """The slots of the group's tokens are split between the ranks without overlap (each computes only
    those of the experts it holds): together they compute each slot once, each about 1/N of them (the
    router's picks are near uniform at initialisation: within 25% of an even share)."""
    from tests.ranks import run_distributed

    work = [r["value"] for r in run_distributed(_cdmoe_slot_work, ranks, "doge-tiny-moe")]
    seen = work[0]["seen"]
    assert all(w["seen"] == seen for w in work)
    assert sum(w["computed"] for w in work) == seen
    for w in work:
        assert abs(w["computed"] / seen - 1 / ranks) <= 0.25 / ranks, work
