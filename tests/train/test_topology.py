"""The topology's coordinates and groups against DeepSpeed's own layouts (its pipeline topology and
`deepspeed.utils.groups`), for worlds larger than this machine can launch: every rank must agree with
DeepSpeed about which stage and replica it is and which ranks share its experts."""

from __future__ import annotations

import pytest
import torch

from train.distributed import Topology, expert_parallel_ranks, stage_data_parallel_ranks


@pytest.mark.parametrize("world,stages", [(2, 2), (4, 2), (8, 2), (8, 4), (12, 3)])
def test_pipeline_coordinates_are_deepspeeds(world, stages):
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    theirs = PipeDataParallelTopology(num_pp=stages, num_dp=world // stages)
    groups = stage_data_parallel_ranks(world, stages)
    for rank in range(world):
        ours = Topology(rank, 0, world, torch.device("cpu"), pp_size=stages)
        coord = theirs.get_coord(rank)
        assert (ours.pp_stage, ours.dp_rank, ours.dp_size) == (coord.pipe, coord.data, world // stages)
        # the replicas of this rank's stage, the group its gradients and data are shared over
        assert groups[ours.pp_stage] == [r for r in range(world) if theirs.get_coord(r).pipe == coord.pipe]


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2), (8, 2), (8, 4), (8, 8), (16, 4)])
def test_expert_groups_are_deepspeeds(world, ep):
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    their_ep, their_edp = _get_expert_parallel_ranks(world, 1, ep)
    ours_ep, ours_edp = expert_parallel_ranks(world, ep)
    assert sorted(ours_ep) == sorted(their_ep) and sorted(ours_edp) == sorted(their_edp)
    for rank in range(world):
        ours = Topology(rank, 0, world, torch.device("cpu"), ep_size=ep)
        group = next(g for g in ours_ep if rank in g)
        assert group.index(rank) == ours.ep_rank  # the slice of the experts this rank holds
