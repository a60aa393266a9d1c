"""Benchmark of the data stages against raw `tokenizers`, measured in the same run on the same cores.

    python bench/data.py                 # ~3 min on 2 cores; prints a table with ratios
    python bench/data.py --reps 1        # quicker, noisier

What it measures, on the bundled sample (25.8 MB of text) cut into 4 input shards:
1. pipeline throughput: `stages.ingest.run` + `stages.tokenize.run` (read zstd, clean, de-duplicate,
   write Parquet, tokenize, split, pack, write .npy shards), content tokens / wall seconds, run with a
   context whose `map` is a process pool (spawn) of 1 or 2 workers, each with the environment the
   pipeline gives a task of the stage's `num_cpus` (`pipeline.context.thread_env`: 1 core, one
   tokenizers thread by default): real parallelism, as the stage's Ray tasks have it;
2. raw baseline: `Tokenizer.encode_batch` (and `encode_batch_fast`; the faster one counts) over the
   same kept documents, already in memory, cut into calls of the same size as the pipeline's
   (`data_prep.packing.ENCODE_BATCH_BYTES` of text each; the ids are counted inside the timed loop, as
   the pipeline collects them), with 1 and 2 rayon threads, in a fresh process;
3. peak memory (VmHWM) of ingest, in a subprocess, on the sample and on a 10x larger input
   (each document repeated with a distinct suffix, so de-duplication keeps all of them).
Every timing is the best of --reps runs; each run starts from fresh worker processes (cold BPE caches).
Goals: pipeline >= 70% of raw at 1 and 2 workers; pipeline 2-vs-1 speed-up >= 0.9 x raw's 2-vs-1;
peak memory at 10x within +-10% of 1x apart from the de-duplication index.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import Artifact  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.context import LocalContext, thread_env  # noqa: E402

SAMPLE = ROOT / "data_prep" / "sample" / "pile_sample.jsonl.zst"


def _init_worker(env: dict):
    os.environ.update(env)  # read when tokenizers first starts its thread pool
    import pyarrow.parquet  # noqa: F401
    import tokenizers  # noqa: F401

    import data_prep.cleaning  # noqa: F401
    import data_prep.packing  # noqa: F401


def _noop(i):
    return i


class PoolContext(LocalContext):
    """A stage context whose map runs on a pool of worker processes (spawned, warmed up first)."""

    def __init__(self, stage, work_dir, workers, num_cpus: float):
        super().__init__(stage, work_dir)
        self.pool = ProcessPoolExecutor(
            workers,
            multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(thread_env(num_cpus),),
        )
        list(self.pool.map(_noop, range(workers * 2)))

    def map(self, fn, items, *, num_cpus=1):
        return list(self.pool.map(fn, items))

    def close(self):
        self.pool.shutdown()


def split_sample(folder: Path, shards: int) -> list[Path]:
    import zstandard

    lines = io.BytesIO(zstandard.ZstdDecompressor().stream_reader(SAMPLE.open("rb")).read()).readlines()
    paths = []
    for k in range(shards):
        path = folder / f"shard-{k}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"".join(lines[k::shards])))
        paths.append(path)
    return paths


def config(sources) -> PipelineConfig:
    cfg = PipelineConfig()
    return dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, sources=tuple(map(str, sources))))


def run_pipeline(cfg, tok_art, root: Path, workers: int) -> dict:
    import stages.ingest as ingest
    import stages.tokenize as tokenize

    shutil.rmtree(root, ignore_errors=True)
    (root / "ingest").mkdir(parents=True)
    (root / "tokenize").mkdir()
    ctx_i, ctx_t = (
        PoolContext("ingest", root / "w/ingest", workers, cfg.ingest.num_cpus),
        PoolContext("tokenize", root / "w/tok", workers, cfg.tokenize.num_cpus),
    )
    t0 = time.perf_counter()
    ingest.run(cfg, {}, root / "ingest", ctx_i)
    t1 = time.perf_counter()
    art = {"ingest": Artifact("ingest", "b", root / "ingest", {}), "tokenizer": tok_art}
    m = tokenize.run(cfg, art, root / "tokenize", ctx_t)
    t2 = time.perf_counter()
    ctx_i.close()
    ctx_t.close()
    index = json.loads((root / "tokenize" / "index.json").read_text())
    content = m["train_tokens"] + m["val_tokens"] - index["documents"]  # minus one EOS per document
    return {"ingest_s": t1 - t0, "tokenize_s": t2 - t1, "seconds": t2 - t0, "tokens": content}


def raw_encode(tok_dir: Path, docs_dir: Path, threads: int) -> dict:
    """encode_batch over every kept document, in a fresh process with `threads` rayon threads."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--raw", str(tok_dir), str(docs_dir)]
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)


