"""What a stage gets from the runner: the only door from stage code to Ray.

A stage is `run(cfg, inputs, out, ctx) -> metrics`. Through `ctx` it can
    ctx.map(fn, items)                      run fn over items in parallel (Ray tasks, one per item, on
                                            any node: their files go through pipeline/units.py `Folder`)
    ctx.map_streams(fn, streams)            the same over the pieces of files read whole by one reader each
    ctx.place(rel, facts, source)           a file of the artifact a task wrote and hashed: not re-read
    ctx.discard(folder)                     a folder of units removed (`discard_when_committed`: once
                                            the artifact is committed)
    ctx.run_workers(train_fn, arg, scaling) run train_fn(arg, wctx) on a worker group (Ray Train)
    ctx.log(row) / ctx.progress(k, n)       metrics.jsonl + W&B / step k of n for `status`
and inside a worker, `wctx.report(metrics, checkpoint_dir)` and `wctx.checkpoint()`, then
`wctx.resumed_from(step)` or `wctx.started_fresh()` (metrics.jsonl is cut back accordingly).

`LocalContext` does all of this in-process (tests call stages directly with it); the Ray versions
live in pipeline/ray_context.py, so stage code never imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import preemption
from pipeline.files import write_json_atomic


@dataclass(frozen=True)
class Stream:
    """A file one reader must read whole, fanned out to tasks as it reads (`StageContext.map_streams`):
    `produce(arg)` is a generator that yields (key, data) pairs and returns a summary; each pair
    becomes a task fn(item(key), data), with `item` called on the driver."""

    produce: Callable
    arg: Any
    item: Callable[[Any], Any]


@dataclass(frozen=True)
class Scaling:
    """A worker group's shape: what each worker asks the cluster for."""

    num_workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    collective_timeout_s: float = 1800
    """How long a collective of the group's process group waits for the other ranks before it fails
    (Ray Train's default: 30 min; a stage's is its collective_timeout_min)."""

    @classmethod
    def of(cls, section) -> Scaling:
        """The group a training stage's config section asks for (num_workers, cpus_per_worker,
        gpus_per_worker, max_failures, keep_last, collective_timeout_min)."""
        return cls(
            num_workers=section.num_workers,
            cpus_per_worker=section.cpus_per_worker,
            gpus_per_worker=section.gpus_per_worker,
            max_failures=section.max_failures,
            checkpoints_to_keep=section.keep_last,
            collective_timeout_s=section.collective_timeout_min * 60,
        )

    def total(self) -> dict[str, float]:
        need = {
            "CPU": self.num_workers * self.cpus_per_worker,
            "GPU": self.num_workers * self.gpus_per_worker,
        }
        for k, v in self.resources_per_worker.items():
            need[k] = need.get(k, 0) + self.num_workers * v
        return {k: v for k, v in need.items() if v}


class MetricsLog:
    """metrics.jsonl of a stage in progress (in its work dir): appended, cut back on resume.

    Every row carries `time`, the wall clock (time.time()) when it was written: a worker's row is
    written as it arrives from the worker (rank 0 reports it at the end of its step), so a stage's
    training rows date its steps. A row that already has a `time` keeps it. W&B gets the row without
    it (W&B stamps its own). Resumes keep the rows before the checkpoint as they were, times included."""

    def __init__(self, path: Path, tracker=None):
        self.path, self.tracker = path, tracker
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        row.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in row.items() if k != "time"})

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, last_step: int) -> None:
        """Drop rows after `last_step` (the checkpoint resumed from), so no step appears twice."""
        self._rewrite([r for r in self.rows() if r.get("step", -1) <= last_step])

    def clear(self) -> None:
        """Drop every row: the stage starts over from step 0."""
        if self.path.exists():
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.path)


def thread_env(num_cpus: float) -> dict[str, str]:
    """The environment of a task given `num_cpus` cores: its thread pools that many threads wide (at
    least one). tokenizers' rayon pool and OpenMP read these once, when they start, and would
    otherwise be as wide as the machine: tasks side by side on one node would oversubscribe it."""
    n = str(max(1, math.ceil(num_cpus)))
    return {"RAYON_NUM_THREADS": n, "OMP_NUM_THREADS": n}


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):  # tensors and numpy scalars
        return v.item()
    return v


