"""The stage context on Ray: tasks for `ctx.map`, a Ray Train worker group for `ctx.run_workers`.

`ctx.map`'s tasks go wherever the cluster has free cores, whatever the root: on an object-store
root they write their files to the root themselves (pipeline/units.py `Folder`) and return only
small results to the driver.

Metrics from rank 0 of a worker group travel to the stage's driver over a Ray queue, so the stage
keeps one metrics.jsonl and one W&B run wherever its workers are placed. Checkpoints go through
`ray.train.report`, so `FailureConfig(max_failures)` restarts a dead group from the last one, and a
re-run with the same name and storage path (the stage's work dir) resumes from it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipeline import preemption
from pipeline.context import Scaling, StageContext, WorkerContext, thread_env
from pipeline.files import is_remote

log = logging.getLogger("kiln.ray")


@ray.remote(num_cpus=0)
class StopFlag:
    """The run's "stop now": set when its driver receives SIGTERM (pipeline/runner.py), read by rank 0
    of every worker group (pipeline/preemption.py). One per run, found by name (`stop_flag_name`)."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def stop_flag_name() -> str:
    """The run's StopFlag: named after the driver's Ray job, to which its stage tasks belong too."""
    return f"kiln-stop-{ray.get_runtime_context().get_job_id()}"


def _stop_flag():
    """The run's StopFlag, or None (a stage run by a test without the runner has none)."""
    try:
        return ray.get_actor(stop_flag_name())
    except ValueError:
        return None


def _here():
    """Scheduling strategy: on this process's node, nowhere else."""
    return _on(ray.get_runtime_context().get_node_id())


def _on(node_id: str):
    """Scheduling strategy: on that node, nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def _near(node_id: str):
    """Scheduling strategy: on that node if it is alive and has the resources free, else anywhere."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True, _spill_on_unavailable=True)


READERS_PER_TASK = 1 / 16
"""`map_streams`: readers at once per task that fits on the cluster (at least one)."""


@dataclass(frozen=True)
class _End:
    summary: Any


def _pairs(produce, arg):
    """A producer's (key, data) pairs as a stream of objects: key, data, key, data, ..., then its
    summary as `_End`, so the driver reads each key without fetching its data."""
    gen = produce(arg)
    while True:
        try:
            pair = list(next(gen))
        except StopIteration as end:
            yield _End(end.value)
            return
        yield pair[0]
        yield pair.pop()  # held by nothing here once stored: the generator keeps no block while paused


def _discard_here(folder) -> None:
    """This node's copy of a folder of units (pipeline/units.py), removed."""
    from pipeline import units

    units.discard(folder.local())


