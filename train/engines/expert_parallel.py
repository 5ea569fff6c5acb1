"""Expert parallelism: each rank of an expert-parallel group of N ranks holds 1/N of every expert
tensor; the rest of the model is replicated, and every rank is a data-parallel replica with its own
micro-batches. Applied from outside the model files, on the swappable siblings models.moe defines.

JetMoE (MLP experts and the attention experts of the mixture of attention): the (token, slot) rows,
sorted by expert as in one process, go to the ranks owning their experts by an all-to-all with
variable sizes and come back the same way (`AllToAllDispatcher`); the router stays replicated and its
maths unchanged. We use DeepSpeed's AutoEP primitives for this (its per-expert count exchange
`compute_split_plan` and its autograd all-to-all `_AllToAllV`): they are dropless, as our single
process is. DeepSpeed's classic `deepspeed.moe.layer.MoE` instead pads or drops tokens to a fixed
capacity per expert and routes with its own gate, so it could not reproduce JetMoE's router or give
the single-process result. For the optimizer, DeepSpeed's classic MoE machinery is the one ZeRO knows:
its expert/data-parallel groups (`deepspeed.utils.groups`), expert parameters marked as such, and its
MoE parameter groups (`split_params_into_different_moe_groups_for_optimizer`). AutoEP's layer
replacement itself targets Hugging Face MoE blocks with a standard top-k gate, not these models.

Doge CDMoE (rank-1 experts, thousands of them, 16–64 per token): `down_embed` / `up_embed` keep E/N
rows per rank. The activations of the group's tokens are all-gathered (with their picked experts and
weights), each rank computes only the slots that picked one of its experts (about 1/N of the group's:
one device-to-host read per layer finds how many), and the partial outputs are reduce-scattered back to
the tokens' ranks (`ShardedRankOneExperts`). Sending each token only to the ranks that own one of its
experts moves fewer bytes, but with k >= 16 picks over N <= 8 ranks nearly every rank is hit anyway:
4-18% fewer bytes for the shapes we ship (docs/parallelism.md), at the price of a count exchange and two
variable-size all-to-alls per layer; all-gather / reduce-scatter have fixed sizes.

Checkpoints stay one Hugging Face directory of full weights (the expert slices gathered one tensor at a
time by the ranks that write them) and name-keyed optimizer state in flat ranges (each rank writes its
slice's), so a run resumes under another expert-parallel size, or none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.moe import ExpertDispatch, ExpertDispatcher, Experts, RankOneExperts, table_gradient

from ..distributed import Topology
from . import compat

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# JetMoE: rows to the experts' ranks and back


class AllToAllDispatcher(ExpertDispatcher):
    """`dispatcher(rows, plan, expert_fn)` for experts split over an expert-parallel group: rows
    (sorted by global expert, so grouped by owning rank) are exchanged with one all-to-all, regrouped by
    local expert, computed, and sent back. The per-expert counts are exchanged once per plan (a layer's
    attention experts reuse it for their second projection)."""

    def __init__(self, group, ep_size: int, num_experts: int):
        super().__init__()
        self.group, self.ep_size = group, ep_size
        self.num_experts, self.local_experts = num_experts, num_experts // ep_size
        self._split = None  # (plan, split plan, permutation): the last plan's exchange

    def _exchange_plan(self, plan: ExpertDispatch):
        if self._split is not None and self._split[0] is plan:
            return self._split[1:]
        counts = torch.diff(plan.group_end, prepend=plan.group_end.new_zeros(1)).to(torch.int64)
        # one all-to-all of counts and one device-to-host read: what variable-size all-to-all needs
        split = compat.expert_split_plan(plan.expert, self.num_experts, self.ep_size, self.local_experts, self.group,
                                         counts)
        by_source = split.local_counts_by_source.to(torch.int64)  # (sources, local experts)
        order, group_end = _by_local_expert(by_source, sum(split.output_splits))
        self._split = (plan, split, order, group_end)
        return split, order, group_end

    def forward(self, rows: torch.Tensor, plan: ExpertDispatch, expert_fn) -> torch.Tensor:
        split, order, group_end = self._exchange_plan(plan)
        received = compat.all_to_all_v(self.group, rows, split.input_splits, split.output_splits)
        local = expert_fn(received[order], group_end)
        back = torch.empty_like(local).index_copy_(0, order, local)
        return compat.all_to_all_v(self.group, back, split.output_splits, split.input_splits)


def _by_local_expert(by_source: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows (`total` of them) arrive grouped by source rank, each source's block sorted by
    local expert. The permutation that groups them by local expert (sources in order within each), and
    the cumulative row counts per local expert: tensor ops on the exchanged counts, with the total
    already on the host, so no further host sync."""
    sources, experts = by_source.shape
    block_start = (torch.cumsum(by_source.reshape(-1), 0) - by_source.reshape(-1)).reshape(sources, experts)
    lengths = by_source.t().reshape(-1)  # blocks in (expert, source) order
    starts = block_start.t().reshape(-1)
    within = torch.arange(total, device=by_source.device)
    offsets = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    group_end = torch.cumsum(by_source.sum(0), 0).to(torch.int32)
    return within + offsets, group_end


