"""The Ray runner on the toy DAG (a -> b -> d, a -> c -> d): failures, parallelism, resources, fan-out."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

import launch
from pipeline.artifacts import ArtifactStore
from pipeline.dag import DAG, Stage
from pipeline.files import NO_ARTIFACT
from pipeline.plan import Selection, make_plan
from pipeline.runner import run_pipeline, status_rows
from tests.toy_stages import TOY_DAG, events, json_list_in, patch_cli, toy_config

pytestmark = pytest.mark.timeout(120)  # every test here waits on Ray


def plan_of(cfg, dag=TOY_DAG) -> dict:
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    return {p.name: p for p in make_plan(cfg, dag, store, Selection())}


def starts(store, p) -> int:
    return len([e for e in events(store, p) if "start" in e])


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Background:
    """run_pipeline in a thread, so the test can act while a stage runs."""

    def __init__(self, *args, **kwargs):
        self.outcome, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args, **kwargs):
        try:
            self.outcome = run_pipeline(*args, **kwargs)
        except BaseException as e:  # surfaced by join()
            self.error = e

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"run_pipeline did not return within {timeout}s"
        if self.error is not None:
            raise self.error
        return self.outcome


@pytest.mark.timeout(180)
def test_killed_stage_leaves_no_artifact_and_resumes_alone(tmp_path, ray_session, monkeypatch, capsys):
    slow_b = ("b.sleep=0.2", "b.steps=40")
    cfg = toy_config(tmp_path, *slow_b)
    store = ArtifactStore(str(tmp_path), "toy")
    plan = plan_of(cfg)
    b = plan["b"]

    run = Background(cfg, TOY_DAG)

    def b_pid_after_two_steps():
        prog = store.progress("b", b.work_key)
        pids = [e["pid"] for e in events(store, b) if "pid" in e]
        return pids[0] if prog and prog["step"] >= 2 and pids else None

    pid = wait_for(b_pid_after_two_steps, 60, "stage b to report step 2")
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # the stage's Ray worker process dies mid-way
    outcome = run.join(60)

    # the failure is reported against b; its downstream is blocked; the independent branch finished
    assert set(outcome.errors) == {"b"}
    assert "died" in outcome.errors["b"] and str(store.log_path("b")) in outcome.errors["b"]
    assert "stage process died" in store.log_path("b").read_text()
    assert outcome.blocked == {"d": "not run: b failed"}
    assert set(outcome.results) == {"a", "c"}
    assert not outcome.ok

    # no complete artifact of b, not even a folder under its name
    assert store.check("b", b.fingerprint) == (None, NO_ARTIFACT)
    assert not (store.run_dir / f"b-{b.fingerprint}").exists()
    assert store.check("c", plan["c"].fingerprint)[0] is not None

    # status shows b as partial with its progress
    rows = {r["stage"]: r for r in status_rows(make_plan(cfg, TOY_DAG, store))}
    assert {s: r["state"] for s, r in rows.items()} == {
        "a": "complete",
        "b": "partial",
        "c": "complete",
        "d": "missing",
    }
    step = rows["b"]["progress"]["step"]
    assert 2 <= step < 40 and rows["b"]["progress"]["total"] == 40
    patch_cli(monkeypatch, *slow_b)
    capsys.readouterr()
    assert launch.main(["status", "--json", "--root", str(tmp_path), "--name", "toy"]) == 1  # b is partial
    cli_rows = {r["stage"]: r for r in json_list_in(capsys.readouterr().out)}
    assert cli_rows["b"]["state"] == "partial"
    assert cli_rows["b"]["progress"]["step"] == step and cli_rows["b"]["progress"]["total"] == 40
    assert cli_rows["c"]["state"] == "complete" and cli_rows["c"]["metrics"] == {"value": 2}

    # the next run re-runs b (and d), not a or c; steps is not fingerprinted, so make it short
    again = toy_config(tmp_path, "b.sleep=0.2", "b.steps=2")
    replan = plan_of(again)
    assert replan["b"].fingerprint == b.fingerprint
    assert {n: p.action for n, p in replan.items()} == {"a": "skip", "b": "run", "c": "skip", "d": "run"}
    assert replan["b"].reason == f"partial: resumes at step {step} of 40"
    outcome = run_pipeline(again, TOY_DAG)
    assert outcome.ok, outcome.errors
    assert set(outcome.results) == {"b", "d"}
    assert starts(store, plan["a"]) == 1 and starts(store, plan["c"]) == 1 and starts(store, b) == 2
    assert not list(store.run_dir.glob(".tmp-*"))  # the killed stage's staging folder was removed


def test_independent_stages_run_at_the_same_time(tmp_path, ray_session):
    # each waits, before finishing, until it sees the other started: sequential runs would time out
    cfg = toy_config(tmp_path, "b.sleep=0.5", "c.sleep=0.5", "b.meet=c", "c.meet=b")
    store = ArtifactStore(str(tmp_path), "toy")
    plan = plan_of(cfg)
    outcome = run_pipeline(cfg, TOY_DAG)
    assert outcome.ok, outcome.errors

    def span(name):
        rows = events(store, plan[name])
        return next(r["start"] for r in rows if "start" in r), next(r["end"] for r in rows if "end" in r)

    (b0, b1), (c0, c1) = span("b"), span("c")
    assert b1 - b0 >= 1.5 and c1 - c0 >= 1.5
    overlap = min(b1, c1) - max(b0, c0)
    assert overlap > 0, f"b ran {b0:.2f}-{b1:.2f}, c ran {c0:.2f}-{c1:.2f}: not in parallel"
    d0, _ = span("d")
    assert d0 >= max(b1, c1)  # d waits for both inputs


def test_failing_stage_is_reported_with_its_traceback(tmp_path, ray_session, monkeypatch, capsys):
    patch_cli(monkeypatch)
    capsys.readouterr()
    rc = launch.main(["run", "--root", str(tmp_path), "--name", "toy", "--set", "c.fail=true"])
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert rc == 1, out
    assert "c failed" in out
    assert "RuntimeError: stage c failed on purpose" in out
    assert "toy_stages.py" in out  # the worker's traceback, not only the message
    assert "blocked" in out  # d

    store = ArtifactStore(str(tmp_path), "toy")
    log = store.log_path("c").read_text()
    assert "Traceback (most recent call last)" in log
    assert 'raise RuntimeError(f"stage {ctx.stage} failed on purpose")' in log
    plan = plan_of(toy_config(tmp_path, "c.fail=true"))
    assert {n: p.state for n, p in plan.items()} == {
        "a": "complete",
        "b": "complete",  # the independent branch finished
        "c": "partial",  # it got to its last step before raising
        "d": "missing",
    }
    assert (store.run_dir / "report.html").is_file()

    # fixed, the next run runs c and d only
    patch_cli(monkeypatch)
    assert launch.main(["run", "--root", str(tmp_path), "--name", "toy"]) == 0
    capsys.readouterr()
    assert {p.state for p in plan_of(toy_config(tmp_path)).values()} == {"complete"}
    assert starts(store, plan["a"]) == 1 and starts(store, plan["b"]) == 1


def test_a_ctrl_c_swallowed_where_it_landed_still_stops_the_run():
    """Python runs a signal handler wherever the main thread is; in a `__del__` the garbage collector
    runs, its KeyboardInterrupt is swallowed. The run's handler notes the press, so the loop's next
    turn stops anyway; the handler before the run is back afterwards."""
    from pipeline.runner import _CtrlC

    before = signal.getsignal(signal.SIGINT)
    ctrl_c = _CtrlC.install()
    try:
        ctrl_c.check()  # nothing pressed yet
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # as `Exception ignored in: <function ... __del__>` does
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    finally:
        ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_training_workers_error_heads_the_stage_failure(tmp_path):
    """Ray Train workers that raise: the run's outcome starts with each distinct exception and the
    ranks that raised it, then their traceback snippet, not Ray's traceback of the stage process."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from pipeline.runner import _describe_failure

    message = "sft.steps=9, but this stage's checkpoint is at 10"
    snippet = (
        f'[Rank 1 Error Snippet]:\n  File "stages/sft.py", line 64, in train_worker\nValueError: {message}'
    )
    lost = RuntimeError("Connection closed by peer")  # what a rank waiting on a collective sees
    cause = WorkerGroupError(snippet, {0: lost, 1: ValueError(message), 2: ValueError(message)})
    stage_error = RayTaskError("kiln:sft", "Traceback: runner.py, trainer.fit()", cause).as_instanceof_cause()
    got = _describe_failure(stage_error, tmp_path / "sft.log").splitlines()
    assert got[:2] == [
        "RuntimeError: Connection closed by peer (worker rank 0)",
        f"ValueError: {message} (worker rank 1, 2)",
    ]
    assert 'File "stages/sft.py", line 64, in train_worker' in "\n".join(got)  # the worker's traceback
    assert "trainer.fit()" not in "\n".join(got)  # not the stage process's
    assert got[-1] == f"(log: {tmp_path / 'sft.log'})"


