"""Exact resume of pretraining: a worker killed before the first checkpoint, SIGTERM to the driver
and to a worker, the driver killed after the second checkpoint and the rest trained on another number
of workers, against an uninterrupted run of the same settings (fp32 on CPU: bitwise equal losses on
the same workers, identical sample ids).

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
from tests.pipeline_helpers import reached, set_flags, start_run, stopped_on_sigterm, wait_for


def kill_leftovers(tmp: Path) -> None:
    """Ray processes that outlive a SIGKILLed driver are found by their unique temp dir."""
    subprocess.run(["pkill", "-9", "-f", str(tmp)], check=False)


@pytest.mark.heavy  # ~8 min on 2 cores with its reference; test_pretrain_failures and test_reshard stay in CI
@pytest.mark.timeout(1500)  # may build the session's tiny pipeline first
def test_kills_and_sigterms_resume_exactly_and_on_another_worker_count(short_pretrain, tmp_path):
    """One pretraining run (2 workers, fp32, checkpoints every 20 steps) through everything that can
    stop it: a worker SIGKILLed before the first checkpoint (the group starts over), SIGTERM to the
    driver and then to a worker between checkpoints (the run saves that step and exits; the next run
    resumes there), the driver SIGKILLed after the second checkpoint, and a last run on ONE worker,
    which resumes from that checkpoint. Against the uninterrupted 2-worker run: every step once, the
    same sequences, bitwise equal losses up to the second checkpoint and within 1e-4 after it."""
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
    every, grace = cfg.pretrain.checkpoint_every, cfg.run.preempt_grace_s
    assert cfg.pretrain.steps == 3 * every
    kill_first_at = random.randint(3, every - 5)  # before any checkpoint: the group starts over
    term_driver_at = random.randint(every + 2, every + 6)  # no periodic checkpoint due
    pre = plan["pretrain"]
    work = store.work_dir("pretrain", pre.work_key)
    pids = work / "worker_pids"
    args = ["--until", "pretrain", *set_flags(SHORT_PRETRAIN)]
    stops = []
    try:
        proc = start_run(root, ray_tmp, log, *args)
        wait_for(lambda: reached(store, pre, kill_first_at), 600, f"step {kill_first_at}", proc)
        first = int((pids / "rank1").read_text().split()[0])
        os.kill(first, signal.SIGKILL)  # Ray Train restarts the group, from step 0
        wait_for(lambda: reached(store, pre, term_driver_at, every), 600, f"step {term_driver_at}", proc)
        since = log.stat().st_size
        proc.send_signal(signal.SIGTERM)  # the driver only: it tells the workers
        stops.append(stopped_on_sigterm(proc, log, since, grace)["pretrain"])
        assert term_driver_at <= stops[-1] < 2 * every - 3, stops

        proc = start_run(root, ray_tmp, log, *args)  # resumes there; then SIGTERM to one worker
        wait_for(lambda: reached(store, pre, stops[0] + 2), 600, f"step {stops[0] + 2} again", proc)
        victim = int((pids / "rank1").read_text().split()[0])
        since = log.stat().st_size
        os.kill(victim, signal.SIGTERM)
        stops.append(stopped_on_sigterm(proc, log, since, grace)["pretrain"])
        assert stops[0] < stops[1] < 2 * every, stops

        proc = start_run(root, ray_tmp, log, *args)
        wait_for(lambda: reached(store, pre, 2 * every + 3, 2 * every), 600, f"step {2 * every + 3}", proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session
        proc.wait(timeout=30)
        kill_leftovers(ray_tmp)
        assert store.check("pretrain", plan["pretrain"].fingerprint)[0] is None  # no artifact yet

        one = [*args, "--set", "pretrain.num_workers=1"]  # placement: the same stage, continued
        proc = start_run(root, ray_tmp, log, *one)
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
    two = 2 * every  # up to the second checkpoint: 2 workers throughout, fp32: bit for bit
    assert [r["loss"] for r in got[:two]] == [r["loss"] for r in want[:two]]
    assert [r.get("val_loss") for r in got[:two]] == [r.get("val_loss") for r in want[:two]]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got[two:], want[two:], strict=True))
    print(f"\nresumed on 1 worker instead of 2: largest per-step loss difference {worst:.2e}")
    assert worst <= 1e-4
    said = store.log_path("pretrain").read_text()  # each kill took effect, the first before a checkpoint
    (dropped,) = re.findall(r"starting over \((\d+) metric rows of an earlier attempt dropped\)", said)
    assert kill_first_at - 1 <= int(dropped) < every
    resumes = re.findall(r"resumed from its checkpoint at step (\d+)", said)
    assert resumes == [str(stops[0]), str(stops[1]), str(two)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
