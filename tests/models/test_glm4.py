"""GLM-4 against transformers 5.23 (the reference), through saved files, both directions."""

from __future__ import annotations

import pytest
import torch

import models
from models import ConfigError, Glm4Config

from .helpers import batch, future_token_changes_past, hf_load, perturb, save_pairs

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SEQ = 12
BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, pad_token_id=None,
)
CASES = {
    "default": {},  # partial_rotary_factor 0.5, q/k/v biases, untied
    "full-rotary-no-bias-tied": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0},
        attention_bias=False, tie_word_embeddings=True,
    ),
    "quarter-rotary-mha-pad-row": dict(
        num_key_value_heads=4, pad_token_id=3, rms_norm_eps=1e-2,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_pairs(tmp_path_factory, "glm4", transformers.Glm4ForCausalLM, transformers.Glm4Config, BASE, CASES)


def _compare(ours, theirs, padding):
    ids, mask, labels = batch(ours.config.vocab_size, 2, SEQ, padding)
    with torch.no_grad():
        a = ours(ids, labels=labels, attention_mask=mask)  # the loss: chunked, without logits
        ours_logits = ours(ids, attention_mask=mask).logits
        b = theirs(ids, labels=labels, attention_mask=mask)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert (ours_logits - b.logits)[valid].abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    assert a.aux_loss is None


@pytest.mark.parametrize("direction", ["ours->transformers", "transformers->ours"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(saved, case, padding, backend, direction):
    directory = saved[case][0 if direction == "ours->transformers" else 1]
    ours = models.from_pretrained(directory, attn_implementation=backend).eval()
    assert isinstance(ours, models.Glm4ForCausalLM)
    _compare(ours, hf_load(directory, backend), padding)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gradients_match_transformers(saved, backend):
    directory = saved["quarter-rotary-mha-pad-row"][0]
    ours = models.from_pretrained(directory, attn_implementation=backend)
    theirs = hf_load(directory, backend).train()
    ids, mask, labels = batch(64, 2, SEQ, "right")
    ours(ids, labels=labels, attention_mask=mask).loss.backward()
    theirs(ids, labels=labels, attention_mask=mask).loss.backward()
    reference = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - reference[name].grad).abs().max().item() <= TOL, name
    # the padding row of the embedding gets no gradient, as in transformers
    assert ours.model.embed_tokens.weight.grad[3].abs().max() == 0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_causal(backend):
    model = models.build({"model_type": "glm4", **BASE, "attn_implementation": backend}).eval()
    perturb(model)
    assert future_token_changes_past(model, 64) == 0.0


def test_interleaved_partial_rotation_by_hand():
    """x'[2i] = x[2i]cos - x[2i+1]sin, x'[2i+1] = x[2i+1]cos + x[2i]sin on the first rd dims; rest untouched."""
    from models.layers import RotaryEmbedding, apply_rope_interleaved

    rotary = RotaryEmbedding({"rope_type": "default", "rope_theta": 100.0}, rotary_dim=4, max_position_embeddings=16)
    cos, sin = rotary(torch.tensor([[5]]), torch.float32)
    x = torch.arange(8.0).view(1, 1, 1, 8)
    out = apply_rope_interleaved(x, cos, sin)[0, 0, 0]
    for i, theta in enumerate([5.0, 5.0 / 100.0 ** 0.5]):
        c, s = torch.cos(torch.tensor(theta)), torch.sin(torch.tensor(theta))
        assert torch.allclose(out[2 * i], x[0, 0, 0, 2 * i] * c - x[0, 0, 0, 2 * i + 1] * s)
        assert torch.allclose(out[2 * i + 1], x[0, 0, 0, 2 * i + 1] * c + x[0, 0, 0, 2 * i] * s)
    assert torch.equal(out[4:], x[0, 0, 0, 4:])


def test_small_vocab_with_the_default_pad_id_does_not_crash():
    # transformers asserts here (padding_idx outside the vocabulary); we drop the impossible pad row
    config = Glm4Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert config.pad_token_id is None and config.eos_token_id is None
    models.build(config)
    with pytest.raises(ConfigError, match="pad_token_id=100 is outside the vocabulary"):
        Glm4Config(vocab_size=64, pad_token_id=100)


def test_9b_preset_has_the_published_shapes():
    import yaml
    from pathlib import Path

    values = yaml.safe_load((Path(__file__).parents[2] / "configs/model/glm4-9b.yaml").read_text())
    model = models.build(values, device="meta")
    with torch.device("meta"):
        reference = transformers.Glm4ForCausalLM(transformers.Glm4Config())  # transformers' defaults = GLM-4-9B
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert 9.3e9 < model.num_parameters() < 9.5e9
