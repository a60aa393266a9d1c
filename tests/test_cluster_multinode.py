"""Kiln on a real two-node Ray cluster on this machine's loopback, with an S3 artifact root.

Module fixtures start, once: a SeaweedFS S3 server that checks request signatures (so only
processes holding the key pair can use the bucket), and a Ray head plus a second node, each with
its own temp dir, ports, custom resource (`node_a` / `node_b`), 1 CPU and its own artifact cache
(`KILN_CACHE`), so a file that only exists on one "node" is not silently found by the other. Every
process gets fake secrets (the S3 secret key, a WANDB_API_KEY) and the tests search everything Kiln
wrote for them. Cleanup kills exactly the processes these fixtures started, even on failure.

1. `launch.py submit` sends the data stages as a Ray job (Jobs API, token auth) and `status` reads
   the shared root; the data stages' tasks ran wherever a core was free, on both nodes.
2. Pretraining with one worker on each node; the second node is killed mid-run, `status` says
   what the stage waits for, the node comes back, Ray Train restarts the group from the last
   checkpoint (in S3), and the per-step losses equal an undisturbed run's bit for bit (both the
   preset cut to 60 steps, `SHORT_PRETRAIN`).
3. The data stages on a corpus of several files: their tasks run on both nodes and write straight to
   the root (each stage's stats list the node of every unit); the driver is killed mid-ingest and a
   driver on another machine (another cache) resumes the finished units; the artifacts' files are the
   bytes a one-node run makes (their sha256 in the manifests).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import units
from pipeline.artifacts import ArtifactStore
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.dag import PIPELINE
from pipeline.plan import Selection, make_plan
from tests.conftest import SHORT_PRETRAIN
from tests.pipeline_helpers import set_flags
from tests.raycluster import LocalCluster, wait_for
from tests.s3server import S3Server, serving

pytestmark = pytest.mark.slow

SECRET_KEY = "kiln-test-secret-" + secrets.token_hex(12)
WANDB_KEY = "kilnfake" + secrets.token_hex(16)  # 40 characters, like a real key
RAY_TOKEN = "kiln-test-token-" + secrets.token_hex(16)
SECRETS = (SECRET_KEY, WANDB_KEY, RAY_TOKEN)
BUCKET = "kiln"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with serving(
        tmp_path_factory.mktemp("s3"), access_key="AKIAKILNTESTACCESS01", secret_key=SECRET_KEY
    ) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    env = {
        **s3.env(),
        "WANDB_API_KEY": WANDB_KEY,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
        "KILN_CACHE": str(base / "cache-head"),
        "OMP_NUM_THREADS": "1",
        # a dead node is noticed in ~3 s instead of ~15 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    c = LocalCluster(base, env=env, auth_token=RAY_TOKEN)
    try:
        c.start_head(num_cpus=1, resources={"node_a": 1})
        start_node_b(c)
        wait_for(lambda: c.node_id("b"), 30, "node b's raylet")
        yield c
    finally:
        c.stop()


def start_node_b(c: LocalCluster) -> None:
    c.start_node("b", num_cpus=1, resources={"node_b": 1}, extra_env={"KILN_CACHE": str(c.base / "cache-b")})


def client_env(c: LocalCluster, tmp: Path) -> dict[str, str]:
    """A driver or client on this machine: the cluster's token and the S3 keys, its own cache."""
    return {**c.client_env(), "KILN_CACHE": str(tmp / "cache-client"), "PYTHONUNBUFFERED": "1"}


def launch(args: list[str], env: dict, log: Path, timeout: float) -> subprocess.CompletedProcess:
    with open(log, "ab") as f:
        return subprocess.run(
            [sys.executable, "launch.py", *args], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
            stderr=f, timeout=timeout,
        )  # fmt: skip


