"""Shared helpers for model tests: tiny configs, weight perturbation, transformers loading."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from models import build as build_model

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


def preset_values(name: str) -> dict:
    """A model preset's keys, as configs/model/<name>.yaml states them."""
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


def preset_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset_values(name))


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter away from its init value, so that parity tests exercise every term
    (A != 0, residual scales != 1, norm weights != 1, biases != 0), and scale weights to ~1/sqrt(fan_in)
    so that activations and logits are O(1): with the 0.02 init, logits are so small that an absolute
    tolerance would hide real differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if name.endswith(".A"):
                p.copy_(noise)
            elif "residual" in name or "norm" in name:
                p.add_(0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise)


def hf_load(directory, attn_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation=attn_implementation, dtype=torch.float32
    ).eval()


def batch(vocab: int, batch_size: int, seq_len: int, padding: str | None, seed: int = 0):
    """input_ids, attention_mask (or None), labels with -100 on padding.

    With left padding the first real token is also -100: it would be predicted from a pad position,
    whose query sees no key at all; that row is garbage in every implementation (transformers' own
    eager and SDPA disagree on it), so no loss may depend on it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":
        labels[1, 3] = -100
    return ids, (None if padding is None else mask), labels


def save_pairs(tmp_path_factory, model_type: str, hf_model_class, hf_config_class, base: dict, cases: dict) -> dict:
    """For each case: our model and transformers' model, each built from the same kwargs, perturbed,
    and saved. Returns case -> (directory written by us, directory written by transformers)."""
    out = {}
    for case, extra in cases.items():
        kwargs = {**base, **extra}
        ours = build_model({"model_type": model_type, **kwargs})
        perturb(ours)
        theirs = hf_model_class(hf_config_class(**kwargs))
        perturb(theirs, seed=2)
        ours_dir = tmp_path_factory.mktemp(f"ours-{case}")
        theirs_dir = tmp_path_factory.mktemp(f"theirs-{case}")
        ours.save_pretrained(ours_dir)
        theirs.save_pretrained(theirs_dir)
        out[case] = (ours_dir, theirs_dir)
    return out


def future_token_changes_past(model, vocab: int, seq_len: int = 12) -> float:
    """Largest change of logits at positions < t when only token t changes."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    t = seq_len - 2
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % vocab
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-2, "the probe must change something"
    return (a[:, :t] - b[:, :t]).abs().max().item()
