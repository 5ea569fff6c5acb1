"""One test per private name of DeepSpeed and torch that train/engines/compat.py reaches: each fails when
the installed library renames or reshapes what we rely on, before a training run finds out."""

from __future__ import annotations

import inspect

import pytest
import torch

from train.engines import compat


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_deepspeed_op_registry_has_the_shared_memory_comm_op():
    import deepspeed

    assert "deepspeed_shm_comm" in compat._get(deepspeed.ops, "__compatible_ops__", "deepspeed", "op registry")


def test_ddp_ignore_list_is_what_ddp_reads():
    from torch.nn.parallel import DistributedDataParallel

    module = torch.nn.Linear(2, 2)
    compat.ddp_ignore_parameters(module, ["weight"])
    # DDP's constructor reads this attribute to leave the parameters alone
    assert module._ddp_params_and_buffers_to_ignore == ["weight"]
    assert "_ddp_params_and_buffers_to_ignore" in _source(DistributedDataParallel.__init__)


def test_autoep_split_plan_takes_the_arguments_we_pass():
    from deepspeed.module_inject import auto_ep_layer

    params = list(inspect.signature(auto_ep_layer.compute_split_plan).parameters)
    assert params == ["selected_experts", "num_experts", "ep_size", "num_local_experts", "ep_group",
                      "num_tokens_per_expert"], params
    assert auto_ep_layer.SplitPlan._fields == ("input_splits", "output_splits", "local_counts_by_source")


def test_autoep_all_to_all_is_an_autograd_function_of_group_rows_and_splits():
    from deepspeed.module_inject import auto_ep_layer

    fn = auto_ep_layer._AllToAllV
    assert issubclass(fn, torch.autograd.Function)
    assert list(inspect.signature(fn.forward).parameters) == ["ctx", "group", "x", "input_splits", "output_splits"]


def test_moe_marker_carries_what_deepspeeds_engine_reads():
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime import engine as ds_engine

    marker = compat.expert_parallel_marker(4, 2, "ep_size_2")
    assert isinstance(marker, MoE) and not list(marker.parameters())
    assert (marker.num_experts, marker.ep_size, marker.expert_group_name) == (4, 2, "ep_size_2")
    # the engine finds MoE layers by type and calls set_deepspeed_parallelism on them
    engine_source = _source(ds_engine)
    assert "isinstance(module, MoE)" in engine_source and "set_deepspeed_parallelism" in engine_source
    assert "use_data_before_expert_parallel_" in inspect.signature(MoE.set_deepspeed_parallelism).parameters


def test_expert_group_registry_and_constructor():
    from deepspeed.utils import groups

    assert callable(groups._get_expert_parallel_group_dict)
    assert "use_data_before_expert_parallel_" in inspect.signature(groups._create_expert_and_data_parallel).parameters


def test_zero_fragment_mapping_fields():
    from deepspeed.utils.tensor_fragment import fragment_address, tensor_fragment

    assert {"start", "numel"} <= set(fragment_address.__dataclass_fields__)
    assert "lp_fragment_address" in tensor_fragment.__dataclass_fields__
    assert list(inspect.signature(tensor_fragment.get_hp_fragment).parameters) == ["self", "optim_state_key"]

    class Param:
        _hp_mapping = tensor_fragment(torch.zeros(3), fragment_address(3, 5), torch.arange(3.0), fragment_address(3, 0),
                                      {}, {}, False, 0, {"exp_avg": torch.ones(3)})

    fragment = compat.zero_fragment(Param())
    assert (fragment.start, fragment.numel) == (5, 3)
    assert fragment.view(None).tolist() == [0.0, 1.0, 2.0] and fragment.view("exp_avg").tolist() == [1.0] * 3


@pytest.mark.parametrize("where", ["deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer",
                                   "deepspeed.runtime.bf16_optimizer:BF16_Optimizer"])
def test_zero_optimizers_relink_their_fragment_views_lazily(where):
    """ZeRO-1/2 and the bf16 optimizer (ZeRO-1 with fp32 gradient accumulation) alike."""
    import importlib

    module, name = where.split(":")
    source = _source(getattr(importlib.import_module(module), name))
    assert "def _lazy_init_hp_params_optimizer_state" in source
    assert "self._hp_optimizer_states_linked" in source


def test_pipeline_engine_dispatches_through_its_instruction_table():
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    table = PipelineEngine._INSTRUCTION_MAP
    for instruction in (schedule.ForwardPass, schedule.BackwardPass, schedule.ReduceTiedGrads):
        assert instruction in table
    assert "self._INSTRUCTION_MAP" in _source(PipelineEngine._exec_schedule)


def test_pipeline_module_keeps_its_layer_specs():
    from deepspeed.runtime.pipe.module import PipelineModule

    assert "self._layer_specs" in _source(PipelineModule.__init__)


def test_pipeline_point_to_point_state_is_in_module_globals():
    from deepspeed.runtime.pipe import p2p

    assert "global _groups, _grid" in _source(p2p.init_process_groups)
    compat.pipeline_release_groups()
    assert p2p._grid is None and p2p._groups is None


def test_a_missing_name_is_a_clear_error():
    with pytest.raises(compat.LibraryChanged, match=r"torch .* has no thing \(`_gone`\).*checked against torch 2\.13"):
        compat._get(object(), "_gone", "torch", "thing")


def test_zero3_optimizer_keeps_flat_fp32_partitions_and_their_state_views():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    params = list(inspect.signature(DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition).parameters)
    assert params == ["self", "param", "release_swap_buffers", "optim_state_key"]
    source = _source(DeepSpeedZeroOptimizer_Stage3)
    assert "self.fp32_partitioned_groups_flat" in source
    # the inner optimizer lists a partition only while it steps it: state must be created by partition
    assert "self.optimizer.param_groups[param_group_id]['params'] = []" in source


def test_zero3_parameters_carry_their_partition_sizes():
    from deepspeed.runtime.zero import partition_parameters

    source = _source(partition_parameters)
    for attribute in ("param.ds_numel", "param.ds_tensor", "ds_process_group", "param.ds_shape"):
        assert attribute in source, attribute


def test_zero3_keeps_the_model_on_a_module_level_stack_that_release_empties():
    from deepspeed.runtime.zero import parameter_offload

    assert "FWD_MODULE_STACK.append(self.module)" in _source(parameter_offload.DeepSpeedZeRoOffload.setup_zero_stage3_hooks)
    model, other = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    parameter_offload.FWD_MODULE_STACK.extend([other, model, model[0]])
    compat.zero3_release_module(model)
    assert parameter_offload.FWD_MODULE_STACK[-1:] == [other]
    parameter_offload.FWD_MODULE_STACK.remove(other)
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    cached = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    cached = next(c.cell_contents for c in cached.__closure__ if hasattr(c.cell_contents, "cache_clear"))
    assert cached.cache_info().currsize == 0  # the NVTX wrapper's function: an lru_cache, and cleared
