"""Resuming a pretraining checkpoint on another world size or ZeRO stage (kiln/reshard.py).

One torchrun launch (tests/dist/reshard_cases.py) trains the tiny MoE model as pretrain does, on 1
rank and on 2 with the same global batches, checkpoints it and continues (the reference); each
checkpoint then resumes on the other world size, through `to_universal` (ZeRO-0's as saved):
- fp32 ZeRO-2 and ZeRO-3, ZeRO-1 saved and ZeRO-2 resumed, ZeRO-0; 2 -> 1 and 1 -> 2: the losses of
  the run on that world size (within 1e-5: the ranks' order of summation); bf16 ZeRO-3: within the
  rounding by which its 1- and 2-rank runs differ anyway;
- a universal checkpoint resumed on its own world size: exactly the run's losses (the conversion
  loses nothing, fp32 and bf16);
- ZeRO-3 needs `repair_universal_load`: without it DeepSpeed 0.19.8's loader decays the no-decay
  group and advances one `step` shared by the groups, and the losses part from the reference;
  ZeRO-1/2 need nothing;
- each rank resumes from only the files `rank_files` keeps (as `fetch` copies them).
Then the layout rules and the file selection, without processes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kiln import reshard as R
from tests.dist.common import PRETRAIN, tokens_dir, torchrun
from tests.dist.reshard_cases import CASES, TAG, parse, universal

ROOT = Path(__file__).resolve().parent.parent
TOL = {"fp32": 1e-5, "bf16": 5e-4}  # bf16: 1- and 2-rank runs round their gradient sums differently
UNIVERSAL = [c for c in CASES if universal(c)]
ZERO3_CASES = [c for c in CASES if parse(c)[1] == 3]
BUILT = [PRETRAIN.weight_decay, 0.0]  # Kiln's AdamW: decayed matrices, then norms and biases


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reshard")
    tokens_dir(out)
    torchrun(ROOT / "tests/dist/reshard_cases.py", out, timeout=240)
    return out


def run(out: Path, case: str, name: str) -> dict:
    return json.loads((out / case / f"{name}.json").read_text())


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("resumed, reference", [("two-to-one", "two"), ("one-to-two", "one")])
def test_a_checkpoint_resumed_on_another_world_size_continues_the_run_there(runs, case, resumed, reference):
    got, want = run(runs, case, resumed), run(runs, case, reference)
    assert max_diff(got["losses"], want["losses"]) <= TOL[parse(case)[2]], (got, want)
    assert got["weight_decays"] == got["built"] == BUILT and not got["shared_step"], got


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", UNIVERSAL)
def test_a_universal_checkpoint_resumed_on_its_own_world_size_is_exact(runs, case):
    """The conversion loses nothing: weights, moments and step, fp32 and bf16."""
    assert run(runs, case, "one-to-one")["losses"] == run(runs, case, "one")["losses"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ZERO3_CASES)
def test_without_the_repair_zero3_decays_every_group_and_advances_a_shared_step(runs, case):
    got, want = run(runs, case, "two-to-one-unrepaired"), run(runs, case, "two")
    assert got["weight_decays"] == [PRETRAIN.weight_decay] * 2 and got["shared_step"], got
    if parse(case)[2] == "fp32":
        assert got["losses"][0] == want["losses"][0]  # the loaded weights are right; the updates are not
        assert max_diff(got["losses"], want["losses"]) > 10 * TOL["fp32"], (got, want)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in UNIVERSAL if parse(c)[1] < 3])
def test_below_zero3_the_universal_load_needs_no_repair(runs, case):
    got = run(runs, case, "two-to-one-unrepaired")
    assert got["weight_decays"] == BUILT and not got["shared_step"], got
    assert got["losses"] == run(runs, case, "two-to-one")["losses"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if parse(c)[0] == parse(c)[1]])
def test_each_rank_resumes_from_only_the_files_it_fetched(runs, case):
    assert run(runs, case, "fetched")["losses"] == run(runs, case, "two")["losses"]
    for rank in (0, 1):
        names = {p.name for p in (runs / case / f"fetched-rank{rank}").rglob("*") if p.is_file()}
        other = 1 - rank
        assert f"rng_rank{rank}.pt" in names and f"rng_rank{other}.pt" not in names, names
        assert not any(f"zero_pp_rank_{other}_" in n for n in names), names
        assert {"trainer_state.json", "latest"} <= names, names
        assert any(f"zero_pp_rank_{rank}_" in n for n in names) is universal(case), names  # ZeRO-0: none


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_the_saved_layout_is_read_from_deepspeeds_files(runs, case):
    """From DeepSpeed's model-states file (no layout recorded); the rules then resume the checkpoint
    on the other world size as the case did."""
    saved, resumed, _ = parse(case)
    for folder, world in (("one", 1), ("two", 2)):
        state = json.loads((runs / case / folder / "trainer_state.json").read_text())
        assert "layout" not in state
        got = R.saved_layout(runs / case / folder, TAG, state)
        assert got == layout(world, saved)
        assert R.layout_change_problem(got, layout(3 - world, resumed)) is None
        assert R.needs_universal(got, layout(3 - world, resumed)) is universal(case)


@pytest.mark.timeout(300)
def test_a_universal_checkpoint_is_laid_out_for_load_checkpoint_and_reused(runs, monkeypatch):
    out = runs / CASES[0] / "two-universal"
    assert (out / "latest_universal").read_text() == TAG
    assert (out / TAG / "zero" / "optimizer_state.pt").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(subprocess, "run", no_conversion)
    assert R.to_universal(runs / CASES[0] / "two", TAG, out) == out


@pytest.mark.timeout(300)
def test_a_failed_conversion_names_the_checkpoint_and_the_converters_error(runs):
    text = (runs / "convert-error.txt").read_text()
    assert f"{runs / 'empty' / TAG}" in text and "can't find *_optim_states.pt files" in text, text
    assert not (runs / "empty-universal").exists()
    assert not [p for p in runs.iterdir() if p.name.startswith(".empty-universal")]


# ---------------------------------------------------------------------------------------------------- no processes


def layout(world: int, zero: int) -> dict:
    return {"world_size": world, "zero_stage": zero}


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


class NotATensor:
    """Pickled into a model-states file that weights_only refuses to load."""


def test_a_recorded_layout_is_used_as_is(tmp_path):
    assert R.saved_layout(tmp_path, TAG, {"layout": layout(4, 3)}) == layout(4, 3)


def test_the_model_states_file_gives_the_layout_over_the_names(tmp_path):
    import torch

    touch(tmp_path / TAG, *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)))
    torch.save({"dp_world_size": 8, "ds_config": {"zero_optimization": {"stage": 2}}},
               tmp_path / TAG / "mp_rank_00_model_states.pt")  # fmt: skip
    assert R.saved_layout(tmp_path, TAG, {}) == layout(8, 2)


@pytest.mark.parametrize(
    "files, top, want",
    [
        ([f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in range(2) for k in ("model", "optim")], [], layout(2, 3)),
        (["mp_rank_00_model_states.pt", *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4))],
         [], layout(4, 1)),
        (["mp_rank_00_model_states.pt"], [f"rng_rank{r}.pt" for r in range(3)], layout(3, 0)),
    ],
    ids=["zero3", "zero1-or-2-bf16", "zero0"],
)  # fmt: skip
def test_without_a_readable_model_states_file_the_names_give_the_layout(tmp_path, files, top, want):
    import torch

    touch(tmp_path / TAG, *files)
    touch(tmp_path, *top, "trainer_state.json")
    if "mp_rank_00_model_states.pt" in files:
        torch.save({"ds_config": NotATensor()}, tmp_path / TAG / "mp_rank_00_model_states.pt")
    assert R.saved_layout(tmp_path, TAG, {}) == want


@pytest.mark.parametrize(
    "saved, now, universal",
    [
        (layout(2, 2), layout(2, 2), False),
        (layout(2, 2), layout(1, 2), True),
        (layout(1, 3), layout(4, 3), True),
        (layout(2, 1), layout(2, 2), False),  # ZeRO-1 and 2 load each other's shards
        (layout(2, 2), layout(4, 1), True),
        (layout(2, 0), layout(1, 0), False),  # ZeRO-0: every rank holds the whole state
    ],
)
def test_layout_changes_deepspeed_resumes(saved, now, universal):
    assert R.layout_change_problem(saved, now) is None
    assert R.needs_universal(saved, now) is universal


@pytest.mark.parametrize(
    "saved, now, why",
    [
        (layout(2, 0), layout(2, 2), "ZeRO-0"),
        (layout(2, 2), layout(1, 0), "ZeRO-0"),
        (layout(2, 3), layout(2, 2), "ZeRO-3"),
        (layout(2, 1), layout(4, 3), "ZeRO-3"),
    ],
)
def test_layout_changes_deepspeed_cannot_resume_are_named_with_what_to_do(saved, now, why):
    problem = R.layout_change_problem(saved, now)
    assert problem and why in problem, problem
    old = saved["zero_stage"]
    assert f"zero_stage={old} on num_workers={saved['world_size']}" in problem
    assert f"zero_stage={now['zero_stage']}" in problem and f"Set zero_stage back to {old}" in problem
    assert not R.needs_universal(saved, now)


CHECKPOINT = [
    "trainer_state.json",
    "rng_rank0.pt",
    "rng_rank1.pt",
    "rng_rank12.pt",
    f"{TAG}/mp_rank_00_model_states.pt",
    f"{TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt",
    f"{TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    f"{TAG}/zero_pp_rank_1_mp_rank_00_model_states.pt",
    f"{TAG}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    f"{TAG}/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt",
]


def test_a_rank_keeps_the_shared_files_and_its_own_shards():
    assert R.rank_files(CHECKPOINT, 1) == [
        "trainer_state.json",
        "rng_rank1.pt",
        f"{TAG}/mp_rank_00_model_states.pt",
        f"{TAG}/zero_pp_rank_1_mp_rank_00_model_states.pt",
        f"{TAG}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_fetch_copies_what_a_rank_reads_from_a_filesystem(tmp_path):
    from pyarrow.fs import LocalFileSystem

    src = tmp_path / "store" / "ckpt"
    for name in CHECKPOINT:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(name)

    def files(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}

    got = R.fetch(LocalFileSystem(), str(src), tmp_path / "rank12", 12)
    assert got == tmp_path / "rank12"
    assert files(got) == {n: n for n in R.rank_files(CHECKPOINT, 12)}
    assert files(R.fetch(LocalFileSystem(), f"{src}/", tmp_path / "all", None)) == {n: n for n in CHECKPOINT}


@pytest.mark.timeout(300)
def test_a_checkpoint_of_experts_one_by_one_resumes_into_the_stacked_experts(runs):
    """Written while each expert was its own layers, re-laid through the universal form (`stack_experts`):
    the stacked model continues the run as the per-expert one did (the same function, the same weights
    and AdamW moments)."""
    apart = runs / "experts-apart"
    assert json.loads((apart / "found.json").read_text()) is True  # per_expert_layout saw it
    got, want = run(apart, "zero2-zero2-fp32", "stacked"), run(apart, "zero2-zero2-fp32", "one")
    assert got["experts"] == ["down_proj", "gate_proj", "up_proj"]  # stacked parameters, not experts.{e}.*
    assert max_diff(got["losses"], want["losses"]) <= 1e-5, (got, want)
