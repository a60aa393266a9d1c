"""What near-duplicate removal and decontamination drop from the bundled sample, and what they cost.

    python bench/dedup.py                # ~1 min on 2 cores; prints two tables
    python bench/dedup.py --reps 1       # quicker, noisier
    python bench/dedup.py --memory       # also ingest's peak memory on the sample and on 10x of it

Runs the ingest stage alone on the sample with the tiny preset's settings (one input file: one task,
in-process), four ways, interleaved, best of --reps each: exact de-duplication only (the baseline),
with near-duplicate removal (`ingest.near_dedup`), with decontamination against the shipped held-out
sets (`ingest.decontaminate`), and with both (the default). Prints each way's wall and CPU seconds
and their ratio to the baseline; then, per Pile set, the documents and bytes of text each check
drops (documents the baseline keeps and the other way does not), and a few of the near-duplicates
dropped, each beside the document kept for it, with their estimated and exact Jaccard similarity.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.context import LocalContext  # noqa: E402

WAYS = {
    "exact dedup only": ["ingest.near_dedup=false", "ingest.decontaminate=[]"],
    "+ near-dup": ["ingest.decontaminate=[]"],
    "+ decontamination": ["ingest.near_dedup=false"],
    "both (default)": [],
}


def run_ingest(overrides: list[str], out: Path) -> dict:
    import stages.ingest as ingest

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
    shutil.rmtree(out, ignore_errors=True)
    (out / "art").mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    ingest.run(cfg, {}, out / "art", LocalContext("ingest", out / "work"))
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def kept_docs(art: Path) -> dict[str, tuple[str, str]]:
    """id -> (source, text) of the documents an ingest artifact holds."""
    import pyarrow.parquet as pq

    docs = {}
    for shard in json.loads((art / "stats.json").read_text())["shards"]:
        for row in pq.read_table(art / "docs" / shard["file"]).to_pylist():
            docs[row["id"]] = (row["source"], row["text"])
    return docs


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = (
        {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}
        for w in (a.lower().split(), b.lower().split())
    )
    return len(sa & sb) / len(sa | sb)


def memory(tmp: Path) -> None:
    """Peak RSS of ingest (a process of its own) on the sample and on 10x the sample (each document
    ten times with a distinct suffix: near-duplicates of each other), near-duplicate removal off and on."""
    from bench.data import SAMPLE, ingest_peak_rss, make_10x

    big = make_10x(tmp / "x10.jsonl.zst")
    rows = {
        (src, near): ingest_peak_rss(path, tmp / f"m-{src}-{near}", near_dedup=near)
        for src, path in (("1x", SAMPLE), ("10x", big))
        for near in (False, True)
    }
    print("\nIngest peak RSS (VmHWM), one process, one task:")
    print(f"{'input':<8}{'near-dup':<10}{'docs':>10}{'MB':>8}{'seconds':>9}")
    for (src, near), r in rows.items():
        print(f"{src:<8}{'on' if near else 'off':<10}{r['docs']:>10,}{r['rss_mb']:>8.0f}{r['seconds']:>9.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--memory", action="store_true", help="also peak RSS at 1x and 10x the sample")
    args = ap.parse_args()
    os.chdir(ROOT)  # the preset names its files relative to the project
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-dedup-"))
    try:
        run_ingest([], tmp / "warm")  # imports and file cache, not timed
        times = {w: [] for w in WAYS}
        for _ in range(args.reps):  # interleaved, so load from other processes hits all alike
            for way, overrides in WAYS.items():
                times[way].append(run_ingest(overrides, tmp / way.replace(" ", "_")))
        arts = {w: tmp / w.replace(" ", "_") / "art" for w in WAYS}
        stats = {w: json.loads((a / "stats.json").read_text()) for w, a in arts.items()}
        docs = {w: kept_docs(a) for w, a in arts.items()}
        report(args, times, stats, docs)
        if args.memory:
            memory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, times: dict, stats: dict, docs: dict) -> None:
    base = "exact dedup only"
    best = {w: (min(t["wall"] for t in ts), min(t["cpu"] for t in ts)) for w, ts in times.items()}
    print(
        f"\nIngest of the bundled sample ({stats[base]['read']:,} documents), tiny preset, best of {args.reps}"
    )
    print(
        f"{'way':<20}{'wall s':>8}{'x base':>8}{'cpu s':>8}{'x base':>8}{'kept':>8}  dropped (beyond too_short)"
    )
    for w, (wall, cpu) in best.items():
        dropped = {k: v for k, v in stats[w]["dropped"].items() if k != "too_short"}
        print(
            f"{w:<20}{wall:>8.2f}{wall / best[base][0]:>8.2f}{cpu:>8.2f}{cpu / best[base][1]:>8.2f}"
            f"{stats[w]['kept']:>8,}  {dropped}"
        )

    sets = sorted(stats[base]["sets"])
    print("\nDropped per Pile set, against exact dedup only (documents / MB of text):")
    print(f"{'set':<18}{'kept':>16}{'near-dup':>18}{'contaminated':>18}{'both':>18}")
    for s in [*sets, "all"]:
        row = f"{s:<18}"
        for w in WAYS:
            if s == "all":
                n, b = stats[w]["kept"], stats[w]["text_bytes"]
            else:
                got = stats[w]["sets"].get(s, {"docs": 0, "bytes": 0})
                n, b = got["docs"], got["bytes"]
            if w == base:
                base_n, base_b = n, b
                row += f"{n:>8,} {b / 1e6:>6.2f} MB"
            else:
                d, db = base_n - n, base_b - b
                row += f"{d:>6,} {db / 1e6:>5.2f} ({db / max(base_b, 1):>4.0%})"
        print(row)

    # a few near-duplicates dropped, with the kept document they resemble most (of those sharing a
    # run of words with it: a near-duplicate's kept twin may be in another set)
    gone = [i for i in docs[base] if i not in docs["+ near-dup"]]
    kept = [(s, t, " ".join(t.lower().split())) for s, t in docs["+ near-dup"].values()]
    print(
        f"\n{len(gone)} near-duplicates dropped; the first {args.examples}, each with the kept document most like it:"
    )
    for i in gone[: args.examples]:
        source, text = docs[base][i]
        ws = text.lower().split()
        runs = [" ".join(ws[k : k + 5]) for k in range(0, max(1, len(ws) - 4), 5)]
        near = [(s, t) for s, t, norm in kept if any(r in norm for r in runs[:20])]
        best_j, best_source, best_text = max((jaccard(text, t), s, t) for s, t in near or kept[:1])
        print(
            f"  J={best_j:.2f} dropped [{source}]: {text[:90]!r}\n"
            f"         kept    [{best_source}]: {best_text[:90]!r}"
        )


if __name__ == "__main__":
    main()
