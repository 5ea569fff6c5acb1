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


# ---------------------------------------------------------------------------------------------------
# The LM head and cross-entropy fused, in chunks of tokens
#
# Full logits cost tokens × vocab × 4 bytes in fp32 (GLM-4's 151552-token vocabulary at 8192 tokens:
# 5 GB), and autograd keeps them, their fp32 copy and their gradient alive at once. Here each chunk of
# tokens computes its logits, its loss terms and, when a gradient is wanted, the gradients of the
# hidden states and of the head weight right away (softmax − one-hot is all the backward needs), then
# drops the chunk. The backward only scales the stored gradients by the incoming (scalar) gradient.
# The same idea as liger-kernel's fused linear cross-entropy and torchtitan's/OLMo-core's chunked loss.

# Rows per chunk: enough that the chunk's fp32 logits stay near a byte budget, and never fewer than a
# minimum: the weight gradient is accumulated by one GEMM per chunk whose inner dimension is the chunk's
# rows and whose output is the whole (vocab, hidden) gradient, so few rows make it a pass over that
# gradient's memory for little arithmetic (measured on CPU, GLM-4's vocabulary, 1024 tokens: 110 rows
# per chunk 1.35x slower than 1024). On CUDA the caching allocator hands a large chunk out for free
# and the GEMMs need many rows to fill the GPU, so the budget is 8x the CPU's and the minimum 2x: a
# 32k vocabulary gets 4096-row chunks (8 chunks for 32k tokens, not 64), GLM-4's 151552 gets 1024 rows
# (620 MB of fp32 logits). Chosen, not yet measured on a GPU.
CHUNK_BUDGET = {  # device type -> (bytes of fp32 logits per chunk, minimum rows); other devices: the CPU's
    "cpu": (64 * 1024**2, 512),
    "cuda": (512 * 1024**2, 1024),
}


def chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    budget, min_rows = CHUNK_BUDGET.get(device_type, CHUNK_BUDGET["cpu"])
    return max(min_rows, budget // (4 * vocab_size))


def chunk_loss_and_grad_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                               buffer: torch.Tensor | None = None):
    """One chunk: (Σ cross-entropy over targets ≠ IGNORE_INDEX, d loss/d logits in the matmul dtype of
    `hidden`/`weight`, or None without need_grad), with fp32 logits and softmax. The elementwise part
    of the chunk, a separate function so that `torch.compile` can fuse it (see train/parallelize.py);
    the gradient GEMMs stay with the caller, which accumulates them in place.

    `buffer`, an fp32 (rows ≥ chunk, vocab) tensor, takes the logits, then the log-probabilities, then
    the gradient, in place. On CPU there is no caching allocator: every large new tensor is fresh pages
    from the kernel, and the page faults cost more than the arithmetic (GLM-4's vocabulary, 512 rows:
    matmul 245 ms into a new tensor, 178 ms into a buffer; log_softmax 111 ms new, 35 ms in place)."""
    if buffer is not None and hidden.dtype == torch.float32:
        logits = torch.mm(hidden, weight.t(), out=buffer[: hidden.shape[0]])
        logprobs = torch.log_softmax(logits, dim=-1, out=logits)  # row-wise: reads each entry before writing it
    else:
        logprobs = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)  # one fused pass, not logsumexp's four
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    loss = -(logprobs.gather(1, safe_targets).squeeze(1) * valid).sum()
    if not need_grad:
        return loss, None
    # softmax − one-hot, rows of ignored targets zeroed: d (Σ loss) / d logits
    grad_logits = logprobs.exp_()
    grad_logits.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=grad_logits.dtype))
    grad_logits.mul_(valid.unsqueeze(1))
    return loss, grad_logits.to(hidden.dtype)


def _add_weight_gradient(grad_weight: torch.Tensor | None, grad_logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_weight + grad_logitsᵀ·h in fp32 (grad_weight None: the first chunk's product), with each
    chunk's product kept in fp32 before the sum: rounded to bf16, every chunk would lose its low bits."""
    if grad_logits.dtype == torch.float32:
        if grad_weight is None:
            return grad_logits.t() @ h
        return grad_weight.addmm_(grad_logits.t(), h)  # in place: no (vocab, hidden) temporary
    if h.device.type == "cuda":
        # bf16 tensor-core GEMM with an fp32 output (torch.mm's out_dtype, which only CUDA implements). An
        # addmm into the accumulator would save the (vocab, hidden) temporary, but addmm's out_dtype
        # kernel has required the accumulator in the inputs' dtype in some torch versions.
        product = torch.mm(grad_logits.t(), h, out_dtype=torch.float32)
        return product if grad_weight is None else grad_weight.add_(product)
    # Elsewhere an fp32 GEMM on the upcast inputs, in place. On a CPU without bf16 units it is also the
    # faster one (measured here: (32768, 256) weight, 512 rows: 4.8 s in bf16, 0.5 s in fp32).
    return _add_weight_gradient(grad_weight, grad_logits.float(), h.float())


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, need_grad: bool, rows: int, chunk_fn):
        device_type = hidden.device.type
        # Under autocast the matmuls run in the autocast dtype, as nn.Linear's would; autocast itself is
        # off inside so that the fp32 accumulations below stay fp32.
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(h) if need_grad else None
            grad_weight = None  # fp32; the first chunk's product initialises it (no separate zeroing pass)
            # On CPU the chunks share one logits buffer (see chunk_loss_and_grad_logits); CUDA's caching
            # allocator hands out reused memory anyway.
            shared = device_type == "cpu" and dtype == torch.float32
            buffer = h.new_empty(min(rows, h.shape[0]), w.shape[0]) if shared else None
            for start in range(0, h.shape[0], rows):
                end = min(start + rows, h.shape[0])
                part, grad_logits = chunk_fn(h[start:end], w, targets[start:end], need_grad, buffer)
                loss += part
                if need_grad:
                    torch.mm(grad_logits, w, out=grad_hidden[start:end])
                    grad_weight = _add_weight_gradient(grad_weight, grad_logits, h[start:end])
        if need_grad:
            if grad_weight is None:  # no tokens
                grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The stored gradients are scaled in place (a (vocab, hidden) weight gradient is worth not
        # copying), so a second backward through the same graph would scale them twice: refuse it.
        if ctx.backward_done:
            raise RuntimeError("the chunked LM-head loss (models.loss.linear_cross_entropy_sum) cannot be "
                               "backpropagated twice (retain_graph=True); compute the loss again instead")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss.to(grad_weight.dtype)),
                None, None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, shift_labels: torch.Tensor,
                             rows: int | None = None, chunk_fn=chunk_loss_and_grad_logits) -> torch.Tensor:
    """Σ cross_entropy(hidden @ weight.T, shift_labels) over targets ≠ IGNORE_INDEX (fp32), equal to
    `cross_entropy_sum(lm_head(hidden), shift_labels)` without holding the full logits."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = rows or chunk_rows(weight.shape[0], hidden.device.type)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, need_grad, rows, chunk_fn)
