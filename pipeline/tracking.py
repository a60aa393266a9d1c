"""Weights & Biases tracking: one W&B run per stage, grouped by pipeline run.

    tracker = Tracker.start(stage="pretrain", fingerprint=fp, run_name="tiny", mode="offline", ...)
    tracker.log({"step": 3, "loss": 2.1})
    tracker.log_artifact(path, metrics)        # by reference: large checkpoints are not copied
    tracker.finish()

group = pipeline run, job_type = stage. Online, each run `use_artifact`s its inputs so W&B draws
the lineage; offline W&B refuses `use_artifact`, so the inputs' artifact names and digests go into
the run's config instead. The run id is kept in the stage's work dir (and the stage's checkpoints),
so a resumed stage continues the same W&B run. Mode `auto` is online when a key is available,
offline otherwise. Only the resolved pipeline config is logged; keys and other secrets never are.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import uuid
from pathlib import Path

log = logging.getLogger("kiln.tracking")


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def artifact_name(run_name: str, stage: str) -> str:
    return f"{run_name}-{stage}"


class Tracker:
    """A stage's W&B run; with mode "disabled" every call does nothing (W&B is not imported)."""

    def __init__(self, run=None, run_name: str = "", stage: str = ""):
        self.run, self.run_name, self.stage = run, run_name, stage

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @classmethod
    def start(
        cls,
        *,
        stage: str,
        fingerprint: str,
        run_name: str,
        project: str,
        mode: str,
        config: dict,
        inputs: dict[str, str],
        work_dir: Path,
        wandb_dir: Path,
    ) -> Tracker:
        mode = resolve_mode(mode)
        if mode == "disabled":
            return cls(None, run_name, stage)
        import wandb

        id_file = Path(work_dir) / "wandb_run.json"
        run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else uuid.uuid4().hex[:12]
        lineage = {
            s: {"artifact": f"{artifact_name(run_name, s)}:{fp}", "digest": fp} for s, fp in inputs.items()
        }
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=project,
            group=run_name,
            job_type=stage,
            name=f"{run_name}/{stage}",
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(wandb_dir),
            config={**config, "kiln": {"stage": stage, "fingerprint": fingerprint, "inputs": lineage}},
            settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
        )
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(json.dumps({"id": run.id}))
        run.define_metric("*", step_metric="step")
        if mode == "online":
            for entry in lineage.values():
                try:
                    run.use_artifact(entry["artifact"])
                except Exception as e:  # an input logged in another mode or project: keep going
                    log.warning("W&B lineage: cannot use %s: %s", entry["artifact"], e)
        return cls(run, run_name, stage)

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log(row)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def log_artifact(self, uri: str, fingerprint: str, metrics: dict) -> None:
        """Log the stage's output by reference (W&B records paths and sizes, copies nothing)."""
        if self.run is None:
            return
        import wandb

        art = wandb.Artifact(
            artifact_name(self.run_name, self.stage),
            type=self.stage,
            metadata={"fingerprint": fingerprint, "metrics": metrics, "uri": uri},
        )
        ref = uri if "://" in uri else f"file://{Path(uri).resolve()}"
        if ref.startswith("file://") or importlib.util.find_spec("boto3") is not None:
            art.add_reference(ref, checksum=False)
        # else: W&B resolves s3:// references with boto3, which Kiln does not need (it reads object
        # stores through pyarrow); the artifact's URI stays in its metadata
        self.run.log_artifact(art, aliases=[fingerprint, "latest"])

    def mark_preempting(self) -> None:
        """W&B shows the run as preempted (to be resumed), not as crashed, when it finishes next."""
        if self.run is not None:
            self.run.mark_preempting()

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
