"""The dpo stage: an opt-in sibling of ppo in the DAG, TRL's DPOTrainer on the bridge sft and reward use.

Cheap first: its config rules (the loss types, checked against the installed TRL), the switch that adds it
to a run (and `--dry-run`'s plan with and without it), the held-out measures on hand-worked numbers.
Then on the session's tiny run (`tiny_run`): dpo alone from the session's sft artifact, a few steps, end
to end: every parameter trained, the manifest's gold and preference keys, the step-0 and final rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import launch
from pipeline.config import DPO_LOSS_TYPES, PROJECT_ROOT, ConfigError, load_config
from pipeline.dag import PIPELINE
from pipeline.plan import Selection
from tests.pipeline_helpers import UPSTREAM, artifact, copy_upstream, manifest, rows, tensors

pytestmark = pytest.mark.timeout(2400)  # the first module to use the session's tiny run builds it (10-25 min)

GOLD = ("task_accuracy", "task_accuracy_sampled", "task_sampled_gained", "task_sampled_lost",
        "task_accuracy_sft", "task_accuracy_sampled_sft", "task_sampled_z")  # fmt: skip
"""The gold keys ppo's manifest carries (less pretraining's held-out windows, which dpo does not score)."""
KEYS = (*GOLD, "preference_accuracy", "preference_accuracy_sft", "kl_sft", "steps", "loss_type", "beta")


def errors_of(*overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=list(overrides))
    return e.value.errors


# ---------------------------------------------------------------------------------------------------- config, DAG


def test_dpo_loss_types_are_the_installed_trls_and_a_wrong_one_names_the_key():
    from dataclasses import fields

    from trl import DPOConfig

    (help_text,) = [f.metadata["help"] for f in fields(DPOConfig) if f.name == "loss_type"]
    assert all(f"'{t}'" in help_text for t in DPO_LOSS_TYPES), help_text
    (error,) = errors_of("dpo.loss_type=sigmod")
    assert error.startswith("dpo.loss_type: 'sigmod' is not one of sigmoid, hinge, ipo,"), error
    assert "did you mean 'sigmoid'" in error
    assert load_config(overrides=["dpo.loss_type=ipo"]).dpo.loss_type == "ipo"
    assert any(x.startswith("dpo.beta:") for x in errors_of("dpo.beta=0"))
    assert any("top_p" in x for x in errors_of("dpo.top_p=0"))


def test_on_policy_pairs_need_prompts_held_out_pairs_and_two_answers():
    """`dpo.pairs: on_policy` trains on the SFT policy's own answers to `dpo.prompts` (their files then
    decide reuse, not `dpo.data`'s); the held-out pairs stay `eval_data`'s."""
    on = "dpo.pairs=on_policy"
    assert any(x.startswith("dpo.pair_samples:") for x in errors_of(on, "dpo.pair_samples=1"))
    assert any(x.startswith("dpo.eval_data:") for x in errors_of(on, "dpo.eval_data=[]"))
    assert any(x.startswith("dpo.prompts:") for x in errors_of(on, "dpo.prompts=[]"))
    offline, on_policy = load_config(), load_config(overrides=[on])
    files = [[f for f, *_ in PIPELINE["dpo"].extra_fingerprint(c)] for c in (offline, on_policy)]
    assert offline.dpo.data[0] in files[0] and offline.dpo.prompts[0] not in files[0]
    assert offline.dpo.prompts[0] in files[1] and offline.dpo.data[0] not in files[1]


def test_dpo_is_off_by_default_and_its_switch_changes_no_identity():
    """`dpo.enabled` decides whether a run builds it, not what it makes (a placement key); it reads sft only."""
    from pipeline.plan import fingerprinted_config

    off, on = load_config(), load_config(overrides=["dpo.enabled=true"])
    assert "dpo" not in PIPELINE.topological(off) and "ppo" in PIPELINE.topological(off)
    assert PIPELINE.topological(on)[-1] == "dpo"
    assert fingerprinted_config(off, PIPELINE["dpo"])[1] == fingerprinted_config(on, PIPELINE["dpo"])[1]
    assert PIPELINE["dpo"].input_names(off) == ("sft",)
    assert "dpo" in PIPELINE.topological(off, ("dpo",))  # a selection that names it
    assert off.dpo.data == off.reward.data and off.dpo.eval_data == off.reward.eval_data  # the preset's pairs


def test_dry_run_plans_dpo_only_when_switched_on_or_named(tmp_path, capsys):
    def plan(*args) -> dict:
        capsys.readouterr()
        assert launch.main(["run", "--root", str(tmp_path), "--dry-run", "--json", *args]) == 0
        return {r["stage"]: r["action"] for r in json.loads(capsys.readouterr().out)}

    assert "dpo" not in plan() and "dpo" not in plan("--from", "ingest")
    assert plan("--set", "dpo.enabled=true")["dpo"] == "run"
    until = plan("--until", "dpo")  # named: planned, with what it reads (not the reward model)
    assert until["dpo"] == "run" and until["sft"] == "run" and until["reward"] == "unselected"
    assert launch.main(["run", "--root", str(tmp_path), "--dry-run", "--only", "dpo"]) == 2
    assert "dpo needs the sft artifact, which is missing" in " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------------------------------------------- measures


def test_the_implicit_reward_measures_count_a_tie_as_half():
    from stages.dpo import pair_measures

    at_start = pair_measures([(0.0, 0.0, "a"), (0.0, 0.0, "b")])  # policy == reference: every margin 0
    assert at_start["preference_accuracy"] == 0.5 and at_start["preference_ties"] == 1.0
    got = pair_measures([(0.3, 0.1, "a"), (0.0, 0.2, "a"), (0.1, -0.1, "b")])
    assert got["preference_accuracy"] == pytest.approx(2 / 3) and got["preference_ties"] == 0
    assert got["preference_accuracy/a"] == 0.5 and got["preference_accuracy/b"] == 1.0
    assert got["margin"] == pytest.approx((0.2 - 0.2 + 0.2) / 3) and got["eval_pairs"] == 3


# ---------------------------------------------------------------------------------------------------- tiny run

RUN = ("dpo.steps=4", "dpo.eval_every=4", "dpo.checkpoint_every=4", "dpo.warmup_steps=1",
       "dpo.task_eval_size=48", "dpo.task_samples=2")  # fmt: skip
"""The preset's dpo (1 worker, ZeRO-2, fp32, 16 pairs a step) made short: 4 steps, evaluations at step
0 and 4 on 48 task prompts x 2 samples, and on the first 160 training and 48 held-out pairs of the
preset's files (scoring all 800 held-out pairs twice with both models is most of the preset's time).
Not switched on: `--only dpo` runs it."""


def first_pairs(source: str, n: int, out: Path) -> Path:
    """The first `n` pairs of a shipped preference file, as a file of their own (TRL's conversational form)."""
    from data_prep.chat_data import load_records, write_jsonl

    records, _ = load_records([source], "preference", (PROJECT_ROOT,))
    write_jsonl(out, records[:n])
    return out


@pytest.fixture(scope="module")
def dpo_run(tiny_run, tmp_path_factory):
    """dpo alone on a copy of the session's upstream and sft artifacts: (cfg, artifact path)."""
    from pipeline.runner import run_pipeline

    root = tmp_path_factory.mktemp("dpo")
    preset = load_config().dpo
    train = first_pairs(preset.data[0], 160, root / "pairs" / "train.jsonl")
    held = first_pairs(preset.eval_data[0], 48, root / "pairs" / "val.jsonl")
    data = (f"dpo.data=[{train}]", f"dpo.eval_data=[{held}]")
    cfg = load_config(overrides=[f"run.root={root}", "run.wandb=disabled", *RUN, *data])
    copy_upstream(tiny_run[1], cfg, (*UPSTREAM, "sft"))
    outcome = run_pipeline(cfg, PIPELINE, Selection(only=("dpo",)))
    assert outcome.ok, (outcome.errors, outcome.blocked)
    assert [p.name for p in outcome.plan if p.action == "run"] == ["dpo"]
    return cfg, artifact(cfg, "dpo")


def test_dpo_trains_every_parameter_and_reports_the_preference_and_gold_measures(dpo_run):
    cfg, path = dpo_run
    m = manifest(path)
    metrics = m["metrics"]
    assert set(m["inputs"]) == {"sft"}
    assert all(k in metrics for k in KEYS), sorted(set(KEYS) - set(metrics))
    assert metrics["steps"] == 4 and metrics["loss_type"] == "sigmoid" and metrics["beta"] == cfg.dpo.beta
    assert (metrics["train_records"], metrics["eval_pairs"], metrics["pairs"]) == (160, 48, "offline")
    sft, dpo = tensors(artifact(cfg, "sft")), tensors(path)
    assert sft.keys() == dpo.keys()
    still = [k for k in sft if (sft[k] == dpo[k]).all()]
    assert still == [], still
    # step 0: the policy is its reference, every implicit reward margin 0 (a tie: half), no KL
    assert metrics["preference_accuracy_sft"] == 0.5
    evals = [r for r in rows(path) if "preference_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["preference_ties"] == 1.0 and evals[0]["kl_sft"] == 0.0 and evals[0]["margin"] == 0.0
    assert evals[0]["val_rewards/margins"] == 0.0  # TRL's own batch means say the same
    assert evals[1]["preference_ties"] == 0.0 and metrics["margin"] != 0.0
    n = cfg.dpo.task_eval_size * cfg.dpo.task_samples
    accuracies = ("preference_accuracy", *GOLD[:2], *(f"{k}_sft" for k in GOLD[:2]))
    assert all(0 <= metrics[k] <= 1 for k in accuracies), {k: metrics[k] for k in accuracies}
    gained, lost = metrics["task_sampled_gained"], metrics["task_sampled_lost"]
    assert 0 <= gained + lost <= n
    assert [r["step"] for r in rows(path) if "loss" in r] == [1, 2, 3, 4]
    print(
        f"\ndpo, {metrics['steps']} steps: held-out preference accuracy {metrics['preference_accuracy_sft']:.3f} -> "
        f"{metrics['preference_accuracy']:.3f} (margin {metrics['margin']:.4f}); task accuracy sampled "
        f"{metrics['task_accuracy_sampled_sft']:.3f} -> {metrics['task_accuracy_sampled']:.3f} ({gained} gained, "
        f"{lost} lost of {n}), greedy {metrics['task_accuracy_sft']:.3f} -> {metrics['task_accuracy']:.3f}; "
        f"kl_sft {metrics['kl_sft']:.4f}; {m['seconds']:.0f} s"
    )


KILL = ("dpo.steps=12", "dpo.eval_every=12", "dpo.checkpoint_every=4", "dpo.warmup_steps=1",
        "dpo.task_eval_size=48", "dpo.task_samples=2")  # fmt: skip
"""dpo_run's settings over 12 steps, checkpoints every 4: a kill after the first, a SIGTERM before the second."""


@pytest.mark.heavy  # ~6 min: its own reference run and a killed one; sft's and reward's twin (test_sft_reward) is heavy too
def test_dpo_resume_after_a_killed_worker_equals_the_uninterrupted_run(dpo_run, tmp_path):
    """As grpo's (tests/test_grpo.py), on dpo's one worker: killed once Ray Train holds the checkpoint at
    step 4, the group restarts from it; SIGTERM to the restarted worker before step 8 saves that step
    and the run exits; a re-run resumes there. Every step's loss, the samples it saw, the held-out
    measures and the exported weights equal an uninterrupted run's (fp32, within 1e-5)."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.runner import run_pipeline
    from tests.pipeline_helpers import kill_then_preempt, plan_of, set_flags

    short = dpo_run[0].dpo  # the same 160 training and 48 held-out pairs
    data = [f"dpo.data=[{short.data[0]}]", f"dpo.eval_data=[{short.eval_data[0]}]"]
    ref_cfg = load_config(
        overrides=[f"run.root={tmp_path / 'reference'}", "run.wandb=disabled", *KILL, *data]
    )
    copy_upstream(dpo_run[0], ref_cfg, (*UPSTREAM, "sft"))
    assert run_pipeline(ref_cfg, PIPELINE, Selection(only=("dpo",))).ok
    root = tmp_path / "runs"
    cfg = load_config(overrides=[f"run.root={root}", *KILL, *data])
    copy_upstream(dpo_run[0], cfg, (*UPSTREAM, "sft"))
    p = plan_of(cfg, Selection(only=("dpo",)))["dpo"]
    assert p.fingerprint == plan_of(ref_cfg, Selection(only=("dpo",)))["dpo"].fingerprint
    store = ArtifactStore(str(root), cfg.run.name)
    flags = set_flags([*KILL, *data])
    kill_then_preempt(store, p, 4, root, tmp_path / "run.log", flags, cfg.run.preempt_grace_s, term_rank=0)
    path, ref_path = store.find("dpo", p.fingerprint).path, artifact(ref_cfg, "dpo")
    got, want = ([r for r in rows(x) if "loss" in r] for x in (path, ref_path))
    assert [r["step"] for r in got] == list(range(1, 13))  # none twice, none lost
    assert [r["batch_crc"] for r in got] == [r["batch_crc"] for r in want]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want, strict=True))
    print(f"\ndpo resumed after a killed worker: largest per-step loss difference {worst:.2e}")
    assert worst <= 1e-5, worst
    final, ref_final = manifest(path)["metrics"], manifest(ref_path)["metrics"]
    for key in ("preference_accuracy", "margin", "kl_sft", *GOLD):
        assert final[key] == pytest.approx(ref_final[key], abs=1e-5), key
    a, b = tensors(path), tensors(ref_path)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_dpo_artifact_loads_and_generates_as_the_sft_model_does(dpo_run):
    """The export is a Hugging Face folder like sft's: config, weights, tokenizer, generation config."""
    _, path = dpo_run
    names = {p.name for p in Path(path).iterdir()}
    want = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "data_stats.json"}
    assert want <= names, sorted(want - names)
