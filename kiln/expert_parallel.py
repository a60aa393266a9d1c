"""Dropless expert parallelism for Kiln's MoE layer (kiln/model.py): P ranks split the E experts, each keeps E/P.

    group = torch.distributed.new_group(ranks)      # the expert-parallel group: P ranks, E % P == 0
    shard_experts(model, group)                     # before the optimizer and the engine are built
    local_experts(E, P, rank)                       # range(rank * E/P, (rank + 1) * E/P): its global expert ids
    slice_experts(full_state_dict, P, rank)         # a full model's tensors -> that rank's, same names

Each rank routes its own tokens with the replicated router (the router, the load-balancing and z losses, the
expert-load statistics and a capacity limit are those of its own tokens, as without expert parallelism), sorts
its (token, expert) assignments by global expert as `dispatch` does and sends each expert's rows to the rank
that holds it with one `all_to_all_single`; the owner runs its experts in one grouped matmul per projection and
the outputs go back the same way (GShard, Lepikhin et al. 2020; the dropless all-to-all of MegaBlocks, Gale et al.
2022, and torchtitan's `ExpertParallel`). Rank r holds the consecutive experts r*E/P ... (r+1)*E/P - 1, so the
rows sorted by global expert are already sorted by destination rank. The row counts are exchanged first (one
small all-to-all of the (E,) counts) and read by the host once (`.tolist()`): the one host sync of a layer, for
the split sizes the data all-to-all needs. Nothing is dropped without a `capacity_factor`.

Gradients. The all-to-all's backward is the reverse all-to-all, so each token's input, router and gate weight
get exactly the gradient they get without expert parallelism, on its own rank. An expert's weights, held by one
rank of the group, receive the rows of every rank of the group: its gradient is the SUM over the group's ranks
of what each rank's tokens contribute, where without expert parallelism each rank holds its own copy with its
own tokens' part. Data parallelism then AVERAGES a gradient over D ranks (sum / D); for an expert, the same
mean over the whole batch is this group sum, summed over the ranks that hold the same experts (the
expert-data-parallel group, D / P of them), divided by D - not by D / P, the size of the group it is reduced
over. (DeepSpeed's MoE reduction divides expert gradients by the data-parallel world size for this reason.)

Checkpoint names stay the global ones: a sharded layer's parameters keep their names (`...ffn.experts.up_proj`)
and hold the slice `local_experts(...)` of the full tensor along dim 0; `checkpoint_names_of_slice` gives the
per-expert names of the experts a slice holds (`...ffn.experts.{global id}.up_proj.weight`). P = 1 (a group of
one rank) changes nothing: the layer keeps every expert and takes the path it takes without a group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kiln.model import STACKED_EXPERTS, MoE, checkpoint_names


def local_experts(n_experts: int, size: int, rank: int) -> range:
    """The global ids of the experts rank `rank` of an expert-parallel group of `size` ranks holds: E/P
    consecutive ones."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in an expert-parallel group of {size} ranks")
    if n_experts % size:
        raise ValueError(f"{n_experts} experts do not split evenly over an expert-parallel group of {size}")
    per_rank = n_experts // size
    return range(rank * per_rank, (rank + 1) * per_rank)


def slice_experts(state_dict: dict[str, torch.Tensor], size: int, rank: int) -> dict[str, torch.Tensor]:
    """A full model's state dict (stacked experts, `...ffn.experts.up_proj` (E, F, C)) -> what rank `rank` of an
    expert-parallel group of `size` ranks holds: the same names, each stacked expert tensor cut to its
    `local_experts` along dim 0 (a view), every other tensor as is."""
    out = {}
    for name, tensor in state_dict.items():
        if STACKED_EXPERTS.match(name.removeprefix("module.")):
            held = local_experts(tensor.shape[0], size, rank)
            tensor = tensor[held.start : held.stop]
        out[name] = tensor
    return out


def checkpoint_names_of_slice(name: str, n_experts: int, size: int, rank: int) -> list[str]:
    """The per-expert checkpoint names (kiln/model.py's `checkpoint_names`) of the experts in rank `rank`'s slice
    of the stacked parameter `name`, in the slice's order: `...ffn.experts.{e}.up_proj.weight`, e its global id."""
    held = local_experts(n_experts, size, rank)
    return checkpoint_names(name, (n_experts,))[held.start : held.stop]


def shard_experts(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Every MoE layer of `model` (or `model` itself, one MoE layer) keeps the experts this rank of the
    expert-parallel `group` holds and exchanges its tokens' rows with the group in its forward. Call it on every
    rank of the group, on a model holding every expert (not partitioned by ZeRO-3), before building the
    optimizer: the expert parameters are replaced by new ones. A group of one rank changes nothing."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        if moe.expert_parallel is not None:
            raise ValueError("this MoE layer's experts are already sharded")
        held = local_experts(moe.n_experts, size, rank)
        if size == 1:
            continue
        for name, param in list(moe.experts.named_parameters(recurse=False)):
            if param.shape[0] != moe.n_experts:
                raise ValueError(f"experts.{name} has {param.shape[0]} experts, not {moe.n_experts}")
            local = param.detach()[held.start : held.stop].clone()
            moe.experts.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))
        moe.expert_parallel = group
    return model


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows with variable split sizes; its backward sends the gradients back the
    reverse way (the splits swapped)."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def exchange(
    experts: nn.Module, xs: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """The experts' outputs for this rank's rows, computed by the ranks that hold them.

    xs (S, C) rows grouped by global expert, counts (E,) rows per global expert (`dispatch`'s order) ->
    (S, C) in the same order. `experts` holds this rank's E/P experts (`shard_experts`)."""
    P = dist.get_world_size(group)
    n_local = counts.shape[0] // P
    counts = counts.to(torch.int64)
    # received[s, e]: the rows source rank s sends to this rank's local expert e
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    received = received.view(P, n_local)
    splits = torch.stack((counts.view(P, n_local).sum(1), received.sum(1)))  # rows to / from each rank
    sent_to, got_from = splits.tolist()  # the layer's one host sync
    rows = _AllToAll.apply(xs, got_from, sent_to, group)  # (R, C): by source rank, then by local expert
    # Regroup by local expert, each expert's rows in source rank order (the stable sort keeps them so).
    local_expert = torch.arange(n_local, device=xs.device).repeat(P)  # (P * n_local,) expert of each block
    local_expert = local_expert.repeat_interleave(received.reshape(-1), output_size=rows.shape[0])  # (R,)
    order = torch.argsort(local_expert, stable=True)  # (R,)
    y = experts(rows[order], received.sum(0), local_expert[order])  # (R, C) grouped by local expert
    y = torch.empty_like(y).index_copy(0, order, y)  # back to the received order
    return _AllToAll.apply(y, sent_to, got_from, group)  # (S, C)
