"""What the trainer applies to a model from outside its file, torchtitan-style: activation
checkpointing and torch.compile per decoder layer today; expert and pipeline parallelism build on the
same decoder-layer contract (`models.base.DecoderLayer`)."""

from __future__ import annotations

import logging
from functools import partial

from torch import nn

logger = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations; only the
    layer inputs are saved."""
    from torch.utils.checkpoint import checkpoint as recompute

    for layer in model.model.layers.values():
        layer.forward = partial(recompute, layer.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder layer separately (small graphs that compile once and are reused by
    every layer of the same shape)."""
    for layer in model.model.layers.values():
        layer.compile()


def parallelize(model: nn.Module, run) -> None:
    """The run's model-level options, in the order they must wrap: checkpointing inside compile."""
    if run.trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    if run.trainer.compile:
        apply_compile(model)
