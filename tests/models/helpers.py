"""Shared helpers for model tests: tiny configs, weight perturbation, transformers loading."""

from __future__ import annotations

import torch


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
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise)


def hf_load(directory, attn_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation=attn_implementation, dtype=torch.float32
    ).eval()


def batch(vocab: int, batch_size: int, seq_len: int, padding: str | None, seed: int = 0):
    """input_ids, attention_mask (or None), labels with -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, (None if padding is None else mask), labels
