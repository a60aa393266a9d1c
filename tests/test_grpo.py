"""The grpo stage: an opt-in sibling of ppo in the DAG, on the RL loop both share (kiln/rl/loop.py).

Cheap first: its config rules, the switch that adds it to a run (and `--dry-run`'s plan with and
without it), the shared update batches, and the worker loop on a tiny random model in one plain
process (tests/dist/grpo_cases.py: exact resume after a stop, learning rate 0, Dr. GRPO / RLOO
options). Then on the session's tiny run (`tiny_run`): grpo with the checking program as the reward,
from the session's sft artifact, end to end, and exact resume after a killed worker against that
same uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from pipeline.artifacts import ArtifactStore
from pipeline.config import ConfigError, load_config
from pipeline.dag import PIPELINE
from pipeline.plan import Selection
from tests.pipeline_helpers import (
    UPSTREAM,
    artifact,
    copy_upstream,
    kill_then_preempt,
    manifest,
    plan_of,
    rows,
    set_flags,
    tensors,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(1800)  # the session's tiny pipeline is built first (~10 min)

GOLD = ("task_accuracy", "task_accuracy_sampled", "task_sampled_gained", "task_sampled_lost",
        "task_accuracy_sft", "task_accuracy_sampled_sft", "heldout_loss", "heldout_loss_sft")  # fmt: skip
"""The held-out measures ppo's manifest carries, grpo's too: the checking program's verdicts on held-out
prompts (greedy, sampled, paired with the SFT policy's) and pretraining's held-out windows."""
ITERATION_KEYS = (
    "score", "score_norm", "reward", "kl", "kl_k3", "flat_groups", "advantage_abs", "entropy", "policy_loss",
    "clip_frac", "approx_kl", "kl_penalty", "response_length", "ended_frac", "rollout_task_accuracy",
    "gen_share", "rollout_s", "rollout_allgathers", "prompt_crc", "lr",
)  # fmt: skip


def errors_of(*overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=list(overrides))
    return e.value.errors


# ---------------------------------------------------------------------------------------------------- config, DAG


def test_grpo_config_rules_name_the_key():
    (error,) = [x for x in errors_of("grpo.group_size=1") if x.startswith("grpo.group_size:")]
    assert ">= 2" in error
    # the preset's 2 workers: each samples the groups of its own prompts
    (error,) = [x for x in errors_of("grpo.rollout_batch_size=15") if "rollout_batch_size" in x]
    assert error.startswith("grpo.rollout_batch_size: 15 is not divisible by num_workers=2")
    want = "grpo.mini_batch_size: 48 does not divide rollout_batch_size x group_size = 128 responses"
    assert want in errors_of("grpo.mini_batch_size=48")
    assert any(x.startswith("grpo.weighting:") for x in errors_of("grpo.weighting=median"))
    rloo = ("grpo.baseline=leave_one_out", "grpo.scale_advantages=false", "grpo.kl_in=reward")
    g = load_config(overrides=list(rloo)).grpo
    assert (g.baseline, g.scale_advantages, g.kl_in) == ("leave_one_out", False, "reward")


def test_grpo_is_off_by_default_and_its_switch_changes_no_identity():
    """`grpo.enabled` decides whether a run builds it, not what it makes (a placement key); its inputs
    are ppo's, less the reward model when the checking program scores."""
    from pipeline.plan import fingerprinted_config

    off, on = load_config(), load_config(overrides=["grpo.enabled=true"])
    assert "grpo" not in PIPELINE.topological(off) and "ppo" in PIPELINE.topological(off)
    assert PIPELINE.topological(on)[-1] == "grpo"
    assert fingerprinted_config(off, PIPELINE["grpo"])[1] == fingerprinted_config(on, PIPELINE["grpo"])[1]
    assert PIPELINE["grpo"].input_names(off) == ("sft", "tokenize")  # the preset: reward_source task
    model = load_config(overrides=["grpo.reward_source=model"])
    assert PIPELINE["grpo"].input_names(model) == ("sft", "reward", "tokenize")
    assert "grpo" in PIPELINE.topological(off, ("grpo",))  # a selection that names it


def test_dry_run_plans_grpo_only_when_switched_on_or_named(tmp_path, capsys):
    def plan(*args) -> dict:
        capsys.readouterr()
        assert launch.main(["run", "--root", str(tmp_path), "--dry-run", "--json", *args]) == 0
        return {r["stage"]: r["action"] for r in json.loads(capsys.readouterr().out)}

    assert list(plan()) == ["ingest", "tokenizer", "tokenize", "pretrain", "sft", "reward", "ppo"]
    assert "grpo" not in plan("--from", "ingest")  # rebuilding all that follows leaves the off stage off
    assert plan("--set", "grpo.enabled=true")["grpo"] == "run"
    until = plan("--until", "grpo")  # named: planned, with what it reads (not the reward model)
    assert until["grpo"] == "run" and until["reward"] == "unselected" and until["ppo"] == "unselected"
    # --only grpo needs its inputs: here none exist, and the plan says so
    assert launch.main(["run", "--root", str(tmp_path), "--dry-run", "--only", "grpo"]) == 2
    assert "grpo needs the sft artifact, which is missing" in " ".join(capsys.readouterr().err.split())


def test_rloo_is_grpos_stage_with_rloos_defaults_beside_it_in_one_run(tmp_path, capsys):
    """The `rloo` stage runs grpo's code under its own section, whose defaults are RLOO's, so that one run
    builds ppo, grpo and rloo from the same sft artifact (the end-of-run table compares them)."""
    cfg = load_config(overrides=["rloo.enabled=true", "grpo.enabled=true"])
    assert (cfg.rloo.baseline, cfg.rloo.scale_advantages, cfg.rloo.weighting) == (
        "leave_one_out",
        False,
        "token_mean",
    )
    assert (cfg.grpo.baseline, cfg.grpo.scale_advantages) == ("group_mean", True)
    assert PIPELINE.topological(cfg)[-3:] == ["ppo", "grpo", "rloo"]
    assert "rloo" not in PIPELINE.topological(load_config())  # off by default
    assert PIPELINE["rloo"].input_names(cfg) == ("sft", "tokenize")  # the preset: the checking program scores
    (error,) = [x for x in errors_of("rloo.group_size=1") if x.startswith("rloo.group_size:")]
    assert ">= 2" in error
    capsys.readouterr()
    assert (
        launch.main(["run", "--root", str(tmp_path), "--dry-run", "--json", "--set", "rloo.enabled=true"])
        == 0
    )
    assert {r["stage"]: r["action"] for r in json.loads(capsys.readouterr().out)}["rloo"] == "run"


# ---------------------------------------------------------------------------------------------------- shared pieces


def test_update_batches_cut_each_epoch_into_mini_and_micro_batches():
    import numpy as np
    import torch

    from kiln.rl.loop import UpdateMeans, update_batches

    rmask = torch.tensor([[1.0] * k + [0.0] * (4 - k) for k in (1, 2, 3, 4, 4, 2)])  # 6 responses
    got = list(update_batches(rmask, epochs=2, mini=3, micro=1, world=1, rng=np.random.default_rng(0)))
    assert len(got) == 2 * 6  # 2 epochs x 2 mini-batches x 3 micro-batches
    for epoch in (got[:6], got[6:]):
        assert sorted(int(i) for rows, _ in epoch for i in rows) == list(range(6))  # each response once
        for k in (0, 3):  # a mini-batch's micro-batches carry its token count
            rows = [int(i) for r, _ in epoch[k : k + 3] for i in r]
            assert all(float(t) == rmask[rows].sum().item() for _, t in epoch[k : k + 3])
    # a token mean per micro-batch, weighted by its tokens: the mean over the mini-batch, per step
    means, value = UpdateMeans(world=1, steps=2), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    for rows, tokens in got[:6]:
        means.tokens({"x": value[rows].mean()}, rmask[rows], tokens)
    mini_batches = [torch.cat([rows for rows, _ in got[k : k + 3]]) for k in (0, 3)]
    want = [(value[r] * rmask[r].sum(1)).sum() / rmask[r].sum() for r in mini_batches]  # token means
    assert means.values["x"] == pytest.approx(float(sum(want)) / 2)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("grpo-cases")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/grpo_cases.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "cases.json").read_text())


