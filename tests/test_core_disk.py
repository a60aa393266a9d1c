"""A stage that fills the disk gets an error that says so (where, how much is free, about how much it
needs, what to do), and leaves no partial work behind to fill it again; checkpoints are kept.

The stages run in-process through `execute_stage`, on a toy DAG (a -> b, a -> c) whose b and c are
defined here: b writes parts into its work dir as the data stages do, c keeps checkpoints there as the
training stages do. Most tests make the failure up and fake the free space; two fill a real 8 MiB
tmpfs (where the tests may mount one: as root here).
"""

from __future__ import annotations

import errno
import logging
import re
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from pipeline import diskspace, runner
from pipeline.artifacts import Artifact, ArtifactStore
from pipeline.dag import DAG, Stage
from pipeline.diskspace import DiskFullError
from pipeline.execute import execute_stage
from pipeline.plan import Selection, make_plan
from pipeline.runner import run_pipeline
from tests.toy_stages import toy_config

VERSION = 1  # this module is also the module of the stages b and c (a stage module declares it)

ERROR: list[BaseException] = []  # what b and c raise once they have written (none: they complete)

DISK_DAG = DAG(
    (
        Stage("a", "tests.toy_stages:run_toy", sections=("a",)),
        Stage("b", "tests.test_core_disk:write_parts", inputs=("a",), sections=("b",)),
        Stage("c", "tests.test_core_disk:train", inputs=("a",), sections=("c",)),
    )
)

Usage = namedtuple("Usage", "total used free")
GiB, MiB = 1 << 30, 1 << 20


def write_parts(cfg, inputs, out, ctx):
    """Parts in the work dir (the data stages delete them at start), half an artifact in `out`."""
    ctx.progress(1, 2)
    parts = ctx.work_dir / "parts"
    parts.mkdir(exist_ok=True)
    for i in range(3):
        (parts / f"{i:05d}.parquet").write_bytes(b"p" * 1000)
    (out / "shard-00000.bin").write_bytes(b"s" * 5000 * cfg.b.value)
    if cfg.b.fail:  # in a Ray worker, where the tests cannot set ERROR
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "shard-00000.bin"))
    if ERROR:
        raise ERROR[0]
    return {"value": cfg.b.value}


def train(cfg, inputs, out, ctx):
    """A checkpoint where Ray Train's storage puts it, then the failure."""
    ctx.progress(1, 2)
    ckpt = ctx.work_dir / "ray" / ctx.work_dir.name / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.bin").write_bytes(b"w" * 3000)
    raise ERROR[0]


def run(cfg, name: str, dag=DISK_DAG) -> dict:
    ERROR.clear()
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    p = {p.name: p for p in make_plan(cfg, dag, store, Selection())}[name]
    return execute_stage(runner._job(cfg, dag, p, None))


def fail(cfg, name: str, error: BaseException, dag=DISK_DAG) -> tuple[BaseException, ArtifactStore, Path]:
    """Run stage `name` raising `error`: (what execute_stage raised, the store, the stage's work dir)."""
    ERROR[:] = [error]
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    p = {p.name: p for p in make_plan(cfg, dag, store, Selection())}[name]
    with pytest.raises(BaseException) as exc:
        execute_stage(runner._job(cfg, dag, p, None))
    return exc.value, store, store.work_dir(name, p.work_key)


@pytest.fixture
def free(monkeypatch):
    """Set the free space the disk module sees (the total is 100 GiB): free(1.5 * MiB)."""

    def set_free(n: int):
        monkeypatch.setattr(diskspace, "disk_usage", lambda path: Usage(100 * GiB, 100 * GiB - n, n))

    set_free(50 * GiB)
    return set_free


def test_a_short_write_on_a_nearly_full_disk_says_where_how_much_and_what_to_do(tmp_path, free):
    cfg = toy_config(tmp_path)
    run(cfg, "a")
    free(int(1.5 * MiB))
    err, store, work = fail(cfg, "b", OSError("4194304 requested and 2062272 written"))

    assert isinstance(err, DiskFullError), err
    assert isinstance(err.__cause__, OSError) and "2062272 written" in str(err.__cause__)
    msg = str(err)
    assert f"1.5 MiB of 100.0 GiB free on the filesystem of {store.run_dir}" in msg
    a = store.previous("a")[0]
    assert (
        "It needs more than 4.9 KiB, what it had written of its artifact when it failed "
        f"(the total size of its inputs (a-{a['fingerprint']}), as it has no complete artifact yet"
    ) in msg
    assert (
        f"Removed its unfinished artifact (4.9 KiB); removed 3 file(s) of partial work (2.9 KiB) from {work}"
        in msg
    )
    assert "which the next run would delete and redo anyway; kept progress.json. 1.5 MiB free now." in msg
    assert "free space there" in msg and "--root on a larger disk" in msg
    assert "OSError: 4194304 requested and 2062272 written" in msg

    assert "b failed with its disk nearly full" in msg  # no ENOSPC seen: the free space tells

    assert not list(store.run_dir.glob(".tmp-*")), "the staging folder is left"
    assert sorted(p.name for p in work.iterdir()) == ["progress.json"]  # parts gone, progress kept
    assert "b failed with its disk nearly full" in store.log_path("b").read_text()


