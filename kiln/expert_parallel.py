"""Dropless expert parallelism for Kiln's MoE layer (kiln/model.py): P ranks split the E experts, each keeps E/P.

    group = torch.distributed.new_group(ranks)      # the expert-parallel group: P ranks, E % P == 0
    shard_experts(model, group)                     # before the optimizer and the engine are built
    local_experts(E, P, rank)                       # range(rank * E/P, (rank + 1) * E/P): its global expert ids
    slice_experts(full_state_dict, P, rank)         # a full model's tensors -> that rank's, same names
    for_deepspeed(model, P)                         # pretraining: the above over DeepSpeed's groups, marked for it

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

DeepSpeed (0.19.8, ZeRO-1/2). `for_deepspeed` shards over DeepSpeed's own expert-parallel groups and marks the
expert parameters as DeepSpeed's MoE marks its own (`allreduce = False`, `group_name`), with a parameterless
`deepspeed.moe.layer.MoE` in the model so that the engine acts on the marks: it then reduces an expert's
gradient over its expert-data-parallel group, divided by the whole data-parallel size (the mean above), and
ZeRO-1/2 partition the expert parameters over that group; the gradient norm it clips by counts every expert
once. The optimizer's groups keep the experts apart (kiln/training.py `adamw`). ZeRO-3 is out (DeepSpeed's
ZeRO-3 partitions only its AutoEP layers' experts by group), and so is ZeRO-0, whose clipping averages the
ranks' norms, each of its own experts.

Checkpoints. Each rank's ZeRO-1/2 shard holds its own experts' slice (under the global name); DeepSpeed loads
them as saved on the P and world size that wrote them (stages/pretrain.py `_restore_experts`). Under another
P (1 included) or world size, kiln/reshard.py converts the checkpoint into DeepSpeed's universal form with
each stacked expert parameter whole, its optimizer state with it (`relay_experts`), and DeepSpeed's loader
gives each rank the slice `local_experts` names for the new P.
"""

from __future__ import annotations

from functools import lru_cache

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
        moe.expert_parallel, moe.exchange = group, exchange
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


# ---------------------------------------------------------------------------------------------------- DeepSpeed


def group_name(size: int) -> str:
    """DeepSpeed's name of the expert-parallel (and expert-data-parallel) groups of `size` ranks, the key a
    parameter's `group_name` gives (deepspeed.moe's `ep_size_{size}`)."""
    return f"ep_size_{size}"


def deepspeed_groups(size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this rank's expert-parallel group, its expert-data-parallel group) of DeepSpeed's layout for `size`,
    made once per process (every rank calls it, after the process group is up): expert-parallel groups of
    `size` consecutive ranks [0 .. P-1], [P .. 2P-1], ...; expert-data-parallel groups the ranks holding the
    same experts, r, r + P, r + 2P, ... ZeRO-1/2 partition and reduce the expert parameters over the latter,
    so `shard_experts` must cut them over the former. Private DeepSpeed API (`deepspeed.utils.groups`,
    0.19.8): tests/test_expert_parallel_pretrain.py holds it to the layout."""
    import deepspeed
    from deepspeed.utils import groups

    if not deepspeed.comm.is_initialized():  # a Ray Train worker: torch's group is up, DeepSpeed's not yet
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # takes the group torch has
    name = group_name(size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


@lru_cache(maxsize=1)
def _marker_type() -> type:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelMarker(DeepSpeedMoE):
        """Tells DeepSpeed's engine that the model it wraps has expert-parallel parameters; holds and computes
        nothing.

        Why it exists: DeepSpeed 0.19.8 treats parameters marked `allreduce=False` as experts (reduced over
        their expert-data-parallel group only, divided by the whole data-parallel size, and partitioned by
        ZeRO-1/2 over that group) only when its engine finds a module that is a `deepspeed.moe.layer.MoE`
        (`has_moe_layers`); no config key says so. Kiln's MoE layer cannot be one: DeepSpeed then saves its
        experts by the names of its own layer, which Kiln's stacked experts do not have. Without the marker,
        marked parameters fail in ZeRO-2's reduction (no expert group), and unmarked ones are silently
        averaged and partitioned as replicas: rank 0's experts overwrite the others'.

        No parameter, buffer or state-dict key; `num_local_experts = 0` keeps DeepSpeed from writing or
        reading per-expert checkpoint files: ZeRO-1/2's shards hold each rank's experts (stages/pretrain.py
        `_restore_experts`; kiln/reshard.py `relay_experts` for another layout)."""

        def __init__(self, n_experts: int, size: int):
            nn.Module.__init__(self)  # not DeepSpeed's MoE's: no gate, no experts
            self.num_experts, self.ep_size = n_experts, size
            self.expert_group_name = group_name(size)
            self.num_local_experts = 0
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The engine calls it at construction: the groups exist already (`deepspeed_groups`)."""

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker marks a model for DeepSpeed; it has no forward pass")

    return ExpertParallelMarker


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name in `model`: parameter} of the experts of its sharded MoE layers (`shard_experts`)."""
    out = {}
    for prefix, moe in model.named_modules():
        if isinstance(moe, MoE) and moe.expert_parallel is not None:
            for name, p in moe.experts.named_parameters():
                out[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = p
    return out


def for_deepspeed(model: nn.Module, size: int) -> nn.Module:
    """`model` (a full MoE model, every expert on every rank, before its optimizer is built) made expert-parallel
    over `size` ranks for a DeepSpeed ZeRO-1/2 engine: its experts cut over `deepspeed_groups`' expert-parallel
    group (`shard_experts`), each expert parameter marked as DeepSpeed marks its own (`allreduce = False`,
    `group_name`), and a parameterless `ExpertParallelMarker` added (as `expert_parallel_marker`) so that the
    engine acts on the marks. The optimizer's groups are then split by
    `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` (kiln/training.py `adamw` does).
    Every rank calls it; `size` 1 changes nothing."""
    if size == 1:
        return model
    n_experts = {m.n_experts for m in model.modules() if isinstance(m, MoE)}
    if not n_experts:
        raise ValueError("expert parallelism splits the experts of MoE layers, and this model has none")
    shard_experts(model, deepspeed_groups(size)[0])
    for p in expert_parameters(model).values():
        p.allreduce, p.group_name = False, group_name(size)
    model.add_module("expert_parallel_marker", _marker_type()(max(n_experts), size))
    return model


def is_expert_parameter(p: torch.Tensor) -> bool:
    """Whether DeepSpeed treats `p` as an expert parameter (deepspeed.moe.utils' `is_moe_param`)."""
    return getattr(p, "allreduce", True) is False


def owner_expert(t: torch.Tensor, e: int, n_experts: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Expert `e` of the stacked expert parameter `t` (this rank's slice), on every rank of the expert-parallel
    `group`: broadcast from the rank that holds it (a collective of the group, one expert at a time)."""
    size = dist.get_world_size(group)
    owner, at = divmod(e, n_experts // size)
    if dist.get_rank(group) == owner:
        value = t.detach()[at].contiguous()
    else:
        value = t.new_empty(t.shape[1:])
    dist.broadcast(value, src=dist.get_global_rank(group, owner), group=group)
    return value