TIMED = ("time", "iteration_s", "gen_share", "rollout_s")


@pytest.mark.timeout(300)
def test_the_loop_stopped_and_resumed_repeats_the_uninterrupted_run(cases):
    """Asked to stop at iteration 2 (as SIGTERM asks), the worker saves that iteration and returns; run
    again, it resumes there: every row and every weight as the uninterrupted run's."""
    ref, resumed = cases["reference"], cases["resumed"]
    assert [r["step"] for r in resumed["stopped"]] == [0, 1, 2]
    assert [r["step"] for r in resumed["rows"]] == [0, 1, 2, 3]  # none twice, none lost
    for a, b in zip(ref["rows"], resumed["rows"], strict=True):
        assert {k: v for k, v in a.items() if k not in TIMED} == {
            k: v for k, v in b.items() if k not in TIMED
        }
    timeless = [{k: v for k, v in r.items() if k not in TIMED} for r in (ref["result"], resumed["result"])]
    assert resumed["differs_from_reference"] == [] and timeless[0] == timeless[1]
    assert ref["changed"] == cases["parameters"]  # every parameter of the policy moved


@pytest.mark.timeout(300)
def test_the_loops_measures_and_options(cases):
    """The manifest's gold keys come from the first and last evaluations; learning rate 0 leaves the policy
    bit-identical (KL 0 throughout); RLOO's baseline with Dr. GRPO's weighting and the KL in the reward
    trains (no KL term in the loss)."""
    result = cases["reference"]["result"]
    assert {k for k in GOLD if not k.startswith("heldout")} <= set(result)  # no held-out windows here
    rows = cases["reference"]["rows"]
    assert all(k in r for r in rows[1:] for k in ITERATION_KEYS), sorted(set(ITERATION_KEYS) - set(rows[-1]))
    lr0 = cases["lr0"]
    assert lr0["changed"] == [] and all(r["kl"] == 0.0 and r["approx_kl"] == 0.0 for r in lr0["rows"][1:])
    rloo = cases["rloo_dr"]["rows"]
    assert [r["step"] for r in rloo] == [0, 1, 2] and all("kl_penalty" not in r for r in rloo)
    assert cases["rloo_dr"]["changed"] == cases["parameters"]
    assert all(r["reward"] != r["score_norm"] for r in rloo[2:])  # the KL charged to the reward once it moved


