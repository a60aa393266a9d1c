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
   (each document repeated with a distinct suffix, so exact de-duplication keeps all of them; near-
   duplicate removal, which would drop the copies, is off for both: bench/dedup.py measures it).
Every timing is the best of --reps runs; each run starts from fresh worker processes (cold BPE caches).
Goals: pipeline >= 70% of raw at 1 and 2 workers; pipeline 2-vs-1 speed-up >= 0.9 x raw's 2-vs-1;
peak memory at 10x within +-10% of 1x apart from the de-duplication index.

    python bench/data.py --resume        # ~4 min on 2 cores: kill-and-resume of ingest and tokenize

4. resuming mid-stage (`--resume`, instead of 1-3): the sample `--scale` times over (each copy of a
   document with a distinct suffix; near-duplicate removal off, as it would drop the copies) dealt
   into `--files` .jsonl.zst shards; ingest, then tokenize
   (one partition per ingest shard), each run in a driver process of its own with a pool of 2
   workers: once uninterrupted, once killed (SIGKILL to the driver and its pool) when about half
   its units are recorded (ingest: once mid-clean, once mid-write), then run again in the same work
   dir. Prints the stage's time uninterrupted, the resumed run's time, their ratio beside the share
   of units left to do, the "N of M units already done" of the resumed run's log, and whether its
   artifact equals the uninterrupted one byte for byte (the goal: always).
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


def _timed(fn, item):
    """fn(item) in a pool worker, and the CPU seconds it took there (all its threads)."""
    t0 = time.process_time()
    result = fn(item)
    return result, time.process_time() - t0


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
        self.task_cpu = 0.0  # CPU seconds the tasks took in the workers

    def map(self, fn, items, *, num_cpus=1, progress=None):
        items = list(items)
        done = list(self.pool.map(_timed, [fn] * len(items), items))
        self.task_cpu += sum(cpu for _, cpu in done)
        return [result for result, _ in done]

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


def config(sources, **ingest) -> PipelineConfig:
    cfg = PipelineConfig()
    section = dataclasses.replace(cfg.ingest, sources=tuple(map(str, sources)), **ingest)
    return dataclasses.replace(cfg, ingest=section)


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


def ingest_peak_rss(src: Path, root: Path, near_dedup: bool = False) -> dict:
    code = (
        "import json, sys, dataclasses; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
        "import stages.ingest as ingest; from pipeline.config import PipelineConfig; from pipeline.context import LocalContext;"
        "cfg = PipelineConfig(); cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, sources=(sys.argv[1],), near_dedup=sys.argv[4] == '1'));"
        "out = Path(sys.argv[2]); out.mkdir(parents=True);"
        "m = ingest.run(cfg, {}, out, LocalContext('ingest', out.parent / 'work'));"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (larger) parent
        "hwm = [int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')][0];"
        "print(json.dumps({'rss_mb': hwm / 1024, 'docs': m['docs_read']}))"
    )
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", code, str(src), str(root / "out"), str(ROOT), str(int(near_dedup))],
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


# -- resuming mid-stage --------------------------------------------------------------------------


