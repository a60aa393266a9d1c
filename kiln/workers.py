"""What every training stage's driver does around its worker group, and what its workers receive.

    job = PretrainJob.new(ctx, cfg, cfg.pretrain, tokens_dir=..., vocab=...)   # in the stage's run()
    metrics = run_group(ctx, train_worker, job, out)                           # rank 0's result

A worker gets its stage's job: a frozen dataclass holding the stage's typed config section and
everything else it reads, paths as `Path` fields (a worker on another node of an object-store run
gets them moved onto its own cache: pipeline/ray_context.py). Rank 0 writes the trained model into
`export_dir`; `run_group` copies it into the artifact.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import preemption
from pipeline.config import stage_seed
from pipeline.context import Scaling


@dataclass(frozen=True, kw_only=True)
class WorkerJob:
    """The fields every training stage's workers read; a stage's job adds its own."""

    section: Any
    """The stage's frozen config section (a subclass narrows the type)."""
    seed: int
    """The stage's seed: its section's `seed`, else `run.seed`."""
    export_dir: Path
    """Where rank 0 writes the trained model as a Hugging Face folder."""
    wandb_run_id: str | None
    """The stage's W&B run, kept with each checkpoint so a resumed run logs to the same one."""

    @classmethod
    def new(cls, ctx, cfg, section, **fields):
        """The job of the stage `ctx` runs, with the common fields filled in from `ctx` and `cfg`."""
        return cls(
            section=section,
            seed=stage_seed(cfg, section),
            export_dir=ctx.work_dir / "export",
            wandb_run_id=ctx.tracker.run_id if ctx.tracker else None,
            **fields,
        )


def run_group(ctx, worker, job: WorkerJob, out: Path) -> dict:
    """`worker(job, wctx)` on the worker group `job.section` asks for (num_workers, CPUs and GPUs
    per worker, restarts, checkpoints kept); the model rank 0 exported copied into the artifact
    folder `out`. Returns rank 0's result: the stage's headline metrics. Raises `Preempted` if the
    workers stopped early on SIGTERM (they return {preemption.STOPPED: step})."""
    results = ctx.run_workers(worker, job, Scaling.of(job.section))
    if preemption.STOPPED in (results[0] or {}):  # asked to stop: the checkpoint of that step is saved
        raise preemption.Preempted(ctx.stage, results[0][preemption.STOPPED])
    for f in Path(job.export_dir).iterdir():
        shutil.copy2(f, Path(out) / f.name)
    return results[0]
