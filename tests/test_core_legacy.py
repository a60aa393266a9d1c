"""A default run built before stage versions is adopted under the new identity, recomputing nothing.

tests/data/legacy_run/ holds the manifests (config, inputs, code hash; files left out) that the
tiny preset's default run wrote with the code before stage versions: their fingerprints are that
code's own, not recomputed by the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import launch
from pipeline import legacy
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.dag import PIPELINE
from tests.pipeline_helpers import plan_of

LEGACY = Path(__file__).parent / "data" / "legacy_run"
OLD = {p.name.split("-")[0]: p.name.split("-")[1] for p in LEGACY.iterdir()}
OLD_WORK = {
    "pretrain": "bbd94e00dd4680c5",
    "sft": "3f419b51930648a9",
    "reward": "c4bf90a394e4e7c4",
    "ppo": "87fe29550bb8cbed",
}
"""The work dirs that run's training stages used (keyed without budget keys), as that code named them."""
AS_BUILT = ["ingest.near_dedup=false", "ingest.decontaminate=[]", "reward.answer_eval=null"]
"""What that run's ingest did, which ingest 2 does only when asked (pipeline/legacy.py, AS_BUILT)."""


@pytest.fixture
def legacy_root(tmp_path, monkeypatch):
    """A copy of the old run. Since it was built, tokenize 2 packs each source apart, so a real old run's
    tokenize and all that reads it run again (`test_tokenize_2_builds_the_old_tokenize_and_all_after_again`);
    ppo 2 reports more measures, so its ppo would run again too. To exercise how the training stages
    are taken over, the other tests declare today's tokenize and ppo the old run's (pipeline/legacy.py's
    MADE_AS_BEFORE)."""
    monkeypatch.chdir(PROJECT_ROOT)  # the preset names its sample corpus relative to the project
    for stage in ("tokenize", "ppo"):
        monkeypatch.setitem(legacy.MADE_AS_BEFORE, stage, PIPELINE[stage].version)
    shutil.copytree(LEGACY, tmp_path / "tiny")
    return tmp_path


def test_tokenize_2_builds_the_old_tokenize_and_all_after_again(legacy_root, monkeypatch):
    monkeypatch.setitem(legacy.MADE_AS_BEFORE, "tokenize", 1)  # what tokenize 1 made, as it stands
    plan = plan_of(load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT]))
    assert {n: (p.adopt is not None, p.action) for n, p in plan.items()} == {
        "ingest": (True, "skip"), "tokenizer": (True, "skip"), "tokenize": (False, "run"),
        "pretrain": (False, "run"), "sft": (False, "run"), "reward": (False, "run"), "ppo": (False, "run"),
    }  # fmt: skip


def _no_ray(*a, **k):
    raise AssertionError("adopting artifacts must not start Ray")


def test_every_stage_of_the_old_run_is_recognised(legacy_root):
    cfg = load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT])
    plan = plan_of(cfg)
    assert {n: (p.state, p.action) for n, p in plan.items()} == dict.fromkeys(
        PIPELINE.topological(cfg), ("complete", "skip")
    )
    assert {n: p.adopt.old_fingerprint for n, p in plan.items()} == OLD
    assert {n: plan[n].adopt.old_work_key for n in OLD_WORK} == OLD_WORK
    assert plan["ppo"].adopt.manifest["inputs"] == {  # it reads tokenize now (the held-out windows)
        "reward": plan["reward"].fingerprint,
        "sft": plan["sft"].fingerprint,
        "tokenize": plan["tokenize"].fingerprint,
    }
    # placement is not identity: the old pretrain is adopted whatever its workers now
    moved = plan_of(load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT, "pretrain.num_workers=1"]))
    assert moved["pretrain"].adopt.old_fingerprint == OLD["pretrain"]


def test_ingest_now_dropping_near_duplicates_adopts_nothing(legacy_root):
    """Today's default ingest makes other documents than that run's: it, and all that reads it, run again."""
    cfg = load_config(overrides=[f"run.root={legacy_root}"])
    plan = plan_of(cfg)
    assert {n: (p.adopt, p.action) for n, p in plan.items()} == dict.fromkeys(
        PIPELINE.topological(cfg), (None, "run")
    )