@pytest.mark.timeout(60)
def test_unmeetable_resources_fail_with_what_is_missing(tmp_path, ray_session):
    from pipeline.context import Scaling

    toy = "tests.toy_stages:run_toy"
    dag = DAG(
        (
            Stage("a", toy, sections=("a",), resources=lambda cfg: {"CPU": 64}),
            Stage("b", toy, sections=("b",), resources=lambda cfg: {"CPU": 1, "kiln_test_accel": 2}),
            Stage(
                "c",
                toy,
                sections=("c",),
                workers=lambda cfg: Scaling(num_workers=3, cpus_per_worker=0.5, gpus_per_worker=1),
            ),
            Stage("d", toy, inputs=("a",), sections=("d",)),
        )
    )
    cfg = toy_config(tmp_path, "run.resource_wait_s=1")
    started = time.monotonic()
    outcome = run_pipeline(cfg, dag)
    took = time.monotonic() - started
    assert 1 <= took < 30
    assert set(outcome.errors) == {"a", "b", "c"}
    assert "a needs 64 CPU (the cluster has 2)" in outcome.errors["a"]
    assert "run.resource_wait_s=1" in outcome.errors["a"]
    assert "b needs 2 kiln_test_accel (the cluster has 0)" in outcome.errors["b"]
    assert "c needs 3 GPU (the cluster has 0);" in outcome.errors["c"]
    assert "c.num_workers" in outcome.errors["c"]  # what to change
    assert outcome.blocked == {"d": "not run: a failed"}
    store = ArtifactStore(str(tmp_path), "toy")
    assert not list(store.run_dir.glob("*-*/manifest.json"))


