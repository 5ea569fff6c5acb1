"""Every architecture's tiny preset, as a user meets it: trained by `python -m train`, its checkpoint
loaded by transformers with its tokenizer, the same logits as ours, and transformers' batched generate()
with a left-padded batch stopping and padding with the checkpoint's own token ids."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import models

from .conftest import FAST, run_train

transformers = pytest.importorskip("transformers")

PRESETS = ["doge-tiny", "doge-tiny-moe", "glm4-tiny", "jetmoe-tiny"]


@pytest.mark.parametrize("preset", PRESETS)
def test_checkpoint_generates_in_transformers(preset, tmp_path, env):
    out = tmp_path / preset
    run_train([*FAST, f"model={preset}", "trainer.max_steps=3", f"trainer.output_dir={out}"], env)
    final = out / "checkpoints" / "step-3"
    config = json.loads((final / "config.json").read_text())
    generation = json.loads((final / "generation_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(final))
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id
    assert config["pad_token_id"] == generation["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert config.get("output_router_logits", False) is False  # exported ready for inference
    assert tokenizer.padding_side == "left"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    ours = models.from_pretrained(final).eval()
    prompts = ["def main():\n    return", "import os"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left
    short = tokenizer(prompts[1:], return_tensors="pt", add_special_tokens=False)["input_ids"]

    # our CDMoE routes each token by itself; transformers' layout mixes tokens (see docs/models.md): only the
    # dense models, and the MoE's shapes and stopping, are compared with transformers here
    routed_alike = not (preset == "doge-tiny-moe")
    with torch.no_grad():
        if routed_alike:
            assert (ours(short).logits - theirs(short).logits).abs().max() < 1e-4
        generated = theirs.generate(**batch, max_new_tokens=6, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] <= batch["input_ids"].shape[1] + 6
    continuation = generated[1, batch["input_ids"].shape[1]:]
    if routed_alike:
        with torch.no_grad():
            alone = theirs.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=6, do_sample=False)
        expected = alone[0, short.shape[1]:]
        assert torch.equal(continuation[: len(expected)], expected)  # padding did not change the answer
    # generation stops at EOS: whatever follows an EOS is padding
    for row in generated[:, batch["input_ids"].shape[1]:]:
        ended = (row == tokenizer.eos_token_id).nonzero()
        if len(ended):
            assert (row[ended[0, 0] + 1:] == generation["pad_token_id"]).all()
