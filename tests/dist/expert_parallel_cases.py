"""Expert parallelism (kiln/expert_parallel.py) on 2 CPU ranks (gloo), against the same layer without it.

    torchrun --nproc_per_node 2 tests/dist/expert_parallel_cases.py OUT_DIR

Started once by tests/test_expert_parallel.py. In each case every rank builds the same tiny MoE block (attention,
norms, a MoE layer) from one seed and runs its own tokens (a number of its own, drawn from its rank) through it
twice, forward and backward of out^2 + aux + z: as built (P=1, every expert on every rank) and with the experts
sharded over both ranks (P=2). The expert gradients of P=1 are summed over the ranks and cut to each rank's
experts (what P=2 computes: every rank's tokens reach the expert's one copy); every other gradient is compared
as is (each rank's own tokens, as P=1). OUT_DIR/<case>-rank<r>.json: the largest absolute differences, the
dropped fractions, the expert loads and the parameter names of both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import leave  # noqa: E402

CASES = {
    "swiglu-top2-bias": dict(num_experts=4, num_experts_per_tok=2, bias=True),
    "gelu-top1": dict(num_experts=4, num_experts_per_tok=1, activation="gelu"),
    "skewed": dict(num_experts=4, num_experts_per_tok=2),  # every token to rank 0's experts: rank 1 gets none
    "capacity": dict(num_experts=4, num_experts_per_tok=2, capacity_factor=1.0),  # dropping, per source rank
    "one-rank-group": dict(num_experts=4, num_experts_per_tok=2),  # P=1: sharding changes nothing
}


def block_for(case: str):
    import torch

    from kiln.model import KilnModel
    from tests.tiny_models import tiny

    torch.manual_seed(0)
    block = KilnModel(tiny(moe_every=1, **CASES[case])).layers[0]
    if case == "skewed":  # experts 0 and 1 score high on a positive input, 2 and 3 low
        with torch.no_grad():
            w = block.ffn.router.weight
            w.copy_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
            w[:2] += 1.0
            w[2:] -= 1.0
    return block


def inputs(case: str, rank: int):
    """This rank's hidden states (B, T, C), token mask (B*T,): another number of tokens per rank, padding on 1."""
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    B, T = (2, 16) if rank == 0 else (3, 7)
    x = torch.randn(B, T, 32, generator=g)
    if case == "skewed":
        x = 0.3 * x + 3.0
    mask = torch.ones(B * T)
    if rank == 1:
        mask[-4:] = 0.0
    return x, mask


def run(block, x, mask):
    """Forward and backward of out^2 + aux + z: out, dropped, expert load, the gradients (x's, then by name)."""
    x = x.clone().requires_grad_()
    out, (_, aux, z, load, dropped) = block(x, None, None, None, mask, True)
    loss = out.square().mean() + aux + z
    block.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return out.detach(), dropped.item(), load.tolist(), x.grad, grads


def case_row(case: str, rank: int, world: int, groups: dict) -> dict:
    import torch
    import torch.distributed as dist

    from kiln.expert_parallel import local_experts, shard_experts, slice_experts

    reference = block_for(case)
    full_state = {n: t.clone() for n, t in reference.state_dict().items()}
    x, mask = inputs(case, rank)
    out1, dropped1, load1, dx1, grads1 = run(reference, x, mask)

    one = case == "one-rank-group"
    sharded = shard_experts(block_for(case), groups["alone"] if one else groups["world"])
    out2, dropped2, load2, dx2, grads2 = run(sharded, x, mask)

    size, at = (1, 0) if one else (world, rank)
    held = local_experts(reference.ffn.n_experts, size, at)
    grad_diff = {}
    for name, g1 in grads1.items():
        if ".experts." in name and not one:  # the expert's one copy gets every rank's tokens
            dist.all_reduce(g1)
            g1 = g1[held.start : held.stop]
        g2 = grads2[name]
        grad_diff[name] = (g1 - g2).abs().max().item() if g1.shape == g2.shape else float("inf")
    state = sharded.state_dict()
    want = slice_experts(full_state, size, at)
    return {
        "out_diff": (out1 - out2).abs().max().item(),
        "dx_diff": (dx1 - dx2).abs().max().item(),
        "grad_diff": grad_diff,
        "dropped": [dropped1, dropped2],
        "load": [load1, load2],
        "names": [list(grads1), list(grads2)],
        "state_is_slice": list(state) == list(want) and all(torch.equal(state[n], want[n]) for n in want),
        "expert_shape": list(sharded.ffn.experts.up_proj.shape),
        "group_set": sharded.ffn.expert_parallel is not None,
        "identical": bool(torch.equal(out1, out2)),
    }


def main(out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in the same order
    groups = {"world": dist.group.WORLD, "alone": alone[rank]}
    for case in CASES:
        row = case_row(case, rank, world, groups)
        (out / f"{case}-rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