def _raw_main(tok_dir: str, docs_dir: str) -> None:
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from data_prep.packing import ENCODE_BATCH_BYTES

    texts = []
    for p in sorted(Path(docs_dir).glob("*.parquet")):
        texts += pq.read_table(p, columns=["text"]).column(0).to_pylist()
    batches, size = [[]], 0  # cut as the pipeline cuts them: ENCODE_BATCH_BYTES of text per call
    for text in texts:
        if size >= ENCODE_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(text)
        size += len(text)
    best = {}
    for name in ("encode_batch", "encode_batch_fast"):
        tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))  # fresh: cold BPE cache
        tok.encode_special_tokens = True  # as the pipeline encodes
        tokens = 0
        t0 = time.perf_counter()
        for batch in batches:
            tokens += sum(len(e.ids) for e in getattr(tok, name)(batch, add_special_tokens=False))
        seconds = time.perf_counter() - t0
        best[name] = {"seconds": seconds, "tokens": tokens, "calls": len(batches)}
    print(json.dumps(best))


def ingest_peak_rss(src: Path, root: Path) -> dict:
    code = (
        "import json, sys, dataclasses; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
        "import stages.ingest as ingest; from pipeline.config import PipelineConfig; from pipeline.context import LocalContext;"
        "cfg = PipelineConfig(); cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, sources=(sys.argv[1],)));"
        "out = Path(sys.argv[2]); out.mkdir(parents=True);"
        "m = ingest.run(cfg, {}, out, LocalContext('ingest', out.parent / 'work'));"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (larger) parent
        "hwm = [int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')][0];"
        "print(json.dumps({'rss_mb': hwm / 1024, 'docs': m['docs_read']}))"
    )
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", code, str(src), str(root / "out"), str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - t0}


