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
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.dag import PIPELINE
from tests.pipeline_helpers import plan_of

LEGACY = Path(__file__).parent / "data" / "legacy_run"
OLD = {p.name.split("-")[0]: p.name.split("-")[1] for p in LEGACY.iterdir()}


@pytest.fixture
def legacy_root(tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)  # the preset names its sample corpus relative to the project
    shutil.copytree(LEGACY, tmp_path / "tiny")
    return tmp_path


def _no_ray(*a, **k):
    raise AssertionError("adopting artifacts must not start Ray")


def test_every_stage_of_the_old_run_is_recognised(legacy_root):
    cfg = load_config(overrides=[f"run.root={legacy_root}"])
    plan = plan_of(cfg)
    assert {n: (p.state, p.action) for n, p in plan.items()} == dict.fromkeys(
        PIPELINE.order, ("complete", "skip")
    )
    assert {n: p.adopt.old_fingerprint for n, p in plan.items()} == OLD
    assert plan["ppo"].adopt.manifest["inputs"] == {
        "reward": plan["reward"].fingerprint,
        "sft": plan["sft"].fingerprint,
    }
    # placement is not identity: the old pretrain is adopted whatever its workers now
    moved = plan_of(load_config(overrides=[f"run.root={legacy_root}", "pretrain.num_workers=1"]))
    assert moved["pretrain"].adopt.old_fingerprint == OLD["pretrain"]


def test_another_config_or_changed_input_files_are_not_adopted(legacy_root, tmp_path):
    changed = plan_of(load_config(overrides=[f"run.root={legacy_root}", "sft.lr=0.002"]))
    assert changed["sft"].adopt is None and changed["sft"].action == "run"
    assert changed["reward"].adopt is not None and changed["ppo"].adopt is None  # ppo reads sft
    corpus = tmp_path / "corpus.jsonl.zst"
    shutil.copy(PROJECT_ROOT / "data_prep/sample/pile_sample.jsonl.zst", corpus)
    other = plan_of(load_config(overrides=[f"run.root={legacy_root}", f"ingest.sources=[{corpus}]"]))
    assert all(p.adopt is None for p in other.values())


def test_a_damaged_old_artifact_is_damaged_not_adopted(legacy_root):
    path = legacy_root / "tiny" / f"tokenizer-{OLD['tokenizer']}" / "manifest.json"
    m = json.loads(path.read_text())
    m["files"] = {"tokenizer.json": {"size": 10, "sha256": "0" * 64}}  # a file it lists is gone
    path.write_text(json.dumps(m))
    plan = plan_of(load_config(overrides=[f"run.root={legacy_root}"]))
    assert plan["tokenizer"].state == "damaged" and plan["tokenizer"].adopt is None
    assert plan["tokenizer"].damage["reason"] == "is missing"


def test_run_adopts_in_place_says_so_and_continues_across_runs(legacy_root, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.runner._init_ray", _no_ray)
    capsys.readouterr()
    args = ["run", "--root", str(legacy_root), "--wandb", "disabled"]
    assert launch.main([*args, "--until", "pretrain"]) == 0  # upstream first ...
    err = " ".join(capsys.readouterr().err.split())  # as one line, however the terminal wraps it
    for stage in ("ingest", "tokenizer", "tokenize", "pretrain"):
        assert f"{stage}: adopted {stage}-{OLD[stage]}, built before stage versions" in err
    assert launch.main(args) == 0  # ... the rest in a later run, from the adopted inputs
    cfg = load_config(overrides=[f"run.root={legacy_root}"])
    after = plan_of(cfg)
    assert all(p.state == "complete" and p.adopt is None for p in after.values())
    assert {n: p.manifest["adopted_from"] for n, p in after.items()} == OLD
    assert sorted(p.name for p in (legacy_root / "tiny").iterdir() if p.name[0] != ".") == sorted(
        f"{n}-{p.fingerprint}" for n, p in after.items()
    ) + ["logs"] * ((legacy_root / "tiny" / "logs").exists())
