"""Pretraining with expert parallelism (`pretrain.expert_parallel`, kiln/expert_parallel.py `for_deepspeed`) trains
the model that every expert on every rank trains: the stage's own loop on 2 CPU ranks (gloo), beside the same run
with expert_parallel=1, which tests/test_pretrain_dist.py holds to an independent single-process loop.

One torchrun launch (tests/dist/expert_parallel_pretrain_cases.py, ~45 s on 2 busy cores, ~10 s of it the
resumes under another layout): the tiny MoE model (4 experts, top-2), fp32, 20 steps of 8 sequences (2 ranks x
2 micro-steps), ZeRO-1 and ZeRO-2, expert_parallel 1 and 2 (and 2 with the optimizer offloaded; and bf16 under
ZeRO-2); a run stopped at step 10 (as on a preemption) and resumed under ZeRO-2, and under ZeRO-1; one stopped
under expert_parallel=2 and resumed under 1 (on 2 ranks, and on 1), and one stopped under 1 and resumed under 2.

Measured (this CPU, gloo): losses within 2.4e-7 of expert_parallel=1, gradient norms within 6.6e-7, every
gradient of optimizer steps 1 and 2 within 1e-8 (the experts' whole tensors, gathered from their ranks), the
exported weights within 4.9e-6 after 20 steps; the resumed run's losses and weights identical to the run that
was not stopped (ZeRO-2; 1.2e-7 when it resumes under ZeRO-1). Without `_restore_experts` after DeepSpeed's load
the resumed losses move by 3.7e-3: rank 1 would resume with rank 0's experts. Resumed under another expert
parallelism or number of workers (kiln/reshard.py: the universal form, each expert whole with its optimizer
state, bit for bit): steps 11-20 within 2.4e-7 of the expert_parallel=2 run never stopped, gradient norms within
6e-7, weights within 1.2e-7 (4.8e-6 for the run whose first 10 steps were expert_parallel=1). Without the run's
own optimizer groups in the universal form (`take_groups`), 1 -> 2 resumes with its experts as initialised:
losses 2.5e-2 apart. The tolerances are 15x (gradient norms) to 40x or more above the measured errors.

Refused (config, planning, the stage's checks before its workers): ZeRO-3 and ZeRO-0 with expert_parallel > 1, a
dense model (or pretrain.init_from's), a group size that does not divide the workers or the experts,
torch.compile; a checkpoint resumed under a ZeRO stage DeepSpeed cannot load it into (kiln/reshard.py
`unsupported`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.common import MODEL, tokens_dir, torchrun
from tests.dist.expert_parallel_pretrain_cases import STEPS

ROOT = Path(__file__).resolve().parent.parent
LOSS, GRAD_NORM, GRAD, PARAM = 1e-5, 1e-5, 1e-5, 2e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expert_parallel_pretrain")
    tokens_dir(out)
    torchrun(ROOT / "tests/dist/expert_parallel_pretrain_cases.py", out, timeout=300)
    return out


def metrics(out: Path, case: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / case / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), case
    return rows


def exported(out: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(out / case / "export" / "model.safetensors")


def recorded(out: Path, case: str) -> dict:
    return torch.load(out / case / "grads.pt", weights_only=True)


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("two", ["ep2-zero1", "ep2-zero2", "ep2-zero2-offload"])
def test_experts_split_over_two_ranks_train_the_model_of_every_expert_on_every_rank(runs, two):
    one = two.replace("ep2", "ep1").removesuffix("-offload")
    a, b = metrics(runs, one), metrics(runs, two)
    assert [r["batch_crc"] for r in a] == [r["batch_crc"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=LOSS, rel=0)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], abs=GRAD_NORM, rel=0)
    for key in ("aux_loss", "z_loss", "expert_load_l0_0", "expert_load_l1_3"):  # each rank's own tokens
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-5), key
    assert all(r["dropped_frac"] == 0.0 for r in a + b)  # dropless
    ga, gb = recorded(runs, one), recorded(runs, two)
    for step in (1, 2):  # the first step's gradients, and those after one update
        assert list(gb[step]) == list(ga[step])
        for name, g in ga[step].items():
            assert gb[step][name].shape == g.shape, name  # the experts whole: (4, ...)
            torch.testing.assert_close(gb[step][name], g, rtol=0, atol=GRAD, msg=f"step {step} {name}")
    assert gb["counts"] == ga["counts"]  # parameters and FLOPs of the whole model, not of a rank's experts
    assert gb["groups"] == [[0, 1], [0]]  # rank 0's expert-parallel and expert-data-parallel groups
    # the exported folder holds every expert, as expert_parallel=1 writes them
    wa, wb = exported(runs, one), exported(runs, two)
    assert sorted(wb) == sorted(wa)
    for layer in range(MODEL.n_layers):
        for e in range(MODEL.n_experts):
            assert f"model.layers.{layer}.ffn.experts.{e}.up_proj.weight" in wb
    for name, w in wa.items():
        torch.testing.assert_close(wb[name], w, rtol=0, atol=PARAM, msg=name)


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_in_bf16_expert_parallelism_stays_within_bf16s_precision(runs):
    """bf16 rounds each expert's gradient summed in another order (one grouped matmul over both ranks' rows, not
    an fp32 average of two): the same first step (measured: loss and gradient norm identical), then trajectories
    apart by bf16's precision (measured: losses within 5.4e-4 relative over 20 steps, as bf16 against fp32 in
    tests/test_pretrain_dist.py), held to one bf16 ulp (2^-8)."""
    a, b = metrics(runs, "ep1-zero2-bf16"), metrics(runs, "ep2-zero2-bf16")
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=2.0**-8)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=2.0**-8)
    wa, wb = exported(runs, "ep1-zero2-bf16"), exported(runs, "ep2-zero2-bf16")
    assert sorted(wb) == sorted(wa) and {w.dtype for w in wb.values()} == {torch.bfloat16}


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", ["ep2-zero2-resumed", "ep2-zero2to1-resumed"])
def test_a_stopped_expert_parallel_run_resumes_where_it_stopped(runs, case):
    """Stopped at step 10 (its checkpoint), started again: steps 11-20 are those of the run never stopped."""
    want, got = metrics(runs, "ep2-zero2"), metrics(runs, case)
    w, g = exported(runs, "ep2-zero2"), exported(runs, case)
    if case == "ep2-zero2-resumed":  # exact
        assert [r["loss"] for r in got] == [r["loss"] for r in want]
        assert all(torch.equal(g[name], value) for name, value in w.items())
        return
    # resumed under ZeRO-1, which loads ZeRO-2's shards: another order of sums
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=LOSS, rel=0)
    for name, value in w.items():
        torch.testing.assert_close(g[name], value, rtol=0, atol=PARAM, msg=name)


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "case", ["ep2to1-zero2-resumed", "ep2to1-zero2-one-rank-resumed", "ep1to2-zero2-resumed"]
)
def test_a_checkpoint_resumes_under_another_expert_parallelism_and_number_of_workers(runs, case):
    """Stopped at step 10 under one expert parallelism (2 ranks), resumed under another (2 ranks, or 1 rank):
    steps 11-20 are those of the expert_parallel=2 run never stopped, within float32 rounding (another order
    of sums: the experts' rows are gathered and reduced elsewhere, one rank accumulates four micro-batches
    where two ranks average two each). Steps 1-10 are exactly those of the first start's layout."""
    first = "ep1-zero2" if case.startswith("ep1to2") else "ep2-zero2"
    want, got, before = metrics(runs, "ep2-zero2"), metrics(runs, case), metrics(runs, first)
    half = STEPS // 2
    assert [r["loss"] for r in got[:half]] == [r["loss"] for r in before[:half]]
    assert [r["batch_crc"] for r in got] == [r["batch_crc"] for r in want]
    assert [r["loss"] for r in got[half:]] == pytest.approx([r["loss"] for r in want[half:]], abs=LOSS, rel=0)
    assert [r["grad_norm"] for r in got[half:]] == pytest.approx(
        [r["grad_norm"] for r in want[half:]], abs=GRAD_NORM, rel=0
    )
    w, g = exported(runs, "ep2-zero2"), exported(runs, case)
    assert sorted(g) == sorted(w)
    for name, value in w.items():
        torch.testing.assert_close(g[name], value, rtol=0, atol=PARAM, msg=name)


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_an_expert_parallel_checkpoint_converts_into_whole_experts_with_their_optimizer_state(runs):
    """The universal form of the expert_parallel=2 checkpoint at step 10 (kiln/reshard.py `to_universal`): each
    stacked expert parameter whole, (4, ...), its fp32 master weights and Adam moments those of rank 0's two
    experts then rank 1's, bit for bit, as their ZeRO-2 shards hold them; marked as DeepSpeed marks expert
    parameters, for its loader to slice under any expert parallelism; the model-states file of whole shapes."""
    from deepspeed.checkpoint import constants as C

    from kiln import reshard as R

    assert (R.PARAM, R.EP_IS_EXPERT, R.EP_EXPERTS) == (C.PARAM, C.EP_IS_EXPERT_PARAM, C.EP_NUM_EXPERTS)
    tag = f"step{STEPS // 2:08d}"
    universal = runs / "ep2-universal"
    assert (universal / "latest_universal").read_text() == tag and not (universal / tag / "tmp").exists()
    written = runs / "ep2to1-zero2-resumed" / "checkpoint" / tag
    shards = [  # each rank's: its parameters' places in its flat groups, the groups' fp32 and Adam states
        torch.load(written / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        for rank in (0, 1)
    ]
    shards = [sd["optimizer_state_dict"] for sd in shards]
    experts = list(shards[0]["param_slice_mappings"][2])  # the expert-parallel group's parameters
    states = torch.load(universal / tag / R.MODEL_STATES, weights_only=True)
    shapes = {n: s for group in states["param_shapes"] for n, s in group.items()}
    assert experts and sorted(experts) == sorted(n for n in shapes if R.STACKED_EXPERTS.match(n))
    for name in experts:
        folder = universal / tag / "zero" / name
        assert torch.load(folder / "step.pt", weights_only=False) == STEPS // 2
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            saved = torch.load(folder / f"{key}.pt", weights_only=True)
            assert saved[C.EP_IS_EXPERT_PARAM] is True and saved[C.EP_NUM_EXPERTS] == MODEL.n_experts
            whole = saved[C.PARAM]
            assert whole.shape[0] == MODEL.n_experts and shapes[name] == whole.shape, name
            for rank, sd in enumerate(
                shards
            ):  # the expert group's flat states, this parameter's place in them
                flat = {
                    "fp32": sd["single_partition_of_fp32_groups"][2],
                    **sd["base_optimizer_state"]["state"][2],
                }
                at = sd["param_slice_mappings"][2][name]
                held = flat[key][at.start : at.start + at.numel].view(MODEL.n_experts // 2, *whole.shape[1:])
                assert torch.equal(whole[2 * rank : 2 * rank + 2], held), (name, key, rank)


# ---------------------------------------------------------------------------------------------------- refusals


def config_errors(*overrides: str) -> str:
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides))
    return str(e.value)


