"""Mixture-of-experts pieces shared by the MoE architectures: expert weights, the top-k router, the
(token, slot) -> expert dispatch plan, grouped expert GEMMs, and the router statistics that make up
the load-balancing loss.

Routing, the dispatch of (token, slot) rows to experts, and the expert compute are separate siblings
(as torchtitan keeps its token dispatcher and experts): a model calls `dispatcher(rows, plan,
expert_fn)` and `RankOneExperts`, and expert parallelism (train/expert_parallel.py) swaps in
dispatchers that send rows to the ranks owning a slice of the experts, without touching model files.

Router statistics travel between decoder layers as one tensor, `router_stats`, of shape
(routers, 2E + 1): row r is router r's [pick counts per expert (E) | summed router probability per
expert (E) | tokens counted (1)], written by the layer that owns router r. Only tensors cross a
pipeline-stage boundary, and the head forms the aux loss from the rows of all layers, wherever they
ran, so the objective is the same for one process and for P pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E linear maps stored as one (E, out, in) tensor, the layout of transformers' checkpoints and of
    grouped-GEMM kernels. Expert e computes F.linear(x, weight[e])."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def forward(self, x_sorted: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x_sorted, self.weight, group_end)


class TopKRouter(nn.Module):
    """logits = W h (in the model dtype, then fp32); keep the top k; softmax over those k only."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, h: torch.Tensor):
        logits = self.layer(h).float()  # (N, E)
        top_logits, experts = logits.topk(self.top_k, dim=-1)
        gates = torch.softmax(top_logits, dim=-1).type_as(h)
        return gates, experts, logits


@dataclass
class ExpertDispatch:
    """(token, slot) pairs sorted by expert, found with tensor ops only (argsort + counts + cumsum):
    nothing is read back to the host, so the step never waits on the device.

    order: (N*k,) flat pair index (token * k + slot) in expert order
    token: (N*k,) the token of each sorted pair
    expert: (N*k,) the expert of each sorted pair (ascending)
    group_end: (E,) int32, cumulative pair counts: expert e owns sorted rows [group_end[e-1], group_end[e])
    """

    order: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    group_end: torch.Tensor

    @classmethod
    def plan(cls, experts: torch.Tensor, num_experts: int) -> "ExpertDispatch":
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return cls(order, order // experts.shape[-1], flat[order], torch.cumsum(counts, 0, dtype=torch.int32))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's CPU backward rejects the
    stride-0 gradients that `.sum()` and broadcasts produce."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# On CUDA every expert's rows are padded to a multiple of this many rows before torch's grouped GEMM,
# as DeepSpeed's AutoEP (TOKEN_GROUP_ALIGN_SIZE_M = 8 for bf16) and torchtitan do. torch's grouped GEMM
# kernels (CUTLASS and cuBLASLt, read in torch's sources, not run) assert 16-byte aligned group
# boundaries where the grouped dimension is the contiguous one; ours are row-major with the grouped
# dimension outermost, which by that reading needs no padding, but that is unconfirmed on a GPU, and
# the padding costs one copy of the rows in and one out.
GROUP_ALIGN_ROWS = 8


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands; where it does not, `grouped_linear` masks.

    Which path runs where (torch 2.13 on CPU, run; on CUDA as read in torch's GroupedBlas.cpp and
    GroupedMMUtils.h, not run):
      * eager, CPU: grouped_mm for fp32 and bf16 (its CPU kernel loops over groups);
      * eager, CUDA, bf16: grouped_mm, a grouped GEMM kernel on sm90/sm100 (no host sync); on other GPUs
        torch loops over the groups itself, reading the group ends back to the host once per call;
      * eager, CUDA, fp32: grouped_mm too: torch's per-group loop (one mm per expert group, one host read
        of the group ends per call). The masked fallback would cost E/k times the FLOPs instead;
      * compiled (any device), not bf16: the masked fallback. The meta kernel that compile traces
        with takes bf16 only ("Expected inputs of BF16 type"); the fallback keeps the graph whole.
    Always: the weight's matrix dims must be 16-byte multiples (the kernels' stride rule)."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    aligned = all((n * x.element_size()) % 16 == 0 for n in weight.shape[1:])
    if torch.compiler.is_compiling():
        return aligned and x.dtype == torch.bfloat16
    return aligned and x.dtype in (torch.float32, torch.bfloat16)


