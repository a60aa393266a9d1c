"""The default pipeline end to end (configs/tiny.yaml), built once per session (tests/conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import launch
from pipeline.artifacts import ArtifactStore
from pipeline.dag import PIPELINE
from pipeline.plan import PlanError, Selection
from tests.pipeline_helpers import plan_of

pytestmark = pytest.mark.timeout(
    1800
)  # the first test builds the session's tiny pipeline (~10 min on 2 cores)


def test_every_stage_completes_with_verified_artifacts(tiny_run):
    root, cfg, outcome = tiny_run
    plan = plan_of(cfg, deep=True)  # every file's sha256 against its manifest
    assert {n: p.state for n, p in plan.items()} == {n: "complete" for n in PIPELINE.topological(cfg)}
    for p in plan.values():
        m = p.manifest
        assert m["fingerprint"] == p.fingerprint and m["code_version"] == p.code and m["version"] == p.version
        assert m["code_files"] == p.code_files and p.notes == []
        assert {"torch", "deepspeed", "ray", "transformers"} <= set(m["versions"])
        assert m["hardware"]["cpus"] and "config" in m


def test_ingest_counts_reconcile(tiny_run):
    _, cfg, _ = tiny_run
    stats = json.loads((_path(cfg, "ingest") / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + sum(stats["dropped"].values()) and stats["kept"] > 1000
    for f in stats["files"]:
        assert f["read"] == f["kept"] + sum(f["dropped"].values()), f


def test_pretraining_learns_and_logs_every_step(tiny_run):
    _, cfg, _ = tiny_run
    rows = [json.loads(x) for x in (_path(cfg, "pretrain") / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, cfg.pretrain.steps + 1))  # every step once
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tokens_seen",
        "aux_loss",
        "z_loss",
        "dropped_frac",
    ):
        assert key in rows[-1], key
    # each MoE layer's expert load (every layer of the tiny model): shares of its assignments
    m = cfg.model
    for layer in range(m.n_layers):
        shares = [rows[-1][f"expert_load_l{layer}_{e}"] for e in range(m.n_experts)]
        assert abs(sum(shares) - 1) < 1e-6, (layer, shares)
    manifest = json.loads((_path(cfg, "pretrain") / "manifest.json").read_text())["metrics"]
    assert 1 <= manifest["expert_imbalance"] <= m.n_experts
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals][-1] == cfg.pretrain.steps and evals[-1]["val_loss"] < rows[0][
        "loss"
    ] - 1.5


def test_pretrained_model_is_a_transformers_model(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)

    _, cfg, _ = tiny_run
    path = _path(cfg, "pretrain")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("The project", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_second_run_runs_nothing_and_leaves_the_report_alone(tiny_run, monkeypatch, capsys):
    root, cfg, _ = tiny_run
    monkeypatch.setattr("pipeline.runner._init_ray", _no_ray)
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    report = root / cfg.run.name / "report.html"
    had = report.read_bytes() if report.exists() else None
    capsys.readouterr()
    code = launch.main(["run", "--root", str(root), "--wandb", "offline"])
    assert code == 0
    assert all(p.action == "skip" for p in plan_of(cfg).values())
    out = capsys.readouterr().out  # the summary table, on stdout
    assert all(name in out for name in PIPELINE.topological(cfg)) and "complete (reused)" in out
    assert (report.read_bytes() if report.exists() else None) == had  # nothing ran: nothing redrawn


def test_dry_run_explains_what_a_change_reruns(tiny_run, capsys):
    root, _, _ = tiny_run
    code = launch.main(["run", "--root", str(root), "--dry-run", "--set", "tokenize.seq_len=128"])
    printed = capsys.readouterr()
    out = printed.out + printed.err
    assert code == 0 and "resolved config" in out and "seq_len: 128" in out  # the config as it will run
    from pipeline.config import load_config

    changed = load_config(overrides=[f"run.root={root}", "tokenize.seq_len=128"])
    plan = plan_of(changed)
    assert {n: p.action for n, p in plan.items()} == {
        "ingest": "skip", "tokenizer": "skip", "tokenize": "run", "pretrain": "run", "sft": "run", "reward": "run",
        "ppo": "run",
    }  # fmt: skip
    assert "tokenize.seq_len: 256 -> 128" in plan["tokenize"].reason
    assert "input re-runs: tokenize" in plan["pretrain"].reason
    forced = plan_of(load_config(overrides=[f"run.root={root}"]), Selection(start="tokenize"))
    assert [n for n, p in forced.items() if p.action == "run"] == [
        "tokenize",
        "pretrain",
        "sft",
        "reward",
        "ppo",
    ]


def test_status_json_lists_every_stage_complete(tiny_run, capsys):
    root, cfg, _ = tiny_run
    assert launch.main(["status", "--root", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows] == PIPELINE.topological(cfg)  # grpo, off, is not the run's
    assert all(r["state"] == "complete" and r["progress"] is None for r in rows)
    pretrain = next(r for r in rows if r["stage"] == "pretrain")
    assert pretrain["metrics"]["val_loss"] > 0 and rows[-1]["metrics"]["task_accuracy"] >= 0


def _path(cfg, stage):
    return Path(plan_of(cfg)[stage].path)


def _no_ray(*a, **k):
    raise AssertionError("a run with nothing to do must not start Ray")


def test_export_writes_a_mixtral_folder_plain_transformers_serves(tiny_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    import kiln.model  # noqa: F401

    root, cfg, _ = tiny_run
    out = tmp_path / "served"
    assert launch.main(["export", "pretrain", str(out), "--root", str(root)]) == 0
    assert "as mixtral" in capsys.readouterr().err.replace("\n", "")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and (out / "tokenizer.json").exists()
    served = MixtralForCausalLM.from_pretrained(out).eval()
    ours = AutoModelForCausalLM.from_pretrained(_path(cfg, "pretrain")).eval()
    x = torch.randint(2, 4000, (2, 32))
    with torch.no_grad():
        assert (served(x).logits - ours(x).logits).abs().max() <= 1e-4
    # a format the architecture cannot take is refused with the reason
    assert (
        launch.main(["export", "pretrain", str(tmp_path / "llama"), "--root", str(root), "--format", "llama"])
        == 2
    )
    assert "n_experts" in capsys.readouterr().err.replace("\n", "")


def test_generate_prints_continuations(tiny_run, capsys):
    root, _, _ = tiny_run
    code = launch.main(
        [
            "generate",
            "pretrain",
            "--root",
            str(root),
            "--prompt",
            "The file",
            "--prompt",
            "A",
            "--max-new-tokens",
            "5",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "The file" in out and out.count("\n") >= 2


def test_export_without_an_artifact_says_what_to_run(tmp_path, capsys):
    assert launch.main(["export", "pretrain", str(tmp_path / "x"), "--root", str(tmp_path / "empty")]) == 1
    assert "run --until pretrain" in capsys.readouterr().err.replace("\n", "")


REFERENCE = Path(__file__).parent / "reference" / "tiny_pretrain_loss.json"


def test_pretrain_loss_curve_matches_the_committed_reference(tiny_run):
    """The tiny preset's loss every 10 steps against a committed curve (regenerate it with
    KILN_UPDATE_REFERENCE=1 after a change that is meant to move it, and say why in the commit).
    0.05 absolute: runs on other CPUs differ in float rounding that grows over 200 steps; a broken
    schedule, data order, loss or optimizer moves the curve by far more."""
    _, cfg, _ = tiny_run
    rows = [json.loads(x) for x in (_path(cfg, "pretrain") / "metrics.jsonl").read_text().splitlines()]
    curve = {str(r["step"]): round(r["loss"], 5) for r in rows if r["step"] == 1 or r["step"] % 10 == 0}
    if os.environ.get("KILN_UPDATE_REFERENCE"):
        REFERENCE.write_text(json.dumps({"config": "configs/tiny.yaml", "loss": curve}, indent=1) + "\n")
    want = json.loads(REFERENCE.read_text())["loss"]
    assert curve.keys() == want.keys()
    far = {s: (curve[s], want[s]) for s in want if abs(curve[s] - want[s]) > 0.05}
    assert not far, f"loss differs from the reference at steps {far}"


def test_pretrain_init_from_a_mixtral_folder_continues_from_its_weights(tiny_run, tmp_path):
    """`pretrain.init_from` loads a Mixtral (or Llama) checkpoint: training starts at its loss, not
    at a random model's."""
    import shutil

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    root, cfg, _ = tiny_run
    served = tmp_path / "mixtral"
    assert launch.main(["export", "pretrain", str(served), "--root", str(root), "--format", "mixtral"]) == 0
    new_root = tmp_path / "runs"
    for stage in ("ingest", "tokenizer", "tokenize"):
        src = _path(cfg, stage)
        shutil.copytree(src, new_root / cfg.run.name / src.name)
    overrides = [
        f"run.root={new_root}",
        "run.wandb=disabled",
        f"pretrain.init_from={served}",
        "pretrain.steps=3",
    ]
    outcome = run_pipeline(load_config(overrides=overrides), PIPELINE, Selection(until="pretrain"))
    assert outcome.ok and set(outcome.results) == {"pretrain"}, outcome.errors
    rows = [
        json.loads(x)
        for x in (Path(outcome.results["pretrain"]["path"]) / "metrics.jsonl").read_text().splitlines()
    ]
    reference = [json.loads(x) for x in (_path(cfg, "pretrain") / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lm_loss"] < reference[0]["lm_loss"] - 1.5  # far below a random start
    assert abs(rows[0]["lm_loss"] - reference[-1]["lm_loss"]) < 0.5  # where the exported model left off


TRAINED = ("pretrain", "sft", "reward", "ppo")


def test_a_run_that_died_after_its_last_checkpoints_trains_nothing_more(tiny_run, tmp_path):
    """Every training stage saves a checkpoint at its last step, then exports. A run that died in
    between (no artifacts yet) resumes each stage at its end: no step is trained again or added, and
    the artifacts and headline metrics are the uninterrupted run's. A budget lowered below such a
    checkpoint is refused at planning, naming the key, and the finished artifact stays as it was."""
    import shutil

    from pipeline.config import budget_keys, load_config
    from pipeline.runner import run_pipeline
    from tests.conftest import TINY_OVERRIDES
    from tests.pipeline_helpers import manifest

    root, cfg, _ = tiny_run
    ref = plan_of(cfg)
    new_root = tmp_path / "runs"
    run_dir = new_root / cfg.run.name
    shutil.copytree(
        Path(root) / cfg.run.name,
        run_dir,
        ignore=lambda d, names: [n for n in names if n.startswith(".tmp-")],
    )
    for stage in TRAINED:
        shutil.rmtree(run_dir / Path(ref[stage].path).name)
    saved = sorted(p.name for p in run_dir.glob(".work/*/ray/*/checkpoint_*"))
    overrides = [f"run.root={new_root}", *TINY_OVERRIDES]
    outcome = run_pipeline(load_config(overrides=overrides), PIPELINE)
    assert outcome.ok, outcome.errors
    assert set(outcome.results) == set(TRAINED)
    assert sorted(p.name for p in run_dir.glob(".work/*/ray/*/checkpoint_*")) == saved  # none saved anew
    for stage in TRAINED:
        (budget,) = budget_keys(cfg, stage)  # steps, or ppo's iterations
        steps = getattr(getattr(cfg, stage), budget)
        assert (
            f"{stage}: resumed from its checkpoint at step {steps}"
            in (run_dir / "logs" / f"{stage}.log").read_text()
        )
        got, want = Path(outcome.results[stage]["path"]), Path(ref[stage].path)
        assert got.name == want.name
        files, wanted = ({k: v["sha256"] for k, v in manifest(d)["files"].items()} for d in (got, want))
        assert files["model.safetensors"] == wanted["model.safetensors"], stage  # the same weights
        assert files["metrics.jsonl"] == wanted["metrics.jsonl"], stage  # no step again, none added
        assert outcome.results[stage]["metrics"] == ref[stage].manifest["metrics"], stage

    lowered = [*overrides, f"sft.steps={cfg.sft.steps - 1}"]
    with pytest.raises(PlanError) as e:  # at planning, before any worker starts
        run_pipeline(load_config(overrides=lowered), PIPELINE, Selection(only=("sft",)))
    assert f"sft.steps={cfg.sft.steps - 1}, but this stage's last checkpoint" in str(e.value)
    assert f"is at step {cfg.sft.steps}: set sft.steps to {cfg.sft.steps} or more" in str(e.value)
    store = ArtifactStore(str(new_root), cfg.run.name)
    assert store.check("sft", ref["sft"].fingerprint, deep=True)[0] is not None  # still complete
