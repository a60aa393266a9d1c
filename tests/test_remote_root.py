"""Object-store artifact roots (pipeline/remote.py) against a real S3 server on loopback: commit with
the manifest last, verification, forced re-runs, tampering, the shared work-dir state, the per-node
cache under concurrency, a data task's files going through the root (pipeline/units.py `Folder`),
and a pipeline run on an s3:// root (toy stages, in-process Ray)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline import remote
from pipeline.artifacts import ArtifactStore
from pipeline.config import PROJECT_ROOT
from pipeline.configlib import load
from pipeline.context import Scaling
from pipeline.dag import DAG, Stage
from pipeline.files import MANIFEST
from pipeline.plan import make_plan
from pipeline.runner import status_rows
from tests.s3server import serving
from tests.toy_stages import ToyConfig

SECRET = "kiln-remote-test-secret-0123456789"

VERSION = 1
"""The version of the stages this module defines (run_mapping, run_group)."""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with serving(
        tmp_path_factory.mktemp("s3"), access_key="AKIAKILNREMOTETEST01", secret_key=SECRET
    ) as server:
        yield server


@pytest.fixture
def s3env(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


def _commit(store, stage, fp, files: dict[str, bytes]):
    staging = store.staging(stage, fp)
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return store.commit(stage, fp, staging, {"metrics": {"n": len(files)}, "config": {}})


@pytest.mark.timeout(120)
def test_artifacts_on_s3_commit_verify_rerun_and_tamper(s3env, tmp_path):
    store = ArtifactStore("s3://kiln/unit", "r1", cache_dir=tmp_path / "cache-a")
    manifest, problem = store.check("a", "f1")
    assert manifest is None and not problem.damaged
    assert str(problem) == "s3://kiln/unit/r1/a-f1/manifest.json is missing (the stage did not finish)"
    art = _commit(store, "a", "f1", {"x.bin": b"x" * 1000, "sub/y.txt": b"hello"})
    assert not art.path.exists()  # the commit downloads nothing back: a reader's `find` fetches it
    art = store.find("a", "f1")
    assert art.path.is_dir() and (art.path / "sub/y.txt").read_bytes() == b"hello"
    assert store.artifact_uri("a", "f1") == "s3://kiln/unit/r1/a-f1"
    assert not list(store.run_dir.glob(".staging/.tmp-*"))  # staging removed after the upload

    other = ArtifactStore("s3://kiln/unit", "r1", cache_dir=tmp_path / "cache-b")  # another machine
    manifest, problem = other.check("a", "f1", deep=True)
    assert problem is None and manifest["metrics"] == {"n": 2}
    down = remote.TRANSFERS["down"]
    assert other.check("a", "f1", deep=True)[1] is None  # a re-plan: hashed there already, unchanged
    assert remote.TRANSFERS["down"] == down
    assert (other.find("a", "f1").path / "x.bin").stat().st_size == 1000
    assert [m["fingerprint"] for m in other.previous("a")] == ["f1"]

    # a forced re-run: the old manifest goes first, then its files; none linger
    _commit(store, "a", "f1", {"z.txt": b"new"})
    listed = store.files.list_files("a-f1")
    assert sorted(listed) == [MANIFEST, "z.txt"]

    # tampering: another size is seen on every check, the same size only by sha256
    s3 = s3env.filesystem()
    with s3.open_output_stream("kiln/unit/r1/a-f1/z.txt") as f:
        f.write(b"newer")
    problem = other.check("a", "f1")[1]
    assert problem.damaged and problem.file == "s3://kiln/unit/r1/a-f1/z.txt"
    assert problem.reason == "has 5 bytes, manifest says 3"
    with s3.open_output_stream("kiln/unit/r1/a-f1/z.txt") as f:
        f.write(b"NEW")
    assert other.check("a", "f1")[1] is None
    assert "sha256" in str(other.check("a", "f1", deep=True)[1])
    # an object without its manifest is never complete
    s3.delete_file("kiln/unit/r1/a-f1/manifest.json")
    assert "manifest.json is missing" in str(other.check("a", "f1")[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("root", ["s3", "local"])
def test_adopting_an_artifact_moves_it_with_its_work_dir(s3env, tmp_path, root):
    """An artifact built before stage versions, taken over under its new fingerprint: every file
    and the rewritten manifest there, nothing left under the old name; the work dir's Ray Train
    folder (named after the work dir) renamed with it."""
    store = ArtifactStore(
        "s3://kiln/unit" if root == "s3" else str(tmp_path / "root"), "r3", cache_dir=tmp_path / "c"
    )
    art = _commit(store, "a", "old", {"x.bin": b"x" * 100, "sub/y.txt": b"hello"})
    if root == "s3":
        store.files.write_bytes(".work/a-k0/ray/a-k0/checkpoint_1/state.bin", b"state")
        store.files.write_bytes(".work/a-k0/progress.json", b'{"step": 3}')
    else:
        (store.work_dir("a", "k0") / "ray" / "a-k0" / "checkpoint_1").mkdir(parents=True)
        (store.work_dir("a", "k0") / "progress.json").write_text('{"step": 3}')
    store.adopt_work("a", "k0", "k1")
    store.adopt_artifact("a", "old", "new", {**art.manifest, "fingerprint": "new", "adopted_from": "old"})

    manifest, problem = store.check("a", "new", deep=True)
    assert problem is None and manifest["adopted_from"] == "old"
    assert store.check("a", "old")[0] is None
    assert store.progress("a", "k1") == {"step": 3}
    if root == "s3":
        assert sorted(store.files.list_files(".work/a-k1")) == [
            "progress.json",
            "ray/a-k1/checkpoint_1/state.bin",
        ]
        assert store.files.list_files(".work/a-k0") == {} and store.files.list_files("a-old") == {}
    else:
        assert (store.work_dir("a", "k1") / "ray" / "a-k1" / "checkpoint_1").is_dir()
        assert not store.work_dir("a", "k0").exists() and not (store.run_dir / "a-old").exists()


@pytest.mark.timeout(60)
def test_work_state_is_shared_through_the_root(s3env, tmp_path):
    a = ArtifactStore("s3://kiln/unit", "r2", cache_dir=tmp_path / "node-a")
    b = ArtifactStore("s3://kiln/unit", "r2", cache_dir=tmp_path / "node-b")
    work = a.work_dir("train", "k1")
    work.mkdir(parents=True)
    (work / "progress.json").write_text(json.dumps({"step": 7, "total": 10}))
    (work / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (work / "big-local-thing.bin").write_bytes(b"0" * 100)
    a.save_work("train", "k1")
    assert b.progress("train", "k1") == {"step": 7, "total": 10}  # `status` anywhere
    assert sorted(a.files.list_files(".work/train-k1")) == ["metrics.jsonl", "progress.json"]

    b.restore_work("train", "k1")  # the stage starts again on node b
    assert (b.work_dir("train", "k1") / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    # a longer local metrics file (rows not mirrored yet) is kept
    (work / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    a.restore_work("train", "k1")
    assert (work / "metrics.jsonl").read_text().count("\n") == 3

    b.note_waiting("train", "k1", "train: waiting for resources: 2 CPU")
    assert a.progress("train", "k1")["waiting"] == "train: waiting for resources: 2 CPU"
    assert a.progress("train", "k1")["step"] == 7
    b.note_waiting("train", "k1", None)
    assert "waiting" not in a.progress("train", "k1")

    a.write_work_file("train", "k1", "worker_pids/rank1", "123 node\n")
    assert b.read_work_file("train", "k1", "worker_pids/rank1") == "123 node\n"
    path, fs = a.train_storage("train", "k1")
    assert path == "kiln/unit/r2/.work/train-k1/ray" and fs is not None  # Ray Train: bucket/prefix

    local = ArtifactStore(str(tmp_path / "plain"), "r2")
    assert local.train_storage("train", "k1") == (str(local.work_dir("train", "k1") / "ray"), None)


@pytest.mark.timeout(120)
def test_a_tasks_files_go_through_the_root_and_the_commit_copies_them(s3env, tmp_path, monkeypatch):
    """A data task's files on an object-store root (pipeline/units.py `Folder`): published on the node
    that wrote them (uploaded and hashed on the way), the record last; found finished by the driver;
    on another node read in ranges or fetched once (its version by sha256); copied into the artifact
    server-side with the task's digest: the commit uploads only the driver's own files."""
    from pipeline import units

    store = ArtifactStore("s3://kiln/unit", "r4", cache_dir=tmp_path / "driver")
    folder = units.Folder("unused-here", store.root, store.run, ".work/s-k/docs")
    data = bytes(range(256)) * 40
    digest = hashlib.sha256(data).hexdigest()

    def on(node: str) -> None:  # this process as a task on `node`: its own cache
        monkeypatch.setenv("KILN_CACHE", str(tmp_path / node))
        units._ROOTS.clear()

    on("node-a")
    (folder.local() / "x.bin").write_bytes(data)
    facts = folder.publish(["x.bin"])
    folder.record("00000", {"k": 1}, {"n": 1}, facts)
    assert facts == {"x.bin": {"size": len(data), "sha256": digest}}
    assert folder.finished("00000", {"k": 1})["result"] == {"n": 1}
    assert folder.finished("00000", {"k": 2}) is None  # another identity: to be done again
    down = remote.TRANSFERS["down"]
    assert folder.fetch("x.bin", digest).read_bytes() == data  # its writer's node holds it
    assert remote.TRANSFERS["down"] == down

    on("node-b")
    with folder.open("x.bin", digest) as f:  # only the range read crosses
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
    assert remote.TRANSFERS["down"] == down + 10
    for _ in range(2):  # fetched once, then this node's copy
        assert folder.fetch("x.bin", digest).read_bytes() == data
    assert remote.TRANSFERS["down"] == down + 10 + len(data)
    (folder.local() / "x.bin").write_bytes(b"changed here")
    assert folder.fetch("x.bin", digest).read_bytes() == data  # not the version recorded: fetched

    staging = store.staging("s", "f1")
    (staging / "stats.json").write_text("{}")
    up, copied = remote.TRANSFERS["up"], remote.TRANSFERS["copied"]
    placed = {"docs/x.bin": {**facts["x.bin"], "source": folder.root_rel("x.bin")}}
    art = store.commit("s", "f1", staging, {"config": {}}, placed=placed)
    assert art.manifest["files"]["docs/x.bin"] == facts["x.bin"]
    assert remote.TRANSFERS["copied"] - copied == len(data)
    assert remote.TRANSFERS["up"] - up < 2000  # stats.json and the manifest
    assert store.check("s", "f1", deep=True)[1] is None
    folder.discard()
    assert store.files.list_files(".work/s-k/docs") == {}
    assert store.files.list_files("s-f1")["docs/x.bin"] == len(data)


@pytest.mark.timeout(120)
def test_a_unit_file_over_s3s_copy_limit_is_streamed_and_a_reader_fetches_only_what_it_reads(
    s3env, tmp_path, monkeypatch
):
    """S3's CopyObject copies objects up to 5 GiB (remote.COPY_OBJECT_MAX, made 1000 bytes here); a
    commit copying a larger unit file into the artifact streams it through this machine instead: the
    same bytes arrive, counted once down and once up, and the smaller file is still copied server-side.
    A stage's driver that reads only some of the artifact's files downloads only those."""
    monkeypatch.setattr(remote, "COPY_OBJECT_MAX", 1000)
    monkeypatch.setattr(remote, "STREAM_CHUNK", 300)
    store = ArtifactStore("s3://kiln/unit", "r6", cache_dir=tmp_path / "driver")
    files = {"big.bin": bytes(range(256)) * 8, "small.bin": b"s" * 100}
    placed = {}
    for name, data in files.items():
        store.files.write_bytes(f".work/s-k/docs/{name}", data)
        digest = hashlib.sha256(data).hexdigest()
        placed[f"docs/{name}"] = {"size": len(data), "sha256": digest, "source": f".work/s-k/docs/{name}"}
    staging = store.staging("s", "f1")
    (staging / "stats.json").write_text("{}")
    before = dict(remote.TRANSFERS)
    store.commit("s", "f1", staging, {"config": {}}, placed=placed)
    moved = {op: remote.TRANSFERS[op] - before.get(op, 0) for op in ("copied", "down", "up")}
    assert moved["copied"] == 100 and moved["down"] == 2048
    assert 2048 < moved["up"] < 2048 + 2000  # the big file, stats.json and the manifest
    other = ArtifactStore("s3://kiln/unit", "r6", cache_dir=tmp_path / "reader")
    assert other.check("s", "f1", deep=True)[1] is None
    art = other.find("s", "f1")
    assert all((art.path / "docs" / name).read_bytes() == data for name, data in files.items())

    # a streamed copy cut off part-way leaves no object behind (a closed output stream would complete one)
    class CutOff:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_input_stream(self, path):
            stream, reads = self.fs.open_input_stream(path), []

            class Reader:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    stream.close()

                def read(self, n):
                    reads.append(n)
                    if len(reads) > 1:
                        raise OSError("connection reset by peer")
                    return stream.read(n)

            return Reader()

    real = store.files.fs
    store.files.fs = CutOff(real)
    try:
        with pytest.raises(OSError, match="connection reset"):
            store.files.copy(".work/s-k/docs/big.bin", "elsewhere/big.bin")
    finally:
        store.files.fs = real
    assert store.files.list_files("elsewhere") == {}

    # a driver that reads only some files of its input (pipeline/dag.py `Stage.driver_reads`) fetches those
    down = remote.TRANSFERS["down"]
    part = ArtifactStore("s3://kiln/unit", "r6", cache_dir=tmp_path / "driver-2").find(
        "s", "f1", only=("stats.json",)
    )
    assert remote.TRANSFERS["down"] - down == 2 and (part.path / "stats.json").read_text() == "{}"
    assert not (part.path / "docs").exists() and part.manifest["files"]["docs/big.bin"]["size"] == 2048
    (part.path / "stale.bin").write_bytes(b"x")  # a file the store does not hold
    down = remote.TRANSFERS["down"]  # the whole artifact after that: the file fetched is not fetched again
    driver = ArtifactStore("s3://kiln/unit", "r6", cache_dir=tmp_path / "driver-2")
    whole = driver.find("s", "f1")
    assert whole.path == part.path and (whole.path / "docs/big.bin").stat().st_size == 2048
    rest = {r: n for r, n in driver.files.list_files(driver.name("s", "f1")).items() if r != "stats.json"}
    assert "docs/big.bin" in rest and remote.TRANSFERS["down"] - down == sum(rest.values())
    assert not (whole.path / "stale.bin").exists()


def _download(args):
    root, cache, fp = args
    store = ArtifactStore(root, "r3", cache_dir=cache)
    art = store.find("big", fp)
    return (art.path / "blob.bin").stat().st_size


@pytest.mark.timeout(120)
def test_processes_on_one_node_share_its_cache(s3env, tmp_path):
    store = ArtifactStore("s3://kiln/unit", "r3", cache_dir=tmp_path / "writer")
    _commit(store, "big", "f", {"blob.bin": b"b" * (8 << 20), "meta.json": b"{}"})
    cache = tmp_path / "node-cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        sizes = pool.map(_download, [("s3://kiln/unit", str(cache), "f")] * 4)
    assert sizes == [8 << 20] * 4
    assert not list(Path(cache).glob("*/.tmp-*"))


def _toy_dag(num_cpus=1):
    def map_stage(section):
        return Stage(section, "tests.test_remote_root:run_mapping", inputs=("a",), sections=(section,))

    return DAG(
        (
            Stage("a", "tests.toy_stages:run_toy", sections=("a",)),
            map_stage("b"),
            Stage(
                "c", "tests.test_remote_root:run_group", inputs=("a",), sections=("c",),
                workers=lambda cfg: Scaling(num_workers=1, cpus_per_worker=num_cpus),
            ),
        )
    )  # fmt: skip


def run_mapping(cfg, inputs, out, ctx):
    """Tasks that write into the work dir and the staging folder: the driver's node's folders, which
    the tasks of this one-node Ray share (on a cluster, tasks write through pipeline/units.py `Folder`)."""
    section = getattr(cfg, ctx.stage)
    parts = ctx.work_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    items = [(str(parts / f"{i}.txt"), str(out / f"out-{i}.txt"), i) for i in range(3)]
    results = ctx.map(_write_two, items, num_cpus=section.value)
    ctx.log({"step": 1, "loss": 1.0})
    ctx.progress(1, 1)
    return {"written": sum(results)}


def _write_two(item):
    import os

    import ray

    part, final, i = item
    Path(part).write_text(str(i))
    Path(final).write_text(Path(part).read_text() + ray.get_runtime_context().get_node_id())
    return os.path.getsize(final)


def run_group(cfg, inputs, out, ctx):
    results = ctx.run_workers(_worker, {"a_path": str(inputs["a"].path), "export": str(ctx.work_dir / "export")}, Scaling(num_workers=1, cpus_per_worker=1))  # fmt: skip
    for f in (ctx.work_dir / "export").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return results[0]


def _worker(arg, wctx):
    value = json.loads((Path(arg["a_path"]) / "value.json").read_text())["value"]
    export = Path(arg["export"])
    export.mkdir(parents=True, exist_ok=True)
    (export / "model.txt").write_text(f"trained on {value}")
    wctx.report({"step": 1, "loss": 0.5})
    return {"value": value}


def _run_in_subprocess(s3, tmp_path: Path, overrides: list[str], only: tuple[str, ...] = ()) -> dict:
    """The toy pipeline on its own local Ray, whose processes get the S3 settings in their
    environment from the start, as a cluster's nodes get them from `ray start`."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    code = (
        "import json, sys\n"
        "from pipeline.configlib import load\n"
        "from pipeline.plan import Selection\n"
        "from pipeline.runner import run_pipeline\n"
        "from tests.test_remote_root import _toy_dag\n"
        "from tests.toy_stages import ToyConfig\n"
        "cfg = load(ToyConfig, None, json.loads(sys.argv[1]))\n"
        "out = run_pipeline(cfg, _toy_dag(), Selection(only=tuple(json.loads(sys.argv[2]))))\n"
        "print('RESULT ' + json.dumps({'ok': out.ok, 'errors': out.errors, 'blocked': out.blocked}))\n"
    )
    ray_tmp = tempfile.mkdtemp(prefix="kr-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **s3.env(), "KILN_CACHE": str(tmp_path / "driver-cache"), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(overrides), json.dumps(list(only))],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=280,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.timeout(300)
def test_pipeline_on_an_s3_root(s3env, tmp_path, monkeypatch):
    root = "s3://kiln/pipeline"
    overrides = [f"run.root={root}", "run.wandb=disabled", "a.value=5"]
    result = _run_in_subprocess(s3env, tmp_path, overrides)
    assert result["ok"], result

    cfg = load(ToyConfig, None, overrides)
    dag = _toy_dag()
    other = ArtifactStore(root, cfg.run.name, cache_dir=tmp_path / "elsewhere")  # `status` elsewhere
    rows = {r["stage"]: r for r in status_rows(make_plan(cfg, dag, other))}
    assert {s: r["state"] for s, r in rows.items()} == {"a": "complete", "b": "complete", "c": "complete"}
    assert rows["b"]["metrics"] == {"written": 3 * (1 + 56)}  # each task's file reached the artifact
    c = other.find("c", rows["c"]["fingerprint"])
    assert (c.path / "model.txt").read_text() == "trained on 5"
    assert json.loads((c.path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 0.5
    logs = other.files.list_files("logs")
    assert {"a.log", "b.log", "c.log"} <= set(logs)
    work = other.files.list_files(".work")
    assert any(k.startswith("c-") and "/ray/" in k for k in work)  # Ray Train's storage on S3
    assert any(k.startswith("b-") and k.endswith("/metrics.jsonl") for k in work)
    assert any(k.startswith("b-") and k.endswith("/progress.json") for k in work)
    assert not any("/outbox/" in k for k in work)  # collected and removed

    # a driver that died between b's commit and the removal of the units the commit copied from
    # (pipeline/units.py `note_after_commit`): b is complete and never runs again; the next run of
    # the pipeline removes them, records first, and the note
    from pipeline import units
    from pipeline.runner import run_pipeline

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "driver-2"))
    units._ROOTS.clear()
    key = {p.name: p for p in make_plan(cfg, dag, other)}["b"].work_key
    rel = f".work/{other.name('b', key)}/docs"
    folder = units.Folder(str(other.run_dir / rel), root, cfg.run.name, rel)
    (folder.local() / "x.bin").write_bytes(b"x" * 100)
    folder.record("00000", {"k": 1}, {"n": 1}, folder.publish(["x.bin"]))
    units.note_after_commit(other, "b", key, [folder])
    assert len(other.files.list_files(rel)) == 2 and other.read_work_file("b", key, units.AFTER_COMMIT)
    assert run_pipeline(cfg, dag).ok  # everything complete: Ray is not even started
    assert other.files.list_files(rel) == {}
    assert other.read_work_file("b", key, units.AFTER_COMMIT) is None
    assert other.find("b", rows["b"]["fingerprint"]) is not None  # the artifact as it was


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:9000"])
def test_an_s3_root_retries_requests_at_aws_as_at_a_compatible_server(endpoint, monkeypatch):
    """AWS itself (no AWS_ENDPOINT_URL; not reachable here, so only the configuration is checked)
    and an S3-compatible server both retry a request S3_ATTEMPTS times, not pyarrow's 3; at AWS the
    root is in the bucket's own region, as `FileSystem.from_uri` would find it."""
    from pyarrow import fs

    from pipeline.remote import S3_ATTEMPTS, RemoteRoot

    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    else:
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    made, real, looked_up = [], fs.S3FileSystem, []
    monkeypatch.setattr(fs, "S3FileSystem", lambda **kw: made.append(kw) or real(**kw))
    monkeypatch.setattr(fs, "resolve_s3_region", lambda bucket: looked_up.append(bucket) or "eu-west-1")
    root = RemoteRoot("s3://kiln-runs/team/")
    assert root.base == "kiln-runs/team" and root.uri("tiny") == "s3://kiln-runs/team/tiny"
    (options,) = made
    assert options["retry_strategy"].max_attempts == S3_ATTEMPTS > 3
    if endpoint:
        assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:9000", "http")
        assert root.fs.region == "us-east-1" and looked_up == []
    else:
        assert "endpoint_override" not in options
        assert root.fs.region == "eu-west-1" and looked_up == ["kiln-runs"]
