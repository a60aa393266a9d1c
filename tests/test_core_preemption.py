"""What a node that is about to go does before it stops Ray (`python -m pipeline.preemption`, the
KubeRay recipe's preStop hook): SIGTERM to its training workers, then wait for them to exit, for at
most the grace period. Processes titled as Ray Train workers stand in for them here; the training
workers' own reaction (save the current step, stop) is tested with the real stages
(tests/test_pretrain_resume.py, tests/test_sft_reward.py, tests/test_ppo.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pipeline import preemption

# a worker that takes a moment to save after SIGTERM, then exits; one that ignores SIGTERM
SAVES = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(0))); print('up', flush=True); time.sleep(60)"
IGNORES = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def start(title: str, code: str) -> subprocess.Popen:
    proc = subprocess.Popen([title, "-c", code], executable=sys.executable, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"  # its handler is installed
    return proc


def test_a_stopping_node_signals_its_training_workers_and_waits_for_them():
    title = f"ray::RayTrainWorker-test-{os.getpid()}"
    workers = [start(title, SAVES), start(title, SAVES)]
    other = start(f"ray::SomethingElse-test-{os.getpid()}", SAVES)
    try:
        assert preemption.training_workers(title) == sorted(w.pid for w in workers)
        started = time.monotonic()
        assert preemption.stop_training_workers(60, title) == (2, 0)  # both signalled, both gone
        assert 0.5 <= time.monotonic() - started < 30  # it waited for them to save, not the whole grace
        assert [w.wait(timeout=5) for w in workers] == [0, 0]
        assert other.poll() is None  # not a training worker: left alone
    finally:
        for p in (*workers, other):
            p.kill()
            p.wait()


def test_the_wait_ends_at_the_grace_period_with_what_still_runs():
    title = f"ray::RayTrainWorker-stuck-{os.getpid()}"
    stuck = start(title, IGNORES)
    try:
        started = time.monotonic()
        assert preemption.stop_training_workers(1.0, title) == (1, 1)
        assert 1.0 <= time.monotonic() - started < 10
        assert stuck.poll() is None
    finally:
        stuck.kill()
        stuck.wait()


def test_an_in_process_training_loop_notes_sigterm_and_puts_the_handler_back():
    """A stage run in-process (LocalContext) notes SIGTERM while its loop runs, instead of dying of
    it, so the loop saves and stops; the process's own handler is back afterwards."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        with preemption.handling():
            assert not preemption.asked()
            signal.raise_signal(signal.SIGTERM)
            assert preemption.asked()  # noted; the process lives on
        assert signal.getsignal(signal.SIGTERM) is before
        with preemption.handling():  # the next block (a new run) starts with it forgotten
            assert not preemption.asked()
    finally:
        preemption.reset()  # this test process was not asked to stop: later tests must not see it
