"""Stage identity on the session's tiny run: code edits keep finished stages, a damaged shard is
named, and a run built before stage versions is adopted without recomputing anything."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from pipeline import legacy
from pipeline.config import PROJECT_ROOT, load_config, section_dict
from pipeline.dag import PIPELINE
from pipeline.fingerprint import project_packages
from pipeline.plan import Selection
from tests.pipeline_helpers import copy_upstream, plan_of

pytestmark = pytest.mark.timeout(1800)  # the session's tiny pipeline is built first (~10 min)


def _launch(project: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=project, capture_output=True, text=True, timeout=120
    )


def test_comments_in_shared_modules_rebuild_nothing_unless_asked(tiny_run, tmp_path):
    root, cfg, _ = tiny_run
    scratch = tmp_path / "checkout"
    for rel in (*project_packages(), "configs"):
        shutil.copytree(PROJECT_ROOT / rel, scratch / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("launch.py", "pyproject.toml"):
        shutil.copy(PROJECT_ROOT / rel, scratch)
    for rel in ("pipeline/config.py", "kiln/model.py"):
        with open(scratch / rel, "a") as f:
            f.write("# a comment\n")

    done = _launch(scratch, "run", "--root", str(root), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["stage"]: r for r in json.loads(done.stdout)}
    assert {s: r["action"] for s, r in rows.items()} == dict.fromkeys(PIPELINE.topological(cfg), "skip")
    assert rows["ingest"]["notes"] == ["code changed since it was built: pipeline/config.py"]
    assert rows["pretrain"]["notes"] == ["code changed since it was built: kiln/model.py, pipeline/config.py"]

    rebuild = _launch(scratch, "run", "--root", str(root), "--dry-run", "--json", "--rebuild-changed")
    assert rebuild.returncode == 0, rebuild.stderr
    assert [r["action"] for r in json.loads(rebuild.stdout)] == ["run"] * len(PIPELINE.topological(cfg))


def test_a_flipped_byte_in_a_token_shard_is_damaged_and_named(tiny_run, tmp_path, capsys):
    cfg = load_config(overrides=[f"run.root={tmp_path}"])
    copy_upstream(tiny_run[1], cfg, ("ingest", "tokenizer", "tokenize"))
    tokenize = Path(plan_of(cfg)["tokenize"].path)
    shard = sorted(p for p in tokenize.rglob("*") if p.is_file() and p.suffix not in (".json", ".jsonl"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    capsys.readouterr()
    assert launch.main(["status", "--root", str(tmp_path), "--json", "--verify"]) == 1
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tokenize"]["state"] == "damaged"
    assert rows["tokenize"]["damaged"] == {
        "file": str(shard),
        "reason": "does not match its sha256 in the manifest (modified or corrupt)",
    }
    assert rows["ingest"]["state"] == "complete" and rows["pretrain"]["state"] == "missing"
    # without --verify too: the sizes hold, but planning checks the sha256 of what pretrain would read
    assert launch.main(["status", "--root", str(tmp_path), "--json"]) == 1
    assert {r["stage"]: r["state"] for r in json.loads(capsys.readouterr().out)}["tokenize"] == "damaged"
    plan = plan_of(cfg, Selection(until="tokenize"))  # nothing to run reads it: sizes only
    assert (
        plan["tokenize"].state == "complete"
        and plan_of(cfg, Selection(until="tokenize"), deep=True)["tokenize"].state == "damaged"
    )


def test_status_of_the_default_run_fits_80_columns(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert launch.main(["status", "--root", str(tiny_run[0])]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80, out
    assert "val_loss=" in out and "pairwise_accuracy=" in out


def _as_legacy(cfg) -> dict[str, str]:
    """Rewrite a copied run as the code before stage versions wrote it: folders named by the old
    fingerprints, manifests without version and per-file code records. Returns stage -> old fp."""
    plan = plan_of(cfg)
    run_dir = Path(cfg.run.root) / cfg.run.name
    old: dict[str, str] = {}
    for name in PIPELINE.topological(cfg):
        p, stage = plan[name], PIPELINE[name]
        full = section_dict(cfg, stage.sections)
        keyed = {
            s: {k: v for k, v in d.items() if k not in legacy.UNKEYED.get(s, ())} for s, d in full.items()
        }
        if stage.extra_fingerprint is not None:
            keyed["_extra"] = stage.extra_fingerprint(cfg)
        inputs = {dep: old[dep] for dep in p.inputs}
        old[name] = legacy.old_fingerprint(name, keyed, inputs, p.code)
        folder = run_dir / f"{name}-{old[name]}"
        Path(p.path).rename(folder)
        m = json.loads((folder / "manifest.json").read_text())
        for key in ("version", "code_files"):
            m.pop(key)
        m.update(fingerprint=old[name], inputs=inputs)
        (folder / "manifest.json").write_text(json.dumps(m))
    return old


def test_a_run_built_before_stage_versions_is_adopted_without_recomputing(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """The real artifacts, moved: every file still verifies, and pretrain's work dir (Ray Train keeps
    checkpoints under ray/<work dir name>/) moves with it, so a raised budget continues from it.
    (tests/test_core_legacy.py checks the recognition against manifests the old code wrote.) These
    artifacts are today's tokenize 2's, which packs per source, unlike the code before stage versions:
    declared that code's here (pipeline/legacy.py MADE_AS_BEFORE), so that the takeover of all the
    stages after it is exercised. Likewise ppo 2, which reports more measures than the old code."""
    for stage in ("tokenize", "ppo"):
        monkeypatch.setitem(legacy.MADE_AS_BEFORE, stage, PIPELINE[stage].version)
    cfg = load_config(overrides=[f"run.root={tmp_path}", "run.wandb=disabled"])
    copy_upstream(tiny_run[1], cfg, PIPELINE.topological(cfg))
    new = {n: p.fingerprint for n, p in plan_of(cfg).items()}
    old = _as_legacy(cfg)
    planned = plan_of(cfg)
    old_key, new_key = planned["pretrain"].adopt.old_work_key, planned["pretrain"].work_key
    checkpoint = (
        tmp_path / "tiny" / ".work" / f"pretrain-{old_key}" / "ray" / f"pretrain-{old_key}" / "checkpoint_1"
    )
    checkpoint.mkdir(parents=True)
    assert {n: (p.state, p.action) for n, p in planned.items()} == dict.fromkeys(
        PIPELINE.topological(cfg), ("complete", "skip")
    )
    assert {n: p.fingerprint for n, p in planned.items()} == new

    monkeypatch.setattr("pipeline.runner._init_ray", _no_ray)
    capsys.readouterr()
    assert launch.main(["run", "--root", str(tmp_path), "--wandb", "disabled"]) == 0
    assert f"ppo: adopted ppo-{old['ppo']}, built before stage versions, as ppo-{new['ppo']}" in " ".join(
        capsys.readouterr().err.split()
    )
    after = plan_of(cfg, deep=True)  # every file's sha256
    assert all(p.state == "complete" and p.adopt is None for p in after.values())
    assert {n: p.manifest["adopted_from"] for n, p in after.items()} == old
    assert (
        tmp_path / "tiny" / ".work" / f"pretrain-{new_key}" / "ray" / f"pretrain-{new_key}" / "checkpoint_1"
    ).is_dir()
    assert not list((tmp_path / "tiny").glob(f"*-{old['pretrain']}"))


def _no_ray(*a, **k):
    raise AssertionError("adopting artifacts must not start Ray")