class StageContext:
    """Everything a stage may ask of the runner. This base runs everything in-process."""

    MIRROR_EVERY_S = 2.0
    """On an object-store root, the work dir's state files are copied there at most this often
    (and at every checkpoint and at the end)."""

    def __init__(
        self, stage: str, work_dir: Path, tracker=None, logger: logging.Logger | None = None,
        store=None, work_key: str | None = None, inputs: dict[str, str] | None = None, layout: dict | None = None,
    ):  # fmt: skip
        self.stage = stage
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        self.metrics = MetricsLog(self.work_dir / "metrics.jsonl", tracker)
        self.logger = logger or logging.getLogger(f"kiln.{stage}")
        self.store, self.work_key, self.inputs = store, work_key, dict(inputs or {})
        self.layout = dict(layout or {})  # the placement a checkpoint is tied to, recorded beside it
        self._mirrored = 0.0
        self.placed: dict[str, dict] = {}  # files of the artifact the tasks wrote (`place`)
        self._after_commit: list = []  # folders of units to remove once committed
        saved = _saved_progress(self.work_dir / "progress.json")  # an earlier attempt's, if any
        self._step, self._total = 0, saved.get("total", 0)  # the last progress reported
        self._checkpoint = saved.get("checkpoint")  # the step of the last checkpoint saved
        self._checkpoint_layout = saved.get("layout")  # what it was saved under (unknown if older)

    @property
    def shared_work(self) -> bool:
        """False when the work dir is a node-local cache of an object-store root."""
        return self.store is None or not self.store.remote

    def mirror(self, force: bool = False) -> None:
        """Copy progress.json / metrics.jsonl to an object-store root (throttled unless forced)."""
        if self.shared_work or (not force and time.time() - self._mirrored < self.MIRROR_EVERY_S):
            return
        self._mirrored = time.time()
        try:
            self.store.save_work(self.stage, self.work_key)
        except OSError as e:
            self.logger.warning("could not copy the work state to %s: %s", self.store.root, e)

    def place(self, rel: str, facts: dict, source: str | None = None) -> None:
        """A file of the artifact that a task wrote and hashed ({size, sha256}): the commit takes
        those facts instead of reading it again. `source`: where it is in an object-store root
        (pipeline/units.py `Folder.root_rel`), copied there into the artifact; None: it is in the
        staging folder as `rel` already (a local or shared root)."""
        self.placed[rel] = {
            "size": facts["size"],
            "sha256": facts["sha256"],
            **({"source": source} if source else {}),
        }

    def discard(self, folder) -> None:
        """Remove a folder of units (pipeline/units.py `Folder`) the stage is done with: in the root
        and on this node (on Ray also on every other node, whose caches hold what its tasks wrote
        or fetched there)."""
        folder.discard()

    def discard_when_committed(self, folder) -> None:
        """Remove a folder of units once the artifact is committed (pipeline/execute.py): one whose
        files the commit copies from an object-store root (`place` with a source). On a local or shared
        root at once: the artifact holds its own links or copies already. On an object store the folder
        is noted in the shared work dir first, so that the next run removes it should the driver die
        between the commit and the removal (pipeline/units.py `note_after_commit`)."""
        from pipeline import units

        if self.shared_work:
            self.discard(folder)
            return
        self._after_commit.append(folder)
        units.note_after_commit(self.store, self.stage, self.work_key, self._after_commit)

    def committed(self) -> None:
        """The artifact is committed: remove the folders `discard_when_committed` kept, then their note
        (a failure is only logged: the note stays, and the next run removes them)."""
        from pipeline import units

        if not self._after_commit:
            return
        try:
            for folder in self._after_commit:
                self.discard(folder)
            self.store.delete_work_file(self.stage, self.work_key, units.AFTER_COMMIT)
        except OSError as e:
            self.logger.warning("%s: could not remove work files after the commit: %s", self.stage, e)
        self._after_commit.clear()

    # -- fan-out ------------------------------------------------------------------------------

    def map(
        self, fn: Callable, items: Iterable, *, num_cpus: float = 1, progress: tuple[int, int] | None = None
    ) -> list:
        """fn(item) for each item, results in item order; on Ray each a task holding `num_cpus`
        cores, its thread pools that wide (`thread_env`), on whichever node has them. Each item that
        finishes is a step of the stage's progress: of len(items), or with `progress=(done, total)`
        (a stage that resumes, or maps more than once) step done + k of total.

        A task may run on another node than the driver: on an object-store root its files go through
        the root (pipeline/units.py `Folder`), not through the work dir or the staging folder, which
        are local to the driver's node there. An item with an `on_node` (on Ray: the node that holds
        what its task reads) runs there if that node has a free core, elsewhere if not."""
        items = list(items)
        done, total = progress or (0, len(items))
        results = []
        for item in items:
            results.append(fn(item))
            self.progress(done + len(results), total, unit="units")
        return results

    def map_streams(
        self, fn: Callable, streams: list[Stream], *, num_cpus: float = 1, progress: tuple[int, int] = (0, 0)
    ) -> list[tuple[list, Any]]:
        """For each stream, its producer run as one task that reads while the tasks it feeds work:
        fn(stream.item(key), data) for each (key, data) it yields, each a task as `map`'s (on Ray
        the data goes through the object store, not the driver). Returns per stream ([(key, result)]
        in the order yielded, the producer's summary). Progress: each pair adds a unit to `progress`'s
        total when it is yielded, and a step when its task is done. Memory on Ray: the data of at most
        as many pairs as the cluster has room for tasks, and about two more per reader, exist at
        once; a reader runs for every 16 of those tasks (pipeline/ray_context.py `READERS_PER_TASK`)."""
        done, total = progress
        out = []
        for stream in streams:
            gen, results = stream.produce(stream.arg), []
            while True:
                try:
                    key, data = next(gen)
                except StopIteration as end:
                    out.append((results, end.value))
                    break
                total += 1
                (result,) = self.map(
                    _WithData(fn, data), [stream.item(key)], num_cpus=num_cpus, progress=(done, total)
                )
                results.append((key, result))
                done += 1
        return out

    def run_workers(self, train_fn: Callable, arg: Any, scaling: Scaling) -> list:
        """train_fn(arg, wctx) on each worker; returns each rank's return value (rank order).

        In-process only one worker can run; multi-worker groups need the Ray context
        (or torchrun, which sets up its own process group: see `worker_from_env`)."""
        if scaling.num_workers != 1:
            raise RuntimeError(f"LocalContext runs 1 worker, {scaling.num_workers} were asked for")
        with preemption.handling():  # SIGTERM to this process: save the current step and stop
            return [train_fn(arg, LocalWorkerContext(self))]

    # -- reporting ------------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        self.metrics.write(row)
        self.mirror()

    def resumed(self, step: int) -> None:
        """A worker group resumed from its checkpoint at `step`: say so, and cut the metrics back to it."""
        self.logger.info("%s: resumed from its checkpoint at step %d", self.stage, step)
        self.metrics.truncate(step)
        self._checkpoint, self._checkpoint_layout = step, self.layout  # it loaded: the layouts agree

    def started_fresh(self) -> None:
        """A worker group found no checkpoint and starts from step 0: rows an earlier attempt logged
        (killed before its first checkpoint, or before Ray Train registered it) are dropped."""
        dropped = len(self.metrics.rows())
        if dropped:
            self.logger.info(
                "%s: no checkpoint to resume from: starting over "
                "(%d metric rows of an earlier attempt dropped)", self.stage, dropped,
            )  # fmt: skip
        self.metrics.clear()  # not truncate(0): that would keep rows logged at step 0
        if dropped or self._checkpoint is not None:  # status and planning: step 0, no checkpoint
            self._checkpoint = None
            self.progress(0, self._total)

    def checkpointed(self, step: int | None = None) -> None:
        """Rank 0's checkpoint of `step` (default: the step it last reported progress for) is stored.
        progress.json keeps that step, so that planning can refuse a budget lowered below it before
        anything starts."""
        self._checkpoint, self._checkpoint_layout = self._step if step is None else step, self.layout
        self.progress(self._step, self._total)

    def progress(self, step: int, total: int, **extra) -> None:
        self._step, self._total = step, total
        saved = {}
        if self._checkpoint is not None:  # planning refuses a resume under another layout
            saved = {"checkpoint": self._checkpoint, "layout": self._checkpoint_layout}
        write_json_atomic(
            self.work_dir / "progress.json",
            {"step": step, "total": total, "time": time.time(), **saved, **extra},
        )
        self.mirror()

    def finalize_metrics(self, out: Path) -> None:
        """Copy the metrics logged so far into the artifact folder."""
        self.mirror(force=True)
        if self.metrics.path.exists():
            (out / "metrics.jsonl").write_bytes(self.metrics.path.read_bytes())