def test_expert_parallelism_is_refused_where_it_would_change_the_model_or_cannot_run():
    from pipeline.config import load_config

    assert load_config(None, ["pretrain.expert_parallel=2"]).pretrain.expert_parallel == 2  # of 2 and 4
    assert "pretrain.expert_parallel: must be >= 1" in config_errors("pretrain.expert_parallel=0")
    text = config_errors("pretrain.expert_parallel=2", "pretrain.zero_stage=3")
    assert "pretrain.expert_parallel: 2 needs zero_stage 1 or 2, and zero_stage is 3" in text
    assert "set pretrain.zero_stage=2 or pretrain.expert_parallel=1" in text
    text = config_errors("pretrain.expert_parallel=2", "pretrain.zero_stage=0")
    assert "zero_stage is 0: DeepSpeed 0.19's ZeRO-0 clips gradients by the mean of the ranks' norms" in text
    text = config_errors("pretrain.expert_parallel=3")
    assert "pretrain.expert_parallel: 3 does not divide num_workers=2" in text
    assert "pretrain.expert_parallel: 3 does not divide model.n_experts=4" in text
    text = config_errors("pretrain.expert_parallel=2", "model.n_experts=0")
    assert "pretrain.expert_parallel: 2 splits a MoE model's experts, and model.n_experts is 0" in text
    text = config_errors("pretrain.expert_parallel=2", "pretrain.compile=true")
    assert "pretrain.compile: expert_parallel=2 exchanges" in text
    # the model section is unused with init_from: that model's experts are checked when the stage starts
    init_from = ["pretrain.expert_parallel=2", "model.n_experts=0", "pretrain.init_from=/some/mixtral"]
    assert load_config(None, init_from).pretrain.expert_parallel == 2


