"""AdamW with weight-decay groups.

No weight decay, unless named in `optim.decay_also`, on:
  embeddings (the token embedding, and the LM head when tied to it), norms, biases, residual scales,
  and Doge's dynamic-mask `A`. Everything else (projection matrices, expert weights, an untied LM
  head) is decayed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

NO_DECAY_CATEGORIES = ("embeddings", "norms", "biases", "residual_scales", "dynamic_mask_A")


def category(name: str, param: torch.Tensor) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if name.endswith("bias"):
        return "biases"
    if "norm" in name:
        return "norms"
    if "residual" in name:
        return "residual_scales"
    if name.endswith(".A"):
        return "dynamic_mask_A"
    if param.dim() < 2:
        return "norms"  # any other vector parameter is a scale, treated like a norm weight
    return "weights"


def parameter_groups(model: nn.Module, weight_decay: float, decay_also=()) -> list[dict]:
    unknown = set(decay_also) - set(NO_DECAY_CATEGORIES)
    if unknown:
        raise ValueError(f"optim.decay_also has {sorted(unknown)}; choose from {list(NO_DECAY_CATEGORIES)}")
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # a tied parameter appears once
        seen.add(id(param))
        kind = category(name, param)
        (decay if kind == "weights" or kind in decay_also else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """cfg: an OptimSchema."""
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_also)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
