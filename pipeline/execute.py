"""Run one stage to a committed artifact. Called inside a Ray task, or in-process.

    result = execute_stage(job)   # job: StageJob with the stage, its fingerprint, config, inputs

Order of events: verify the inputs (sha256), open the W&B run, call the stage into a staging
folder, copy its metrics.jsonl in, write the manifest last and move the folder into place. If the
stage raises or its process dies, no manifest is written, so no complete artifact exists; the work
dir keeps the in-stage checkpoints the next run resumes from.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from pipeline import diskspace
from pipeline.artifacts import ArtifactError, ArtifactStore
from pipeline.config import PROJECT_ROOT
from pipeline.context import StageContext
from pipeline.dag import Stage
from pipeline.preemption import Preempted
from pipeline.tracking import Tracker

LIBRARIES = (
    "torch", "deepspeed", "transformers", "tokenizers", "accelerate", "trl", "datasets", "ray", "wandb",
    "safetensors", "pyarrow",
)  # fmt: skip


@dataclass(frozen=True)
class StageJob:
    stage: Stage
    fingerprint: str
    work_key: str
    cfg: object
    config: dict  # the sections the stage reads (what is fingerprinted + budget keys)
    inputs: dict[str, str]  # input stage -> fingerprint
    root: str
    run_name: str
    wandb_mode: str
    wandb_project: str
    version: int  # the stage's declared VERSION
    code_version: str  # its code, recorded (not keyed): one hash, and file by file
    code_files: dict[str, str]
    layout: dict  # the placement its checkpoints are tied to (progress.json records it with them)
    fresh: bool = False  # a rebuild: remove the work dir's checkpoints first
    inputs_verified: bool = False  # the planner already checked the inputs' sha256


def execute_stage(job: StageJob, make_context=StageContext) -> dict:
    """Run the stage and commit its artifact; returns {"metrics", "path", "seconds"}."""
    store = ArtifactStore(job.root, job.run_name)
    stage = job.stage.name
    logger = _stage_logger(stage, store.log_path(stage))
    started = time.time()
    inputs = {}
    for name, fp in job.inputs.items():
        art = store.find(name, fp, deep=not job.inputs_verified, only=job.stage.driver_reads.get(name))
        if art is None:
            _, why = store.check(name, fp, deep=not job.inputs_verified)
            raise ArtifactError(f"{stage} needs the {name} artifact ({fp}), which is not usable: {why}")
        inputs[name] = art
    work_dir = store.work_dir(stage, job.work_key)
    if job.fresh:
        logger.info("stage %s is rebuilt: its earlier work dir %s is removed", stage, work_dir)
        store.remove_work(stage, job.work_key)
    store.restore_work(stage, job.work_key)  # a shared root's copy: the stage may have run elsewhere
    tracker = Tracker.start(
        stage=stage,
        fingerprint=job.fingerprint,
        run_name=job.run_name,
        project=job.wandb_project,
        mode=job.wandb_mode,
        config=job.config,
        inputs=job.inputs,
        work_dir=work_dir,
        wandb_dir=store.run_dir,
    )
    ctx = make_context(
        stage, work_dir, tracker=tracker, logger=logger, store=store, work_key=job.work_key, inputs=job.inputs,
        layout=job.layout,
    )  # fmt: skip
    staging = store.staging(stage, job.fingerprint)
    logger.info("stage %s (%s) starting; inputs %s", stage, job.fingerprint, job.inputs)
    try:
        metrics = job.stage.load()(job.cfg, inputs, staging, ctx) or {}
        ctx.finalize_metrics(staging)
        manifest = {
            "config": job.config,
            "inputs": job.inputs,
            "metrics": metrics,
            "version": job.version,
            "code_version": job.code_version,
            "code_files": job.code_files,
            "versions": library_versions(),
            "git_commit": git_commit(),
            "hardware": hardware(),
            "wandb_run_id": tracker.run_id,
            "seconds": round(time.time() - started, 2),
        }
        art = store.commit(stage, job.fingerprint, staging, manifest, placed=ctx.placed)
        if art is not None:
            ctx.committed()  # units the commit copied from (pipeline/context.py `discard_when_committed`)
    except BaseException as e:
        if isinstance(e, Preempted):  # SIGTERM: it saved a checkpoint; the next run resumes it
            logger.warning("%s", e)
            tracker.mark_preempting()
        else:
            logger.error("stage %s failed:\n%s", stage, traceback.format_exc())
        full = diskspace.detect(e, store.run_dir, staging)  # before the cleanup frees space
        shutil.rmtree(staging, ignore_errors=True)
        tracker.finish(exit_code=1)
        if full:  # say so, with what to do; its partial work is removed unless it holds checkpoints
            err = diskspace.disk_full_error(e, full, store, stage, work_dir, inputs)
            logger.error("%s", err)
            _save_state(store, stage, job.work_key)
            raise err from e
        _save_state(store, stage, job.work_key)
        raise
    tracker.summary(metrics)
    tracker.log_artifact(store.artifact_uri(stage, job.fingerprint), job.fingerprint, metrics)
    tracker.finish()
    logger.info("stage %s complete in %.1fs: %s", stage, time.time() - started, metrics)
    _save_state(store, stage, job.work_key)
    return {"metrics": metrics, "path": str(art.path), "seconds": time.time() - started}


def _save_state(store: ArtifactStore, stage: str, work_key: str) -> None:
    """On an object-store root: the work dir's state files and the log to the shared root."""
    try:
        store.save_work(stage, work_key)
        store.save_log(stage)
    except OSError as e:  # never hide the stage's own outcome behind a failed copy
        logging.getLogger(f"kiln.{stage}").warning("could not copy %s state to %s: %s", stage, store.root, e)


def _stage_logger(stage: str, path: Path) -> logging.Logger:
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"kiln.{stage}")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return logger


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if "torch" in sys.modules:  # only report GPUs when the stage already loaded torch
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
