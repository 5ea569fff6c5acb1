"""The training objective, written once: the model's forward with labels, the training engines (single
process, DDP, ZeRO, pipeline stages) and the benchmarks all use it.

    loss = Σ cross-entropy over this batch's target tokens / num_items_in_batch
           + aux_coef · aux_loss · aux_weight

With the defaults (num_items_in_batch = this batch's target count, aux_weight = 1) it is transformers'
loss: mean token cross-entropy plus the coefficient times the aux loss. A training step over M
micro-batches on R data-parallel ranks passes num_items_in_batch = the target tokens of the whole
global batch and aux_weight = 1 / (M · R): summed over micro-batches and ranks that is exactly the
mean token loss of the global batch plus the mean aux loss, whatever the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted labels (token t is predicted at position t - 1) -> the target of each position."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def cross_entropy_sum(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy summed over the positions whose target is not IGNORE_INDEX."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, shift_labels.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def count_targets(shift_labels: torch.Tensor) -> torch.Tensor:
    return (shift_labels != IGNORE_INDEX).sum()


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token t predicts labels[t + 1] (or shift_labels[t], already shifted, as packed rows provide);
    fp32 cross-entropy over non-ignored tokens, divided by `num_items_in_batch` (default: their count)."""
    if shift_labels is None:
        shift_labels = shift_labels_of(labels)
    if num_items_in_batch is None:
        logits = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(logits, shift_labels.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)
    loss = cross_entropy_sum(logits, shift_labels)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def objective(cross_entropy: torch.Tensor, aux_loss: torch.Tensor | None, aux_coef: float,
              aux_weight: float = 1.0) -> torch.Tensor:
    """The training loss from its normalised cross-entropy term and the (raw) aux loss."""
    if aux_loss is None or not aux_coef:
        return cross_entropy
    return cross_entropy + aux_coef * aux_weight * aux_loss.to(cross_entropy.device)
