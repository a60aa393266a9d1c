"""Pretraining under preemption and divergence, one plain process (tests/dist/single_rank.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import preemption
from tests.dist.common import tokens_dir

ROOT = Path(__file__).resolve().parent.parent


def start(out: Path, changes: dict, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port)}
    cmd = [sys.executable, str(ROOT / "tests/dist/single_rank.py"), str(out), json.dumps(changes)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_then_exits_and_the_run_resumes_exactly(tmp_path):
    tokens_dir(tmp_path)
    changes = {"steps": 30, "checkpoint_every": 1000}  # no scheduled checkpoint before the end
    reference = tmp_path / "reference"
    ref = start(reference, changes, 29571)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]

    run = tmp_path / "preempted"
    proc = start(run, changes, 29572)
    deadline = time.time() + 300
    while len(rows(run)) < 8:  # let it train a few steps, then preempt
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == preemption.EXIT_CODE  # it exits, and says where it stopped
    stopped = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert f"stopped on SIGTERM with its checkpoint saved at step {stopped}" in proc.stderr.read()
    assert 8 <= stopped < 30 and [r["step"] for r in rows(run)][-1] == stopped

    again = start(run, changes, 29573)  # the same folder: resumes from the preemption checkpoint
    assert again.wait(timeout=300) == 0, again.stderr.read()[-3000:]
    got, want = rows(run), rows(reference)
    assert [r["step"] for r in got] == list(range(1, 31))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # fp32: bit for bit


@pytest.mark.timeout(600)
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tokens_dir(tmp_path)
    run = tmp_path / "diverged"
    # lr 1e4 with clipping off blows the weights up within a few steps; checkpoints every step
    proc = start(run, {"steps": 50, "lr": 1e4, "min_lr": 1e4, "warmup_steps": 1, "grad_clip": 0.0,
                       "checkpoint_every": 1}, 29574)  # fmt: skip
    assert proc.wait(timeout=300) != 0
    err = proc.stderr.read()
    assert "FloatingPointError" in err and "non-finite loss" in err
    bad_step = int(err.split("at step ")[1].split(";")[0])
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == bad_step - 1  # the last good one, not the diverged step
    good = [r for r in rows(run) if r["step"] <= state["step"]]
    assert all(abs(r["loss"]) < float("inf") for r in good)
