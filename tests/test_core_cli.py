"""The CLI's promises on the toy DAG: what goes to stdout, exit codes, the plan as JSON, and code
edits that keep finished stages (noted, rebuilt only on request)."""

from __future__ import annotations

import json
import shutil

import pytest

import launch
from pipeline import fingerprint
from pipeline.config import PROJECT_ROOT
from tests.toy_stages import actions, patch_cli, plan_of

pytestmark = pytest.mark.timeout(120)  # the template run waits on Ray


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """launch.main on the toy DAG: (exit code, stdout, stderr)."""
    patch_cli(monkeypatch)
    capsys.readouterr()
    rc = launch.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_dry_run_json_is_the_plan_alone_on_stdout(done, monkeypatch, capsys):
    root = done[0]
    rc, out, err = cli(
        monkeypatch, capsys, "run", "--dry-run", "--json", "--root", str(root), "--name", "toy"
    )
    assert rc == 0
    rows = json.loads(out)  # nothing else on stdout
    assert [(r["stage"], r["state"], r["action"], r["reason"]) for r in rows] == [
        (s, "complete", "skip", "complete") for s in "abcd"
    ]
    assert all(r["notes"] == [] for r in rows)

    rc, out, _ = cli(monkeypatch, capsys, "run", "--dry-run", "--json", "--root", str(root), "--name", "toy",
                     "--set", "c.value=4")  # fmt: skip
    assert rc == 0
    assert {r["stage"]: r["action"] for r in json.loads(out)} == {
        "a": "skip",
        "b": "skip",
        "c": "run",
        "d": "run",
    }


def test_dry_run_of_a_plan_that_cannot_run_exits_2(done, monkeypatch, capsys):
    root, _, store, plan = done
    work = store.work_dir("b", plan["b"].work_key)
    (work / "progress.json").write_text(json.dumps({"step": 2, "total": 3, "checkpoint": 2}))
    args = ("run", "--dry-run", "--json", "--root", str(root), "--name", "toy", "--set", "b.budget=1")
    rc, out, _ = cli(monkeypatch, capsys, *args)
    assert rc == 2
    (b,) = [r for r in json.loads(out) if r["stage"] == "b"]
    assert b["action"] == "run" and b["reason"].startswith("cannot run: b.budget=1")


def test_dry_run_text_goes_to_stdout(done, monkeypatch, capsys):
    rc, out, err = cli(monkeypatch, capsys, "run", "--dry-run", "--root", str(done[0]), "--name", "toy")
    assert rc == 0
    assert "resolved config" in out and "DAG" in out and "complete" in out
    assert "resolved config" not in err and "DAG" not in err


def test_status_exit_code_says_whether_every_stage_is_complete(done, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    for extra in ((), ("--json",)):
        rc, out, _ = cli(monkeypatch, capsys, "status", "--root", str(empty), "--name", "toy", *extra)
        assert rc == 1 and "missing" in out
        rc, out, _ = cli(monkeypatch, capsys, "status", "--root", str(done[0]), "--name", "toy", *extra)
        assert rc == 0 and "complete" in out


def test_status_fits_80_columns_and_wide_shows_every_metric(done, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = cli(monkeypatch, capsys, "status", "--root", str(done[0]), "--name", "toy")
    assert rc == 0
    assert max(len(line) for line in out.splitlines()) <= 80, out
    header = next(line for line in out.splitlines() if "stage" in line)
    assert header.split() == ["stage", "state", "time", "headline", "artifact"]
    assert "value=5" in out and done[3]["d"].fingerprint in out
    monkeypatch.setenv("COLUMNS", "300")
    rc, out, _ = cli(monkeypatch, capsys, "status", "--root", str(done[0]), "--name", "toy", "--wide")
    assert "metrics" in out and done[3]["d"].path in out


@pytest.fixture
def edited_project(tmp_path, monkeypatch):
    """A scratch copy of the project's code as fingerprint.py reads it, to edit."""
    scratch = tmp_path / "project"
    for rel in (*fingerprint.project_packages(), "tests"):
        shutil.copytree(PROJECT_ROOT / rel, scratch / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", scratch)
    monkeypatch.setattr(fingerprint, "PROJECT_ROOT", scratch)
    caches = (fingerprint.project_imports, fingerprint.project_packages, fingerprint._module_file)
    for c in caches:
        c.cache_clear()
    yield scratch
    for c in caches:  # they hold the scratch tree's paths
        c.cache_clear()


def test_a_code_edit_keeps_finished_stages_and_notes_the_files(done, edited_project, monkeypatch, capsys):
    root, cfg, _, before = done
    with open(edited_project / "pipeline" / "config.py", "a") as f:
        f.write("# a comment\n")
    plan = plan_of(cfg)
    assert actions(plan) == dict.fromkeys("abcd", "skip")
    assert {n: p.fingerprint for n, p in plan.items()} == {n: p.fingerprint for n, p in before.items()}
    assert plan["a"].notes == ["code changed since it was built: pipeline/config.py"]

    args = ("run", "--dry-run", "--json", "--root", str(root), "--name", "toy")
    rc, out, _ = cli(monkeypatch, capsys, *args)
    rows = json.loads(out)
    assert rc == 0 and [r["action"] for r in rows] == ["skip"] * 4
    assert all("pipeline/config.py" in r["notes"][0] for r in rows)

    rc, out, _ = cli(monkeypatch, capsys, *args, "--rebuild-changed")
    rows = json.loads(out)
    assert rc == 0 and [r["action"] for r in rows] == ["run"] * 4
    assert rows[0]["reason"].startswith("code changed, rebuilt (--rebuild-changed): a")

    rc, _, err = cli(monkeypatch, capsys, "run", "--root", str(root), "--name", "toy", "--rebuild-changed")
    assert rc == 0, err
    after = plan_of(cfg)
    assert actions(after) == dict.fromkeys("abcd", "skip") and all(p.notes == [] for p in after.values())
    assert all(p.manifest["created"] > before[n].manifest["created"] for n, p in after.items())


def test_a_version_bump_rebuilds_the_stage_and_its_downstream(done, edited_project):
    _, cfg, _, before = done
    toy = edited_project / "tests" / "toy_stages.py"
    toy.write_text(toy.read_text().replace("VERSION = 1\n", "VERSION = 2\n"))
    plan = plan_of(cfg)
    assert actions(plan) == dict.fromkeys("abcd", "run")  # every toy stage lives in that module
    assert plan["a"].reason == "stage version 1 -> 2"
    assert plan["a"].fingerprint != before["a"].fingerprint