def test_expert_parallelism_is_placement_and_a_checkpoint_resumes_under_another(tmp_path):
    """Changing it re-runs nothing (the model is the same); a checkpoint written with it resumes under another
    expert_parallel or num_workers (through the universal form), and planning accepts that; what DeepSpeed
    cannot load (another ZeRO stage but 1 <-> 2) it refuses, naming the key and the way back."""
    from kiln import reshard as R
    from kiln.model import STACKED_EXPERTS
    from pipeline.artifacts import ArtifactStore
    from pipeline.config import load_config
    from tests.pipeline_helpers import plan_of

    def config(*overrides):
        return load_config(overrides=[f"run.root={tmp_path}", *overrides])

    base, split = plan_of(config())["pretrain"], plan_of(config("pretrain.expert_parallel=2"))["pretrain"]
    assert (split.fingerprint, split.work_key) == (base.fingerprint, base.work_key)

    work = ArtifactStore(str(tmp_path), config().run.name).work_dir("pretrain", base.work_key)
    work.mkdir(parents=True, exist_ok=True)
    layout = {"pretrain.num_workers": 2, "pretrain.zero_stage": 2, "pretrain.expert_parallel": 2}
    saved = {"step": 10, "total": 20, "checkpoint": 10, "layout": layout}
    (work / "progress.json").write_text(json.dumps(saved))

    def problems(*overrides):
        return plan_of(config(*overrides))["pretrain"].problems

    assert problems("pretrain.expert_parallel=2") == []
    assert problems("pretrain.expert_parallel=2", "pretrain.zero_stage=1") == []  # ZeRO-1 loads ZeRO-2's
    assert problems("pretrain.expert_parallel=1") == []
    assert (
        problems("pretrain.expert_parallel=1", "pretrain.num_workers=1", "pretrain.micro_batch_size=4") == []
    )
    assert (
        problems("pretrain.expert_parallel=2", "pretrain.num_workers=4", "pretrain.micro_batch_size=2") == []
    )
    (why,) = problems("pretrain.expert_parallel=1", "pretrain.zero_stage=3")
    assert why.startswith(
        f"pretrain: its checkpoint at step 10 ({work}) was written with pretrain.zero_stage=2 and cannot be "
        "resumed with pretrain.zero_stage=3 (DeepSpeed converts a ZeRO-3 checkpoint into a universal one"
    )
    assert "set pretrain.zero_stage=2 to resume from it" in why
    # and inside the workers: a new world size or expert parallelism goes through the universal form, which
    # re-lays the model's stacked experts
    assert R.STACKED_EXPERTS.pattern == STACKED_EXPERTS.pattern
    saved = {"world_size": 2, "zero_stage": 2, "expert_parallel": 2}
    assert R.layout_change_problem(saved, saved) is None and not R.needs_universal(saved, saved)
    assert not R.needs_universal(saved, saved | {"zero_stage": 1})  # ZeRO-1 loads the shards as saved
    for now in (saved | {"world_size": 4}, saved | {"expert_parallel": 1}, saved | {"world_size": 1, "expert_parallel": 1}):  # fmt: skip
        assert R.layout_change_problem(saved, now) is None and R.needs_universal(saved, now), now
    old = {"world_size": 2, "zero_stage": 2}  # recorded before the key: expert_parallel 1
    assert R.needs_universal(old, old | {"expert_parallel": 2})
    assert not R.needs_universal(old, old | {"expert_parallel": 1})
    problem = R.layout_change_problem(saved, {**saved, "zero_stage": 3, "expert_parallel": 1})
    assert "zero_stage=2 on num_workers=2 and cannot resume with zero_stage=3" in problem


