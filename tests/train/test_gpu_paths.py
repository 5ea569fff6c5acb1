"""Guards, runnable on a CPU, for code paths that only a GPU exercises for real (issue: the first GPU run;
../shared/reviews/gpu-first-run.md). Each fails against the defect it names: where a CUDA device would
be, a meta tensor (another device torch knows on any build) or a patched availability stands in."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from train.config import validate

from .conftest import compose


def test_precision_auto_is_bf16_on_a_gpu_with_bf16_and_fp32_on_a_cpu(monkeypatch):
    assert validate(compose([])).trainer.precision == "fp32"  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert validate(compose([])).trainer.precision == "bf16"
    assert validate(compose(["trainer.device=cpu"])).trainer.precision == "fp32"
    assert validate(compose(["trainer.precision=fp32"])).trainer.precision == "fp32"
    gpu = validate(compose(["trainer=gpu"])).trainer
    assert gpu.precision == "bf16" and gpu.tf32


def test_the_compiled_loss_chunk_is_decided_by_the_runs_device(monkeypatch):
    """parallelize ran before the engine moved the model to the GPU, so `trainer.compile` never compiled
    the loss chunk on CUDA (the head was still on the CPU when it looked)."""
    import train.engines.parallelize as parallelize_module
    from train import engines

    seen = {}
    monkeypatch.setattr(parallelize_module, "apply_compile", lambda model, compile_loss=None: seen.update(loss=compile_loss))
    run = validate(compose(["model=doge-tiny", "trainer.compile=true"]))
    model = __import__("models").build(run.model)  # on the CPU, as the trainer builds it

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("train.engines.torch_engine.TorchEngine.__init__", stop)
    topology = type("T", (), {"device": torch.device("cuda", 0), "pp_size": 1, "ep_size": 1})()
    with pytest.raises(Stop):
        engines.build_engine(run, model, topology, 1)
    assert seen["loss"] is True
    topology.device = torch.device("cpu")
    with pytest.raises(Stop):
        engines.build_engine(run, model, topology, 1)
    assert seen["loss"] is False


def test_the_timeouts_reach_the_process_groups(monkeypatch):
    """NCCL's 10-minute default aborted jobs whose rank 0 worked alone (a slow save, lm-eval scoring) while
    the others waited in a barrier: the timeout is a config key, and barriers run on a gloo group with
    their own, longer timeout."""
    import torch.distributed as dist

    from train import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw["timeout"])))
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda ranks=None, **kw: calls.append(("group", kw.get("backend"),
                                                                                   kw.get("timeout"))) or object())
    run = validate(compose(["parallel.timeout_minutes=7", "parallel.barrier_timeout_minutes=300"]))
    distributed.setup("cpu", "nccl", timeout_minutes=run.parallel.timeout_minutes,
                      barrier_timeout_minutes=run.parallel.barrier_timeout_minutes)
    assert calls == [("init", "nccl", timedelta(minutes=7)), ("group", "gloo", timedelta(minutes=300))]


def test_optimizer_state_is_created_on_the_parameters_device():
    """Resuming under DeepSpeed created AdamW's `step` on the CPU beside partitions on the GPU; torch's
    fused AdamW hands the step's address to the CUDA kernel, which reads it on the device. Here a meta
    tensor is the GPU."""
    from train.engines.optimizer_state import _new_step

    flat = torch.empty(8, device="meta")
    assert _new_step(3, flat, {"fused": True}).device.type == "meta"
    assert _new_step(3, flat, {"capturable": True}).device.type == "meta"
    # the plain kernel reads the count on the host (a device count would cost a sync per parameter)
    assert _new_step(3, flat, {"fused": None}).device.type == "cpu"


def test_deepspeed_accumulates_bf16_gradients_in_fp32():
    from train.engines.deepspeed_engine import deepspeed_config

    def config(*overrides):
        run = validate(compose(["trainer.precision=bf16", *overrides]))
        return deepspeed_config(run.parallel, run.trainer, run.optim, 1)

    for zero in ("parallel=zero1", "parallel=zero2", "parallel=zero3"):
        assert config(zero)["data_types"] == {"grad_accum_dtype": "fp32"}, zero
    assert "data_types" not in config("parallel.engine=deepspeed")  # DeepSpeed refuses the mix without ZeRO


@pytest.mark.parametrize("layout", [["parallel=zero2", "parallel.expert_parallel=2", "model=jetmoe-tiny"],
                                    ["parallel=zero1", "parallel.pipeline_stages=2", "model=doge-tiny-moe"]])
def test_no_host_tensor_reaches_a_collective_when_saving_and_resuming(layout, tmp_path, cache_dir):
    """NCCL refuses CPU tensors; gloo (these tests) takes them. ZeRO + expert parallelism moved optimizer
    state to the CPU and then all-gathered it at its first checkpoint. Here every `.cpu()` returns a marked
    copy (as on a GPU) and a collective handed one fails the run (tests/train/faults.py), on in-process
    ranks."""
    from tests.ranks import run_distributed

    from .conftest import FAST, losses
    from .faults import train_with_fault

    common = [*FAST, *layout, f"trainer.output_dir={tmp_path}", "trainer.save_every=2", "trainer.eval_every=2"]
    env = {"SMOLPRETRAIN_CACHE": str(cache_dir)}
    run_distributed(train_with_fault, 2, "host-tensors-in-collectives", 0, [*common, "trainer.max_steps=2"], env=env)
    run_distributed(train_with_fault, 2, "host-tensors-in-collectives", 0,
                    [*common, "trainer.max_steps=3", "trainer.resume=auto"], env=env)
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_each_rank_takes_a_gpu_it_can_see(monkeypatch):
    """cuda:LOCAL_RANK assumed every rank sees all GPUs of its node; under per-task GPU binding (Slurm's
    --gpus-per-task, submitit) each sees one, and ranks 1..7 failed with "invalid device ordinal"."""
    from train.distributed import resolve_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # bound: this task sees its own GPU only
    assert resolve_device("cuda", 5) == torch.device("cuda", 0) and chosen == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # the whole node
    assert resolve_device("auto", 5) == torch.device("cuda", 5) and chosen == [0, 5]


def test_cuda_rng_state_is_this_ranks_devices_and_resumes_where_fewer_gpus_are_visible(monkeypatch):
    """Every visible GPU's RNG state was saved per rank (get_rng_state_all) and restored the same way, which
    fails on a resume that sees fewer GPUs (another node, per-task binding)."""
    from train.checkpoint import rng_state, set_rng_state

    visible, current = [8], [3]  # rank 3 of a node whose 8 GPUs it sees
    generators = {index: torch.tensor([index], dtype=torch.uint8) for index in range(8)}

    def get_state(device="cuda"):
        return generators[current[0] if device == "cuda" else device].clone()

    def set_state(state, device="cuda"):
        index = current[0] if device == "cuda" else device  # set_rng_state_all passes device indices
        if index >= visible[0]:
            raise RuntimeError("CUDA error: invalid device ordinal")
        generators[index] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible[0])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [get_state(i) for i in range(visible[0])])
    for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls torch.cuda.random's
        monkeypatch.setattr(module, "set_rng_state", set_state)
    saved = rng_state()
    visible[0], current[0] = 1, 0  # resumed where this rank sees its own GPU only, as device 0
    set_rng_state(saved)
    assert torch.equal(generators[0], torch.tensor([3], dtype=torch.uint8))  # its own generator's state


def test_an_offloaded_optimizer_steps_on_the_ranks_share_of_the_cores(monkeypatch):
    """torchrun and launch/deepspeed.sh give each rank one thread: right for a GPU rank, but with the
    optimizer offloaded (zero2-offload, zero3-offload) AdamW steps on the CPU, and did so on one core."""
    import os

    from train.distributed import use_cores_for_offloaded_optimizer

    threads = [1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.__setitem__(0, n))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 ranks on this node
    cuda = torch.device("cuda", 0)
    assert use_cores_for_offloaded_optimizer(torch.device("cpu"), True) is None and threads == [1]
    assert use_cores_for_offloaded_optimizer(cuda, False) is None and threads == [1]
    assert use_cores_for_offloaded_optimizer(cuda, True) == 4 and threads == [4]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name for it
    assert use_cores_for_offloaded_optimizer(cuda, True) == 16 and threads == [16]
    threads[0] = 24  # OMP_NUM_THREADS asked for more: left alone
    assert use_cores_for_offloaded_optimizer(cuda, True) is None and threads == [24]


def largest_parameter_move(overrides: list[str]) -> dict:
    """One rank of a run: the most parameter elements any one `Module.to(device)` carried, and the
    model's parameter count (a module's parameters partitioned by ZeRO-3 hold none of their elements)."""
    import train.builders
    from tests.ranks import train_ranks

    moved, parameters = [0], [0]
    to, build_engine = torch.nn.Module.to, train.builders.build_engine

    def counting_build_engine(run, model, *args):
        parameters[0] = model.num_parameters()
        return build_engine(run, model, *args)

    def recording_to(module, *args, **kwargs):
        if "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args):
            moved[0] = max(moved[0], sum(p.data.numel() for p in module.parameters()))
        return to(module, *args, **kwargs)

    torch.nn.Module.to, train.builders.build_engine = recording_to, counting_build_engine
    try:
        train_ranks(overrides)
    finally:
        torch.nn.Module.to, train.builders.build_engine = to, build_engine
    return {"moved": moved[0], "parameters": parameters[0]}


def test_zero3_never_puts_the_whole_model_on_the_device(tmp_path, cache_dir):
    """ZeRO-3 exists for models that fit only partitioned: the full model must not go onto each GPU first
    (`model.to(device)` before DeepSpeed partitions it, which also defeats zero3-offload). On a CPU the
    device is the host, so the guard watches the moves themselves: none may carry more than a rank's
    share of the parameters plus the largest single tensor (zero.Init moves one parameter at a time)."""
    from tests.ranks import run_distributed

    from .conftest import FAST

    results = run_distributed(largest_parameter_move, 2,
                              [*FAST, "model=doge-tiny", "parallel=zero3", "trainer.max_steps=1",
                               "trainer.micro_batch_size=2", "trainer.eval_every=0", f"trainer.output_dir={tmp_path}"],
                              env={"SMOLPRETRAIN_CACHE": str(cache_dir)})
    for result in results:
        moved, parameters = result["value"]["moved"], result["value"]["parameters"]
        assert moved < parameters / 2, (moved, parameters)