def test_another_config_or_changed_input_files_are_not_adopted(legacy_root, tmp_path):
    changed = plan_of(load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT, "sft.lr=0.002"]))
    assert changed["sft"].adopt is None and changed["sft"].action == "run"
    assert changed["reward"].adopt is not None and changed["ppo"].adopt is None  # ppo reads sft
    corpus = tmp_path / "corpus.jsonl.zst"
    shutil.copy(PROJECT_ROOT / "data_prep/sample/pile_sample.jsonl.zst", corpus)
    other = plan_of(
        load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT, f"ingest.sources=[{corpus}]"])
    )
    assert all(p.adopt is None for p in other.values())


def test_a_damaged_old_artifact_is_damaged_not_adopted(legacy_root):
    path = legacy_root / "tiny" / f"tokenizer-{OLD['tokenizer']}" / "manifest.json"
    m = json.loads(path.read_text())
    m["files"] = {"tokenizer.json": {"size": 10, "sha256": "0" * 64}}  # a file it lists is gone
    path.write_text(json.dumps(m))
    plan = plan_of(load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT]))
    assert plan["tokenizer"].state == "damaged" and plan["tokenizer"].adopt is None
    assert plan["tokenizer"].damage["reason"] == "is missing"


def test_run_adopts_in_place_says_so_and_continues_across_runs(legacy_root, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.runner._init_ray", _no_ray)
    capsys.readouterr()
    args = [
        "run",
        "--root",
        str(legacy_root),
        "--wandb",
        "disabled",
        *(a for k in AS_BUILT for a in ("--set", k)),
    ]
    assert launch.main([*args, "--until", "pretrain"]) == 0  # upstream first ...
    err = " ".join(capsys.readouterr().err.split())  # as one line, however the terminal wraps it
    for stage in ("ingest", "tokenizer", "tokenize", "pretrain"):
        assert f"{stage}: adopted {stage}-{OLD[stage]}, built before stage versions" in err
    assert launch.main(args) == 0  # ... the rest in a later run, from the adopted inputs
    cfg = load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT])
    after = plan_of(cfg)
    assert all(p.state == "complete" and p.adopt is None for p in after.values())
    assert {n: p.manifest["adopted_from"] for n, p in after.items()} == OLD
    assert sorted(p.name for p in (legacy_root / "tiny").iterdir() if p.name[0] != ".") == sorted(
        f"{n}-{p.fingerprint}" for n, p in after.items()
    ) + ["logs"] * ((legacy_root / "tiny" / "logs").exists())


def test_a_raised_budget_continues_from_the_old_work_dir(legacy_root):
    """Not the artifact (another number of steps), but its checkpoints: the longer run resumes there."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.plan import adopt_legacy, make_plan

    old_work = legacy_root / "tiny" / ".work" / f"pretrain-{OLD_WORK['pretrain']}"
    (old_work / "ray" / old_work.name / "checkpoint_1").mkdir(parents=True)
    (old_work / "progress.json").write_text(json.dumps({"step": 200, "total": 200, "checkpoint": 200}))
    cfg = load_config(overrides=[f"run.root={legacy_root}", *AS_BUILT, "pretrain.steps=210"])
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, ArtifactStore(str(legacy_root), "tiny"))}
    p = plan["pretrain"]
    assert (p.state, p.action) == ("partial", "run") and p.adopt.manifest is None
    assert p.reason == "config changed: pretrain.steps: 200 -> 210 (continues from step 200)"
    assert plan["tokenize"].adopt.manifest is not None and plan["sft"].action == "run"  # sft: new input

    said = []
    adopt_legacy(ArtifactStore(str(legacy_root), "tiny"), list(plan.values()), log=said.append)
    assert (
        f"pretrain: continues from the work dir of pretrain-{OLD['pretrain']}, built before stage versions"
        in said
    )
    new_work = legacy_root / "tiny" / ".work" / f"pretrain-{p.work_key}"
    assert (new_work / "ray" / new_work.name / "checkpoint_1").is_dir() and not old_work.exists()
    assert not (legacy_root / "tiny" / f"pretrain-{p.fingerprint}").exists()  # the artifact is not its
