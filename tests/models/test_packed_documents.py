"""Packed documents: position_ids that restart mark document boundaries; attention stays inside each
document, so a packed row gives the logits of its documents run one by one, and transformers' logits
for the same packed row (with use_cache=False, the setting in which it masks packed sequences)."""

from __future__ import annotations

import pytest
import torch

import models

from .helpers import perturb

TINY = {
    "doge": dict(model_type="doge", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, keep_window_size=64, is_moe=True, num_experts=16,
                 num_experts_per_tok=4),
    "glm4": dict(model_type="glm4", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=None),
    "jetmoe": dict(model_type="jetmoe", vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                   num_key_value_heads=2, kv_channels=8, num_local_experts=4, num_experts_per_tok=2),
}
LENGTHS = (5, 7, 4)
# (Doge's top-k key window is left inactive here: top-k flips on near-tied key biases when a float
# changes in the last bit, as the packed and separate runs may; the window is tested elsewhere.)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(TINY))
def test_packed_row_equals_documents_run_separately(arch, backend):
    model = models.build({**TINY[arch], "attn_implementation": backend}).eval()
    perturb(model)
    docs = [torch.randint(0, 64, (1, n)) for n in LENGTHS]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions).logits
        apart = torch.cat([model(d).logits for d in docs], dim=1)
        unmasked = model(packed).logits
    assert (together - apart).abs().max().item() < 1e-5
    assert (together - unmasked).abs().max().item() > 1e-3  # without the boundaries it would differ


@pytest.mark.parametrize("arch", list(TINY))
def test_packed_row_matches_transformers_without_cache(arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = models.build({**TINY[arch], "router_layout": "transformers"} if arch == "doge" else TINY[arch]).eval()
    perturb(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager", dtype=torch.float32)
    packed = torch.randint(0, 64, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    with torch.no_grad():
        ours = model(packed, position_ids=positions).logits
        theirs = reference(packed, position_ids=positions, use_cache=False).logits
    assert (ours - theirs).abs().max().item() < 1e-5
