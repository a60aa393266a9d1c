"""Preemption: SIGTERM (a spot reclaim, a pod eviction, `scancel`) asks the running training stages to
save a checkpoint at their current step and stop; the next run resumes there.

How the signal reaches every rank of a worker group, whoever receives it:
- the driver (`launch.py run`): its handler notes the signal and the run loop sets the run's stop
  flag, which rank 0 of each worker group reads at the end of a step (`WorkerContext.stop_requested`);
- a worker process: its own handler notes it. Ray Train runs the training loop in a thread of the
  worker's process, and handlers can only be installed from the main thread, so the worker context
  installs it there (pipeline/ray_context.py);
- each rank then adds its "asked to stop" to the all-reduce it makes every step anyway, so all ranks
  see the same answer after the same step, save that step's checkpoint and return `stopped_at`.
The stage raises `Preempted` with the step; the driver waits at most `run.preempt_grace_s` for the
running stages to get there, then exits with `EXIT_CODE`, saying where each stopped.

SIGTERM to a node's Ray processes (the raylet) takes that node's workers down at once (measured: the
worker was gone within 0.2 s, its own handler never ran): those ranks cannot save, and their group
resumes from its last periodic checkpoint. So a node that is about to go signals its training
workers first and waits for them (`python -m pipeline.preemption`, the KubeRay recipe's preStop
hook), and only then stops Ray.

    python -m pipeline.preemption [--grace 60]   # SIGTERM this machine's training workers, wait for them
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import threading
import time
from pathlib import Path

EXIT_CODE = 143
"""`launch.py run`'s exit status when it stopped on SIGTERM (128 + 15, as a shell reports a process
the signal ended): a scheduler's requeue can tell it from a failure (1)."""

STOPPED = "stopped_at"
"""The key of a worker's result that says it stopped early, at that step, with a checkpoint saved."""

_asked_at: float | None = None  # time.monotonic() of this process's first SIGTERM since `reset`


class Preempted(RuntimeError):
    """A stage stopped on request with its checkpoint saved at `step`: the next run resumes there."""

    def __init__(self, stage: str, step: int):
        super().__init__(
            f"{stage}: stopped on SIGTERM with its checkpoint saved at step {step}; run the same command "
            "again to resume from there"
        )
        self.stage, self.step = stage, step

    def __reduce__(self):  # crosses process boundaries (a Ray task's error) with its fields
        return Preempted, (self.stage, self.step)


def install() -> bool:
    """Note SIGTERM in this process instead of dying of it. Only from the main thread (False elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _note)
    return True


@contextlib.contextmanager
def handling():
    """`install` for the length of a block (a training loop run in-process), the handler before it
    put back afterwards. The block starts with any earlier SIGTERM forgotten, also in a thread other
    than the main one (which cannot install the handler, but must not act on a stale note either)."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    install()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _note(signum, frame) -> None:
    global _asked_at
    if _asked_at is None:
        _asked_at = time.monotonic()


def asked() -> bool:
    """This process has received SIGTERM since `install`."""
    return _asked_at is not None


def asked_at() -> float | None:
    """When (time.monotonic()) this process first received SIGTERM, or None."""
    return _asked_at


def reset() -> None:
    """Forget an earlier SIGTERM (a long-lived process starting a new run)."""
    global _asked_at
    _asked_at = None


class Throttled:
    """`check()` at most once every `every_s` seconds (a remote flag read costs a round trip);
    the answer sticks once it is True."""

    def __init__(self, check, every_s: float = 1.0):
        self._check, self._every, self._next, self._seen = check, every_s, 0.0, False

    def __call__(self) -> bool:
        if not self._seen and time.monotonic() >= self._next:
            self._seen = bool(self._check())
            self._next = time.monotonic() + self._every
        return self._seen


TRAIN_WORKER = "ray::RayTrainWorker"
"""The title Ray gives a Ray Train worker's process (its command line as `ps` shows it)."""


def training_workers(title: str = TRAIN_WORKER, proc: Path = Path("/proc")) -> list[int]:
    """The pids of this machine's processes whose command line starts with `title` (Ray Train workers)."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title.encode()):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return sorted(found)


def stop_training_workers(grace_s: float, title: str = TRAIN_WORKER) -> tuple[int, int]:
    """SIGTERM to every Ray Train worker process on this machine (each saves its group's checkpoint at
    the current step and stops, pipeline/ray_context.py), then wait until they have exited or `grace_s`
    has passed. Returns (signalled, still running)."""
    waiting = {}
    for pid in training_workers(title):
        try:
            fd = os.pidfd_open(pid)  # signalled and waited for through it: a pid reused later is not ours
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
            waiting[fd] = pid
        except ProcessLookupError:  # exited meanwhile
            os.close(fd)
    signalled = len(waiting)
    poll, deadline = select.poll(), time.monotonic() + grace_s
    for fd in waiting:
        poll.register(fd, select.POLLIN)  # readable once the process has exited
    while waiting and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poll.poll(left * 1000):
            poll.unregister(fd)
            os.close(fd)
            del waiting[fd]
    for fd in waiting:
        os.close(fd)
    return signalled, len(waiting)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.preemption",
        description="Before a node stops Ray (a pod eviction, a spot reclaim): SIGTERM its training "
        "workers, which save a checkpoint at their current step, and wait for them to exit.",
    )
    parser.add_argument("--grace", type=float, default=60.0, help="seconds to wait at most (default 60)")
    args = parser.parse_args(argv)
    signalled, left = stop_training_workers(args.grace)
    print(f"kiln: SIGTERM to {signalled} training worker(s); {left} still running after the wait")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(main())
