"""The quickstart's model smoke check runs end to end: the loss falls, the saved directory reloads
with identical logits, and transformers reads the saved dense model."""

import pytest
import torch

import models
from train import smoke


def test_smoke_check_trains_saves_and_reloads(tmp_path, capsys):
    smoke.main(["--steps", "40", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "smoke check passed" in out
    for name in smoke.PRESETS:
        assert (tmp_path / name / "model.safetensors").is_file()
        assert (tmp_path / name / "config.json").is_file()
    transformers = pytest.importorskip("transformers")
    for name in ("doge-tiny", "glm4-tiny", "jetmoe-tiny"):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype=torch.float32)
        ours = models.from_pretrained(tmp_path / name).eval()
        ids = torch.randint(0, 256, (1, 32))
        with torch.no_grad():
            assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-4, name
