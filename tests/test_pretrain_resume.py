"""Exact resume of pretraining: a worker killed before the first checkpoint, another after it,
then the driver itself, against an uninterrupted run of the same settings (fp32 on CPU: bitwise
equal losses, identical sample ids).

The run goes through `python launch.py run --until pretrain` in a subprocess with its own Ray, so
that the driver can be killed too. Its data stages' artifacts are copied from the reference run
(same fingerprints), so only pretraining runs; both are the preset cut to 60 steps
(`SHORT_PRETRAIN`), so that the test takes a third of the preset's pretraining time.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.dag import PIPELINE
from pipeline.plan import make_plan
from tests.conftest import SHORT_PRETRAIN
from tests.pipeline_helpers import reached, registered_step, set_flags, start_run, wait_for


def kill_leftovers(tmp: Path) -> None:
    """Ray processes that outlive a SIGKILLed driver are found by their unique temp dir."""
    subprocess.run(["pkill", "-9", "-f", str(tmp)], check=False)


@pytest.mark.timeout(1500)  # may build the session's tiny pipeline first
def test_killed_worker_and_killed_driver_resume_exactly(short_pretrain, tmp_path):
    ref_root, ref_cfg, _ = short_pretrain
    root, ray_tmp, log = tmp_path / "runs", Path(f"/tmp/kiln-resume-{os.getpid()}"), tmp_path / "run.log"
    cfg = load_config(overrides=[f"run.root={root}", *SHORT_PRETRAIN])
    store = ArtifactStore(str(root), cfg.run.name)
    ref_plan = {
        p.name: p for p in make_plan(ref_cfg, PIPELINE, ArtifactStore(str(ref_root), ref_cfg.run.name))
    }
    for stage in ("ingest", "tokenizer", "tokenize"):  # the same data: only pretraining runs
        shutil.copytree(ref_plan[stage].path, store.run_dir / Path(ref_plan[stage].path).name)
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, store)}
    assert [n for n, p in plan.items() if p.action == "run"] == ["pretrain", "sft", "reward", "ppo"]
    assert plan["pretrain"].fingerprint == ref_plan["pretrain"].fingerprint
    every = cfg.pretrain.checkpoint_every
    assert cfg.pretrain.steps == 3 * every
    kill_first_at = random.randint(3, every - 5)  # before any checkpoint: the group starts over
    kill_worker_at = random.randint(every + 3, 2 * every - 5)
    kill_driver_at = random.randint(2 * every + 3, 3 * every - 8)  # well before the end
    pre = plan["pretrain"]
    work = store.work_dir("pretrain", pre.work_key)
    pids = work / "worker_pids"
    args = ["--until", "pretrain", *set_flags(SHORT_PRETRAIN)]
    try:
        proc = start_run(root, ray_tmp, log, *args)
        wait_for(lambda: reached(store, pre, kill_first_at), 600, f"step {kill_first_at}", proc)
        first = int((pids / "rank1").read_text().split()[0])
        os.kill(first, signal.SIGKILL)  # Ray Train restarts the group, from step 0
        wait_for(lambda: reached(store, pre, kill_worker_at, every), 600, f"step {kill_worker_at}", proc)
        victim, held = int((pids / "rank1").read_text().split()[0]), registered_step(work)
        assert victim != first and held == every, (victim, first, held)
        os.kill(victim, signal.SIGKILL)  # Ray Train restarts the group from the last checkpoint
        wait_for(lambda: reached(store, pre, kill_driver_at, 2 * every), 600, f"step {kill_driver_at}", proc)
        assert registered_step(work) == 2 * every
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session
        proc.wait(timeout=30)
        kill_leftovers(ray_tmp)
        assert store.check("pretrain", plan["pretrain"].fingerprint)[0] is None  # no artifact yet

        proc = start_run(root, ray_tmp, log, *args)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    got = _rows(store.find("pretrain", plan["pretrain"].fingerprint).path)
    want = _rows(Path(ref_plan["pretrain"].path))
    assert [r["step"] for r in got] == list(range(1, cfg.pretrain.steps + 1))  # no step twice, none lost
    assert [r["batch_crc"] for r in got] == [r["batch_crc"] for r in want]  # the same sequences per step
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # fp32: bit for bit
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    said = store.log_path("pretrain").read_text()  # each kill took effect, the first before a checkpoint
    (dropped,) = re.findall(r"starting over \((\d+) metric rows of an earlier attempt dropped\)", said)
    assert kill_first_at - 1 <= int(dropped) < every
    resumes = re.findall(r"resumed from its checkpoint at step (\d+)", said)
    assert resumes == [str(every), str(2 * every)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