def test_the_estimate_is_the_stages_last_artifact_and_older_ones_are_offered_to_free(tmp_path, free):
    run(toy_config(tmp_path), "a")
    for value in (3, 2):  # two complete b artifacts: the first is older, the second its last
        run(toy_config(tmp_path, f"b.value={value}"), "b")
    store = ArtifactStore(str(tmp_path), "toy")
    older, last = sorted(store.previous("b"), key=lambda m: m["created"])
    free(10 * MiB)
    err, _, _ = fail(toy_config(tmp_path, "b.value=1"), "b", OSError(errno.ENOSPC, "No space left on device"))

    msg = str(err)
    last_name, older_name = f"b-{last['fingerprint']}", f"b-{older['fingerprint']}"
    assert f"It needs about 9.8 KiB: the size of its last complete artifact in this run, {last_name}." in msg
    assert f"older artifacts of this run that newer ones replaced: {older_name} (14.6 KiB in all)" in msg


def test_without_an_artifact_of_its_own_the_estimate_is_its_inputs_size():
    inputs = {
        "ingest": Artifact(
            "ingest", "f1", Path("i"), {"files": {"a": {"size": 3 * MiB}, "b": {"size": MiB}}}
        ),
        "tokenizer": Artifact("tokenizer", "f2", Path("t"), {"files": {"t.json": {"size": MiB}}}),
    }
    assert diskspace.estimate([], inputs) == (
        "It needs about 5.0 MiB: the total size of its inputs (ingest-f1, tokenizer-f2), "
        "as it has no complete artifact yet."
    )
    assert diskspace.estimate([], {}) == (
        "How much it needs is unknown: it has no complete artifact yet, and no inputs."
    )


def test_enospc_is_a_full_disk_even_with_space_free_again(tmp_path, free):
    cfg = toy_config(tmp_path)
    run(cfg, "a")
    err, store, work = fail(cfg, "b", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, DiskFullError)
    assert "b ran out of disk space: 50.0 GiB of 100.0 GiB free" in str(err)
    assert "[Errno 28] No space left on device" in str(err)
    assert not (work / "parts").exists() and not list(store.run_dir.glob(".tmp-*"))


def test_another_error_with_space_to_spare_is_left_as_it_was(tmp_path, free):
    cfg = toy_config(tmp_path)
    run(cfg, "a")
    original = OSError("4194304 requested and 2062272 written")  # without a full disk: something else
    err, store, work = fail(cfg, "b", original)
    assert err is original
    assert len(list((work / "parts").iterdir())) == 3  # left for the next run, which deletes them itself
    assert not list(store.run_dir.glob(".tmp-*"))


def test_checkpoints_in_the_work_dir_are_kept_for_the_next_run(tmp_path, free):
    cfg = toy_config(tmp_path)
    run(cfg, "a")
    free(0)
    err, store, work = fail(cfg, "c", RuntimeError("PytorchStreamWriter failed writing file data/0"))
    assert isinstance(err, DiskFullError)
    assert f"kept 1 checkpoint(s) (2.9 KiB) in {work}; the next run resumes from them" in str(err)
    assert (work / "ray" / work.name / "checkpoint_000001" / "model.bin").is_file()


def test_a_full_disk_is_found_inside_ray_trains_wrapping_of_a_workers_error():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    worker = OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/model.pt")
    wrapped = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(worker, "Traceback ...")})
    assert diskspace.out_of_space(wrapped)
    assert diskspace.out_of_space(RuntimeError("upload failed: [Errno 122] Disk quota exceeded"))
    assert not diskspace.out_of_space(WorkerGroupError("rank 0 failed", {0: ValueError("bad batch")}))
    assert diskspace.detect(KeyboardInterrupt(), Path("/")) is None  # never a full disk, however low


@pytest.mark.timeout(120)
def test_the_runner_shows_a_full_disk_by_its_message_alone(tmp_path, ray_session):
    outcome = run_pipeline(toy_config(tmp_path, "b.fail=true"), DAG(DISK_DAG.stages[:2]))
    store = ArtifactStore(str(tmp_path), "toy")
    text = outcome.errors["b"]
    assert text.startswith("b ran out of disk space: ") and f"filesystem of {store.run_dir}." in text
    assert "To go on: free space there; or give --root on a larger disk." in text
    assert "No space left on device" in text and "Traceback" not in text
    assert text.endswith(f"(log: {store.log_path('b')})")