def make_corpus(folder: Path, scale: int, files: int, frame_bytes: int = 0) -> list[Path]:
    """The sample `scale` times over, each copy of a document with a distinct suffix (none is a
    duplicate of another), dealt round-robin into `files` .jsonl.zst shards: each one zstd frame, or
    with `frame_bytes` frames of about that many bytes that say their sizes (as `pzstd` writes)."""
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(SAMPLE.open("rb")).read()
    records = [json.loads(line) for line in raw.splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard-{k:03d}.jsonl.zst" for k in range(files)]
    outs = [open(p, "wb") for p in paths]
    z = zstandard.ZstdCompressor(level=1)
    # a compressor per open stream: one compressor's context cannot serve two at once
    writers = [zstandard.ZstdCompressor(level=1).stream_writer(f) for f in outs] if not frame_bytes else None
    pending: list[list[bytes]] = [[] for _ in range(files)]
    held = [0] * files  # bytes pending per file

    def frame(k: int) -> None:  # the file's pending lines as one frame
        outs[k].write(z.compress(b"".join(pending[k])))
        pending[k].clear()
        held[k] = 0

    n = 0
    for copy in range(scale):
        for r in records:
            line = (json.dumps({"text": r["text"] + f"\n[copy {copy}]", "meta": r["meta"]}) + "\n").encode()
            k = n % files
            if writers:
                writers[k].write(line)
            else:
                pending[k].append(line)
                held[k] += len(line)
                if held[k] >= frame_bytes:
                    frame(k)
            n += 1
    for k in range(files):
        if writers:
            writers[k].close()
        else:
            if pending[k]:
                frame(k)
            outs[k].close()
    return paths


def _stage_main(job: str) -> None:
    """One stage in this process (its driver), map on a pool of 2 workers; prints its seconds."""
    import logging

    import stages.ingest as ingest
    import stages.tokenize as tokenize

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    job = json.loads(job)
    cfg = config(job["sources"], near_dedup=False)  # the copies are near-duplicates by construction
    arts = {name: Artifact(name, "b", Path(path), {}) for name, path in job["inputs"].items()}
    ctx = PoolContext(job["stage"], Path(job["work"]), 2, 1)
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    {"ingest": ingest, "tokenize": tokenize}[job["stage"]].run(cfg, arts, out, ctx)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0 + ctx.task_cpu
    ctx.close()
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def run_stage(job: dict, kill_when=None) -> dict:
    """The stage in a driver process of its own: {"seconds", "log"}; or, with `kill_when` (a
    function of nothing, true when it is time), killed with its workers then: {"killed": True}."""
    import signal

    cmd = [sys.executable, __file__, "--stage-run", json.dumps(job)]
    Path(job["work"]).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(job["work"]).parent / f"{job['stage']}.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        if kill_when is not None:
            while proc.poll() is None and not kill_when():
                time.sleep(0.005)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool: a lost head
                proc.wait()
                return {"killed": True}
        stdout, _ = proc.communicate()
        log.seek(0)
        text = log.read()
    if proc.returncode:
        raise RuntimeError(f"{job['stage']} failed:\n{text[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "log": text}


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def resume_main(args) -> None:
    import re

    import stages.tokenizer as tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-resume-"))
    rows = []
    try:
        t0 = time.perf_counter()
        sources = [str(p) for p in make_corpus(tmp / "src", args.scale, args.files)]
        gen_s = time.perf_counter() - t0

        def job(stage, name, inputs=None):
            return {
                "stage": stage, "sources": sources, "inputs": inputs or {},
                "work": str(tmp / name / "work"), "out": str(tmp / name / "out"),
            }  # fmt: skip

        def records(work: str, folder: str) -> int:
            return len(list((Path(work) / folder).glob("*.done.json")))

        ref_ingest = job("ingest", "ingest-ref")
        full = run_stage(ref_ingest)
        (tmp / "tok").mkdir()
        ref_art = {"ingest": Artifact("ingest", "b", Path(ref_ingest["out"]), {})}
        tokenizer.run(config(sources), ref_art, tmp / "tok", LocalContext("tokenizer", tmp / "w-tokenizer"))
        inputs = {"ingest": ref_ingest["out"], "tokenizer": str(tmp / "tok")}
        ref_tok = job("tokenize", "tokenize-ref", inputs)
        full_tok = run_stage(ref_tok)
        n_parts = json.loads((Path(ref_tok["out"]) / "index.json").read_text())["partitions"]

        cases = [  # (stage, where it is killed, its uninterrupted run, the unit folder, records to wait for, units)
            ("ingest", "mid-clean", ref_ingest, full, "parts", args.files // 2, 2 * args.files),
            ("ingest", "mid-write", ref_ingest, full, "docs", args.files // 2, 2 * args.files),
            ("tokenize", "mid-way", ref_tok, full_tok, "streams", n_parts // 2, n_parts),
        ]
        for stage, where, ref, ref_run, folder, wait_for, units in cases:
            j = job(stage, f"{stage}-{where}", ref["inputs"])
            run_stage(j, kill_when=lambda j=j, f=folder, n=wait_for: records(j["work"], f) >= n)
            done = records(j["work"], "parts") + records(j["work"], "docs") + records(j["work"], "streams")
            again = run_stage(j)
            said = re.search(r"(\d+) of (\d+) units already done", again["log"])
            rows.append(
                {
                    "stage": stage, "where": where, "full_s": ref_run["seconds"], "resume_s": again["seconds"],
                    "full_cpu": ref_run["cpu"], "resume_cpu": again["cpu"],
                    "done": done, "units": units, "said": said.group(0) if said else "(no line)",
                    "same": same_bytes(Path(j["out"]), Path(ref["out"])),
                }
            )  # fmt: skip
        total_s = time.perf_counter() - t0
        docs = json.loads((Path(ref_ingest["out"]) / "stats.json").read_text())["read"]
        tokens = sum(
            s["tokens"]
            for s in json.loads((Path(ref_tok["out"]) / "index.json").read_text())["splits"].values()
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nKiln data stages killed mid-stage and resumed — {args.files} input files, {docs:,} documents "
        f"(the sample x{args.scale}), {tokens:,} tokens, {len(os.sched_getaffinity(0))} CPUs, 2 pool workers"
    )
    print(
        "wall: seconds of the stage's run; cpu: CPU seconds of its driver and its tasks (less sensitive to load)"
    )
    print(
        f"{'stage':<10}{'killed':<11}{'units done':>12}{'units left':>12}{'wall full':>11}{'resumed':>9}{'ratio':>7}"
        f"{'cpu full':>10}{'resumed':>9}{'ratio':>7}  {'identical':<11}log of the resumed run"
    )
    for r in rows:
        print(
            f"{r['stage']:<10}{r['where']:<11}{r['done']:>6} of {r['units']:<3}{1 - r['done'] / r['units']:>12.2f}"
            f"{r['full_s']:>11.2f}{r['resume_s']:>9.2f}{r['resume_s'] / r['full_s']:>7.2f}"
            f"{r['full_cpu']:>10.2f}{r['resume_cpu']:>9.2f}{r['resume_cpu'] / r['full_cpu']:>7.2f}"
            f"  {'yes' if r['same'] else 'NO':<11}{r['said']!r}"
        )
    print(f"(corpus generation {gen_s:.1f} s; bench total {total_s:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="kill-and-resume of ingest and tokenize instead")
    ap.add_argument("--scale", type=int, default=10, help="--resume: the sample this many times over")
    ap.add_argument("--files", type=int, default=40, help="--resume: input files")
    ap.add_argument("--raw", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--stage-run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw:
        return _raw_main(*args.raw)
    if args.stage_run:
        return _stage_main(args.stage_run)
    if args.resume:
        return resume_main(args)
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
