"""ZeRO-3 models built and loaded already partitioned (kiln/sharded.py), on 2 CPU ranks (gloo).

One torchrun launch (tests/dist/sharded_cases.py) builds and loads every case and compares it, on
each rank, with the full build of the same seed:
- pretraining's random init (a MoE model, and a dense one with learned positions, LayerNorm, biases,
  GELU and a tied LM head), fp32 and bf16: every gathered initial weight EXACTLY the full build's
  (bf16: the full build cast to bf16), the RNG left where the full build leaves it, and the AdamW
  groups (which parameters, weight decay) the full build's; below ZeRO-3 the plain build;
- from_pretrained under ZeRO-3 as ppo loads its four models, from a sharded checkpoint: partitioned
  (each rank holds 1/2 of every parameter, the full tensors released), the gathered weights the
  checkpoint's, a new score head the one the full load draws; a checkpoint whose config.json does
  not describe its weights refused on every rank;
- sft / reward: the model loaded under the trainer arguments' own DeepSpeed config;
- pretrain.init_from: a Llama folder imported partitioned, equal to the full import.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.common import rank_reports

ROOT = Path(__file__).resolve().parent.parent
BUILDS = [f"build-{m}-{p}" for m in ("moe", "dense") for p in ("fp32", "bf16")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return rank_reports(ROOT / "tests/dist/sharded_cases.py", tmp_path_factory.mktemp("sharded"), timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", BUILDS)
def test_a_sharded_build_starts_from_the_full_builds_weights(ranks, case):
    for r, got in enumerate(ranks):
        c = got[case]
        assert c["partitioned"] and c["released"] and c["local_share"], (r, case, c)
        assert c["local_elements"] * 2 >= c["full_elements"] > c["local_elements"], (r, case, c)
        assert c["mismatched"] == [], (r, case)  # exactly equal, every parameter
        assert c["rng_equal"], (r, case)  # the rest of training draws what the full build's would
    if case.startswith("build-dense"):
        assert ranks[0][case]["tied"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", BUILDS)
def test_the_optimizer_groups_of_a_sharded_build_are_the_full_builds(ranks, case):
    """AdamW's no-decay group holds the 1-d parameters by their full shape: a partitioned
    parameter's data is an empty placeholder (p.dim() == 1), which would put all in no-decay."""
    for got in ranks:
        c = got[case]
        assert c["groups_equal"], c["groups"]
        (wd, n_decay), (no_wd, n_no_decay) = c["groups"]
        assert (wd, no_wd) == (0.1, 0.0) and n_decay > 0 and n_no_decay > 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_below_zero3_the_build_is_the_plain_one(ranks, kind):
    c = ranks[0][f"build-{kind}-zero2"]
    assert not c["partitioned"] and c["mismatched"] == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_from_pretrained_under_zero3_loads_partitioned_the_checkpoints_weights(ranks, precision):
    for r, got in enumerate(ranks):
        c = got[f"load-{precision}"]
        assert c["shards"] > 1  # the checkpoint's index is followed
        assert c["partitioned"] and c["released"] and c["local_share"], (r, c)
        assert c["local_elements"] * 2 >= c["full_elements"] > c["local_elements"], (r, c)
        assert c["mismatched_lm"] == [], (r, c)
        # the backbone loaded, the new head as the full load draws it
        assert c["mismatched_head"] == [], (r, c)
        assert c["rng_equal"] and c["tied"] and c["eval"], (r, c)


@pytest.mark.timeout(300)
def test_a_checkpoint_its_config_does_not_describe_is_refused_on_every_rank(ranks):
    for got in ranks:  # no rank got as far as a gather (the other would wait there)
        assert "embed_tokens.weight" in got["load-bad"] and "config.json does not describe" in got["load-bad"]
        assert "/bad" in got["load-bad"]


@pytest.mark.timeout(300)
def test_sft_and_reward_load_partitioned_under_their_trainer_arguments(ranks):
    for r, got in enumerate(ranks):
        c = got["trl"]
        assert c["partitioned"] and c["released"] and c["local_share"], (r, c)
        assert c["mismatched"] == [], (r, c)
        assert c["zero3_after"], c


@pytest.mark.timeout(300)
def test_init_from_imports_partitioned_the_full_imports_weights(ranks):
    for r, got in enumerate(ranks):
        c = got["import"]
        assert c["partitioned"] and c["released"] and c["local_share"], (r, c)
        assert c["mismatched"] == [], (r, c)
        assert c["rng_equal"], r


@pytest.mark.timeout(60)
def test_random_inits_draw_on_the_cpu_in_fp32_whatever_the_tensor():
    """`cpu_draws` routes every random init through a CPU fp32 temporary: a tensor of another dtype
    (here float64; on a GPU, another device) gets the full build's fp32 CPU draws, and the CPU
    generator advances as for them, through torch's init functions and transformers' alike."""
    import torch
    from transformers import initialization as hf_init

    from kiln.sharded import cpu_draws

    torch.manual_seed(0)
    want = torch.nn.init.kaiming_uniform_(torch.empty(8, 16), a=5**0.5)
    want_normal = torch.empty(40).normal_(0.0, 0.02)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    with cpu_draws():
        got = torch.nn.init.kaiming_uniform_(torch.empty(8, 16, dtype=torch.float64), a=5**0.5)
        got_normal = hf_init.normal_(torch.empty(40, dtype=torch.float64), 0.0, 0.02)
    assert torch.equal(got, want.double()) and torch.equal(got_normal, want_normal.double())
    assert torch.equal(torch.get_rng_state(), after)
    # and the functions are torch's own again after the scope
    assert torch.nn.init.normal_ is hf_init.TORCH_INIT_FUNCTIONS["normal_"]


RETENTION = """
import contextlib, json, sys
import torch
from kiln.sharded import large_frees_returned

def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

def kept_after_freeing(scope):
    # 64 blocks of 2 MiB, each written, with a small live tensor after each (so that the freed blocks
    # are holes the heap cannot give back from its top); then the blocks are freed
    with scope:
        before, small, blocks = rss_mib(), [], []
        for _ in range(64):
            blocks.append(torch.ones(1 << 19))
            small.append(torch.ones(1 << 14))  # 64 KiB: from the heap, right after the block
        del blocks
        return rss_mib() - before

big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # a large free: glibc's dynamic threshold rises past 2 MiB
print(json.dumps([kept_after_freeing(contextlib.nullcontext()), kept_after_freeing(large_frees_returned())]))
"""


@pytest.mark.timeout(60)
def test_inside_a_build_freed_large_blocks_go_back_to_the_os():
    """What a rank that receives gathered modules frees goes back at once inside the scope, where
    glibc's heap would keep it (measured in a fresh process, whose allocator state is known)."""
    import subprocess
    import sys

    from kiln.sharded import _glibc

    if _glibc() is None:
        pytest.skip("the scope tunes glibc's allocator only")
    out = subprocess.run(
        [sys.executable, "-c", RETENTION], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr
    heap_kept, scope_kept = json.loads(out.stdout)
    assert heap_kept > 64  # the setting matters: without the scope most of the 128 MiB stays resident
    assert scope_kept < 16, (heap_kept, scope_kept)