def _padded_groups(group_end: torch.Tensor, rows: int, align: int):
    """Each expert's rows padded to a multiple of `align`: (destination of every sorted row, padded group
    ends (int32), padded row count). Tensor ops only; the padded count is the static bound
    rows + E·(align − 1), so nothing is read back to the host."""
    counts = torch.diff(group_end, prepend=group_end.new_zeros(1))
    padded_counts = (counts + align - 1) // align * align
    padded_end = torch.cumsum(padded_counts, 0, dtype=torch.int32)
    moved = ((padded_end - padded_counts) - (group_end - counts)).long()  # each group's new start - old start
    position = torch.arange(rows, device=group_end.device)
    expert = torch.searchsorted(group_end, position.to(group_end.dtype), right=True)
    destination = position + moved[expert]
    return destination, padded_end, rows + group_end.shape[0] * (align - 1)


def grouped_linear(x_sorted: torch.Tensor, weight: torch.Tensor, group_end: torch.Tensor,
                   align_rows: int | None = None) -> torch.Tensor:
    """Row r of `x_sorted` (sorted by expert; expert e owns rows [group_end[e-1], group_end[e])) times
    weight[expert_r]ᵀ.

    Uses torch's grouped GEMM (offsets stay on the device) where it applies (`_grouped_mm_fits` says
    where, and which syncs torch's own per-group loop costs). Elsewhere, one dense matmul per expert over
    all rows, masked: E/k times the FLOPs, sync-free; fine for the small E of JetMoE-style layers.
    `align_rows`: pad every group to a multiple of this many rows for the grouped GEMM (default:
    GROUP_ALIGN_ROWS on CUDA, none elsewhere); the padding rows are zeros and are dropped after."""
    if torch.is_autocast_enabled(x_sorted.device.type):
        dtype = torch.get_autocast_dtype(x_sorted.device.type)
        x_sorted, weight = x_sorted.to(dtype), weight.to(dtype)
    else:
        x_sorted = x_sorted.to(weight.dtype)
    if _grouped_mm_fits(x_sorted, weight):
        if align_rows is None:
            align_rows = GROUP_ALIGN_ROWS if x_sorted.device.type == "cuda" else 1
        if align_rows == 1:
            return _ContiguousGrad.apply(F.grouped_mm(x_sorted, weight.transpose(1, 2), offs=group_end))
        destination, padded_end, padded_rows = _padded_groups(group_end, x_sorted.shape[0], align_rows)
        padded = x_sorted.new_zeros(padded_rows, x_sorted.shape[1]).index_copy(0, destination, x_sorted)
        out = _ContiguousGrad.apply(F.grouped_mm(padded, weight.transpose(1, 2), offs=padded_end))
        return out.index_select(0, destination)
    out = x_sorted.new_zeros(x_sorted.shape[0], weight.shape[1])
    expert = torch.searchsorted(group_end, torch.arange(x_sorted.shape[0], device=x_sorted.device,
                                                        dtype=group_end.dtype), right=True)
    for e in range(weight.shape[0]):
        mine = (expert == e).unsqueeze(-1)
        out = torch.where(mine, F.linear(x_sorted, weight[e]), out)
    return out


