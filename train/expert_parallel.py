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
weights), each rank adds the contributions of the experts it holds, and the partial outputs are
reduce-scattered back to the tokens' ranks (`ShardedRankOneExperts`). Sending each token only to the
ranks that own one of its experts moves fewer bytes, but with k >= 16 picks over N <= 8 ranks nearly
every rank is hit anyway: 4-18% fewer bytes for the shapes we ship (README's table), at the price of a
count exchange, a host sync and two variable-size all-to-alls per layer. All-gather / reduce-scatter
have fixed sizes: no host synchronisation at all.

Checkpoints stay one Hugging Face directory of full weights (`full_state_dict` gathers the shards) and
name-keyed optimizer state with full expert tensors, so a run resumes under another expert-parallel
size, or none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from models.moe import ExpertDispatch, ExpertDispatcher, Experts, RankOneExperts

from .distributed import Topology

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
        from deepspeed.module_inject.auto_ep_layer import compute_split_plan

        counts = torch.diff(plan.group_end, prepend=plan.group_end.new_zeros(1)).to(torch.int64)
        # one all-to-all of counts and one device-to-host read: what variable-size all-to-all needs
        split = compute_split_plan(plan.expert, self.num_experts, self.ep_size, self.local_experts, self.group,
                                   num_tokens_per_expert=counts)
        by_source = split.local_counts_by_source.to(torch.int64)  # (sources, local experts)
        order, group_end = _by_local_expert(by_source, sum(split.output_splits))
        self._split = (plan, split, order, group_end)
        return split, order, group_end

    def forward(self, rows: torch.Tensor, plan: ExpertDispatch, expert_fn) -> torch.Tensor:
        from deepspeed.module_inject.auto_ep_layer import _AllToAllV

        split, order, group_end = self._exchange_plan(plan)
        received = _AllToAllV.apply(self.group, rows, split.input_splits, split.output_splits)
        local = expert_fn(received[order], group_end)
        back = torch.empty_like(local).index_copy_(0, order, local)
        return _AllToAllV.apply(self.group, back, split.output_splits, split.input_splits)


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


class ShardedRankOneExperts(RankOneExperts):
    """RankOneExperts over tables that hold rows [first, first + E/N) of the experts on this rank."""

    def __init__(self, act, group, ep_size: int, ep_rank: int, local_experts: int):
        super().__init__(act)
        self.group, self.ep_size = group, ep_size
        self.first, self.local_experts = ep_rank * local_experts, local_experts

    def forward(self, h, experts, weights, down, up):
        h_all = _GatherRows.apply(h, self.group, self.ep_size)
        # ids as int32 and weights in the activations' dtype: 6 bytes a slot under bf16 (README's table)
        experts_all = _GatherRows.apply(experts.to(torch.int32), self.group, self.ep_size).long()
        weights_all = _GatherRows.apply(weights.to(h.dtype), self.group, self.ep_size)
        local = experts_all - self.first
        mine = (local >= 0) & (local < self.local_experts)
        # every slot is computed on a valid local row; the slots of other ranks' experts weigh 0
        partial = super().forward(h_all, local.clamp(0, self.local_experts - 1), weights_all * mine, down, up)
        return _ReduceScatterRows.apply(partial, self.group, self.ep_size)


# ---------------------------------------------------------------------------------------------------
# Sharding a model, and what engines need to know about it


@dataclass
class ExpertSharding:
    """Which parameters are expert slices (name -> rows of the full tensor), and the groups."""

    topology: Topology
    full_rows: dict[str, int] = field(default_factory=dict)

    @property
    def ep_size(self) -> int:
        return self.topology.ep_size

    def is_expert(self, name: str) -> bool:
        return name in self.full_rows

    def local_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        rows = self.full_rows[name] // self.ep_size
        return full.narrow(0, self.topology.ep_rank * rows, rows)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's slice (collective over the expert-parallel group)."""
        full = local.new_empty((local.shape[0] * self.ep_size, *local.shape[1:]))
        dist.all_gather_into_tensor(full, local.contiguous(), group=self.topology.ep_group)
        return full

    def full_state_dict(self, state: dict) -> dict:
        """A state dict with every expert slice gathered into the full tensor (collective)."""
        return {k: (self.gather(v.detach()) if self.is_expert(k) else v) for k, v in state.items()}

    def gather_optimizer_state(self, name: str, state: dict) -> dict:
        if not self.is_expert(name):
            return state
        return {k: (self.gather(v) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}

    def slice_optimizer_state(self, name: str, state: dict) -> dict:
        if not self.is_expert(name):
            return state
        return {k: (self.local_slice(name, v) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}

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

    def grad_norm(self, module: nn.Module) -> torch.Tensor:
        """The global gradient norm: replicated parameters once, expert slices summed over the group."""
        shared, expert = [], []
        for name, param in module.named_parameters():
            if param.grad is not None:
                (expert if self.is_expert(name) else shared).append(param.grad.detach().float().norm() ** 2)
        zero = torch.zeros((), device=self.topology.device)
        expert_sq = torch.stack(expert).sum() if expert else zero
        dist.all_reduce(expert_sq, group=self.topology.ep_group)
        return torch.sqrt((torch.stack(shared).sum() if shared else zero) + expert_sq)


def shard_experts(model: nn.Module, topology: Topology) -> ExpertSharding:
    """Keep this rank's slice of every expert tensor and swap in the expert-parallel siblings."""
    from .engine import import_deepspeed

    # DeepSpeed's AutoEP collectives go through deepspeed.comm, over the process group already set up
    import_deepspeed(topology).init_distributed(dist_backend=dist.get_backend())
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
    from deepspeed.moe.layer import MoE

    group_name = f"ep_size_{sharding.ep_size}"

    class ExpertParallelMarker(MoE):
        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)  # no gate, no experts: only what DeepSpeed's engine reads
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(self.ep_size,
                                                        use_data_before_expert_parallel_=use_data_before_expert_parallel_)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    for name, param in model.named_parameters():
        if sharding.is_expert(name):
            param.allreduce = False
            param.group_name = group_name
    model.add_module("deepspeed_expert_parallel", ExpertParallelMarker(max(sharding.full_rows.values()),
                                                                       sharding.ep_size))
    return group_name


def _is_expert_table(model: nn.Module, embedding: nn.Embedding) -> bool:
    """CDMoE's down_embed / up_embed (not the token embedding)."""
    return any(isinstance(m, RankOneExperts) for parent in model.modules() if embedding in parent.children()
               for m in parent.children())