def make_10x(dst: Path) -> Path:
    """Every sample document 10 times, each copy with a distinct suffix (so none is a duplicate)."""
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(SAMPLE.open("rb")).read()
    records = [json.loads(line) for line in raw.splitlines()]
    cctx = zstandard.ZstdCompressor(level=1)
    with open(dst, "wb") as f, cctx.stream_writer(f) as w:
        for k in range(10):
            for r in records:
                w.write(
                    (json.dumps({"text": r["text"] + f"\n[copy {k}]", "meta": r["meta"]}) + "\n").encode()
                )
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--raw", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw:
        return _raw_main(*args.raw)
    import stages.tokenizer as tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        t0 = time.perf_counter()
        sources = split_sample(tmp, 4)
        cfg = config(sources)
        # a reference ingest (its documents are what the raw encoder reads) and the tokenizer (not timed)
        import stages.ingest as ingest

        (tmp / "ref/ingest").mkdir(parents=True)
        ingest.run(cfg, {}, tmp / "ref/ingest", LocalContext("ingest", tmp / "ref/w"))
        (tmp / "tok").mkdir()
        docs_art = Artifact("ingest", "b", tmp / "ref/ingest", {})
        tt = time.perf_counter()
        tokenizer.run(cfg, {"ingest": docs_art}, tmp / "tok", LocalContext("tokenizer", tmp / "w/tokenizer"))
        tok_s = time.perf_counter() - tt
        tok_art = Artifact("tokenizer", "b", tmp / "tok", {})

        raw = {1: [], 2: []}
        pipe = {1: [], 2: []}
        for _ in range(args.reps):  # interleaved, so load from other processes hits all alike
            for n in (1, 2):
                r = raw_encode(tmp / "tok", tmp / "ref/ingest/docs", n)
                raw[n].append(max(r.values(), key=lambda x: x["tokens"] / x["seconds"]))
                pipe[n].append(run_pipeline(cfg, tok_art, tmp / f"p{n}", n))
        raw_best = {n: max(r, key=lambda x: x["tokens"] / x["seconds"]) for n, r in raw.items()}
        pipe_best = {n: min(p, key=lambda x: x["seconds"]) for n, p in pipe.items()}
        assert all(raw_best[n]["tokens"] == pipe_best[n]["tokens"] for n in (1, 2)), (raw_best, pipe_best)

        mem1 = ingest_peak_rss(SAMPLE, tmp / "m1")
        big = make_10x(tmp / "x10.jsonl.zst")
        mem10 = ingest_peak_rss(big, tmp / "m10")
        total_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rate = {n: raw_best[n]["tokens"] / raw_best[n]["seconds"] for n in (1, 2)}
    prate = {n: pipe_best[n]["tokens"] / pipe_best[n]["seconds"] for n in (1, 2)}
    tokens = pipe_best[1]["tokens"]
    print(
        f"\nKiln data stages vs raw tokenizers — {tokens:,} content tokens, {len(os.sched_getaffinity(0))} CPUs, best of {args.reps}"
    )
    print(
        "pipeline = ingest + tokenize stages, map on a spawn process pool, 1-thread tokenizers per worker\n"
    )
    print(
        f"{'workers/threads':<16}{'raw tok/s':>12}{'pipeline tok/s':>16}{'ingest s':>10}{'tokenize s':>12}{'pipe/raw':>10}"
    )
    for n in (1, 2):
        p = pipe_best[n]
        print(
            f"{n:<16}{rate[n]:>12,.0f}{prate[n]:>16,.0f}{p['ingest_s']:>10.2f}{p['tokenize_s']:>12.2f}{prate[n] / rate[n]:>10.2f}"
        )
    raw_up, pipe_up = rate[2] / rate[1], prate[2] / prate[1]
    print(
        f"\n2-vs-1 speed-up: raw {raw_up:.2f}x, pipeline {pipe_up:.2f}x, ratio {pipe_up / raw_up:.2f} (goal >= 0.90)"
    )
    print(
        f"pipeline / raw throughput: 1 worker {prate[1] / rate[1]:.2f}, 2 workers {prate[2] / rate[2]:.2f} (goal >= 0.70)"
    )
    dedup_mb = (mem10["docs"] - mem1["docs"]) * 40 / 2**20  # hashes + stable-sort temporaries, ~40 B/doc
    print(
        f"ingest peak RSS: 1x {mem1['docs']:,} docs {mem1['rss_mb']:.0f} MB ({mem1['seconds']:.1f} s), "
        f"10x {mem10['docs']:,} docs {mem10['rss_mb']:.0f} MB ({mem10['seconds']:.1f} s): ratio "
        f"{mem10['rss_mb'] / mem1['rss_mb']:.2f}; minus the de-dup index (~{dedup_mb:.0f} MB) "
        f"{(mem10['rss_mb'] - dedup_mb) / mem1['rss_mb']:.2f} (goal 0.90-1.10)"
    )
    print(f"(tokenizer training, not in the ratios: {tok_s:.1f} s; bench total {total_s:.0f} s)")


if __name__ == "__main__":
    main()