@pytest.mark.timeout(300)
def test_select_exports_the_best_evaluated_iteration_and_resumes_to_the_same_choice(cases):
    """`select: best_gold` exports the evaluated iteration with the best sampled accuracy on the selection
    half (ties: the earlier; iteration 0 is the SFT policy) and reports it on the other half; stopped and
    resumed, the choice, the rows and the exported weights are the uninterrupted run's. Without it the
    manifest says the last iteration was kept. Every evaluation row carries gold, proxy and KL."""
    sel, resumed = cases["select"], cases["select_resumed"]
    evals = [r for r in sel["rows"] if "task_accuracy_sampled_select" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    picked = [r["task_accuracy_sampled_select"] for r in evals]
    best = picked.index(max(picked))
    result = sel["result"]
    assert result["selected_iteration"] == best and "selection half" in result["selected_why"]
    assert result["gold_prompts"] == 2 and result["task_accuracy_sampled_select"] == max(picked)
    assert (sel["changed"] == []) == (best == 0)  # iteration 0: the SFT policy's weights
    assert (sel["differs_from_reference"] == []) == (best == 3)  # the last: as without select
    assert all(
        k in r for r in evals for k in ("task_accuracy", "task_accuracy_sampled", "kl_sft", "proxy_score")
    )
    assert abs(evals[0]["kl_sft"]) < 1e-6  # the SFT policy against itself
    assert [r["step"] for r in resumed["stopped"]] == [0, 1, 2]
    for a, b in zip(sel["rows"], resumed["rows"], strict=True):
        assert {k: v for k, v in a.items() if k not in TIMED} == {
            k: v for k, v in b.items() if k not in TIMED
        }
    assert {k: v for k, v in resumed["result"].items() if k not in TIMED} == {
        k: v for k, v in result.items() if k not in TIMED
    }
    assert resumed["differs_from_select"] == []
    last = cases["reference"]["result"]
    assert last["selected_iteration"] == 3 and "last" in last["selected_why"]


# ---------------------------------------------------------------------------------------------------- tiny run

RUN = (
    "grpo.iterations=8", "grpo.checkpoint_every=3", "grpo.eval_every=8", "grpo.rollout_batch_size=8",
    "grpo.group_size=4", "grpo.mini_batch_size=16", "grpo.micro_batch_size=8", "grpo.ppo_epochs=1",
    "grpo.task_eval_size=64", "grpo.task_samples=2",
)  # fmt: skip
"""The preset's grpo (2 workers, the checking program as the reward) made small: 8 prompts x 4 answers
per iteration in 2 optimizer steps, checkpoints at 3, 6 and 8, evaluations before the first iteration
and after the last. Not switched on: `--only grpo` runs it."""


@pytest.fixture(scope="module")
def grpo_run(tiny_run, tmp_path_factory):
    """grpo alone, uninterrupted, on a copy of the session's upstream artifacts: (cfg, artifact path)."""
    from pipeline.runner import run_pipeline

    root = tmp_path_factory.mktemp("grpo")
    cfg = load_config(overrides=[f"run.root={root}", "run.wandb=disabled", *RUN])
    copy_upstream(tiny_run[1], cfg, (*UPSTREAM, "sft"))  # no reward model: the program scores
    outcome = run_pipeline(cfg, PIPELINE, Selection(only=("grpo",)))
    assert outcome.ok, (outcome.errors, outcome.blocked)
    assert [p.name for p in outcome.plan if p.action == "run"] == ["grpo"]
    return cfg, artifact(cfg, "grpo")


def test_grpo_on_the_checking_program_trains_every_parameter_and_reports_the_gold_measures(grpo_run):
    cfg, path = grpo_run
    m = manifest(path)
    metrics, its = m["metrics"], [r for r in rows(path) if "score" in r]
    assert set(m["inputs"]) == {"sft", "tokenize"}
    assert [r["step"] for r in its] == list(range(1, cfg.grpo.iterations + 1))
    assert all(k in r for r in its for k in ITERATION_KEYS), sorted(set(ITERATION_KEYS) - set(its[-1]))
    assert [r["step"] for r in rows(path) if "task_accuracy" in r] == [0, 8]
    assert all(k in metrics for k in GOLD), sorted(set(GOLD) - set(metrics))
    assert any(k.startswith("heldout_loss/") for k in metrics)
    sft, grpo = tensors(artifact(cfg, "sft")), tensors(path)
    assert sft.keys() == grpo.keys()
    still = [k for k in sft if (sft[k] == grpo[k]).all()]
    assert still == [], still
    assert 0 <= metrics["task_accuracy_sampled"] <= 1 and metrics["prompts"] == 800
    gained, lost = metrics["task_sampled_gained"], metrics["task_sampled_lost"]
    print(
        f"\ngrpo, {cfg.grpo.iterations} short iterations on the checking program: held-out task accuracy, sampled "
        f"{metrics['task_accuracy_sampled_sft']:.3f} -> {metrics['task_accuracy_sampled']:.3f} ({gained} answers "
        f"wrong -> right, {lost} right -> wrong), greedy {metrics['task_accuracy_sft']:.3f} -> "
        f"{metrics['task_accuracy']:.3f}; {m['seconds']:.0f} s"
    )


def test_grpo_resume_after_a_killed_worker_equals_the_uninterrupted_run(grpo_run, tmp_path):
    """As ppo's (tests/test_ppo.py): kill rank 0 once Ray Train holds the first checkpoint, so the group
    restarts from it; then SIGTERM to rank 1 between checkpoints, so the run saves that iteration and
    exits; a re-run resumes there. Every iteration's metrics equal the uninterrupted run's (fp32,
    within 1e-5), on the same prompts, and so do the final gold measures."""
    ref_cfg, ref_path = grpo_run
    root, log = tmp_path / "runs", tmp_path / "run.log"
    cfg = load_config(overrides=[f"run.root={root}", *RUN])
    copy_upstream(ref_cfg, cfg, (*UPSTREAM, "sft"))
    p = plan_of(cfg, Selection(only=("grpo",)))["grpo"]
    assert (
        p.action == "run" and p.fingerprint == plan_of(ref_cfg, Selection(only=("grpo",)))["grpo"].fingerprint
    )
    store = ArtifactStore(str(root), cfg.run.name)
    kill_then_preempt(store, p, cfg.grpo.checkpoint_every, root, log, set_flags(RUN), cfg.run.preempt_grace_s)
    path = store.find("grpo", p.fingerprint).path
    got, want = ([r for r in rows(x) if "score" in r] for x in (path, ref_path))
    assert [r["step"] for r in got] == list(range(1, cfg.grpo.iterations + 1))  # none twice, none lost
    assert [r["prompt_crc"] for r in got] == [r["prompt_crc"] for r in want]
    keys = (
        "score",
        "reward",
        "kl",
        "policy_loss",
        "entropy",
        "clip_frac",
        "response_length",
        "advantage_abs",
    )
    worst = max(abs(a[k] - b[k]) for a, b in zip(got, want, strict=True) for k in keys)
    print(f"\ngrpo resumed after a killed worker: largest per-iteration metric difference {worst:.2e}")
    assert worst <= 1e-5, worst
    final, ref_final = manifest(path)["metrics"], manifest(ref_path)["metrics"]
    for key in ("task_accuracy", "task_accuracy_sampled", "task_sampled_gained", "task_sampled_lost"):
        assert final[key] == ref_final[key], key
