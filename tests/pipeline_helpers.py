"""Helpers of the tests that run stages of the real pipeline against the session's `tiny_run`:
find artifacts, read their metrics and weights, seed a fresh root with upstream artifacts, and start
`launch.py` in a subprocess that a test can kill."""

from __future__ import annotations

import json
import os
import re
import shutil
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
