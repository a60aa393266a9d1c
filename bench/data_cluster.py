"""The data stages on a cluster with an object-store root: one node against two, and the bytes moved.

    python bench/data_cluster.py                   # ~6 min on 2 quiet cores
    python bench/data_cluster.py --files 8 --scale 1
    python bench/data_cluster.py --files 1 --scale 3 --split-mb 8   # one Pile-like shard, cleaned in blocks

On this machine's loopback: an S3 server (tests/s3server.py, SeaweedFS) and a Ray cluster
(tests/raycluster.py) of one node, then of two, each node 1 CPU and its own cache (KILN_CACHE). The
bundled sample, `--scale` times over (every copy of a document with a distinct suffix; near-duplicate
removal off, as it would drop the copies), dealt into `--files` .jsonl.zst shards; then
`launch.py run --until tokenize` on an s3:// root, its driver on the head (0 CPU: the tasks hold the
cores). For each cluster size it reports:

- each stage's seconds (its manifest's `seconds`: from the stage's start to its commit) and the
  speed-up of ingest + tokenize from one node to two (the goal: >= 1.7x), beside the ceiling the same
  clusters give 16 CPU-bound tasks (`CEILING`, run on each before the pipeline): two 1-CPU nodes on one
  2-core machine share its cores with Ray's processes, the S3 server and the driver;
- the nodes the units ran on (ingest's stats.json `units`, tokenize's units.json);
- the bytes each stage moved, as pipeline/remote.py logs them (KILN_TRANSFER_LOG, every process of
  every node): uploaded, downloaded (range reads included) and copied inside the store (server-side,
  crossing no network of ours), and the files that one node uploaded or downloaded more than once
  (the goal: none; "no file crosses the network twice");
- "before": what the flow before issue 26 moved for the same artifacts, computed from their sizes,
  not measured: the commit uploaded every file of the artifact and downloaded it all back, and
  tokenize's driver downloaded the whole ingest artifact (its tasks all on the driver's node).

Both runs use the same corpus and config; the artifacts' files must be the same bytes (sha256 in the
manifests, stats.json and units.json apart: they name the nodes): it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data import make_corpus  # noqa: E402
from pipeline.artifacts import WORK_STATE, ArtifactStore  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.dag import PIPELINE  # noqa: E402
from pipeline.plan import Selection, make_plan  # noqa: E402
from tests.raycluster import LocalCluster, wait_for  # noqa: E402
from tests.s3server import serving  # noqa: E402

STAGES = ("ingest", "tokenizer", "tokenize")
SECRET = "kiln-bench-secret-0123456789abcdef"
TOKEN = "kiln-bench-token-" + os.urandom(8).hex()


def stage_of(path: str) -> str:
    """The stage whose files a logged transfer moved (its artifact's or its work dir's), from the
    path under the run's prefix: a stage's reads of its inputs count as its inputs' files."""
    part = path.split("/")[1] if path.startswith(".work/") else path.split("/")[0]
    return part.rsplit("-", 1)[0] if "-" in part else part


CEILING = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=1)
def burn(n):
    x = 0
    for i in range(n):
        x += i * i
    return x