class RayStageContext(StageContext):
    def map(self, fn, items, *, num_cpus: float = 1, progress: tuple[int, int] | None = None):
        items = list(items)
        done, total = progress or (0, len(items))
        # tokenizers' and OpenMP's threads: the task's cores, not the node's
        options: dict = {"runtime_env": {"env_vars": thread_env(num_cpus)}}
        # wherever the cluster has the cores: on an object-store root the tasks read and write
        # through the root (pipeline/units.py `Folder`), not through this node's work dir
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)  # retried if a node dies
        refs = [  # near the node that holds its input, when the item names one (`on_node`)
            task.options(**options, scheduling_strategy=_near(node)).remote(item)
            if (node := getattr(item, "on_node", None))
            else task.options(**options).remote(item)
            for item in items
        ]
        index = {ref: i for i, ref in enumerate(refs)}
        results, pending = [None] * len(refs), list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[index[ready[0]]] = ray.get(ready[0])
            self.progress(done + len(refs) - len(pending), total, unit="units")
        return results

    def map_streams(self, fn, streams, *, num_cpus: float = 1, progress: tuple[int, int] = (0, 0)):
        done, total = progress
        options: dict = {"runtime_env": {"env_vars": thread_env(num_cpus)}}
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        # A reader holds no core: it mostly waits for its pairs to be taken, and with cores, readers
        # could hold them all while their tasks wait for one. It runs ahead by one pair (two objects:
        # key, then data) and holds about two blocks meanwhile. Decompressing is ~100x faster than
        # what a task does with a block, so one reader feeds many tasks: READERS_PER_TASK of the
        # tasks that fit on the cluster (`window`, as many blocks in flight) read at once.
        produce = ray.remote(
            num_cpus=0, max_retries=0, num_returns="streaming", _generator_backpressure_num_objects=2
        )(_pairs)
        window = max(1, int(ray.cluster_resources().get("CPU", 1) // max(num_cpus, 1e-3)))
        waiting = list(enumerate(streams))
        readers: dict = {}  # generator -> its stream, in the order they are served (oldest first)
        results: list[list] = [[] for _ in streams]
        summaries: list = [None] * len(streams)
        running: dict = {}  # task ref -> (stream, its index in results)
        try:
            while waiting or readers or running:
                while waiting and len(readers) < max(1, math.ceil(window * READERS_PER_TASK)):
                    j, s = waiting.pop(0)
                    readers[produce.remote(s.produce, s.arg)] = j
                waitable = list(running) + (list(readers) if len(running) < window else [])
                (ready,), _ = ray.wait(waitable, num_returns=1)
                if ready in running:
                    j, at = running.pop(ready)
                    results[j][at] = (results[j][at][0], ray.get(ready))
                    done += 1
                    self.progress(done, total, unit="units")
                    continue
                j = readers.pop(ready)
                try:
                    head = ray.get(next(ready))
                except StopIteration:
                    continue  # the reader is through (its summary came before)
                readers[ready] = j  # served last next time: the readers take turns
                if isinstance(head, _End):
                    summaries[j] = head.summary
                    continue
                data = next(ready)  # its data, right behind: passed on to the task, not fetched here
                running[task.options(**options).remote(streams[j].item(head), data)] = (j, len(results[j]))
                results[j].append((head, None))
                total += 1
                self.progress(done, total, unit="units")
        finally:  # a failure: nothing left running
            for ref in [*readers, *running]:
                ray.cancel(ref)
        return list(zip(results, summaries, strict=True))

    def discard(self, folder) -> None:
        super().discard(folder)
        if not folder.remote:
            return
        here = ray.get_runtime_context().get_node_id()
        task = ray.remote(num_cpus=0, max_retries=0)(_discard_here)
        refs = [
            task.options(scheduling_strategy=_on(n["NodeID"])).remote(folder)
            for n in ray.nodes()
            if n["Alive"] and n["NodeID"] != here
        ]
        try:
            ray.get(refs, timeout=300)
        except Exception as e:  # noqa: BLE001 - a node gone meanwhile: only its cache stays
            self.logger.warning("%s: could not empty every node's copy of %s: %s", self.stage, folder.rel, e)

    def run_workers(self, train_fn, arg, scaling: Scaling):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        # the queue lives beside this driver: a worker node that goes away must not take it along
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": _here()})
        use_gpu = scaling.gpus_per_worker > 0
        where = _Placement(
            root=self.store.root if self.store else None, run=self.store.run if self.store else None,
            stage=self.stage, work_key=self.work_key, inputs=self.inputs, work_dir=str(self.work_dir),
            driver_node=ray.get_runtime_context().get_node_id(),
            driver_run_dir=str(self.store.run_dir) if self.store else None,
        )  # fmt: skip
        if not self.shared_work:
            self.store.files.delete_tree(where.outbox)  # nothing left from an earlier attempt
        storage_path, storage_fs = (
            self.store.train_storage(self.stage, self.work_key)
            if self.store
            else (str(self.work_dir / "ray"), None)
        )

        stop_flag = _stop_flag()

        def loop(_config):
            wctx = RayWorkerContext(queue, stop_flag)
            started = time.time()
            where.announce(wctx)
            local_arg, node_work = where.localize(arg, wctx.node_id)
            try:
                result = train_fn(local_arg, wctx)
            finally:
                wctx.remove_fetched()
            if node_work is not None:
                where.send_back(node_work, wctx.rank, started)
            queue.put(("result", wctx.rank, result))

        trainer = TorchTrainer(
            loop,
            scaling_config=ScalingConfig(
                num_workers=scaling.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={
                    "CPU": scaling.cpus_per_worker,
                    **({"GPU": scaling.gpus_per_worker} if use_gpu else {}),
                    **scaling.resources_per_worker,
                },
            ),
            torch_config=torch_config(scaling),
            run_config=RunConfig(
                name=self.work_dir.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep),
            ),
        )
        results: dict[int, object] = {}
        stop = threading.Event()
        drainer = threading.Thread(target=self._drain, args=(queue, results, stop), daemon=True)
        drainer.start()
        try:
            trainer.fit()
        finally:
            stop.set()
            drainer.join()
            ray.kill(queue.actor)
        if not self.shared_work:  # files the ranks on other nodes wrote into their work dirs
            got = self.store.files.download_tree(where.outbox, self.work_dir)
            if got:
                self.logger.info("%s: %d file(s) from workers on other nodes", self.stage, len(got))
            self.store.files.delete_tree(where.outbox)
        return [results.get(r) for r in range(scaling.num_workers)]

    def _drain(self, queue, results, stop):
        """Apply messages from the workers, in order, until the group is done and the queue empty."""
        from ray.util.queue import Empty

        while True:
            try:
                kind, *payload = queue.get(timeout=0.2)
            except Empty:
                if stop.is_set():
                    return
                continue
            if kind == "metrics":
                self.log(payload[0])
            elif kind == "progress":
                self.progress(*payload[0])
            elif kind == "resumed":  # metrics.jsonl was cut back: the shared copy too
                self.resumed(payload[0])
                self.mirror(force=True)
            elif kind == "started_fresh":
                self.started_fresh()
                self.mirror(force=True)
            elif kind == "checkpoint":  # the rows up to it must reach a shared root before a resume
                self.checkpointed(payload[0])
                self.mirror(force=True)
            elif kind == "result":
                results[payload[0]] = payload[1]


def torch_config(scaling: Scaling):
    """Ray Train's process group for a worker group: NCCL on GPUs, gloo on CPUs. Its collectives fail
    after `scaling.collective_timeout_s` (the stage's collective_timeout_min), and the group restarts
    from its last checkpoint (FailureConfig) as after any worker failure."""
    from ray.train.torch import TorchConfig

    backend = "nccl" if scaling.gpus_per_worker > 0 else "gloo"
    return TorchConfig(backend=backend, timeout_s=max(1, round(scaling.collective_timeout_s)))


class RayWorkerContext(WorkerContext):
    """Inside a Ray Train worker."""

    def __init__(self, queue, stop_flag=None):
        import ray.train

        tctx = ray.train.get_context()
        self.queue = queue
        self.rank = tctx.get_world_rank()
        self.world_size = tctx.get_world_size()
        self.local_rank = tctx.get_local_rank()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._step = 0  # the last step reported by `progress`: a checkpoint reported next is its
        self._fetched: list[Path] = []  # checkpoints fetched from an object store, removed at the end
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # the driver's SIGTERM, through the run's flag: rank 0 reads it (a round trip, at most once a
        # second) and the loop's all-reduce tells the other ranks
        self._driver_stop = (
            preemption.Throttled(lambda: ray.get(stop_flag.is_set.remote()))
            if stop_flag is not None and self.rank == 0
            else None
        )
        _handle_sigterm_here()

    def stop_requested(self) -> bool:
        return preemption.asked() or (self._driver_stop is not None and self._driver_stop())

    def report(self, metrics=None, checkpoint_dir=None):
        """Every rank reports its own checkpoint folder (its shards); Ray merges them into one
        checkpoint under the stage's storage. Saving stalls training for the local write only: Ray
        uploads the folder in a background thread and then deletes it, and the checkpoint counts
        (for a restart, for the next run) once every rank's upload is done, so a crash mid-upload
        leaves the one before in use. One upload at a time: a checkpoint waits here for the one
        before to be stored, so a node holds at most two local copies."""
        import ray.train

        if metrics and self.rank == 0:
            self.queue.put(("metrics", dict(metrics)))
        if checkpoint_dir is None:
            return
        uploads = _upload_thread()
        if uploads is None:  # a Ray Train without it: upload now, then delete
            ray.train.report(
                dict(metrics or {}), checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
            )
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            if self.rank == 0:
                self.queue.put(("checkpoint", self._step))
            return
        uploads.submit(lambda: None).result()  # the previous checkpoint is stored
        ray.train.report(
            dict(metrics or {}),
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,  # deletes the folder once stored
        )
        if self.rank == 0:  # once stored (the upload thread runs one job at a time, in order)
            step = self._step
            uploads.submit(lambda: self.queue.put(("checkpoint", step)))

    def progress(self, step, total, **extra):
        self._step = step
        if self.rank == 0:
            self.queue.put(("progress", (step, total)))

    def checkpoint(self, every_rank=False) -> Path | None:
        import ray.train

        from kiln.reshard import fetch

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if os.path.isdir(ckpt.path):
            return Path(ckpt.path)
        # an object store: this rank's files (or every rank's) into a fresh local folder
        dest = Path(tempfile.mkdtemp(prefix=f"kiln-resume-rank{self.rank}-"))
        self._fetched.append(dest)
        return fetch(ckpt.filesystem, ckpt.path, dest, None if every_rank else self.rank)

    def remove_fetched(self) -> None:
        """Delete the local copies `checkpoint` fetched (the loop has loaded them, or has failed)."""
        for folder in self._fetched:
            shutil.rmtree(folder, ignore_errors=True)
        self._fetched.clear()

    def resumed_from(self, step):
        if self.rank == 0:
            self.queue.put(("resumed", step))

    def started_fresh(self):
        if self.rank == 0:
            self.queue.put(("started_fresh",))


def _upload_thread():
    """Ray Train's checkpoint upload thread pool (one thread) in this worker, or None: where this
    version of Ray Train has none, or where KILN_CHECKPOINT_UPLOAD=sync asks for the upload before
    training goes on (bench/checkpoint_stall.py's baseline)."""
    if os.environ.get("KILN_CHECKPOINT_UPLOAD") == "sync":
        return None
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().checkpoint_upload_threadpool
    except (ImportError, AttributeError):
        return None


def _handle_sigterm_here() -> None:
    """SIGTERM to this worker's process is noted (pipeline/preemption.py) instead of ending it. Ray
    Train runs the training loop in a thread, and a handler can only be installed from the process's
    main thread, which serves the worker actor's calls: so the worker actor installs it, through its
    `execute(fn)` (Ray Train's own way of running a function on a worker)."""
    try:
        actor = ray.get_runtime_context().current_actor
        if not ray.get(actor.execute.remote(preemption.install), timeout=60):
            raise RuntimeError("not run on the main thread")
    except Exception as e:  # noqa: BLE001 - a worker that cannot handle it still trains
        log.warning("SIGTERM to this worker will end it without a checkpoint: %s", e)


@dataclass(frozen=True)
class _Placement:
    """What a worker needs to know about where the stage keeps its files, whatever node it is on.

    On a local or NFS root every path the stage hands its workers is valid on every node. On an
    object-store root the stage driver's paths (its input artifacts, its work dir) are a cache on
    the driver's node; a worker on another node gets its own: the inputs are downloaded into that
    node's cache (`KILN_CACHE`, once per node), the paths in the worker's argument are moved onto it,
    and what the worker leaves in its work dir is sent back through the object store (`outbox`)
    for the driver to collect when the group is done.
    """

    root: str | None
    run: str | None
    stage: str
    work_key: str | None
    inputs: dict
    work_dir: str
    driver_node: str
    driver_run_dir: str | None

    @property
    def remote(self) -> bool:
        return self.root is not None and is_remote(self.root)

    @property
    def outbox(self) -> str:
        return f".work/{self.stage}-{self.work_key}/outbox"

    def _store(self):
        from pipeline.artifacts import ArtifactStore

        return ArtifactStore(self.root, self.run)

    def announce(self, wctx) -> None:
        """worker_pids/rank<r> = "pid node_id" in the stage's work dir: where each rank runs, for
        operators (and for tests that kill one)."""
        text, rel = f"{os.getpid()} {wctx.node_id}\n", f"worker_pids/rank{wctx.rank}"
        try:
            if self.root is None:  # a context without a store: the work dir is this machine's
                (Path(self.work_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(self.work_dir) / rel).write_text(text)
            else:  # through the root: the driver's work dir (NFS), or the object store
                self._store().write_work_file(self.stage, self.work_key, rel, text)
        except OSError as e:  # informational only
            log.warning("could not record rank %d's pid: %s", wctx.rank, e)

    def localize(self, arg, node_id: str):
        """(the argument with paths valid on this node, this node's work dir if it is not the
        driver's own, else None)."""
        if not self.remote or node_id == self.driver_node:
            return arg, None
        store = self._store()
        for name, fp in self.inputs.items():
            if store.find(name, fp) is None:
                raise RuntimeError(f"{self.stage}: the {name} artifact ({fp}) is not complete on {self.root}")
        node_work = store.work_dir(self.stage, self.work_key)
        node_work.mkdir(parents=True, exist_ok=True)
        return _rebase(arg, self.driver_run_dir, str(store.run_dir)), node_work

    def send_back(self, node_work: Path, rank: int, since: float) -> None:
        store = self._store()
        for p in sorted(node_work.rglob("*")):
            rel = p.relative_to(node_work).as_posix()
            if (
                p.is_file()
                and p.stat().st_mtime >= since - 1
                and not rel.startswith(("ray/", "worker_pids/"))
            ):
                store.files.upload_file(p, f"{self.outbox}/{rel}")
        log.info("rank %d sent its work-dir files back through %s", rank, store.root)


def _rebase(value, old: str, new: str):
    """`value` with every `Path` under `old` moved under `new`: in a worker's job (a dataclass) and in
    the dicts, lists and tuples it holds. Strings are left alone: a job's paths are `Path` fields."""
    if isinstance(value, Path):
        if value == Path(old) or value.is_relative_to(old):
            return Path(new) / value.relative_to(old)
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if (w := _rebase(v, old, new)) is not v:
                moved[f.name] = w
        return dataclasses.replace(value, **moved) if moved else value
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_rebase(v, old, new) for v in value)
    return value