def test_the_runner_shows_a_full_disk_wrapped_by_ray_by_its_message_alone(tmp_path):
    from_ray = RuntimeError("ray::kiln:b() (pid=1)\n  File ...\nTraceback ... long")
    from_ray.cause = DiskFullError("b ran out of disk space: ...\nTo go on: free space there")
    text = runner._describe_failure(from_ray, tmp_path / "b.log")
    assert text == f"b ran out of disk space: ...\nTo go on: free space there\n(log: {tmp_path / 'b.log'})"


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs at tmp_path/disk (needs root, or a container that lets it mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    yield disk
    for name in ("a", "b"):  # the stage loggers hold their log files open on it
        logger = logging.getLogger(f"kiln.{name}")
        for handler in [h for h in logger.handlers if str(disk) in getattr(h, "baseFilename", "")]:
            handler.close()
            logger.removeHandler(handler)
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill_with_arrays(cfg, inputs, out, ctx):
    """Parts in the work dir and shards in `out`, 2 MiB at a time, as numpy writes them, until full."""
    import numpy as np

    chunk = np.zeros(1 << 20, dtype=np.uint16)
    (ctx.work_dir / "parts").mkdir(exist_ok=True)
    for i in range(100):
        with open(ctx.work_dir / "parts" / f"{i:05d}.bin", "wb") as f:
            chunk.tofile(f)
        with open(out / f"shard-{i:05d}.bin", "wb") as f:
            chunk.tofile(f)
    return {}


FILL_DAG = DAG(
    (DISK_DAG["a"], Stage("b", "tests.test_core_disk:fill_with_arrays", inputs=("a",), sections=("b",)))
)


def test_a_real_full_disk(small_disk):
    cfg = toy_config(small_disk)
    run(cfg, "a", FILL_DAG)
    err, store, work = fail(cfg, "b", OSError("never raised: the disk fills first"), FILL_DAG)

    assert isinstance(err, DiskFullError), err
    msg = str(err)
    assert f"free on the filesystem of {store.run_dir}" in msg and "of 8.0 MiB free" in msg
    assert "requested and" in msg  # numpy's short write, seen through
    assert re.search(
        r"It needs more than [34]\.\d MiB, what it had written of its artifact when it failed", msg
    )
    assert "removed 2 file(s) of partial work (4.0 MiB)" in msg and "--root on a larger disk" in msg
    assert not list(store.run_dir.glob(".tmp-*")) and not (work / "parts").exists()
    assert diskspace.disk_usage(small_disk).free > 6 * MiB  # the space is back


def test_a_full_disk_other_than_the_run_dirs_is_named_for_what_it_is(small_disk, tmp_path):
    """A checkpoint is saved to the system's temporary folder first: that may be the disk that fills."""
    cfg = toy_config(tmp_path / "root")
    run(cfg, "a")
    (small_disk / "big").write_bytes(b"x" * 7 * MiB)
    full = OSError(errno.ENOSPC, "No space left on device", str(small_disk / "kiln-ckpt-20" / "model.pt"))
    err, store, _ = fail(cfg, "b", full)

    msg = str(err)
    assert f"free on the filesystem of {small_disk}/kiln-ckpt-20/model.pt, which it was writing" in msg
    assert f"(not the run dir's, {store.run_dir})" in msg and "of 8.0 MiB free" in msg
    assert "To go on: free space on that filesystem." in msg and "--root" not in msg


def test_a_full_disk_keeps_a_data_stages_finished_units_and_drops_the_half_written(tmp_path):
    """Finished units are progress the next run reuses (pipeline/units.py): only the temporary files of
    the units in flight go."""
    from pipeline import units
    from pipeline.diskspace import tidy_work_dir

    parts = tmp_path / "work" / "parts"
    parts.mkdir(parents=True)
    (parts / "00000.parquet").write_bytes(b"x" * 100)
    units.record(units.record_path(parts, "00000"), {"input": "a"}, {"kept": 1}, [parts / "00000.parquet"])
    (parts / "00001.parquet.tmp").write_bytes(b"y" * 50)  # a unit killed half-way
    said = tidy_work_dir(tmp_path / "work")
    assert said.startswith("kept 1 finished unit(s)") and "the next run reuses them" in said
    assert sorted(p.name for p in parts.iterdir()) == ["00000.done.json", "00000.parquet"]
    assert units.finished(units.record_path(parts, "00000"), {"input": "a"}) == {"kept": 1}
