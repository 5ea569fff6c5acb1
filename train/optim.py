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


def parameter_groups(model, weight_decay: float, decay_also=(), new_params=()) -> list[dict]:
    """Decay / no-decay groups; with `new_params` (name substrings) each is split further into the
    parameters that are new (e.g. upcycled experts) and the rest, tagged `stage: new | old`.
    `model`: a module, or (Hugging Face name, parameter) pairs when the module's own names differ
    (a pipeline stage's)."""
    unknown = set(decay_also) - set(NO_DECAY_CATEGORIES)
    if unknown:
        raise ValueError(f"optim.decay_also has {sorted(unknown)}; choose from {list(NO_DECAY_CATEGORIES)}")
    groups: dict[tuple[bool, str], list] = {}
    seen = set()
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    for name, param in named:
        if not param.requires_grad or id(param) in seen:
            continue  # a tied parameter appears once
        seen.add(id(param))
        kind = category(name, param)
        decayed = kind == "weights" or kind in decay_also
        stage = "new" if any(pattern in name for pattern in new_params) else "old"
        groups.setdefault((decayed, stage), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "stage": stage}
        for (decayed, stage), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def build_optimizer(model, cfg, device_type: str, moe_groups: bool = False) -> torch.optim.Optimizer:
    """cfg: an OptimSchema; model: as in `parameter_groups`. `moe_groups`: put DeepSpeed MoE parameters
    (expert slices under expert parallelism) in groups of their own, as DeepSpeed's ZeRO requires."""
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    new = cfg.new_params if cfg.new_params_only_steps > 0 else ()
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_also, new)
    if moe_groups:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        for group in groups:
            group["name"] = f"{'decay' if group['weight_decay'] else 'no_decay'}-{group['stage']}"
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
