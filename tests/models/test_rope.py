"""RoPE frequencies of every supported rope type against transformers' ROPE_INIT_FUNCTIONS."""

from __future__ import annotations

import pytest
import torch

from models.layers import RotaryEmbedding, rope_frequencies

transformers = pytest.importorskip("transformers")

HEAD_DIM, MAX_POS = 64, 512
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 128,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def _hf(rope: dict, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.DogeConfig(
        hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=MAX_POS, rope_parameters=dict(rope)
    )
    if rope["rope_type"] == "default":
        from transformers.models.doge.modeling_doge import DogeRotaryEmbedding

        return DogeRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None, seq_len=seq_len)


@pytest.mark.parametrize("name", list(ROPES))
def test_inverse_frequencies_match_transformers(name):
    ours, ours_scale = rope_frequencies(ROPES[name], HEAD_DIM, MAX_POS)
    theirs, theirs_scale = _hf(ROPES[name])
    assert torch.equal(ours, theirs)
    assert ours_scale == pytest.approx(theirs_scale, rel=0, abs=0)


@pytest.mark.parametrize("seq_len", [100, 512, 513, 2000])
def test_dynamic_ntk_follows_the_sequence_length(seq_len):
    rotary = RotaryEmbedding(ROPES["dynamic"], HEAD_DIM, MAX_POS)
    position_ids = torch.arange(seq_len)[None]
    theirs, _ = _hf(ROPES["dynamic"], seq_len=torch.tensor(seq_len))
    if seq_len <= MAX_POS:
        theirs, _ = _hf(ROPES["default"])
    assert torch.equal(rotary._dynamic_inv_freq(position_ids), theirs)
    cos, sin = rotary(position_ids, torch.float32)
    expected = position_ids[..., None].float() * theirs
    assert torch.equal(cos, torch.cat([expected, expected], -1).cos())
    assert torch.equal(sin, torch.cat([expected, expected], -1).sin())
