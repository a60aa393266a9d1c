"""Dropless expert parallelism (kiln/expert_parallel.py): a MoE layer whose experts are split over 2 ranks computes
what the same layer computes with every expert on every rank.

One torchrun launch (tests/dist/expert_parallel_cases.py, 2 gloo ranks, ~10 s) runs a tiny MoE block on each
rank's own tokens (another number per rank, padding on one) with P=1 and with P=2: outputs, input gradients and
every parameter gradient within 1e-5, nothing dropped without a capacity, the same drops with one.

What the expert gradients are: with P=2 an expert's one copy receives the rows of both ranks' tokens, so its
gradient is the SUM over the expert-parallel group of each rank's contribution, which P=1 spreads over the
ranks' copies: the test sums P=1's expert gradients over the ranks (all-reduce) and cuts them to each rank's
experts. Every other gradient (attention, norms, router) is each rank's own, with P=2 as with P=1. Data-parallel
training AVERAGES gradients over its D ranks (sum / D); the expert gradients reach the same mean over the whole
batch by a sum over the ranks holding the same experts (D / P of them), divided by D, not by D / P.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.expert_parallel import checkpoint_names_of_slice, local_experts, slice_experts
from kiln.model import KilnForCausalLM, MoE
from tests.dist.common import torchrun
from tests.dist.expert_parallel_cases import CASES
from tests.tiny_models import tiny

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
SPLIT = [c for c in CASES if c != "one-rank-group"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expert_parallel")
    torchrun(ROOT / "tests/dist/expert_parallel_cases.py", out, timeout=60)
    return out


def rows(out: Path, case: str) -> list[dict]:
    return [json.loads((out / f"{case}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", SPLIT)
def test_experts_split_over_two_ranks_give_the_outputs_and_gradients_of_one(runs, case):
    for rank, row in enumerate(rows(runs, case)):
        assert row["group_set"] and row["expert_shape"][0] == 2, row  # 2 of the 4 experts held here
        assert row["names"][0] == row["names"][1], row["names"]  # the same parameter names
        assert row["state_is_slice"], "the sharded layer's state is not slice_experts of the full one"
        assert row["out_diff"] <= TOL and row["dx_diff"] <= TOL, (rank, row)
        bad = {n: d for n, d in row["grad_diff"].items() if not d <= TOL}
        assert not bad, (rank, bad)
        assert row["load"][0] == row["load"][1], row["load"]  # each rank's own tokens' statistics
        dropped_one, dropped_split = row["dropped"]
        assert dropped_split == dropped_one
        if CASES[case].get("capacity_factor") is None:
            assert dropped_split == 0.0


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_a_rank_that_receives_no_rows_still_takes_part(runs):
    """Every token of both ranks routed to experts 0 and 1 (rank 0's): rank 1 receives no row."""
    for row in rows(runs, "skewed"):
        assert row["load"][1][2:] == [0.0, 0.0], row["load"]


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_a_capacity_drops_per_source_rank_as_without_expert_parallelism(runs):
    """The capacity is each rank's own (its tokens, as without expert parallelism): the same rows dropped."""
    dropped = [row["dropped"] for row in rows(runs, "capacity")]
    assert any(one > 0 for one, _ in dropped) and all(one == split for one, split in dropped), dropped


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_a_group_of_one_rank_leaves_the_layer_as_it_was(runs):
    for row in rows(runs, "one-rank-group"):
        assert not row["group_set"] and row["expert_shape"][0] == 4
        assert row["identical"] and max(row["grad_diff"].values()) == 0.0, row


def test_each_rank_holds_consecutive_experts():
    assert [local_experts(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert local_experts(4, 1, 0) == range(4)
    with pytest.raises(ValueError, match="split evenly"):
        local_experts(6, 4, 0)
    with pytest.raises(ValueError, match="not in"):
        local_experts(4, 2, 2)


def test_a_full_state_dict_slices_to_a_rank_under_its_global_names():
    """`slice_experts` cuts only the stacked expert tensors, keeping every name; the slice's per-expert
    checkpoint names carry the experts' global ids."""
    torch.manual_seed(0)
    model = KilnForCausalLM(tiny(num_experts=4, moe_every=2, bias=True))
    full = model.state_dict()
    local = slice_experts(full, 2, 1)
    assert list(local) == list(full)
    for name, tensor in full.items():
        if ".ffn.experts." in name:
            assert torch.equal(local[name], tensor[2:4]), name
        else:
            assert local[name] is tensor, name
    assert checkpoint_names_of_slice("model.layers.1.ffn.experts.up_proj", 4, 2, 1) == [
        "model.layers.1.ffn.experts.2.up_proj.weight",
        "model.layers.1.ffn.experts.3.up_proj.weight",
    ]
    assert checkpoint_names_of_slice("model.layers.1.ffn.experts.down_proj_bias", 4, 2, 0)[-1] == (
        "model.layers.1.ffn.experts.1.down_proj.bias"
    )
    assert all(m.expert_parallel is None for m in model.modules() if isinstance(m, MoE))