def test_adamw_keeps_expert_parameters_in_groups_of_their_own_with_their_weight_decay():
    """The groups DeepSpeed's MoE needs (`moe`, named by the expert-parallel group): ZeRO-1/2 partition them over
    the expert-data-parallel ranks. Each keeps the decay of the group it came from (none on a bias)."""
    from kiln import training as T
    from kiln.model import KilnForCausalLM
    from tests.tiny_models import tiny

    model = KilnForCausalLM(tiny(num_experts=4, moe_every=2, bias=True))
    plain = T.adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert [g.get("moe", False) for g in plain.param_groups] == [False, False]  # as without marked experts
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    for p in experts:
        p.allreduce, p.group_name = False, "ep_size_2"
    groups = T.adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1).param_groups
    got = [(g["name"], g.get("moe", False), g["weight_decay"], len(g["params"])) for g in groups]
    weights = [p for p in experts if p.dim() == 3]
    assert got == [
        ("decay", False, 0.1, len(plain.param_groups[0]["params"]) - len(weights)),
        ("no_decay", False, 0.0, len(plain.param_groups[1]["params"]) - (len(experts) - len(weights))),
        ("ep_size_2", True, 0.1, len(weights)),
        ("ep_size_2", True, 0.0, len(experts) - len(weights)),  # the stacked biases
    ]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in weights}


