"""Who writes what in a checkpoint written by many ranks (train/sharded.py), and the optimizer-state
format read back under another layout (train/engines/optimizer_state.py), in one process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from train import sharded
from train.engines import optimizer_state
from train.engines.optimizer_state import StateChunk


def test_replicas_share_the_writing_by_bytes():
    # 4 data-parallel replicas hold the same 4 tensors of 40, 30, 20 and 10 bytes
    held = [sharded.Offer(n, n, 0, size) for n, size in (("a", 40), ("b", 30), ("c", 20), ("d", 10))]
    writers = sharded.assign_writers([held] * 4)
    assert writers == {"a": 0, "b": 1, "c": 2, "d": 3}
    # 2 replicas: largest first, each to the least loaded -> 40+10 and 30+20
    assert sharded.assign_writers([held] * 2) == {"a": 0, "b": 1, "c": 1, "d": 0}


def test_the_lowest_holder_writes_a_tensor_held_by_two_stages():
    # a tied embedding on stage 0 (rank 0) and the last stage (rank 1); each stage's own layers
    stage0 = [sharded.Offer("embed", "embed", 0, 100), sharded.Offer("layer.0", "layer.0", 0, 10)]
    stage1 = [sharded.Offer("embed", "embed", 1, 100), sharded.Offer("layer.1", "layer.1", 1, 10)]
    assert sharded.assign_writers([stage0, stage1]) == {"embed": 0, "layer.0": 0, "layer.1": 1}


def test_files_are_numbered_over_all_writers_and_bounded_in_size():
    writers = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 1}
    sizes = {"a": 6, "b": 6, "c": 3, "d": 3, "e": 20}
    files = sharded.plan_files(writers, sizes, 10, lambda i, n: f"{i}-of-{n}")
    # rank 0: a | b (6 + 6 > 10); rank 1: c, d | e (a piece larger than the bound gets a file of its own)
    assert files == {"a": "1-of-4", "b": "2-of-4", "c": "3-of-4", "d": "3-of-4", "e": "4-of-4"}


def test_a_view_of_a_flat_buffer_is_written_as_its_own_bytes():
    flat = torch.arange(1000.0)
    view = flat[10:20]
    owned = sharded.owned_cpu_tensor(view)
    assert owned.untyped_storage().nbytes() == 10 * 4 and torch.equal(owned, view)
    alone = torch.ones(3)
    assert sharded.owned_cpu_tensor(alone).data_ptr() == alone.data_ptr()  # nothing to copy


def _topology(rank=0, world=1):
    return SimpleNamespace(rank=rank, world_size=world, is_main=rank == 0)


def test_state_saved_in_fragments_loads_into_another_cut(tmp_path):
    """What ZeRO ranks write (fragments of one parameter at arbitrary boundaries) reads back into any
    other cut: here expert-parallel rows, and a whole parameter."""
    full = {"exp_avg": torch.randn(6, 4), "exp_avg_sq": torch.rand(6, 4)}
    flat = {k: v.reshape(-1) for k, v in full.items()}
    cuts = [(0, 7), (7, 13), (13, 24)]  # three "ranks", fragment boundaries inside rows
    # one process plays every rank: each rank's save writes the ranges it is assigned
    chunks = [StateChunk("w", (6, 4), a, b, {k: v[a:b] for k, v in flat.items()}) for a, b in cuts]
    optimizer_state.save(tmp_path, chunks, 7.0, _topology())
    saved = optimizer_state.SavedState(tmp_path)
    assert saved.step == 7.0 and saved.names() == {"w"}
    # rows 3..5 of the parameter (an expert-parallel rank's slice): elements 12..24, across two fragments
    torch.testing.assert_close(saved.read("w", "exp_avg", 12, 24), flat["exp_avg"][12:24], rtol=0, atol=0)
    whole = optimizer_state.read_full(tmp_path)
    torch.testing.assert_close(whole["w"]["exp_avg_sq"], full["exp_avg_sq"], rtol=0, atol=0)

    target = {k: torch.zeros(12) for k in full}
    optimizer_state.load(tmp_path, lambda step: [StateChunk("w", (6, 4), 12, 24, target)], _topology())
    torch.testing.assert_close(target["exp_avg"], flat["exp_avg"][12:24], rtol=0, atol=0)


def test_ranges_that_do_not_tile_a_parameter_are_a_bug_not_a_checkpoint(tmp_path):
    chunks = [StateChunk("w", (10,), 0, 4, {"exp_avg": torch.zeros(4)}),
              StateChunk("w", (10,), 5, 10, {"exp_avg": torch.zeros(5)})]
    with pytest.raises(RuntimeError, match="gap or overlap at element 4"):
        optimizer_state.save(tmp_path, chunks, 1.0, _topology())


def test_state_of_parameters_the_model_lacks_is_refused(tmp_path):
    optimizer_state.save(tmp_path, [StateChunk("gone", (2,), 0, 2, {"exp_avg": torch.zeros(2)})], 1.0, _topology())
    with pytest.raises(RuntimeError, match=r"optimizer state for parameters this model does not have: \['gone'\]"):
        optimizer_state.load(tmp_path, lambda step: [], _topology())


def test_a_torch_optimizer_round_trips_and_new_parameters_start_at_the_saved_step(tmp_path):
    from train.engines.expert_parallel import NoSharding

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.step()
    named = list(model.named_parameters())
    optimizer_state.save(tmp_path, optimizer_state.torch_chunks(opt, named[:1], NoSharding()),
                         optimizer_state.torch_step(opt), _topology())  # only the weight: bias is "new"
    fresh = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    named2 = list(fresh.named_parameters())
    optimizer_state.load(tmp_path, lambda step: optimizer_state.torch_chunks(opt2, named2, NoSharding(), step),
                         _topology())
    torch.testing.assert_close(opt2.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"], rtol=0, atol=0)
    assert float(opt2.state[fresh.bias]["step"]) == 2.0 and not opt2.state[fresh.bias]["exp_avg"].any()
    assert opt2.state[fresh.bias]["step"].device.type == "cpu"  # not fused: torch keeps the count on the host
