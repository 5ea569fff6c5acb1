"""Every private name of DeepSpeed and torch the engines touch, behind one door.

A library release may rename or reshape what it does not publish. Each private name used here is
reached through one function of this module, checked against the versions below (tests/train/
test_compat.py has one test per name that fails when the installed library changes it), and a missing
name is a `LibraryChanged` error naming the name, the versions it was checked against and the installed
one, at the moment it is first needed, instead of an AttributeError deep inside a step.

    name (library)                                         used for
    deepspeed.ops.__compatible_ops__                        skip the shared-memory comm op build on CPU
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model (torch)
                                                            DDP leaves expert slices alone
    deepspeed.module_inject.auto_ep_layer.compute_split_plan, _AllToAllV
                                                            JetMoE's expert all-to-all (AutoEP's primitives)
    deepspeed.moe.layer.MoE (built without its __init__), deepspeed.utils.groups.
        _get_expert_parallel_group_dict / _create_expert_and_data_parallel
                                                            DeepSpeed's MoE machinery for our expert slices
    ZeRO-1/2 optimizer: _lazy_init_hp_params_optimizer_state, _hp_optimizer_states_linked,
        param._hp_mapping (lp_fragment_address, get_hp_fragment)
                                                            per-parameter views of ZeRO's flat partitions
    PipelineEngine._INSTRUCTION_MAP                          timing and the non-finite check per instruction
    PipelineModule._layer_specs                             dropping the other stages' pieces
    deepspeed.runtime.pipe.p2p._grid, _groups               releasing the pipeline's process groups at the end
    deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK, PartitionedParameterCoordinator.
        __params_to_release (its lru_cache)                 releasing a ZeRO-3 model (and its groups) at the end
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch

CHECKED_AGAINST = {"deepspeed": "0.19.8", "torch": "2.13.0"}


class LibraryChanged(RuntimeError):
    """A private name this project relies on is missing or different in the installed library."""


def _installed(library: str) -> str:
    if library == "torch":
        return torch.__version__
    import deepspeed

    return deepspeed.__version__


def _get(owner, name: str, library: str, what: str):
    try:
        return getattr(owner, name)
    except AttributeError:
        raise LibraryChanged(
            f"{library} {_installed(library)} has no {what} (`{name}`), which this trainer uses and checked against "
            f"{library} {CHECKED_AGAINST[library]}; install {library}=={CHECKED_AGAINST[library]} (pyproject.toml pins "
            f"it) or update train/engines/compat.py") from None


# ---------------------------------------------------------------------------------------------------
# DeepSpeed's import on this process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(device: torch.device, world_size: int):
    """deepspeed, ready for this process: its CPU accelerator on CPU, no shared-memory comm op build,
    and a one-process rendezvous when no launcher started us (DeepSpeed would otherwise look for MPI
    and fail with `No module named 'mpi4py'`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed

    # The shared-memory comm op is a C++ build (~30 s) at every first start on CPU; gloo does the
    # same job here.
    _get(deepspeed.ops, "__compatible_ops__", "deepspeed", "op registry")["deepspeed_shm_comm"] = False
    return deepspeed


# ---------------------------------------------------------------------------------------------------
# torch DDP


def ddp_ignore_parameters(module: torch.nn.Module, names: list[str]) -> None:
    """DDP neither broadcasts nor all-reduces these parameters (expert slices differ per rank)."""
    from torch.nn.parallel import DistributedDataParallel

    _get(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", "torch",
         "DDP's ignore list")(module, names)


# ---------------------------------------------------------------------------------------------------
# Expert parallelism (DeepSpeed AutoEP's primitives and MoE groups)


def expert_split_plan(expert, num_experts: int, ep_size: int, local_experts: int, group, counts):
    """DeepSpeed AutoEP's all-to-all plan: input/output splits (host ints) and the rows each source rank
    sends to each local expert."""
    from deepspeed.module_inject import auto_ep_layer

    plan = _get(auto_ep_layer, "compute_split_plan", "deepspeed", "AutoEP split plan")
    return plan(expert, num_experts, ep_size, local_experts, group, num_tokens_per_expert=counts)


def all_to_all_v(group, rows: torch.Tensor, input_splits, output_splits) -> torch.Tensor:
    """Variable-size all-to-all with its autograd (the backward is the reverse exchange)."""
    from deepspeed.module_inject import auto_ep_layer

    return _get(auto_ep_layer, "_AllToAllV", "deepspeed", "AutoEP autograd all-to-all").apply(
        group, rows, input_splits, output_splits)


def expert_parallel_marker(num_experts: int, ep_size: int, group_name: str) -> torch.nn.Module:
    """A parameter-free `deepspeed.moe.layer.MoE`: DeepSpeed's engine switches its MoE handling (expert
    groups, MoE gradient reduction in ZeRO) on only when it finds one of those modules, and reads
    `num_experts`, `ep_size`, `expert_group_name` and `set_deepspeed_parallelism` from it. It creates
    DeepSpeed's expert and expert-data-parallel groups when the engine asks."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    existing = _get(groups, "_get_expert_parallel_group_dict", "deepspeed", "expert group registry")
    create = _get(groups, "_create_expert_and_data_parallel", "deepspeed", "expert group constructor")

    class ExpertParallelMarker(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)  # no gate, no experts: only what DeepSpeed's engine reads
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.expert_group_name not in existing():
                create(self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker()


# ---------------------------------------------------------------------------------------------------
# ZeRO-1/2 (and the bf16 optimizer): per-parameter views of flat partitions


@dataclass
class ZeroFragment:
    """The part of one parameter that a ZeRO rank's flat fp32 partition holds: elements
    [start, start + numel) of the flattened parameter, and live views of its fp32 master copy and its
    optimizer state (writing into them writes the optimizer's state)."""

    start: int
    numel: int
    view: Callable[[str | None], torch.Tensor]  # None: the fp32 master weights; else an optimizer state key


def zero_fragment(param: torch.nn.Parameter) -> ZeroFragment | None:
    """This rank's fragment of `param`, or None when its partition holds none of it (or the parameter is
    not under a ZeRO-1/2 optimizer)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = _get(mapping, "lp_fragment_address", "deepspeed", "ZeRO fragment address")
    get = _get(mapping, "get_hp_fragment", "deepspeed", "ZeRO fragment view")
    return ZeroFragment(int(address.start), int(address.numel), get)


def is_zero_partitioned(optimizer) -> bool:
    return hasattr(optimizer, "_lazy_init_hp_params_optimizer_state")


def zero_link_fragments(optimizer) -> None:
    """(Re)build the per-parameter views of the flat optimizer state. DeepSpeed 0.19.8 links them once,
    right after the first step of the first parameter group, so the views of the other groups stay empty;
    before any step there is no state to view at all. The caller creates what is missing first."""
    relink = _get(optimizer, "_lazy_init_hp_params_optimizer_state", "deepspeed", "ZeRO fragment linking")
    _get(optimizer, "_hp_optimizer_states_linked", "deepspeed", "ZeRO fragment linking flag")
    optimizer._hp_optimizer_states_linked = False
    relink()


# ---------------------------------------------------------------------------------------------------
# ZeRO-3: each parameter's partition of the flat fp32 state


def zero3_partition(optimizer, param) -> tuple[int, int] | None:
    """(start, numel) of this rank's partition of `param`, flattened (the last rank's partition is padded
    past the parameter's end: numel counts the real elements only); None without one."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None or not param.requires_grad:
        return None
    import torch.distributed as dist

    # the group a parameter is partitioned over (as DeepSpeed's _get_param_partition_group finds it)
    group = getattr(param, "ds_process_group", None) or _get(optimizer, "dp_process_group", "deepspeed",
                                                               "ZeRO-3 partition group")

    size = int(_get(partition, "ds_numel", "deepspeed", "ZeRO-3 partition size"))
    start = dist.get_rank(group=group) * size if dist.is_initialized() else 0
    numel = max(0, min(size, int(_get(param, "ds_numel", "deepspeed", "ZeRO-3 parameter size")) - start))
    return (start, numel) if numel else None


def zero3_flat_partitions(optimizer) -> list[torch.Tensor]:
    """The flat fp32 partitions whose state the inner optimizer keeps (its parameter groups list them only
    while it steps one)."""
    return list(_get(optimizer, "fp32_partitioned_groups_flat", "deepspeed", "ZeRO-3 fp32 partitions"))


def zero3_state_view(optimizer, param, key: str | None) -> torch.Tensor:
    """A live view of this rank's partition of `param`'s fp32 master weights (key None) or optimizer state
    (`key`), wherever it lives (on the CPU when offloaded; DeepSpeed's public getter copies to the device)."""
    view, _ = _get(optimizer, "_get_fp32_opt_state_partition", "deepspeed", "ZeRO-3 state partition")(
        param, release_swap_buffers=False, optim_state_key=key)
    return view


# ---------------------------------------------------------------------------------------------------
# DeepSpeed's pipeline engine


def wrap_pipeline_instruction(engine, instruction: type, wrapper) -> None:
    """Run `wrapper(original, engine, *args, **kwargs)` in place of a pipeline instruction's function.
    DeepSpeed executes each instruction through its class-level _INSTRUCTION_MAP (instruction type ->
    function, bound at each call), never through the engine's attributes, so assigning an attribute
    would change nothing: the wrapper goes into this engine's own copy of the map."""
    table = engine.__dict__.get("_INSTRUCTION_MAP") or dict(
        _get(type(engine), "_INSTRUCTION_MAP", "deepspeed", "pipeline instruction table"))
    original = table[instruction]
    table[instruction] = lambda eng, *args, **kwargs: wrapper(original, eng, *args, **kwargs)
    engine._INSTRUCTION_MAP = table


def pipeline_keep_own_specs(pipe, keep: Callable[[object], bool]) -> None:
    """Drop the PipelineModule's references to the pieces of other stages (it keeps every layer spec it
    was given), so that this process frees them."""
    specs = _get(pipe, "_layer_specs", "deepspeed", "pipeline layer specs")
    pipe._layer_specs = [s if keep(s) else None for s in specs]


def pipeline_release_groups() -> None:
    """Drop the grid (and with it the pipeline's process groups) that DeepSpeed's point-to-point module
    keeps in its globals once a pipeline engine exists (`p2p.init_process_groups`), so that the groups can
    end with the run (distributed.teardown) instead of outliving the interpreter."""
    from deepspeed.runtime.pipe import p2p

    for name in ("_grid", "_groups"):
        _get(p2p, name, "deepspeed", "pipeline point-to-point state")
        setattr(p2p, name, None)


def zero3_release_module(module: torch.nn.Module) -> None:
    """DeepSpeed's ZeRO-3 pushes the model onto a module-level stack (`parameter_offload.FWD_MODULE_STACK`)
    when it sets up and never pops it, not even in `engine.destroy()`: the model, its partitioned
    parameters and, through them, the process groups they gather over would outlive the run, and a
    group that ends during interpreter shutdown aborts the process (distributed.teardown). The same holds
    for the parameter coordinator's `__params_to_release`, an `lru_cache` on the class, whose keys are
    coordinators and submodules of every ZeRO-3 model the process has run: it is cleared (it only saves
    recomputing a set of parameter ids)."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = _get(parameter_offload, "FWD_MODULE_STACK", "deepspeed", "ZeRO-3 forward module stack")
    stack[:] = [m for m in stack if not any(m is own for own in module.modules())]
    cached = _get(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", "deepspeed",
                  "ZeRO-3 coordinator's release cache")
    if not hasattr(cached, "cache_clear"):  # under DeepSpeed's NVTX wrapper, which keeps it in its closure
        cached = next((c.cell_contents for c in cached.__closure__ or () if hasattr(c.cell_contents, "cache_clear")),
                      cached)
    _get(cached, "cache_clear", "deepspeed", "ZeRO-3 coordinator's release cache (an lru_cache)")()
