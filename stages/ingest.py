"""ingest: raw Pile-style shards -> cleaned, de-duplicated document shards + stats.json.

    python launch.py run --only ingest --set 'ingest.sources=[data/*.jsonl.zst]'

Inputs: none (reads `ingest.sources`: paths/globs of .jsonl / .jsonl.zst / .jsonl.gz, relative to
the working directory, then the project; or `hf:NAME[:SPLIT]`). Artifact:

    docs/part-<file>-<k>.parquet   columns text, source (meta.pile_set_name), id (content hash)
    stats.json                     read, kept, dropped by reason, files, errors (every count reconciles)

One task per input file (`ctx.map`), so a cluster spreads the shards over its nodes; each streams
its file (memory flat whatever the size) into a Parquet part of candidates and returns their
64-bit content hashes. The driver then finds exact duplicates across files (the first in input
order wins), and a second round of per-file tasks writes the final shards. Results come back in
input order and every decision depends only on the data, so the output is the same byte for byte
whichever task finishes first. Parts live in the stage's work dir: on a multi-node cluster with a
shared-filesystem root the tasks spread over the nodes; with an object-store root (s3://) the work
dir is local to the stage's driver, so the runner keeps the tasks on its node (pipeline/ray_context.py).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from data_prep.cleaning import BAD_RECORD, CleanTask, WriteTask, clean_file, find_duplicates, write_docs
from data_prep.readers import resolve_sources
from pipeline.config import PROJECT_ROOT
from pipeline.files import write_json_atomic

VERSION = 1
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""


class IngestError(RuntimeError):
    pass


def run(cfg, inputs, out, ctx) -> dict:
    c = cfg.ingest
    out = Path(out)
    try:
        paths = resolve_sources(c.sources, (Path.cwd(), PROJECT_ROOT))
    except ValueError as e:
        raise IngestError(str(e)) from None
    ctx.logger.info("ingest: %d input file(s)", len(paths))

    # 1. per file: stream, clean, write candidates + hashes (parallel)
    parts = Path(ctx.work_dir) / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    tasks = [
        CleanTask(
            index=i,
            path=p,
            part=str(parts / f"{i:05d}.parquet"),
            min_chars=c.min_chars,
            max_chars=c.max_chars,
            include_sets=tuple(c.include_sets),
            set_weights=dict(c.set_weights),
            max_errors=c.max_errors,
        )
        for i, p in enumerate(paths)
    ]
    results = ctx.map(clean_file, tasks, num_cpus=c.num_cpus)
    ctx.progress(1, 3)

    failed = [r for r in results if r.status == "failed"]
    if failed and c.on_bad_file == "fail":
        lines = "\n".join(f"  {r.error}" for r in failed)
        raise IngestError(
            f"ingest: {len(failed)} input file(s) cannot be read to the end:\n{lines}\n"
            "Replace or re-download them, or set ingest.on_bad_file=skip to leave them out."
        )
    for r in failed:
        r.status = "skipped"
        ctx.logger.warning("ingest: skipping %s", r.error)
    good = [r for r in results if r.status == "ok"]

    # 2. exact duplicates across all files, in input order (driver: 8 bytes per candidate + sort)
    occurrences = find_duplicates([r.hashes for r in good])
    for r, occ in zip(good, occurrences, strict=True):
        if c.dedup and (n_dup := int((occ > 0).sum())):
            r.dropped["duplicate"] += n_dup
    ctx.progress(2, 3)

    # 3. per file: write the final shards (parallel)
    docs_dir = out / "docs"
    docs_dir.mkdir(parents=True, exist_ok=True)
    writes = [
        WriteTask(
            index=r.index,
            part=tasks[r.index].part,
            occurrence=occ,
            dedup=c.dedup,
            set_weights=dict(c.set_weights),
            out_dir=str(docs_dir),
            docs_per_shard=c.docs_per_shard,
        )
        for r, occ in zip(good, occurrences, strict=True)
    ]
    written = dict(
        zip((w.index for w in writes), ctx.map(write_docs, writes, num_cpus=c.num_cpus), strict=True)
    )
    shutil.rmtree(parts, ignore_errors=True)

    stats = _stats(results, written, c.max_errors)
    write_json_atomic(out / "stats.json", stats)
    ctx.progress(3, 3)
    ctx.logger.info(
        "ingest: read %d, kept %d, written %d, dropped %s",
        stats["read"],
        stats["kept"],
        stats["written"],
        dict(stats["dropped"]),
    )
    return {
        "docs_read": stats["read"],
        "docs_kept": stats["kept"],
        "docs_written": stats["written"],
        "docs_dropped": sum(stats["dropped"].values()),
        "bad_records": sum(n for k, n in stats["dropped"].items() if k in BAD_RECORD),
        "duplicates": stats["dropped"].get("duplicate", 0),
        "files_skipped": sum(r.status == "skipped" for r in results),
        "text_bytes": stats["text_bytes"],
        "shards": len(stats["shards"]),
    }


def _stats(results, written: dict, max_errors: int) -> dict:
    """stats.json: totals, one entry per input file (in input order), the capped error list."""
    files, dropped, errors, sets, set_bytes = [], Counter(), [], Counter(), Counter()
    shards = []
    for r in results:
        w = written.get(r.index, {"kept": 0, "written": 0, "shards": [], "sets": {}, "set_bytes": {}})
        entry = {
            "path": r.path,
            "status": r.status,
            "read": r.read if r.status == "ok" else 0,
            "kept": w["kept"],
            "written": w["written"],
            "dropped": dict(sorted(r.dropped.items())) if r.status == "ok" else {},
            "blank_lines": r.blank_lines,
        }
        if r.error:
            entry["error"] = r.error
        if r.status == "ok":
            if entry["read"] != entry["kept"] + sum(r.dropped.values()):
                raise AssertionError(f"ingest: counts do not reconcile for {r.path}: {entry}")
            dropped.update(r.dropped)
            errors.extend(r.errors)
            sets.update(w["sets"])
            set_bytes.update(w["set_bytes"])
            shards.extend(w["shards"])
        files.append(entry)
    bad_total = sum(n for k, n in dropped.items() if k in BAD_RECORD)
    return {
        "read": sum(f["read"] for f in files),
        "kept": sum(f["kept"] for f in files),
        "written": sum(f["written"] for f in files),
        "dropped": dict(sorted(dropped.items())),
        "files": files,
        "files_skipped": sum(f["status"] == "skipped" for f in files),
        "errors": errors[:max_errors],
        "errors_total": bad_total,
        "errors_listed": min(len(errors), max_errors),
        "sets": {k: {"docs": sets[k], "bytes": set_bytes[k]} for k in sorted(sets)},
        "text_bytes": sum(set_bytes.values()),
        "shards": shards,
    }