# ---------------------------------------------------------------------------------------------------
# Doge CDMoE: all-gather the tokens, add the local experts' contributions, reduce-scatter


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // ctx.size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] * ctx.size, *grad.shape[1:]))
        dist.all_gather_into_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None, None


class _SlotDot(torch.autograd.Function):
    """scores[m] = <table[ids[m]], h[token[m]]> for a ragged list of slots sorted by token: the slots of
    the experts this rank holds, out of the group's gathered tokens. Like models.moe._GatherDot, both
    gradients are weighted sums of rows (embedding_bag), never an (M, D) gradient tensor: d h[n] sums
    the slots of token n (bags at `token_starts`), d table[e] the slots that picked e."""

    @staticmethod
    def forward(ctx, h, token, ids, table, token_starts):
        ctx.save_for_backward(h, token, ids, table, token_starts)
        return (F.embedding(ids, table) * h.index_select(0, token)).sum(-1)

    @staticmethod
    def backward(ctx, grad_scores):
        h, token, ids, table, token_starts = ctx.saved_tensors
        grad_h = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_h = F.embedding_bag(ids, table, token_starts, mode="sum",
                                     per_sample_weights=grad_scores.to(table.dtype)).to(h.dtype)
        if ctx.needs_input_grad[3]:
            grad_table = table_gradient(ids, lambda order: token[order], h, grad_scores, table)
        return grad_h, None, None, grad_table, None


class ShardedRankOneExperts(RankOneExperts):
    """RankOneExperts over tables that hold rows [first, first + E/N) of the experts on this rank.

    The group's tokens are all-gathered (with their picks and weights), and this rank computes only the
    slots that picked one of its experts: about 1/N of the group's slots, so its expert arithmetic is that
    of a replica without expert parallelism. Which slots those are is data-dependent: finding them is one
    device-to-host read per layer (the number of local slots, for the shapes). Each token's local slots
    are summed in slot order, as the single process sums all of its slots, and the partial outputs are
    reduce-scattered back to the tokens' ranks."""

    def __init__(self, act, group, ep_size: int, ep_rank: int, local_experts: int):
        super().__init__(act)
        self.group, self.ep_size = group, ep_size
        self.first, self.local_experts = ep_rank * local_experts, local_experts
        self.slots_computed = 0  # local slots computed so far (what the tests and benchmarks count)
        self.slots_seen = 0  # slots of the group's tokens

    def forward(self, h, experts, weights, down, up):
        h_all = _GatherRows.apply(h, self.group, self.ep_size)
        # ids as int32 and weights in the activations' dtype: 6 bytes a slot under bf16 (docs/parallelism.md's table)
        experts_all = _GatherRows.apply(experts.to(torch.int32), self.group, self.ep_size).long()
        weights_all = _GatherRows.apply(weights.to(h.dtype), self.group, self.ep_size)
        local = experts_all - self.first
        mine = (local >= 0) & (local < self.local_experts)
        token, slot = mine.nonzero(as_tuple=True)  # row-major: sorted by token, then slot
        per_token = mine.sum(1)
        token_starts = torch.cumsum(per_token, 0) - per_token
        ids = local[token, slot]
        gates = self.act(_SlotDot.apply(h_all, token, ids, down, token_starts)) * weights_all[token, slot]
        partial = F.embedding_bag(ids, up, token_starts, mode="sum", per_sample_weights=gates.to(up.dtype))
        self.slots_computed += ids.numel()
        self.slots_seen += experts_all.numel()
        return _ReduceScatterRows.apply(partial, self.group, self.ep_size)