ray.get([burn.remote(1000) for _ in range(4)])  # the workers started
t = time.time()
ray.get([burn.remote(15_000_000) for _ in range(16)])
print("SECONDS", time.time() - t)
"""
"""The cluster's ceiling: 16 tasks of fixed pure-Python work (~1 s each on a core), nothing else running.
Its speed-up from one node to two is the most the data stages can show on the same machine (the nodes
share its cores with Ray's own processes, the S3 server and the driver)."""


def ceiling(cluster: LocalCluster, base: Path) -> float:
    script = base / "ceiling.py"
    script.write_text(CEILING)
    out = subprocess.run(
        [sys.executable, str(script), cluster.address], env=cluster.client_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("SECONDS ")), None)
    if line is None:
        raise SystemExit(f"the ceiling tasks failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(line.split()[1])


def run_on(nodes: int, base: Path, s3, corpus: Path, sets: list[str], stages=STAGES) -> dict:
    """`launch.py run --until <the last of stages>` on a fresh cluster of `nodes` nodes and a fresh prefix."""
    log = base / "transfers.jsonl"
    env = {
        **s3.env(), "KILN_TRANSFER_LOG": str(log), "KILN_CACHE": str(base / "cache-head"),
        "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    cluster = LocalCluster(base / "cluster", env=env, auth_token=TOKEN)
    root = f"s3://kiln/bench-{nodes}"
    try:
        cluster.start_head(num_cpus=1, dashboard=False)
        if nodes == 2:
            cluster.start_node("b", num_cpus=1, extra_env={"KILN_CACHE": str(base / "cache-b")})
            wait_for(lambda: cluster.node_id("b"), 60, "node b")
        cpu_bound = ceiling(cluster, base)
        cmd = [
            sys.executable,
            "launch.py",
            "run",
            "--until",
            stages[-1],
            "--root",
            root,
            "--wandb",
            "disabled",
        ]
        cmd += ["--address", cluster.address] + [a for s in sets for a in ("--set", s)]
        client = {**cluster.client_env(), "KILN_CACHE": str(base / "cache-client")}
        t0 = time.time()
        out = subprocess.run(cmd, cwd=ROOT, env=client, capture_output=True, text=True, timeout=3600)
        wall = time.time() - t0
        if out.returncode:
            raise SystemExit(
                f"the run on {nodes} node(s) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        ids = {cluster.node_id(n): n for n in cluster.nodes}
    finally:
        cluster.stop()
    for k, v in s3.env().items():
        os.environ[k] = v
    cfg = load_config(overrides=[f"run.root={root}", *sets])
    store = ArtifactStore(root, cfg.run.name, cache_dir=base / "cache-bench")
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, store, Selection(until=stages[-1]))}
    manifests = {s: store.check(s, plan[s].fingerprint)[0] for s in stages}
    stats = json.loads(
        store.files.read_bytes(f"{store.name('ingest', plan['ingest'].fingerprint)}/stats.json")
    )
    placement = (
        json.loads(
            store.files.read_bytes(f"{store.name('tokenize', plan['tokenize'].fingerprint)}/units.json")
        )
        if "tokenize" in stages
        else {"partitions": [], "shards": []}
    )
    return {
        "wall": wall, "manifests": manifests, "transfers": [json.loads(x) for x in log.read_text().splitlines()],
        "ceiling": cpu_bound,
        "cleaning": Counter(  # ingest's cleaning units: whole files, byte ranges or blocks
            "block" if "block" in u else "range" if "range" in u else "file" for u in stats["units"] if u["unit"] == "clean"
        ),
        "nodes": {
            "ingest": Counter(ids.get(u["node_id"], u["node_id"]) for u in stats["units"]),
            "tokenize": Counter(
                ids.get(u["node_id"], u["node_id"]) for u in placement["partitions"] + placement["shards"]
            ),
        },
    }  # fmt: skip


def moved(transfers: list[dict]) -> dict:
    """Per stage: bytes up, down, copied; files one node (cache) moved the same way more than once."""
    out = defaultdict(Counter)
    seen = Counter()
    for t in transfers:
        stage = stage_of(t["path"])
        out[stage][t["op"]] += t["bytes"]
        state = t["path"].rsplit("/", 1)[-1] in WORK_STATE or stage == "logs"  # rewritten as they grow
        if t["op"] in ("up", "down") and t.get("whole", True) and not state:  # ranges: other bytes each
            seen[stage, t["op"], t["cache"], t["path"]] += 1
    for (stage, _op, _cache, _path), n in seen.items():
        if n > 1:
            out[stage]["files moved twice by one node"] += 1
    return out


def before(manifests: dict) -> dict:
    """The bytes of each stage's files the flow before issue 26 moved (from the artifacts' sizes):
    every task on the driver's node, the work files never leaving it; the commit uploaded the
    artifact and downloaded it back into that node's cache, where the next stages' drivers (on the
    same node) found it."""
    size = {s: sum(f["size"] for f in m["files"].values()) for s, m in manifests.items()}
    return {s: {"up": size[s], "down": size[s]} for s in manifests}


def comparable(manifest: dict) -> dict:
    """The files that hold the data: not those naming the nodes, nor the stage's timed metrics."""
    skip = ("stats.json", "units.json", "metrics.jsonl")
    return {r: f["sha256"] for r, f in manifest["files"].items() if r not in skip}


def mb(n: float) -> str:
    return f"{n / 1e6:8.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8, help="input shards (default 8)")
    ap.add_argument("--scale", type=int, default=1, help="copies of the sample (default 1: 25.8 MB of text)")
    ap.add_argument(
        "--frame-mb", type=float, default=0,
        help="write the shards as zstd frames of this many MB of text (ingest splits them); default one frame",
    )  # fmt: skip
    ap.add_argument(
        "--split-mb", type=float, default=None,
        help="ingest.split_mb: MiB of text per cleaning task (a one-frame shard larger than a quarter of it "
        "is read by one task and cleaned in blocks of it); default the preset's 256",
    )  # fmt: skip
    ap.add_argument("--until", choices=("ingest", "tokenize"), default="tokenize", help="the last stage run")
    args = ap.parse_args()
    stages = STAGES[: STAGES.index(args.until) + 1]
    timed = [s for s in ("ingest", "tokenize") if s in stages]
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-cluster-"))
    try:
        corpus = work / "corpus"
        make_corpus(corpus, args.scale, args.files, int(args.frame_mb * 1e6))
        sets = [
            f"ingest.sources=[{corpus}/*.jsonl.zst]", "ingest.near_dedup=false", "ingest.decontaminate=[]",
            f"tokenize.partitions={2 * args.files}",
        ]  # fmt: skip
        if args.split_mb is not None:
            sets.append(f"ingest.split_mb={args.split_mb}")
        with serving(work / "s3", access_key="AKIAKILNBENCHCLUSTER", secret_key=SECRET) as s3:
            runs = {n: run_on(n, work / f"nodes-{n}", s3, corpus, sets, stages) for n in (1, 2)}
        load = os.getloadavg()
        print(
            f"\ncorpus: {args.files} shards"
            + (f" of {args.frame_mb:g} MB frames" if args.frame_mb else " of one frame")
            + f", sample x{args.scale}"
            + (f", ingest.split_mb={args.split_mb:g}" if args.split_mb is not None else "")
            + f"; load average now {load[0]:.1f} {load[1]:.1f}"
        )
        for n, r in runs.items():
            secs = {s: r["manifests"][s]["seconds"] for s in stages}
            print(
                f"\n{n} node(s): run {r['wall']:.0f} s; "
                + ", ".join(f"{s} {v:.1f} s" for s, v in secs.items())
            )
            print(
                f"  units per node: ingest {dict(r['nodes']['ingest'])}, tokenize {dict(r['nodes']['tokenize'])}"
                f"; ingest cleaned {dict(r['cleaning'])}"
            )
            was = before(r["manifests"])
            for stage, c in sorted(moved(r["transfers"]).items()):
                old = was.get(stage)
                print(
                    f"  files of {stage:10s} up {mb(c['up'])}  down {mb(c['down'])}  copied in the store "
                    f"{mb(c['copied'])}"
                    f"  twice by one node: {c['files moved twice by one node']}"
                    + (f"   (before: up {mb(old['up'])}, down {mb(old['down'])})" if old else "")
                )
        t = {n: sum(r["manifests"][s]["seconds"] for s in timed) for n, r in runs.items()}
        c = {n: r["ceiling"] for n, r in runs.items()}
        print(
            f"\n{' + '.join(timed)}: 1 node {t[1]:.1f} s, 2 nodes {t[2]:.1f} s: {t[1] / t[2]:.2f}x (goal >= 1.7x)"
            f"\nceiling, 16 CPU-bound tasks on the same clusters: 1 node {c[1]:.1f} s, 2 nodes {c[2]:.1f} s: "
            f"{c[1] / c[2]:.2f}x; the data stages reach {(t[1] / t[2]) / (c[1] / c[2]):.2f} of it"
        )
        for s in stages:
            a, b = (comparable(runs[n]["manifests"][s]) for n in (1, 2))
            differ = sorted(r for r in a.keys() | b.keys() if a.get(r) != b.get(r))
            print(
                f"{s}: the same bytes on 1 and 2 nodes: {not differ}"
                + (f" (not: {differ[:5]})" if differ else "")
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