def dispatch_dtype(rows: torch.Tensor) -> torch.Tensor:
    """`rows`, about to be handed to the experts (and under expert parallelism sent to other ranks), in
    the autocast dtype when autocast is on for their device; unchanged otherwise (fp32 runs, DeepSpeed's
    bf16 mode).

    Under autocast RMSNorm returns fp32 (its fp32 weight times the fp32 residual stream), so without
    this an expert-parallel exchange moves 4-byte activations where 2 bytes carry what the experts use:
    they compute in the autocast dtype (`grouped_linear` casts first; CDMoE's dot products are autocast
    einsums). Call it after gathering a token's k rows, so that their gradients are still summed in
    fp32 before they reach the token."""
    device_type = rows.device.type
    return rows.to(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else rows


class ExpertDispatcher(nn.Module):
    """Runs an expert computation on (token, slot) rows sorted by expert, here in this process:
    `expert_fn(rows, group_end)`. Expert parallelism swaps in a dispatcher that sends each row to the
    rank holding its expert and brings the results back in the same order (train/expert_parallel.py)."""

    def forward(self, rows: torch.Tensor, plan: ExpertDispatch, expert_fn) -> torch.Tensor:
        return expert_fn(rows, plan.group_end)


def table_gradient(ids: torch.Tensor, token_of, h: torch.Tensor, grad_scores: torch.Tensor,
                   table: torch.Tensor) -> torch.Tensor:
    """d table[e] = Σ_{slots m with ids[m] = e} grad_scores[m]·h[token of m], for flat slot lists `ids`
    and `grad_scores`: one embedding_bag over the slots sorted by expert (bag e: the slots of expert e,
    empty for an expert no slot picked: a zero row), never an (M, D) tensor. `token_of(order)` maps
    positions in the slot list to the rows of `h` they read."""
    order = torch.argsort(ids)
    counts = torch.zeros(table.shape[0], dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    return F.embedding_bag(token_of(order), h.to(table.dtype), torch.cumsum(counts, 0) - counts, mode="sum",
                           per_sample_weights=grad_scores[order].to(table.dtype))


class _GatherDot(torch.autograd.Function):
    """scores[n, s] = <table[ids[n, s]], h[n]>: each token's dot products with its k picked rows.

    Autograd of gather-then-multiply would write the (N, k, D) gradient of the gathered rows and
    scatter-add it into the table. Both gradients are weighted sums of rows instead, which
    `embedding_bag` computes without that tensor: d h[n] = Σ_s g[n, s]·table[ids[n, s]] (bags of
    k rows), and d table[e] = Σ_{ids[n, s] = e} g[n, s]·h[n] (bags of the tokens that picked e, found
    by sorting the ids). On CPU, doge-20m's 16384-expert tables: the layer's backward 2.4x faster."""

    @staticmethod
    def forward(ctx, h, ids, table):
        ctx.save_for_backward(h, ids, table)
        return torch.einsum("nkd,nd->nk", F.embedding(ids, table), h)

    @staticmethod
    def backward(ctx, grad_scores):
        h, ids, table = ctx.saved_tensors
        grad_h = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_h = F.embedding_bag(ids, table, per_sample_weights=grad_scores.to(table.dtype), mode="sum").to(h.dtype)
        if ctx.needs_input_grad[2]:
            k = ids.shape[-1]  # slot m of the flattened (N, k) picks is token m // k's
            grad_table = table_gradient(ids.reshape(-1), lambda order: order // k, h, grad_scores.reshape(-1), table)
        return grad_h, None, grad_table


class RankOneExperts(nn.Module):
    """CDMoE's rank-1 experts: expert e reads <down[e], h> and writes along up[e]. For tokens h (N, D)
    with k picked experts (N, k) and routing weights (N, k): Σ_slots act(<down[e], h>) · w · up[e].
    embedding_bag sums the up-embeddings without materialising an (N, k, D) tensor, and `_GatherDot`
    keeps the down-projection's backward free of one too. The tables are passed in (they stay the
    model's parameters, with its key names); expert parallelism swaps in a version that holds a slice
    of them on each rank (train/expert_parallel.py)."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, down: torch.Tensor,
                up: torch.Tensor) -> torch.Tensor:
        gates = self.act(_GatherDot.apply(h, experts, down)) * weights
        return F.embedding_bag(experts, up, per_sample_weights=gates.to(up.dtype), mode="sum")


@dataclass
class RouterStats:
    """One router's contribution to a load-balancing loss.

    expert_counts: (E,) picks per expert (padding excluded); expert_prob_sum: (E,) Σ over tokens of the
    router's probability for each expert; num_tokens: () tokens counted."""

    expert_counts: torch.Tensor
    expert_prob_sum: torch.Tensor
    num_tokens: torch.Tensor

    def row(self) -> torch.Tensor:
        """This router's row of the `router_stats` tensor (fp32)."""
        return torch.cat([self.expert_counts.float(), self.expert_prob_sum.float(),
                          self.num_tokens.float().reshape(1).to(self.expert_counts.device)])


def new_router_stats(num_routers: int, num_experts: int, device) -> torch.Tensor:
    """The empty (routers, 2E + 1) statistics tensor a forward pass starts with."""
    return torch.zeros(num_routers, 2 * num_experts + 1, dtype=torch.float32, device=device)


def record_router_stats(router_stats: torch.Tensor, router_index: int, stats: RouterStats) -> torch.Tensor:
    """`router_stats` with row `router_index` set to `stats` (out of place, so autograd keeps both). The
    index is filled on the device (torch.full): an index tensor made from a Python list would be a
    host-to-device copy per router, and such a copy waits for the device. (Joining slices around the row
    with torch.cat instead gave wrong gradients in compiled layers under torch 2.13's inductor.)"""
    index = torch.full((1,), router_index, dtype=torch.long, device=router_stats.device)
    return router_stats.index_copy(0, index, stats.row()[None])


def expert_counts(router_stats: torch.Tensor) -> torch.Tensor:
    """(routers, E) pick counts per router."""
    return router_stats[:, : (router_stats.shape[1] - 1) // 2]


def count_picks(experts: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None):
    """Per-expert pick counts of (N, k) expert ids and the number of tokens counted, padding excluded
    when a (B, S) token mask is given (tokens flattened batch-major, as the router sees them)."""
    weights = torch.ones(experts.shape, dtype=torch.float32, device=experts.device)
    if token_mask is None:
        num_tokens = experts.new_full((), experts.shape[0], dtype=torch.float32)  # filled on the device: no copy
    else:
        m = token_mask.reshape(-1).to(device=experts.device, dtype=torch.float32)
        weights = weights * m[:, None]
        num_tokens = m.sum()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=experts.device)
    return counts.scatter_add_(0, experts.reshape(-1), weights.reshape(-1)), num_tokens


def softmax_router_stats(logits: torch.Tensor, experts: torch.Tensor, token_mask: torch.Tensor | None) -> RouterStats:
    """Statistics of a plain softmax router: probabilities over all E experts, picks = `experts`."""
    probs = torch.softmax(logits.float(), dim=-1)
    if token_mask is not None:
        probs = probs * token_mask.reshape(-1, 1).to(probs)
    counts, num_tokens = count_picks(experts, logits.shape[-1], token_mask)
    return RouterStats(counts, probs.sum(0), num_tokens)


def load_balancing_loss(router_stats: torch.Tensor, picks_per_token: int) -> torch.Tensor:
    """Switch-transformer load balancing over all routers: E · Σ_e f_e · p_e, where p_e is the mean
    router probability of expert e and f_e = picks of e / (tokens · picks_per_token). With
    picks_per_token = k the f_e sum to 1 (Doge's convention); with 1 they sum to k (JetMoE's)."""
    total = router_stats.sum(0)
    num_experts = (total.shape[0] - 1) // 2
    counts, probs, tokens = total[:num_experts], total[num_experts : 2 * num_experts], total[-1]
    return num_experts * torch.sum((counts / (tokens * picks_per_token)) * (probs / tokens))