LocalContext = StageContext


class _WithData:
    """fn(item, data) as a function of the item (`map_streams` in-process hands each pair to `map`)."""

    def __init__(self, fn: Callable, data: Any):
        self.fn, self.data, self.__name__ = fn, data, fn.__name__

    def __call__(self, item):
        return self.fn(item, self.data)


def _saved_progress(progress: Path) -> dict:
    """What an earlier attempt of the stage last wrote to progress.json ({} if nothing)."""
    try:
        return json.loads(progress.read_text())
    except (OSError, ValueError):
        return {}


class WorkerContext:
    """A training worker's view: its rank, and report/checkpoint like Ray Train's."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def report(self, metrics: dict | None = None, checkpoint_dir: Path | None = None) -> None:
        """A metrics row (rank 0's is logged) and/or this rank's checkpoint folder, which the context
        then owns: it is stored (on Ray, uploaded in the background) and deleted."""
        raise NotImplementedError

    def checkpoint(self, every_rank: bool = False) -> Path | None:
        """The folder of the latest reported checkpoint to resume from, or None on a fresh start.
        From an object store only what this rank reads is fetched (kiln/reshard.py `rank_files`),
        or every rank's files with `every_rank` (to convert it to another world size)."""
        raise NotImplementedError

    def resumed_from(self, step: int) -> None:
        """Tell the stage which step a resume starts after (metrics after it are cut)."""
        raise NotImplementedError

    def started_fresh(self) -> None:
        """Tell the stage there was no checkpoint: it starts from step 0 (every metric row is cut).
        A stage calls either this or `resumed_from` once, before it logs anything."""
        raise NotImplementedError

    def progress(self, step: int, total: int, **extra) -> None:
        """Step k of n, shown by `status` and the progress display (rank 0 only). Call it before
        reporting the checkpoint of step k: that checkpoint is recorded as step k's."""
        raise NotImplementedError

    def stop_requested(self) -> bool:
        """This rank has been asked to stop (SIGTERM to its process, or to the run's driver): the
        loop adds it to its per-step all-reduce, so that every rank saves the same step and returns
        {preemption.STOPPED: step} (pipeline/preemption.py)."""
        return preemption.asked()


class EnvWorkerContext(WorkerContext):
    """A rank started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment), without Ray:
    metrics go to `folder/metrics.jsonl` from rank 0; every rank copies its checkpoint shard into
    `folder/checkpoint`, as Ray Train merges them. Used by bench/ and the GPU checks."""

    def __init__(self, folder: Path):
        import os

        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.folder / "metrics.jsonl")
        preemption.install()  # torchrun runs each rank's loop in its main thread

    def report(self, metrics=None, checkpoint_dir=None):
        import shutil

        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.folder / "checkpoint", dirs_exist_ok=True)
            shutil.rmtree(checkpoint_dir)
        if metrics and self.rank == 0:
            self.metrics.write(metrics)

    def checkpoint(self, every_rank=False):
        found = self.folder / "checkpoint"
        return found if (found / "trainer_state.json").exists() else None

    def resumed_from(self, step):
        if self.rank == 0:
            self.metrics.truncate(step)

    def started_fresh(self):
        if self.rank == 0:
            self.metrics.clear()

    def progress(self, step, total, **extra):
        pass