def test_the_plan_counts_a_ranks_experts_and_the_all_to_alls():
    """kiln/capacity.py under expert parallelism (bench/expert_parallel.py measures the all-to-all bytes)."""
    from dataclasses import replace

    from kiln import capacity as C
    from kiln.model_fields import hf_values

    tensors = C.parameter_tensors(hf_values(MODEL), 256)  # 2 MoE layers, d_model 32, 4 experts, top-2
    one = C.Setup(world=2, zero_stage=2, precision="fp32", micro_batch_size=2, grad_accum=2, seq_len=32, top_k=2)  # fmt: skip
    c1, c2 = C.training_cost(tensors, one), C.training_cost(tensors, replace(one, expert_parallel=2))
    experts = sum(t.numel for t in tensors if t.expert)
    assert c1.memory["weights"] - c2.memory["weights"] == 4 * experts // 2  # half the experts held
    for kind in ("gradients", "optimizer"):  # 1/N of each expert: partitioned over those holding it
        assert c2.memory[kind] == c1.memory[kind], kind
    assert c2.comm["all_reduce"] == c1.comm["all_reduce"] - 2 * 4 * experts  # no expert is on two ranks
    assert "all_reduce_expert_data" not in c2.comm and "all_to_all" not in c1.comm
    # 2 micro-steps x 2 MoE layers x (4 exchanges of 2 x 32 tokens x top-2 rows of 32 fp32, and 4 int64 counts)
    assert c2.comm["all_to_all"] == 2 * 2 * (4 * (2 * 32 * 2) * 32 * 4 + 4 * 8)
    recomputed = C.training_cost(tensors, replace(one, expert_parallel=2, activation_checkpointing=True))
    assert recomputed.comm["all_to_all"] == 2 * 2 * (6 * (2 * 32 * 2) * 32 * 4 + 2 * 4 * 8)
    four = C.training_cost(tensors, replace(one, world=4, expert_parallel=2))
    assert four.comm["all_reduce_expert_data"] == 2 * 4 * experts // 2  # over the 2 holding the same ones
    with pytest.raises(ValueError, match="ZeRO-1/2"):
        C.training_cost(tensors, replace(one, zero_stage=3, expert_parallel=2))


def test_a_model_to_start_from_is_checked_for_experts_to_split_before_the_workers_start(tmp_path):
    """With pretrain.init_from the architecture is that folder's: its experts per MoE layer, read from its config."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, MixtralConfig, PreTrainedTokenizerFast

    from pipeline.config import ConfigError, load_config
    from stages.pretrain import _check_config

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(tmp_path / "tok")
    index = {"seq_len": 8, "splits": {"train": {"sequences": 64}}}
    for name, config in {
        "mixtral4": MixtralConfig(num_local_experts=4),
        "mixtral3": MixtralConfig(num_local_experts=3),
        "llama": LlamaConfig(),
    }.items():
        config.save_pretrained(tmp_path / name)

    def check(name: str) -> None:
        cfg = load_config(None, [f"pretrain.init_from={tmp_path / name}", "pretrain.expert_parallel=2"])
        _check_config(cfg, index, tmp_path / "tok")

    check("mixtral4")
    with pytest.raises(ConfigError, match="init_from's model has 3 experts per MoE layer; set pretrain.exp"):
        check("mixtral3")
    with pytest.raises(ConfigError, match="init_from's model is dense"):
        check("llama")
