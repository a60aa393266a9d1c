"""The typed worker boundary: a training stage's job reaches its workers as a frozen dataclass, its
paths moved onto a worker's own node when needed, and `run_group` brings back what rank 0 exported."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kiln.trl_bridge import TrlJob
from kiln.workers import WorkerJob, run_group
from pipeline.config import load_config
from pipeline.context import StageContext
from pipeline.ray_context import _rebase
from stages.pretrain import PretrainJob, Vocab


def _pretrain_job(run_dir: Path) -> PretrainJob:
    cfg = load_config()
    return PretrainJob(
        section=cfg.pretrain, model=cfg.model, seed=cfg.run.seed, wandb_run_id=None,
        tokens_dir=run_dir / "tokenize-abc", tokenizer_dir=Path("/elsewhere/tokenizer"),
        vocab=Vocab(size=300, pad=0, eos=1, bos=None), export_dir=run_dir / ".work" / "pretrain-k" / "export",
    )  # fmt: skip


def test_a_jobs_paths_under_the_drivers_cache_move_onto_the_workers_node():
    job = _pretrain_job(Path("/driver/cache/run"))
    moved = _rebase(job, "/driver/cache/run", "/node/cache/run")
    assert moved.tokens_dir == Path("/node/cache/run/tokenize-abc")
    assert moved.export_dir == Path("/node/cache/run/.work/pretrain-k/export")
    assert moved.tokenizer_dir == Path("/elsewhere/tokenizer")  # not under the run: left as it is
    assert moved.section == job.section and moved.model == job.model and moved.vocab == job.vocab
    # strings are data, not paths: a prompt that happens to start with the run dir is not rewritten
    trl = TrlJob(
        section=load_config().sft, seed=1, wandb_run_id=None, export_dir=Path("/driver/cache/run/x"),
        model_dir=Path("/driver/cache/run/sft-1"), train=[{"prompt": "/driver/cache/run/a"}], eval=[],
    )  # fmt: skip
    moved = _rebase(trl, "/driver/cache/run", "/n")
    assert moved.model_dir == Path("/n/sft-1") and moved.train == [{"prompt": "/driver/cache/run/a"}]


def test_a_job_is_frozen_and_its_section_typed():
    job = _pretrain_job(Path("/r"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.seed = 2
    assert job.section.lr == load_config().pretrain.lr  # attribute access, no string keys


def _exporting_worker(job: WorkerJob, wctx) -> dict:
    job.export_dir.mkdir(parents=True)
    (job.export_dir / "model.safetensors").write_bytes(b"weights")
    return {"rank": wctx.rank, "seed": job.seed}


def test_run_group_copies_rank_0s_export_into_the_artifact_and_returns_its_result(tmp_path):
    cfg = load_config(overrides=["sft.num_workers=1"])
    ctx = StageContext("sft", tmp_path / "work")
    job = WorkerJob.new(ctx, cfg, cfg.sft)
    assert job.export_dir == tmp_path / "work" / "export" and job.seed == cfg.run.seed
    out = tmp_path / "artifact"
    out.mkdir()
    assert run_group(ctx, _exporting_worker, job, out) == {"rank": 0, "seed": cfg.run.seed}
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_a_killed_builds_lock_is_cleared_and_each_environment_has_its_own_cache(
    tmp_path, monkeypatch, caplog
):
    """A process killed while DeepSpeed JIT-compiles its CPU collective op leaves a lock file that
    makes every later build wait forever: a lock older than any build is removed, a fresh one kept."""
    import os
    import time

    from kiln.training import STALE_BUILD_LOCK_S, extension_cache

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, new = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (old, new):
        lock.parent.mkdir()
        lock.touch()
    then = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(old, (then, then))
    extension_cache()
    assert not old.exists() and new.exists()
    assert "a JIT build's lock" in caplog.text
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    extension_cache()  # unset: the running environment's own folder
    import sys

    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")


def _crashing_mid_upload(arg: dict, wctx) -> dict:
    """Attempt 1, on each rank: checkpoint "a" (its own shard), stored and registered by Ray Train;
    then checkpoint "b", and the process dies the moment `report` returns, b's upload under way.
    Attempt 2 says what it resumed from."""
    import json
    import os
    import tempfile

    from tests.pipeline_helpers import registered_step, wait_for

    ckpt = wctx.checkpoint()
    if ckpt is not None:
        return {"resumed_from": (ckpt / "name").read_text(), "files": sorted(p.name for p in ckpt.iterdir())}
    for step, name, mb in ((1, "a", 1), (2, "b", 256)):
        folder = Path(tempfile.mkdtemp())
        (folder / "name").write_text(name)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        (folder / f"shard-{wctx.rank}.bin").write_bytes(os.urandom(mb << 20))  # b takes a while to copy
        wctx.progress(step, 2)
        wctx.report({"step": step}, checkpoint_dir=folder)
        if name == "a":  # a restart from here would resume from a
            wait_for(lambda: registered_step(Path(arg["work"])) == 1, 60, "checkpoint a registered")
    os._exit(1)  # a crash mid-upload: b's copy is not complete, and not registered


@pytest.mark.timeout(300)
def test_a_crash_mid_upload_resumes_from_the_checkpoint_before(tmp_path, ray_session):
    """Checkpoints upload in the background (pipeline/ray_context.py): a worker that dies while one
    uploads restarts from the one before, whole, never from a partial copy."""
    from pipeline.context import Scaling
    from pipeline.ray_context import RayStageContext

    ctx = RayStageContext("toy", tmp_path / "work")
    results = ctx.run_workers(
        _crashing_mid_upload, {"work": str(ctx.work_dir)}, Scaling(num_workers=2, max_failures=1)
    )
    # every rank from a, with every rank's shard: b, whose uploads never all finished, is not used
    whole_a = {"resumed_from": "a", "files": ["name", "shard-0.bin", "shard-1.bin", "trainer_state.json"]}
    assert results == [whole_a, whole_a]