def dashboard_get(c: LocalCluster, path: str, token: str | None = RAY_TOKEN):
    req = urllib.request.Request(c.dashboard + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.timeout(420)
def test_submit_runs_the_data_stages_as_a_job_and_status_reads_the_shared_root(cluster, s3, tmp_path):
    env = client_env(cluster, tmp_path)
    root = f"s3://{BUCKET}/jobs"
    log = tmp_path / "submit.log"
    run_opts = ["--root", root, "--wandb", "offline"]

    out = launch(["submit", "--address", cluster.dashboard, *run_opts, "--until", "tokenize"], env, log, 360)
    stdout = out.stdout.decode()
    assert out.returncode == 0, stdout[-3000:] + log.read_text()[-3000:]
    job_id = next(line.split()[1] for line in stdout.splitlines() if line.startswith("job: "))
    assert job_id.startswith("kiln-tiny-")
    assert "tokenize" in stdout and "complete" in stdout  # the job's own output, streamed
    assert f"job {job_id}: SUCCEEDED (exit code 0)" in log.read_text()

    # `status` on another machine (here: another cache) reads the shared root
    st = launch(["status", *run_opts[:2], "--json"], env, log, 120)
    rows = {r["stage"]: r for r in json.loads(st.stdout)}
    assert [rows[s]["state"] for s in ("ingest", "tokenizer", "tokenize")] == ["complete"] * 3
    assert rows["pretrain"]["state"] == "missing"
    assert rows["tokenize"]["path"].startswith(f"{root}/tiny/tokenize-")

    # the Jobs API: the job as submitted, no secret in its runtime env, nothing without the token
    job = dashboard_get(cluster, f"/api/jobs/{job_id}")
    assert job["status"] == "SUCCEEDED" and job["driver_exit_code"] == 0
    assert "--address auto" in job["entrypoint"] and "--until tokenize" in job["entrypoint"]
    assert not any(s in json.dumps(job) for s in SECRETS)
    for token in (None, "not-the-token"):
        with pytest.raises(urllib.error.HTTPError) as err:
            dashboard_get(cluster, "/api/jobs/", token=token)
        assert err.value.code in (401, 403)

    # the data stages' tasks go wherever a core is free, on an object-store root too: the sample is
    # one file (one cleaning task), tokenize's 4 partitions and its shards spread over both nodes
    tasks = dashboard_get(cluster, "/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
    nodes = {cluster.node_id("head"), cluster.node_id("b")}
    placed = {(t["name"], t["node_id"]) for t in tasks if t["name"] in DATA_TASKS}
    assert {name for name, _ in placed} == set(DATA_TASKS)
    assert {node for _, node in placed} == nodes

    logs = dashboard_get(cluster, f"/api/jobs/{job_id}/logs")["logs"]
    assert_no_secrets(s3, f"{BUCKET}/jobs", [cluster.base, tmp_path, *cluster.temp_dirs()], [stdout, logs])


@pytest.mark.heavy  # ~5 min on 2 cores beside the two nodes; test_pretrain_failures stops and resumes pretraining in CI
@pytest.mark.timeout(2400)  # may build the session's tiny pipeline first (~10 min on 2 cores)
def test_pretrain_across_two_nodes_survives_losing_one(cluster, s3, short_pretrain, tmp_path, monkeypatch):
    _, _, ref_outcome = short_pretrain
    env = client_env(cluster, tmp_path)
    for k, v in s3.env().items():  # this process reads the bucket too
        monkeypatch.setenv(k, v)
    root = f"s3://{BUCKET}/multinode"
    cfg = load_config(overrides=[f"run.root={root}", *SHORT_PRETRAIN])
    store = ArtifactStore(root, cfg.run.name, cache_dir=tmp_path / "cache-test")
    ref_plan = {p.name: p for p in ref_outcome.plan}  # as the uninterrupted run made them
    for stage in ("ingest", "tokenizer", "tokenize"):  # the same data: only pretraining runs
        store.files.upload(Path(ref_plan[stage].path), Path(ref_plan[stage].path).name)
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, store, Selection(until="pretrain"))}
    assert [n for n, p in plan.items() if p.action == "run"] == ["pretrain"]
    assert plan["pretrain"].fingerprint == ref_plan["pretrain"].fingerprint
    key = plan["pretrain"].work_key
    every = cfg.pretrain.checkpoint_every
    kill_at = random.randint(every + 3, every + 12)  # soon after the first checkpoint

    def progress() -> dict:
        return store.progress("pretrain", key) or {}

    def ranks() -> dict[int, tuple[int, str]]:
        found = {}
        for r in range(cfg.pretrain.num_workers):
            text = store.read_work_file("pretrain", key, f"worker_pids/rank{r}")
            if text:
                pid, node = text.split()
                found[r] = (int(pid), node)
        return found

    log = tmp_path / "run.log"
    sets = set_flags(SHORT_PRETRAIN)
    cmd = ["run", "--until", "pretrain", "--root", root, "--wandb", "offline", "--address", cluster.address]
    cmd += sets
    proc = subprocess.Popen(
        [sys.executable, "launch.py", *cmd], cwd=PROJECT_ROOT, env=env, stdout=open(log, "ab"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: progress().get("step", 0) >= 1, 600, "the first step", proc)
        placed = ranks()  # one worker per node: 1 CPU each, and the head's CPU is free (driver: 0 CPU)
        assert {node for _, node in placed.values()} == {cluster.node_id("head"), cluster.node_id("b")}, (
            placed
        )
        wait_for(lambda: progress().get("step", 0) >= kill_at, 600, f"step {kill_at}", proc)

        killed_at, t_kill = progress()["step"], time.time()
        cluster.kill_node("b")
        waiting = wait_for(lambda: progress().get("waiting"), 120, "the waiting note", proc)
        t_noted = time.time()
        assert "waiting for resources" in waiting and "2 CPU (the cluster has 1)" in waiting
        st = launch(
            ["status", "--root", root, *sets], {**env, "COLUMNS": "400"}, tmp_path / "status.log", 120
        )
        shown = st.stdout.decode()  # the table goes to stdout
        assert "partial (step" in shown and "pretrain: waiting for resources" in shown, shown

        start_node_b(cluster)
        t_back = time.time()
        # the group restarted once the waiting note is gone (its step may already be past the kill:
        # under load the group can save the next checkpoint before node b is noticed gone)
        wait_for(lambda: not progress().get("waiting"), 300, "the restarted group", proc)
        t_restarted = time.time()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
    print(
        f"\nnode b killed at step {killed_at}: noted as waiting after {t_noted - t_kill:.1f}s; "
        f"node back {t_back - t_kill:.1f}s after the kill; training resumed {t_restarted - t_back:.1f}s "
        f"after that ({t_restarted - t_kill:.1f}s after the kill)"
    )

    art = store.find("pretrain", plan["pretrain"].fingerprint)
    got = _rows(art.path)
    want = _rows(Path(ref_plan["pretrain"].path))
    assert [r["step"] for r in got] == list(range(1, cfg.pretrain.steps + 1))
    assert [r["batch_crc"] for r in got] == [r["batch_crc"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # fp32: bit for bit
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    assert "waiting" not in progress()  # cleared once the node was back
    after = ranks()
    assert cluster.node_id("b") in {node for _, node in after.values()}  # the new node b took a rank
    assert (art.path / "model.safetensors").is_file()
    files = s3.filesystem()
    from pyarrow import fs

    checkpoints = [
        i.path for i in files.get_file_info(fs.FileSelector(f"{BUCKET}/multinode/tiny/.work", recursive=True))
    ]
    assert any("/ray/" in p and "/checkpoint_" in p for p in checkpoints)  # Ray Train wrote to S3
    assert "pretrain.log" in store.files.list_files("logs")  # the stage log, in the shared root
    assert_no_secrets(
        s3, f"{BUCKET}/multinode", [cluster.base, tmp_path, *cluster.temp_dirs()], [log.read_text()]
    )


DATA_TASKS = ("clean_file", "write_docs", "pack_partition", "write_shard")


@pytest.mark.timeout(600)
def test_data_stages_spread_over_both_nodes_resume_and_match_one_node(cluster, s3, tmp_path, monkeypatch):
    from pipeline.artifacts import Artifact
    from pipeline.context import StageContext
    from stages import ingest, tokenize
    from tests.test_data_ingest import doc, prose, write

    for k, v in s3.env().items():  # this process reads the bucket too
        monkeypatch.setenv(k, v)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(8):  # every process of the cluster sees this machine's files
        docs = [doc(prose(1000 * k + i, 900), f"Set {'AB'[i % 2]}") for i in range(300 + 40 * k)]
        write(corpus / f"shard-{k}.jsonl", docs + [doc(prose(7, 900))])  # one exact duplicate each
    sets = [
        f"ingest.sources=[{corpus}/*.jsonl]", "ingest.decontaminate=[]", "ingest.docs_per_shard=200",
        "tokenizer.sample_bytes=1000000", "tokenize.partitions=6", "tokenize.sequences_per_shard=300",
    ]  # fmt: skip
    root = f"s3://{BUCKET}/spread"
    cfg = load_config(overrides=[f"run.root={root}", *sets])
    store = ArtifactStore(root, cfg.run.name, cache_dir=tmp_path / "cache-test")
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, store, Selection(until="tokenize"))}
    work = f".work/{store.name('ingest', plan['ingest'].work_key)}"
    cmd = ["run", "--until", "tokenize", "--root", root, "--wandb", "offline", "--address", cluster.address]
    cmd += set_flags(sets)
    log = tmp_path / "run.log"

    # a driver killed once some of ingest's units are recorded in the root
    proc = subprocess.Popen(
        [sys.executable, "launch.py", *cmd], cwd=PROJECT_ROOT, env=client_env(cluster, tmp_path / "one"),
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _records(store, f"{work}/parts"), 300, "a cleaned file's record", proc, every=0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert store.check("ingest", plan["ingest"].fingerprint)[0] is None  # killed mid-stage

    # another machine's driver (its own cache) finds the finished units in the root
    (tmp_path / "two").mkdir()
    out = launch(cmd, client_env(cluster, tmp_path / "two"), log, 420)
    assert out.returncode == 0, out.stdout.decode()[-3000:] + log.read_text()[-3000:]
    said = store.files.read_bytes("logs/ingest.log").decode().splitlines()
    resumed = [line.split("ingest: ")[1] for line in said if "units already done" in line][-1]
    assert not resumed.startswith("0 of"), resumed

    arts = {s: store.find(s, plan[s].fingerprint) for s in ("ingest", "tokenizer", "tokenize")}
    stats = json.loads((arts["ingest"].path / "stats.json").read_text())
    placement = json.loads((arts["tokenize"].path / "units.json").read_text())
    nodes = {cluster.node_id("head"), cluster.node_id("b")}
    assert {u["node_id"] for u in stats["units"]} == nodes and len(stats["units"]) == 16
    assert {u["node_id"] for u in placement["partitions"] + placement["shards"]} == nodes
    assert not [f for f in store.files.list_files(work) if "/" in f]  # its units removed once committed
    assert units.AFTER_COMMIT not in store.files.list_files(work)  # and the note saying so
    caches = [cluster.base / c for c in ("cache-head", "cache-b")]
    left = [
        p
        for c in caches
        for p in c.glob("*/.work/*/*/*")
        if p.parent.name in ("parts", "docs", "streams", "shards")
    ]
    assert not left  # nor does any node's cache keep its copies of them

    # the same stages on one node, in this process: the same bytes, file by file
    ref = tmp_path / "one-node"
    (ref / "ingest").mkdir(parents=True)
    ingest.run(cfg, {}, ref / "ingest", StageContext("ingest", tmp_path / "w-ingest"))
    local = {"ingest": Artifact("ingest", "ref", ref / "ingest", {}), "tokenizer": arts["tokenizer"]}
    (ref / "tokenize").mkdir()
    tokenize.run(cfg, local, ref / "tokenize", StageContext("tokenize", tmp_path / "w-tokenize"))
    for stage in ("ingest", "tokenize"):
        got = {
            rel: f["sha256"] for rel, f in arts[stage].manifest["files"].items()
            if rel not in ("stats.json", "units.json", "metrics.jsonl")
        }  # fmt: skip
        # units.json is written wherever Ray is up, here too when the test session started it
        want = {
            p.relative_to(ref / stage).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (ref / stage).rglob("*") if p.is_file() and p.name not in ("stats.json", "units.json")
        }  # fmt: skip
        assert got == want and len(got) > 3, stage
    want_stats = json.loads((ref / "ingest" / "stats.json").read_text())
    assert {**stats, "units": None} == {**want_stats, "units": None}


def _records(store: ArtifactStore, rel: str) -> int:
    return sum(name.endswith(".done.json") for name in store.files.list_files(rel))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_no_secrets(s3: S3Server, prefix: str, folders: list[Path], texts: list[str]) -> None:
    """No secret in any object under the prefix, any file under the folders (caches, W&B offline
    runs, Ray's and Kiln's logs), or the given texts."""
    from pyarrow import fs

    needles = [s.encode() for s in SECRETS]
    found = []
    files = s3.filesystem()
    for info in files.get_file_info(fs.FileSelector(prefix, recursive=True)):
        if info.type == fs.FileType.File:
            with files.open_input_stream(info.path) as f:
                data = f.read()
            found += [f"s3://{info.path}" for n in needles if n in data]
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file() and not p.is_symlink() and p.name not in ("auth_token", "s3.json"):
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                found += [str(p) for n in needles if n in data]
    for i, text in enumerate(texts):
        found += [f"text #{i}" for s in SECRETS if s in text]
    assert not found, f"a secret was written to: {sorted(set(found))}"