class LocalWorkerContext(WorkerContext):
    """Single in-process worker: metrics go straight to the stage's log; checkpoints are copied
    into the stage's work dir, the latest one kept, as Ray Train does with its storage path."""

    def __init__(self, stage_ctx: StageContext):
        self.stage_ctx = stage_ctx
        self.ckpt_root = stage_ctx.work_dir / "local_checkpoints"

    def report(self, metrics=None, checkpoint_dir=None):
        import shutil

        if checkpoint_dir is not None:
            dest = self.ckpt_root / f"checkpoint_{time.time_ns()}"
            shutil.copytree(checkpoint_dir, dest)
            shutil.rmtree(checkpoint_dir)
            for old in sorted(self.ckpt_root.glob("checkpoint_*"))[:-1]:
                shutil.rmtree(old)
        if metrics:
            self.stage_ctx.log(metrics)
        if checkpoint_dir is not None:
            self.stage_ctx.checkpointed()

    def checkpoint(self, every_rank=False):
        found = sorted(self.ckpt_root.glob("checkpoint_*"))
        return found[-1] if found else None

    def resumed_from(self, step):
        self.stage_ctx.resumed(step)

    def started_fresh(self):
        self.stage_ctx.started_fresh()

    def progress(self, step, total, **extra):
        self.stage_ctx.progress(step, total, **extra)