def test_ctx_map_returns_results_in_item_order(tmp_path, ray_session):
    dag = DAG((Stage("a", "tests.toy_stages:run_mapper", sections=("a",)),))
    cfg = toy_config(tmp_path)
    outcome = run_pipeline(cfg, dag)
    assert outcome.ok, outcome.errors
    result = json.loads(
        (ArtifactStore(str(tmp_path), "toy").run_dir.glob("a-*/value.json").__next__()).read_text()
    )
    assert result["results"] == [0, 1, 4, 9, 16, 25]  # slow_squares finishes the last items first
    # each task's thread pools as wide as its cores (at least one), not as the machine
    assert result["threads"] == {"0.5": ["1", "1"], "2": ["2", "2"]}
    assert outcome.results["a"]["metrics"] == {"value": 55}


@pytest.mark.timeout(120)
def test_sigterm_stops_starting_stages_and_cancels_one_past_the_grace_period(tmp_path, ray_session):
    """SIGTERM in the driver: no stage starts after it; a running stage that does not stop on its own
    (a toy stage has no checkpoints) is cancelled once `run.preempt_grace_s` has passed, and the run
    says so and ends, marked terminated. (Training stages stop in time: tests/test_pretrain_resume.py.)"""
    cfg = toy_config(tmp_path, "run.preempt_grace_s=2", "b.steps=400", "b.sleep=0.1")
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    plan = plan_of(cfg)
    main, sent = threading.main_thread().ident, {}

    def terminate_once_b_runs():
        wait_for(lambda: (store.progress("b", plan["b"].work_key) or {}).get("step", 0) >= 3, 60, "b to run")
        sent["at"] = time.monotonic()
        signal.pthread_kill(main, signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_b_runs, daemon=True).start()
    outcome = run_pipeline(cfg, TOY_DAG)  # in the main thread, where the signal is handled
    took = time.monotonic() - sent["at"]
    assert outcome.terminated and not outcome.ok and "a" in outcome.results
    assert "did not stop within run.preempt_grace_s=2s of SIGTERM" in outcome.errors["b"]
    assert outcome.blocked["d"] == "not started: the run was stopped (SIGTERM)"
    assert 2 <= took < 30, took  # cancelled after the grace period, not when b would have finished
    assert store.check("b", plan["b"].fingerprint)[0] is None
    assert signal.getsignal(signal.SIGTERM) is before  # the handler before the run is back


def test_ctrl_c_stops_running_stages_and_leaves_no_artifact(tmp_path, ray_session):
    """SIGINT in the driver (Ctrl-C): running stages are cancelled, nothing half-written counts as an
    artifact, the outcome says interrupted, and the next run resumes the unfinished stages only."""
    cfg = toy_config(tmp_path, "b.steps=40", "b.sleep=0.1", "c.steps=40", "c.sleep=0.1")
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    plan = plan_of(cfg)
    main = threading.main_thread().ident

    def interrupt_once_b_runs():
        wait_for(lambda: (store.progress("b", plan["b"].work_key) or {}).get("step", 0) >= 3, 60, "b to run")
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt_once_b_runs, daemon=True).start()
    outcome = run_pipeline(cfg, TOY_DAG)  # in the main thread, where Ctrl-C lands
    assert outcome.interrupted and not outcome.ok
    assert "a" in outcome.results and not {"b", "c", "d"} & set(outcome.results)
    for name in ("b", "c", "d"):
        assert store.check(name, plan[name].fingerprint)[0] is None
    again = run_pipeline(cfg, TOY_DAG)
    assert again.ok and set(again.results) == {"b", "c", "d"}  # a is not re-run
