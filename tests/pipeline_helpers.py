"""Helpers of the tests that run stages of the real pipeline against the session's `tiny_run`:
find artifacts, read their metrics and weights, seed a fresh root with upstream artifacts, and start
`launch.py` in a subprocess that a test can kill."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import preemption
from pipeline.artifacts import ArtifactStore
from pipeline.config import PROJECT_ROOT
from pipeline.dag import PIPELINE
from pipeline.plan import Selection, make_plan

UPSTREAM = ("ingest", "tokenizer", "tokenize", "pretrain")


def plan_of(cfg, sel=None, deep=False) -> dict:
    """The pipeline's plan for `cfg`, by stage name (deep: every file's sha256 checked)."""
    store = ArtifactStore(str(cfg.run.root), cfg.run.name)
    return {p.name: p for p in make_plan(cfg, PIPELINE, store, sel or Selection(), deep=deep)}


def artifact(cfg, stage) -> Path:
    p = plan_of(cfg, Selection(until=stage))[stage]  # named: an opt-in stage that is off is planned too
    assert p.state == "complete", (stage, p.state, p.reason)
    return Path(p.path)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def copy_upstream(ref_cfg, cfg, stages=UPSTREAM) -> None:
    """The session run's upstream artifacts into cfg's root (the same fingerprints: nothing re-runs)."""
    ref = plan_of(ref_cfg)
    store = ArtifactStore(str(cfg.run.root), cfg.run.name)
    store.run_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        shutil.copytree(ref[stage].path, store.run_dir / Path(ref[stage].path).name, dirs_exist_ok=True)


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def registered_step(work_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered for a stage's worker group: what
    the group resumes from if a worker dies now (0: none yet). Ray Train registers a reported
    checkpoint when its controller next polls the workers, a few seconds later; a worker killed
    before that restarts the group from the checkpoint before. Read from the snapshot Ray Train keeps
    beside the checkpoints; the step from each checkpoint's trainer_state.json."""
    newest = 0
    for snapshot in Path(work_dir).glob("ray/*/checkpoint_manager_snapshot.json"):
        try:
            names = [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):  # being written
            continue
        for name in names:
            try:
                state = json.loads((snapshot.parent / name / "trainer_state.json").read_text())
            except (OSError, ValueError):  # deleted since (keep_last)
                continue
            # the step's name in trainer_state.json: pretrain's, ppo's, TRL's (sft, reward); TRL
            # reports its checkpoints without metrics, so the snapshot's own cannot say
            newest = max(newest, state.get("step", state.get("iteration", state.get("global_step", 0))))
    return newest


def reached(store: ArtifactStore, p, step: int, checkpoint: int = 0) -> bool:
    """Stage `p` (a plan entry) has reported step `step`, and Ray Train holds its checkpoint at
    `checkpoint` or later: the moment a kill test may strike."""
    prog = store.progress(p.name, p.work_key)
    work = store.work_dir(p.name, p.work_key)
    return (prog["step"] if prog else 0) >= step and (not checkpoint or registered_step(work) >= checkpoint)


def set_flags(overrides) -> list[str]:
    """Config overrides ("key=value", ...) as `launch.py` flags: ["--set", "key=value", ...]."""
    return [a for o in overrides for a in ("--set", o)]


def start_run(root: Path, ray_tmp: Path, log: Path, *selection: str) -> subprocess.Popen:
    """`launch.py run` as a user starts it (its own session, W&B offline, Ray's files under `ray_tmp`),
    with stage selection flags such as ("--only", "sft") or ("--until", "pretrain"); output to `log`."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "launch.py", "run", *selection, "--root", str(root), "--wandb", "offline"]
    return subprocess.Popen(
        cmd,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stopped_on_sigterm(proc: subprocess.Popen, log: Path, since: int, within: float) -> dict[str, int]:
    """Wait for a `start_run` process that was sent SIGTERM (or one of whose workers was): it must
    exit within `within` seconds with preemption.EXIT_CODE. Returns {stage: step} of the stages it
    says stopped with a checkpoint, read from what it printed after byte `since` of `log`."""
    started = time.monotonic()
    code = proc.wait(timeout=within)
    text = log.read_bytes()[since:].decode(errors="replace")
    assert code == preemption.EXIT_CODE, text[-4000:]
    print(f"\nSIGTERM: the run exited {time.monotonic() - started:.1f}s later")
    said = re.findall(
        r"(\w+): stopped\s+on\s+SIGTERM\s+with\s+its\s+checkpoint\s+saved\s+at\s+step\s+(\d+)", text
    )
    return {stage: int(step) for stage, step in said}


def kill_then_preempt(
    store: ArtifactStore,
    p,
    every: int,
    root: Path,
    log: Path,
    flags: list[str],
    grace: float,
    term_rank: int = 1,
) -> int:
    """Run stage `p` (a plan entry of a worker-group stage checkpointing every `every` steps) alone with
    `flags`: SIGKILL its rank 0 once Ray Train holds the checkpoint at `every`, so the group restarts
    from it; SIGTERM its rank `term_rank` between the next checkpoints, so the run saves that step and
    exits within `grace` seconds; then run it again to the end. Asserts the group was restarted (a new rank 0)
    and resumed from both checkpoints; returns the step the SIGTERM stopped at."""
    stage, work = p.name, store.work_dir(p.name, p.work_key)
    rank0 = work / "worker_pids" / "rank0"  # "pid node" of the rank
    ray_tmp = Path(f"/tmp/kiln-{stage}-resume-{os.getpid()}")
    proc = None
    try:
        proc = start_run(root, ray_tmp, log, "--only", stage, *flags)
        wait_for(
            lambda: reached(store, p, every + 1, every), 900, f"{stage}'s checkpoint at step {every}", proc
        )
        pid = int(rank0.read_text().split()[0])
        assert registered_step(work) == every  # not yet the next one
        os.kill(pid, signal.SIGKILL)

        def resumed() -> bool:
            said = store.log_path(stage).read_text()
            return f"resumed from its checkpoint at step {every}" in said and reached(store, p, every + 1)

        wait_for(resumed, 900, "the restarted group's next step", proc)
        since = log.stat().st_size
        os.kill(int((work / "worker_pids" / f"rank{term_rank}").read_text().split()[0]), signal.SIGTERM)
        stopped = stopped_on_sigterm(proc, log, since, grace)[stage]
        assert every < stopped < 2 * every, stopped  # between checkpoints
        proc = start_run(root, ray_tmp, log, "--only", stage, *flags)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert int(rank0.read_text().split()[0]) != pid  # the group was restarted, not left to finish
    said = store.log_path(stage).read_text()
    assert re.findall(rf"{stage}: resumed from its checkpoint at step (\d+)", said) == [
        str(every),
        str(stopped),
    ]
    return stopped