# ---------------------------------------------------------------------------------------------------
# Sharding a model, and what engines need to know about it


class NoSharding:
    """The sharding strategy of a model whose parameters every data-parallel rank holds whole."""

    ep_size = 1

    def is_expert(self, name: str) -> bool:
        return False

    def flat_offset(self, name: str, param: torch.Tensor) -> int:
        """Where this rank's `param` starts in the flattened full parameter."""
        return 0

    def full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def exports(self, name: str) -> bool:
        """Whether this rank takes part in writing `name` to a checkpoint (a replica, or a member of the
        group that gathers it)."""
        return True

    def full_tensor(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of `name` from this rank's part (collective for expert slices)."""
        return local

    def reduce_gradients(self, module: nn.Module) -> None:
        """Gradients DDP does not reduce itself (none here)."""

    def grad_norm(self, named_grads: list[tuple[str, torch.Tensor]], device) -> torch.Tensor:
        """The global gradient norm over every parameter (collective where parameters are sharded)."""
        grads = [g for _, g in named_grads]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


@dataclass
class ExpertSharding(NoSharding):
    """Which parameters are expert slices (name -> rows of the full tensor), and the groups."""

    topology: Topology
    full_rows: dict[str, int] = field(default_factory=dict)

    @property
    def ep_size(self) -> int:
        return self.topology.ep_size

    def is_expert(self, name: str) -> bool:
        return name in self.full_rows

    def flat_offset(self, name: str, param: torch.Tensor) -> int:
        # expert tables are split by rows: this rank's rows are one contiguous range of the flattened tensor
        return self.topology.ep_rank * param.numel() if self.is_expert(name) else 0

    def full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        return (self.full_rows[name], *param.shape[1:]) if self.is_expert(name) else tuple(param.shape)

    def exports(self, name: str) -> bool:
        # the first expert-parallel group (ranks 0 .. N-1) gathers the expert tables; its replicas need not
        return not self.is_expert(name) or self.topology.rank < self.ep_size

    def full_tensor(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return self.gather(local.detach()) if self.is_expert(name) else local

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's slice (collective over the expert-parallel group)."""
        full = local.new_empty((local.shape[0] * self.ep_size, *local.shape[1:]))
        dist.all_gather_into_tensor(full, local.contiguous(), group=self.topology.ep_group)
        return full

    def reduce_gradients(self, module: nn.Module) -> None:
        """Expert gradients, which DDP leaves alone: summed over the ranks holding the same slice (other
        replicas) and divided by the data-parallel size, as DDP's averaging does for the rest (each
        rank's loss is scaled by that size)."""
        edp = self.topology.world_size // self.ep_size
        for name, param in module.named_parameters():
            if self.is_expert(name) and param.grad is not None:
                param.grad.div_(self.topology.dp_size)
                if edp > 1:
                    dist.all_reduce(param.grad, group=self.topology.edp_group)

    def grad_norm(self, named_grads: list[tuple[str, torch.Tensor]], device) -> torch.Tensor:
        """Replicated parameters once, expert slices summed over the group."""
        shared, expert = [], []
        for name, grad in named_grads:
            (expert if self.is_expert(name) else shared).append(grad.detach().float().norm() ** 2)
        zero = torch.zeros((), device=device)
        expert_sq = torch.stack(expert).sum() if expert else zero
        dist.all_reduce(expert_sq, group=self.topology.ep_group)
        return torch.sqrt((torch.stack(shared).sum() if shared else zero) + expert_sq)


def shard_experts(model: nn.Module, topology: Topology) -> ExpertSharding:
    """Keep this rank's slice of every expert tensor and swap in the expert-parallel siblings."""
    # DeepSpeed's AutoEP collectives go through deepspeed.comm, over the process group already set up
    compat.import_deepspeed(topology.device, topology.world_size).init_distributed(dist_backend=dist.get_backend())
    sharding = ExpertSharding(topology)
    group, n, r = topology.ep_group, topology.ep_size, topology.ep_rank
    names = {id(p): name for name, p in model.named_parameters()}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ExpertDispatcher) and not isinstance(child, AllToAllDispatcher):
                experts = [m for m in module.children() if isinstance(m, Experts)]
                setattr(module, child_name, AllToAllDispatcher(group, n, experts[0].weight.shape[0]))
            elif isinstance(child, RankOneExperts) and not isinstance(child, ShardedRankOneExperts):
                tables = [m for m in module.children() if isinstance(m, nn.Embedding)]
                setattr(module, child_name, ShardedRankOneExperts(child.act, group, n, r, tables[0].num_embeddings // n))
        if isinstance(module, Experts) or (isinstance(module, nn.Embedding) and _is_expert_table(model, module)):
            weight = module.weight
            sharding.full_rows[names[id(weight)]] = weight.shape[0]
            rows = weight.shape[0] // n
            module.weight = nn.Parameter(weight.detach()[r * rows:(r + 1) * rows].clone(), requires_grad=weight.requires_grad)
            if isinstance(module, nn.Embedding):
                module.num_embeddings = rows
    held = sum(p.numel() for p in model.parameters())
    experts_held = sum(p.numel() for name, p in model.named_parameters() if name in sharding.full_rows)
    full = held + experts_held * (n - 1)
    logger.info("expert parallelism: %d ranks share the experts; this rank holds %d of %d parameters (%d expert "
                "parameters, 1/%d of them)", n, held, full, experts_held, n)
    return sharding


def mark_for_deepspeed(model: nn.Module, sharding: ExpertSharding) -> str:
    """Make DeepSpeed treat the expert slices as its MoE parameters: each is marked (`allreduce=False`,
    `group_name`), and a parameter-free `deepspeed.moe.layer.MoE` marker is attached, since DeepSpeed's
    engine switches its MoE handling (expert groups, MoE gradient reduction in ZeRO) on only when it finds
    one of those modules. The marker creates DeepSpeed's expert and expert-data-parallel groups
    (`deepspeed.utils.groups`) when the engine asks for them."""
    group_name = f"ep_size_{sharding.ep_size}"
    for name, param in model.named_parameters():
        if sharding.is_expert(name):
            param.allreduce = False
            param.group_name = group_name
    model.add_module("deepspeed_expert_parallel", compat.expert_parallel_marker(max(sharding.full_rows.values()),
                                                                                sharding.ep_size, group_name))
    return group_name


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights expert parallelism splits by rows: JetMoE's Experts, CDMoE's expert
    tables (`shard_experts` splits these; the planner counts them)."""
    return [m for m in model.modules()
            if isinstance(m, Experts) or (isinstance(m, nn.Embedding) and _is_expert_table(model, m))]


def _is_expert_table(model: nn.Module, embedding: nn.Embedding) -> bool:
    """CDMoE's down_embed / up_embed (not the token embedding)."""
    return any(isinstance(m, RankOneExperts) for parent in model.modules() if embedding in parent.children()
               for m in parent.children())
