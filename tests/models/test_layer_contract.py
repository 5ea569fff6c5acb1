"""The decoder-layer contract a pipeline can cut: layers take and return tensors only, are keyed by
their global index, and a stage (the model minus some layers, with or without embedding and head)
has the full model's state-dict keys and computes its part of the same function."""

from __future__ import annotations

import copy

import pytest
import torch

import models

from .helpers import perturb

CASES = {
    "doge-moe": dict(model_type="doge", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, keep_window_size=64, is_moe=True, num_experts=16,
                     num_experts_per_tok=4, tie_word_embeddings=False),
    "glm4": dict(model_type="glm4", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=None),
    "jetmoe": dict(model_type="jetmoe", vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                   num_key_value_heads=2, kv_channels=8, num_local_experts=4, num_experts_per_tok=2,
                   tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_stages_compute_the_model(case):
    model = models.build(CASES[case]).eval()
    perturb(model)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for index in ("2", "3"):
        del first.model.layers[index]
    for index in ("0", "1"):
        del last.model.layers[index]
    first.model.norm, first.lm_head, last.model.embed_tokens = None, None, None
    full_keys = set(model.state_dict())
    assert set(first.state_dict()) | set(last.state_dict()) == full_keys
    assert not set(first.state_dict()) & set(last.state_dict())
    assert {k.split(".")[2] for k in last.state_dict() if k.startswith("model.layers.")} == {"2", "3"}

    ids = torch.randint(0, 64, (2, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]).expand(2, -1)  # two packed documents
    with torch.no_grad():
        boundary = first.decoder(*first.embed(ids, position_ids=positions))
        assert all(t is None or isinstance(t, torch.Tensor) for t in boundary)  # only tensors cross
        hidden, _, _, router_stats = last.decoder(*boundary)
        staged = last.head(hidden, router_stats, shift_labels=ids, return_logits=True)
        whole = model(ids, position_ids=positions, shift_labels=ids, return_logits=True)
    assert torch.equal(staged.logits, whole.logits)
    assert torch.equal(staged.loss, whole.loss)
    if whole.aux_loss is not None:  # the routers of both stages reach the aux loss
        assert torch.equal(staged.aux_loss, whole.aux_loss) and staged.expert_counts.shape[0] == (
            8 if case == "jetmoe" else 4)
