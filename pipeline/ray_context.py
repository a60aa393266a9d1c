"""The stage context on Ray: tasks for `ctx.map`, a Ray Train worker group for `ctx.run_workers`.

Metrics from rank 0 of a worker group travel to the stage's driver over a Ray queue, so the stage
keeps one metrics.jsonl and one W&B run wherever its workers are placed. Checkpoints go through
`ray.train.report`, so `FailureConfig(max_failures)` restarts a dead group from the last one, and a
re-run with the same name and storage path (the stage's work dir) resumes from it too.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import ray

from pipeline.context import Scaling, StageContext, WorkerContext

log = logging.getLogger("kiln.ray")


class RayStageContext(StageContext):
    def map(self, fn, items, *, num_cpus: float = 1):
        items = list(items)
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)  # retried if a node dies
        refs = [task.remote(item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results, pending = [None] * len(refs), list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[index[ready[0]]] = ray.get(ready[0])
            self.progress(len(refs) - len(pending), len(refs), unit="files")
        return results

    def run_workers(self, train_fn, arg, scaling: Scaling):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})
        use_gpu = scaling.gpus_per_worker > 0

        pids = self.work_dir / "worker_pids"

        def loop(_config):
            wctx = RayWorkerContext(queue)
            try:  # where each rank runs, for operators (and for tests that kill one)
                pids.mkdir(parents=True, exist_ok=True)
                (pids / f"rank{wctx.rank}").write_text(f"{os.getpid()} {wctx.node_id}\n")
            except OSError:  # the work dir is not shared with this node
                pass
            result = train_fn(arg, wctx)
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
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=self.work_dir.name,
                storage_path=str(self.work_dir / "ray"),
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
            elif kind == "resumed":
                self.metrics.truncate(payload[0])
            elif kind == "result":
                results[payload[0]] = payload[1]


class RayWorkerContext(WorkerContext):
    """Inside a Ray Train worker."""

    def __init__(self, queue):
        import ray.train

        tctx = ray.train.get_context()
        self.queue = queue
        self.rank = tctx.get_world_rank()
        self.world_size = tctx.get_world_size()
        self.local_rank = tctx.get_local_rank()
        self.node_id = ray.get_runtime_context().get_node_id()
        os.environ.setdefault("OMP_NUM_THREADS", "1")

    def report(self, metrics=None, checkpoint_dir=None):
        import ray.train

        if metrics and self.rank == 0:
            self.queue.put(("metrics", dict(metrics)))
        if checkpoint_dir is not None:  # every rank reports its own shard; Ray merges them
            ray.train.report(
                dict(metrics or {}), checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
            )

    def progress(self, step, total, **extra):
        if self.rank == 0:
            self.queue.put(("progress", (step, total)))

    def checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if os.path.isdir(ckpt.path):
            return Path(ckpt.path)
        return Path(ckpt.to_directory())  # remote storage: download

    def resumed_from(self, step):
        if self.rank == 0:
            self.queue.put(("resumed", step))
