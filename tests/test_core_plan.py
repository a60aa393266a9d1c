"""Resume and selection on the toy DAG (a -> b -> d, a -> c -> d) with real Ray and real artifacts.

One complete run is made per test session (conftest.py `template`) and copied into each test's own
root (`done`), so each test starts from "everything complete" in a few milliseconds.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

import launch
from pipeline.artifacts import ArtifactStore
from pipeline.plan import PlanError, Selection
from pipeline.report import write_report
from pipeline.runner import run_pipeline, status_rows
from tests.toy_stages import TOY_DAG, actions, events, json_list_in, patch_cli, plan_of, toy_config

pytestmark = pytest.mark.timeout(120)  # every test here may wait on Ray (the template run)


def value(path) -> int:
    return json.loads((path / "value.json").read_text())["value"]


def cli_json(monkeypatch, capsys, root, *args, rc: int = 0) -> list[dict]:
    patch_cli(monkeypatch)
    capsys.readouterr()
    assert launch.main(["status", "--json", "--root", str(root), "--name", "toy", *args]) == rc
    return json_list_in(capsys.readouterr().out)


def test_first_run_commits_every_artifact(done):
    root, cfg, store, plan = done
    assert {p.state for p in plan.values()} == {"complete"}
    assert value(store.find("d", plan["d"].fingerprint).path) == 5  # d + b (1 + a) + c (1 + a)
    manifest = plan["d"].manifest
    assert manifest["inputs"] == {"b": plan["b"].fingerprint, "c": plan["c"].fingerprint}
    assert manifest["metrics"] == {"value": 5}
    assert manifest["config"] == {
        "d": {"value": 1, "steps": 3, "workers": 1, "budget": 0, "sleep": 0.0, "fail": False, "meet": ""}
    }
    assert set(manifest["files"]) == {"value.json", "metrics.jsonl"}
    assert {"versions", "git_commit", "hardware", "code_version"} <= set(manifest)
    assert manifest["version"] == 1 and "tests/toy_stages.py" in manifest["code_files"]
    rows = [
        json.loads(line) for line in (store.find("d", plan["d"].fingerprint).path / "metrics.jsonl").open()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not list(store.run_dir.glob(".tmp-*"))  # staging folders were renamed into place


@pytest.mark.timeout(60)
def test_second_run_runs_nothing_and_needs_no_ray(done, no_ray):
    _, cfg, _, plan = done
    assert actions(plan) == dict.fromkeys("abcd", "skip")
    assert {p.reason for p in plan.values()} == {"complete"}
    outcome = run_pipeline(cfg, TOY_DAG)  # _init_ray raises if called
    assert outcome.ok and outcome.results == {} and outcome.errors == {}


def test_changed_config_reruns_the_stage_and_its_downstream_only(done):
    root, _, store, before = done
    cfg = toy_config(root, "b.value=5")
    plan = plan_of(cfg)
    assert actions(plan) == {"a": "skip", "b": "run", "c": "skip", "d": "run"}
    assert "config changed: b.value: 1 -> 5" in plan["b"].reason
    assert plan["d"].reason == "input re-runs: b"
    assert plan["a"].fingerprint == before["a"].fingerprint
    assert plan["b"].fingerprint != before["b"].fingerprint

    outcome = run_pipeline(cfg, TOY_DAG)
    assert outcome.ok, outcome.errors
    assert set(outcome.results) == {"b", "d"}
    assert outcome.results["d"]["metrics"] == {"value": 1 + (5 + 1) + (1 + 1)}
    assert len([e for e in events(store, before["a"]) if "start" in e]) == 1  # a did not run again
    # the old artifacts stay: switching back is free
    assert store.check("b", before["b"].fingerprint)[0] is not None
    assert actions(plan_of(toy_config(root))) == dict.fromkeys("abcd", "skip")


@pytest.mark.timeout(60)
def test_placement_keys_rerun_nothing(done, no_ray):
    root, _, _, before = done
    cfg = toy_config(root, "b.steps=7", "b.workers=4", "run.resource_wait_s=5")
    plan = plan_of(cfg)
    assert actions(plan) == dict.fromkeys("abcd", "skip")
    assert {n: p.fingerprint for n, p in plan.items()} == {n: p.fingerprint for n, p in before.items()}
    assert {n: p.work_key for n, p in plan.items()} == {n: p.work_key for n, p in before.items()}
    assert run_pipeline(cfg, TOY_DAG).results == {}


def test_a_checkpoint_of_another_layout_is_refused_with_the_choices(done, no_ray):
    """A partial stage whose checkpoint was written by 2 workers cannot resume on 1 (placement is
    not in the work dir's key): planning says so, naming the keys and both ways out."""
    root, _, store, before = done
    shutil.rmtree(store.run_dir / f"b-{before['b'].fingerprint}")  # b is partial, with a checkpoint
    work = store.work_dir("b", before["b"].work_key)
    saved = {"step": 2, "total": 3, "checkpoint": 2, "layout": {"b.workers": 2}}
    (work / "progress.json").write_text(json.dumps(saved))
    cfg = toy_config(root, "b.budget=2")  # a budget the checkpoint does not pass
    with pytest.raises(PlanError) as e:
        run_pipeline(cfg, TOY_DAG)
    assert str(e.value) == (
        f"b: its checkpoint at step 2 ({work}) was written with b.workers=2 and cannot be resumed with "
        "b.workers=1: keep the old placement (--set b.workers=2) to resume from it, or start the stage "
        "over: delete that folder, or run with `--from b` (which re-runs what follows too)"
    )
    assert plan_of(toy_config(root, "b.budget=2", "b.workers=2"))["b"].problems == []
    assert plan_of(toy_config(root, "b.budget=2", "b.steps=9", "b.workers=2"))["b"].problems == []


def test_a_checkpoint_records_the_layout_it_was_written_with(tmp_path):
    from pipeline.context import LocalContext, LocalWorkerContext

    wctx = LocalWorkerContext(LocalContext("b", tmp_path / "work", layout={"b.workers": 2}))
    wctx.progress(1, 3)
    assert "layout" not in json.loads((tmp_path / "work" / "progress.json").read_text())  # no checkpoint yet
    (tmp_path / "ckpt").mkdir()
    wctx.report({"step": 1}, checkpoint_dir=tmp_path / "ckpt")
    saved = json.loads((tmp_path / "work" / "progress.json").read_text())
    assert (saved["checkpoint"], saved["layout"]) == (1, {"b.workers": 2})
    # the next attempt runs on 3 workers (it found no checkpoint yet): the record stays the checkpoint's
    LocalContext("b", tmp_path / "work", layout={"b.workers": 3}).progress(2, 3)
    saved = json.loads((tmp_path / "work" / "progress.json").read_text())
    assert (saved["checkpoint"], saved["layout"]) == (1, {"b.workers": 2})


def test_pretraining_resumes_on_another_worker_count_and_the_trl_stages_say_they_cannot(tmp_path):
    """The real stages' rules, at planning: a pretraining checkpoint written by 2 workers resumes on 1
    (it is converted), but not under another ZeRO family; sft's, tied to its ranks' data positions,
    resumes on its own placement only. Each refusal names the keys and the ways out."""
    from pipeline.config import load_config
    from tests.pipeline_helpers import plan_of

    def partial(stage: str, layout: dict) -> Path:
        cfg = load_config(overrides=[f"run.root={tmp_path}"])
        store = ArtifactStore(str(tmp_path), cfg.run.name)
        work = store.work_dir(stage, plan_of(cfg)[stage].work_key)
        work.mkdir(parents=True, exist_ok=True)
        saved = {"step": 10, "total": 20, "checkpoint": 10, "layout": layout}
        (work / "progress.json").write_text(json.dumps(saved))
        return work

    def problems(stage: str, *overrides: str) -> list[str]:
        return plan_of(load_config(overrides=[f"run.root={tmp_path}", *overrides]))[stage].problems

    work = partial("pretrain", {"pretrain.num_workers": 2, "pretrain.zero_stage": 2})
    assert problems("pretrain", "pretrain.num_workers=1") == []
    assert (
        problems("pretrain", "pretrain.num_workers=1", "pretrain.zero_stage=1") == []
    )  # ZeRO-1 loads ZeRO-2's
    (why,) = problems("pretrain", "pretrain.zero_stage=3")
    assert why.startswith(
        f"pretrain: its checkpoint at step 10 ({work}) was written with pretrain.zero_stage=2 and cannot be "
        "resumed with pretrain.zero_stage=3 (DeepSpeed converts a ZeRO-3 checkpoint into a universal one"
    )
    assert why.endswith(
        "set pretrain.zero_stage=2 to resume from it (pretrain.num_workers may change), or start the stage "
        "over: delete that folder, or run with `--from pretrain` (which re-runs what follows too)"
    )
    work = partial("sft", {"sft.num_workers": 1, "sft.zero_stage": 2, "sft.micro_batch_size": 16})
    (why,) = problems("sft", "sft.num_workers=2", "sft.micro_batch_size=8")
    assert why == (
        f"sft: its checkpoint at step 10 ({work}) was written with sft.num_workers=1, sft.micro_batch_size=16 "
        "and cannot be resumed with sft.num_workers=2, sft.micro_batch_size=8 (TRL's checkpoint holds one "
        "DeepSpeed shard per rank and each rank's position in its data, counted in its own micro-batches): "
        "keep the old placement "
        "(--set sft.num_workers=1 --set sft.micro_batch_size=16) to resume from it, or start the stage over: "
        "delete that folder, or run with `--from sft` (which re-runs what follows too)"
    )
    for stage in ("reward", "ppo"):  # the same refusal, with the reason of each
        partial(stage, {f"{stage}.num_workers": 1, f"{stage}.zero_stage": 2})
        (why,) = problems(stage, f"{stage}.num_workers=2", f"{stage}.micro_batch_size=8")
        assert f"cannot be resumed with {stage}.num_workers=2 (" in why and f"`--from {stage}`" in why


def test_budget_key_reruns_downstream_and_keeps_the_work_dir(done):
    root, _, _, before = done
    plan = plan_of(toy_config(root, "b.budget=10"))
    assert actions(plan) == {"a": "skip", "b": "run", "c": "skip", "d": "run"}
    assert plan["b"].fingerprint != before["b"].fingerprint  # a new artifact ...
    assert plan["b"].work_key == before["b"].work_key  # ... continued from the same work dir
    assert plan["d"].work_key != before["d"].work_key  # its input changed


def test_a_budget_below_the_last_checkpoint_is_refused_before_anything_runs(done, no_ray):
    """A stage's checkpoint at step 5 cannot give a model of 3 steps: the run stops at planning,
    naming the key and the folder, and nothing is started or written."""
    root, _, store, before = done
    work = store.work_dir("b", before["b"].work_key)
    (work / "progress.json").write_text(json.dumps({"step": 6, "total": 8, "checkpoint": 5}))
    files = {f: f.stat().st_mtime_ns for f in (root / "toy").rglob("*") if f.is_file()}
    cfg = toy_config(root, "b.budget=3")
    plan = plan_of(cfg)
    assert plan["b"].action == "run" and plan["b"].reason.startswith("cannot run: b.budget=3")
    with pytest.raises(PlanError) as e:
        run_pipeline(cfg, TOY_DAG)
    assert f"b.budget=3, but this stage's last checkpoint ({work}) is at step 5" in str(e.value)
    assert "set b.budget to 5 or more to finish from it, or delete that folder" in str(e.value)
    assert {f: f.stat().st_mtime_ns for f in (root / "toy").rglob("*") if f.is_file()} == files
    assert plan_of(toy_config(root, "b.budget=5"))["b"].problems == []  # at the checkpoint: it finishes


def test_a_checkpoint_is_recorded_at_the_step_of_its_progress_and_kept_on_resume(tmp_path):
    """What planning reads: progress.json's `checkpoint` is the step last reported before the
    checkpoint, and a later attempt of the stage keeps it until it saves a newer one."""
    from pipeline.context import LocalContext, LocalWorkerContext

    ctx = LocalContext("b", tmp_path / "work")
    wctx = LocalWorkerContext(ctx)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step in (1, 2):
        wctx.progress(step, 4)
    wctx.report({"step": 2, "loss": 0.5}, checkpoint_dir=folder)
    wctx.progress(3, 4)
    progress = tmp_path / "work" / "progress.json"
    assert json.loads(progress.read_text())["checkpoint"] == 2
    again = LocalContext("b", tmp_path / "work")  # the next attempt
    again.progress(3, 4)
    saved = json.loads(progress.read_text())
    assert (saved["step"], saved["total"], saved["checkpoint"]) == (3, 4, 2)


def test_an_attempt_without_a_checkpoint_starts_over_and_drops_the_rows_before(tmp_path, caplog):
    """A group killed before its first checkpoint (or before Ray Train registered it) restarts
    from step 0: the rows the killed attempt logged go, so no step appears twice in the artifact."""
    from pipeline.context import LocalContext, LocalWorkerContext

    first = LocalWorkerContext(LocalContext("b", tmp_path / "work"))
    first.started_fresh()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step in (1, 2, 3):
        first.progress(step, 4)
        first.report({"step": step, "loss": 1.0 / step}, checkpoint_dir=folder if step == 2 else None)
    assert json.loads((tmp_path / "work" / "progress.json").read_text())["checkpoint"] == 2
    shutil.rmtree(first.ckpt_root)  # a checkpoint reported, but not one the next attempt gets
    ctx = LocalContext("b", tmp_path / "work")  # the next attempt finds no checkpoint
    wctx = LocalWorkerContext(ctx)
    assert wctx.checkpoint() is None
    with caplog.at_level("INFO", logger="kiln.b"):
        wctx.started_fresh()
    assert "starting over (3 metric rows of an earlier attempt dropped)" in caplog.text
    progress = json.loads((tmp_path / "work" / "progress.json").read_text())
    assert (progress["step"], progress["total"]) == (0, 4) and "checkpoint" not in progress  # planning
    assert ctx.metrics.rows() == []
    for step in (1, 2, 3, 4):
        wctx.report({"step": step, "loss": 0.5 / step})
    wctx.progress(4, 4)
    assert [r["step"] for r in ctx.metrics.rows()] == [1, 2, 3, 4]
    assert [r["loss"] for r in ctx.metrics.rows()] == [0.5, 0.25, 0.5 / 3, 0.125]


def test_from_reruns_the_stage_and_its_downstream(done):
    _, cfg, store, before = done
    plan = plan_of(cfg, Selection(start="b"))
    assert actions(plan) == {"a": "unselected", "b": "run", "c": "unselected", "d": "run"}
    assert plan["b"].reason == "--from b (starts over: its checkpoints are removed)"
    assert plan["b"].fresh and plan["d"].fresh
    marker = store.work_dir("b", before["b"].work_key) / "checkpoint-marker"
    marker.write_text("a checkpoint of the build before")
    outcome = run_pipeline(cfg, TOY_DAG, Selection(start="b"))
    assert outcome.ok, outcome.errors
    assert set(outcome.results) == {"b", "d"}
    assert not marker.exists()  # a rebuild starts over: the work dir went, events.jsonl with it
    assert len([e for e in events(store, before["b"]) if "start" in e]) == 1
    assert len([e for e in events(store, before["c"]) if "start" in e]) == 1
    manifest, problem = store.check("b", before["b"].fingerprint, deep=True)
    assert problem is None and manifest["created"] > before["b"].manifest["created"]  # replaced


def test_from_starts_a_partial_stage_over_too(done):
    """Its checkpoints were trained on what the rebuild replaces: --from never resumes them."""
    _, cfg, store, before = done
    shutil.rmtree(store.run_dir / f"b-{before['b'].fingerprint}")
    work = store.work_dir("b", before["b"].work_key)
    (work / "progress.json").write_text(json.dumps({"step": 2, "total": 3, "checkpoint": 2}))
    plan = plan_of(cfg, Selection(start="a"))
    assert plan["b"].state == "partial" and plan["b"].fresh
    assert plan["b"].reason == "--from a (starts over: its checkpoints are removed)"


def test_only_and_until_select_stages(tmp_path, ray_session):
    cfg = toy_config(tmp_path)
    store = ArtifactStore(str(tmp_path), "toy")
    with pytest.raises(PlanError, match=r"c needs the a artifact, which is missing: run `--until a` first"):
        plan_of(cfg, Selection(only=("c",)))
    with pytest.raises(PlanError, match=r"b needs the a artifact, which is missing"):
        plan_of(cfg, Selection(start="b"))
    with pytest.raises(PlanError, match=r"unknown stage 'e'; stages are: a, b, c, d"):
        plan_of(cfg, Selection(only=("c", "e")))

    until = Selection(until="b")
    assert actions(plan_of(cfg, until)) == {"a": "run", "b": "run", "c": "unselected", "d": "unselected"}
    outcome = run_pipeline(cfg, TOY_DAG, until)
    assert outcome.ok and set(outcome.results) == {"a", "b"}
    plan = plan_of(cfg)
    assert {n: p.state for n, p in plan.items()} == {
        "a": "complete",
        "b": "complete",
        "c": "missing",
        "d": "missing",
    }

    only = Selection(only=("c",))  # now its input exists
    assert actions(plan_of(cfg, only)) == {
        "a": "unselected",
        "b": "unselected",
        "c": "run",
        "d": "unselected",
    }
    outcome = run_pipeline(cfg, TOY_DAG, only)
    assert outcome.ok and set(outcome.results) == {"c"}
    assert store.check("c", plan["c"].fingerprint)[0] is not None
    assert store.check("d", plan["d"].fingerprint)[0] is None


def test_same_size_tamper_is_caught_by_sha256(done, monkeypatch, capsys):
    root, cfg, store, plan = done
    target = store.find("b", plan["b"].fingerprint).path / "value.json"
    data = bytearray(target.read_bytes())
    i = data.index(b"2")  # {"value": 2}
    data[i] = ord("7")
    target.write_bytes(bytes(data))

    # sizes are checked on every run: this one still looks complete ...
    assert store.check("b", plan["b"].fingerprint)[0] is not None
    # ... sha256 finds it, naming the file
    manifest, problem = store.check("b", plan["b"].fingerprint, deep=True)
    assert manifest is None and problem.file == str(target) and "sha256" in problem.reason
    deep = plan_of(cfg, deep=True)
    assert deep["b"].state == "damaged" and deep["a"].state == "complete"
    rows = {r["stage"]: r for r in cli_json(monkeypatch, capsys, root, "--verify", rc=1)}
    assert rows["b"]["state"] == "damaged" and rows["c"]["state"] == "complete"
    assert rows["b"]["damaged"] == {
        "file": str(target),
        "reason": "does not match its sha256 in the manifest (modified or corrupt)",
    }
    rows = {r["stage"]: r for r in cli_json(monkeypatch, capsys, root)}
    assert rows["b"]["state"] == "complete"  # without --verify only sizes are checked

    # a stage that will consume it verifies sha256 first and rebuilds the damaged input before it runs
    changed = toy_config(root, "d.value=7")
    planned = plan_of(changed)
    assert actions(planned) == {"a": "skip", "b": "run", "c": "skip", "d": "run"}
    assert "damaged" in planned["b"].reason and "value.json" in planned["b"].reason
    outcome = run_pipeline(changed, TOY_DAG)
    assert outcome.ok and set(outcome.results) == {"b", "d"}
    assert json.loads(target.read_text()) == {"value": 2}  # rebuilt, same fingerprint
    assert outcome.results["d"]["metrics"]["value"] == 2 + 2 + 7

    # when the damaged input is not selected, the plan refuses and says how to rebuild it
    target.write_bytes(target.read_bytes().replace(b"2", b"7"))
    again = toy_config(root, "d.value=8")
    with pytest.raises(PlanError, match=r"damaged.*--from b"):
        plan_of(again, Selection(only=("d",)))


@pytest.mark.parametrize("damage", ["grow", "delete"])
def test_damaged_artifact_is_incomplete_and_rebuilt(done, damage):
    _, cfg, store, plan = done
    target = store.find("b", plan["b"].fingerprint).path / "value.json"
    if damage == "grow":
        target.write_bytes(target.read_bytes() + b" ")
    else:
        target.unlink()
    manifest, problem = store.check("b", plan["b"].fingerprint)
    assert manifest is None and problem.damaged and problem.file == str(target)
    assert store.find("b", plan["b"].fingerprint) is None

    replan = plan_of(cfg)
    assert actions(replan) == {"a": "skip", "b": "run", "c": "skip", "d": "skip"}  # same fingerprint
    assert replan["b"].state == "damaged" and replan["b"].damage["file"] == str(target)
    assert replan["b"].reason.startswith("damaged artifact:") and str(target) in replan["b"].reason

    outcome = run_pipeline(cfg, TOY_DAG)
    assert outcome.ok and set(outcome.results) == {"b"}
    assert store.check("b", plan["b"].fingerprint, deep=True)[1] is None
    assert value(target.parent) == 2


def test_status_rows_and_cli_json(done, monkeypatch, capsys):
    root, _, _, plan = done
    expected = status_rows(list(plan.values()))
    assert [r["stage"] for r in expected] == ["a", "b", "c", "d"]
    assert all(r["state"] == "complete" and r["progress"] is None for r in expected)
    assert expected[3]["metrics"] == {"value": 5}
    assert cli_json(monkeypatch, capsys, root) == json.loads(json.dumps(expected))


def test_report_has_each_stage_and_its_curves(done):
    root, _, store, plan = done
    out = write_report(store.run_dir, list(plan.values()), "kiln run toy")
    assert out == root / "toy" / "report.html"
    html = out.read_text()
    for name in "abcd":
        assert f"<td>{name}</td><td>complete</td>" in html
        assert f"<h2>{name}</h2>" in html  # each toy stage logs a loss curve
    assert "value=5" in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 4
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)
