"""ingest: raw Pile-style shards -> cleaned, de-duplicated, decontaminated document shards + stats.json.

    python launch.py run --only ingest --set 'ingest.sources=[data/*.jsonl.zst]'

Inputs: none (reads `ingest.sources`: paths/globs of .jsonl / .jsonl.zst / .jsonl.gz, relative to
the working directory, then the project; or `hf:NAME[:SPLIT]`; and `ingest.decontaminate`, the
held-out sets pretraining must not see). Artifact:

    docs/part-<file>-<k>.parquet   columns text, source (meta.pile_set_name), id (content hash)
    stats.json                     read, kept, dropped by reason, files, errors (every count reconciles)

One task per input file (`ctx.map`), so a cluster spreads the shards over its nodes; each streams
its file (memory flat whatever the size) into a Parquet part of candidates, dropping the documents
that quote a held-out text (data_prep/decontaminate.py), and returns their 64-bit content hashes;
the part also holds each candidate's MinHash band hashes (data_prep/near_dup.py). The driver then
finds exact duplicates across files (the first in input order wins), and near-duplicates band by
band (in itself, or a task per band for a large corpus), each cluster's first document in input
order kept; a second round of per-file tasks writes the final shards. Results come back in input
order and every decision depends only on the data, so the output is the same byte for byte
whichever task finishes first.

The work dir holds the units, each recorded as finished once its files are in place (pipeline/units.py):

    parts/<file>.parquet, <file>.hashes.npy, <file>.done.json    a file cleaned: candidates, hashes
    docs/part-<file>-<k>.parquet, <file>.done.json                 a file written: its final shards
    bands/<band>.npy                                               a large corpus's band tasks' pairs (not units)

A run that dies keeps them: the next one reuses every unit whose record matches what it would make
now (the input file's size and mtime, the settings, the held-out n-grams; for shards also the part
and a digest of its duplicate and near-duplicate decisions, which the driver finds again from the
saved hashes), says in the log "N of M units already done" (M: two per file), and redoes the rest,
so the artifact is the same byte for byte. The shards are hard-linked into the artifact, and the
units removed once it is complete. On a multi-node cluster with a shared-filesystem root the tasks
spread over the nodes; with an object-store root (s3://) the work dir is local to the stage's
driver, so the runner keeps the tasks on its node (pipeline/ray_context.py), and a run resumes
mid-stage on that node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.cleaning import (
    BAD_RECORD,
    CleanTask,
    FileResult,
    WriteTask,
    clean_file,
    find_duplicates,
    finished_clean,
    write_docs,
)
from data_prep.decontaminate import HeldOut
from data_prep.near_dup import (
    BandTask,
    NearDupSpec,
    band_pairs,
    band_values,
    bucket_pairs,
    distinct_pairs,
    near_duplicates,
)
from data_prep.readers import resolve_sources
from pipeline import units
from pipeline.config import PROJECT_ROOT
from pipeline.files import write_json_atomic

VERSION = 3
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing.
2: near-duplicates and documents quoting the held-out sets are dropped (`near_duplicate`, `contaminated`).
3: MinHash signatures by rensa (data_prep/near_dup.py): other near-duplicate pairs are found than with
ingest 2's; with `ingest.near_dedup` off the output is ingest 2's."""

BAND_TASK_MIN_DOCS = 1_000_000
"""From this many candidates on, each band of the near-duplicate search is a task of its own
(`ctx.map`, ~60 bytes a document while it sorts) that saves its pairs in the work dir, and the driver
merges them a band at a time (16 bytes a pair it keeps). Below it, the driver reads every band at
once (8 bytes a band and document) and sorts one at a time: ~0.3 KB a document at its peak
(bench/dedup.py --memory), 300 MB at most."""


class IngestError(RuntimeError):
    pass


def run(cfg, inputs, out, ctx) -> dict:
    c = cfg.ingest
    out = Path(out)
    roots = (Path.cwd(), PROJECT_ROOT)
    try:
        paths = resolve_sources(c.sources, roots)
        heldout_paths = resolve_sources(c.decontaminate, roots, "ingest.decontaminate")
    except ValueError as e:
        raise IngestError(str(e)) from None
    ctx.logger.info("ingest: %d input file(s)", len(paths))
    heldout = HeldOut.read(heldout_paths, c.decontaminate_ngram) if heldout_paths else None
    if heldout is not None:
        ctx.logger.info(
            "ingest: decontaminating against %d held-out texts in %d file(s)",
            heldout.texts,
            len(heldout_paths),
        )
    near_dup = (
        NearDupSpec(c.near_dedup_bands, c.near_dedup_rows, c.near_dedup_shingle) if c.near_dedup else None
    )
    parts, shards = Path(ctx.work_dir) / "parts", Path(ctx.work_dir) / "docs"
    for folder in (parts, shards):  # kept from an earlier attempt: its finished units are reused
        folder.mkdir(parents=True, exist_ok=True)
        units.clear_temporary(folder)
    settings = {
        "min_chars": c.min_chars,
        "max_chars": c.max_chars,
        "include_sets": tuple(c.include_sets),
        "set_weights": dict(c.set_weights),
        "max_errors": c.max_errors,
    }
    checks = {  # what else a part depends on: its band hashes' settings, the held-out n-grams
        "near_dup": near_dup.identity() if near_dup else None,
        "decontaminate": {"n": c.decontaminate_ngram, "texts": heldout.digest()} if heldout else None,
    }
    tasks = [
        CleanTask(
            index=i,
            path=p,
            part=str(parts / f"{i:05d}.parquet"),
            **settings,
            record=str(units.record_path(parts, f"{i:05d}")),
            identity={"input": units.file_facts(p), **settings, **checks},
            near_dup=near_dup,
            heldout=heldout,
        )
        for i, p in enumerate(paths)
    ]
    total = 2 * len(tasks)  # units: each file cleaned, then written (nothing to write for a bad file)

    # 1. per file: stream, clean, write candidates + hashes (parallel); finished ones are reused
    results = [finished_clean(t) for t in tasks]
    todo = [t for t, r in zip(tasks, results, strict=True) if r is None]
    writes = None if todo else _writes(c, ctx, tasks, results, shards, total)  # all cleaned: step 3's too
    cleaned = len(tasks) - len(todo)
    ctx.logger.info(
        "ingest: %d of %d units already done (%d of %d files cleaned, %d written)",
        cleaned + (writes.done() if writes else 0), total, cleaned, len(tasks),
        len(writes.finished) if writes else 0,
    )  # fmt: skip
    if todo:
        got = ctx.map(clean_file, todo, num_cpus=c.num_cpus, progress=(cleaned, total))
        for t, r in zip(todo, got, strict=True):
            results[t.index] = r

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

    # 2. exact duplicates across all files, in input order (driver: 8 bytes per candidate + sort),
    # then near-duplicates, band by band (~40 bytes per candidate at a time)
    if writes is None:
        writes = _writes(c, ctx, tasks, results, shards, total)
        if writes.finished:  # shards an earlier attempt wrote, that the files cleaned since left valid
            ctx.logger.info(
                "ingest: %d of %d files already written",
                len(writes.finished), len(writes.finished) + len(writes.todo),
            )  # fmt: skip
    total += writes.band_tasks  # a large corpus's band tasks count as units of its progress

    # 3. per file: write the final shards into the work dir (parallel); finished ones are reused
    written, step = dict(writes.finished), total - len(writes.todo)
    ctx.progress(step, total, unit="units")
    if writes.todo:
        got = ctx.map(write_docs, writes.todo, num_cpus=c.num_cpus, progress=(step, total))
        written.update(zip((w.index for w in writes.todo), got, strict=True))
    docs_dir = out / "docs"
    docs_dir.mkdir(parents=True, exist_ok=True)
    for w in written.values():  # linked into the artifact: the units stay whole until they are removed
        for shard in w["shards"]:
            units.link_or_copy(shards / shard["file"], docs_dir / shard["file"])
    ctx.progress(total, total, unit="units")

    stats = _stats(results, written, c.max_errors)
    if near_dup is not None:  # how the drops were decided (absent when off: the output is ingest 1's)
        stats["near_dedup"] = {
            "bands": near_dup.bands, "rows": near_dup.rows, "shingle_words": near_dup.shingle,
            "found_at_jaccard": {str(s): round(near_dup.found(s), 4) for s in (0.5, 0.7, 0.8, 0.84, 0.9)},
        }  # fmt: skip
    if heldout is not None:
        stats["decontamination"] = {
            "files": heldout_paths, "ngram_words": heldout.n, "heldout_texts": heldout.texts,
        }  # fmt: skip
    write_json_atomic(out / "stats.json", stats)
    for folder in (shards, parts, Path(ctx.work_dir) / "bands"):  # the artifact holds the result now
        units.discard(folder)
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
        "near_duplicates": stats["dropped"].get("near_duplicate", 0),
        "contaminated": stats["dropped"].get("contaminated", 0),
        "files_skipped": sum(r.status == "skipped" for r in results),
        "text_bytes": stats["text_bytes"],
        "shards": len(stats["shards"]),
    }


@dataclass
class _Writes:
    """Step 3's units: those an earlier attempt finished (file index -> result), those to do, and
    the bad files' (nothing to write: done as they are); and the band tasks step 2 ran."""

    finished: dict[int, dict] = field(default_factory=dict)
    todo: list[WriteTask] = field(default_factory=list)
    bad: int = 0
    band_tasks: int = 0

    def done(self) -> int:
        return len(self.finished) + self.bad


def _writes(c, ctx, tasks: list[CleanTask], results: list[FileResult], shards: Path, total: int) -> _Writes:
    """Find the duplicates and near-duplicates across the good files (counted in their results), and
    the write unit of each: its identity holds its part's and the decisions about its documents (a
    digest of its occurrences and near-duplicate flags), so that a change upstream of a shard never
    reuses an old one."""
    good = [r for r in results if r.status == "ok"]
    hashes = [r.hashes for r in good]
    occurrences = find_duplicates(hashes)
    settings = {"dedup": c.dedup, "set_weights": dict(c.set_weights), "docs_per_shard": c.docs_per_shard}
    plan = _Writes(bad=len(results) - len(good))
    near = [None] * len(good)
    if c.near_dedup:
        parts = [tasks[r.index].part for r in good]
        if sum(map(len, hashes)) >= BAND_TASK_MIN_DOCS:  # a task per band, each saving its pairs
            folder = Path(ctx.work_dir) / "bands"
            folder.mkdir(exist_ok=True)
            bands = [BandTask(k, parts, str(folder / f"{k:02d}.npy")) for k in range(c.near_dedup_bands)]
            plan.band_tasks = len(bands)
            saved = ctx.map(band_pairs, bands, num_cpus=c.num_cpus, progress=(len(tasks), total + len(bands)))
            pairs = (np.load(path) for path in saved)  # merged one band at a time
        else:  # the driver: every band read at once, searched one at a time
            pairs = (bucket_pairs(v) for v in band_values(parts, range(c.near_dedup_bands)))
        near = near_duplicates(distinct_pairs(pairs), hashes, occurrences, c.dedup)
    for r, occ, flags in zip(good, occurrences, near, strict=True):
        if c.dedup and (n_dup := int((occ > 0).sum())):
            r.dropped["duplicate"] += n_dup
        if flags is not None and (n_near := int(flags.sum())):
            r.dropped["near_duplicate"] += n_near
        task = WriteTask(
            index=r.index,
            part=tasks[r.index].part,
            occurrence=occ,
            near=flags,
            out_dir=str(shards),
            **settings,
            record=str(units.record_path(shards, f"{r.index:05d}")),
            identity={
                "part": tasks[r.index].identity,
                "occurrence": units.digest(occ.astype("<i8").tobytes()),
                "near": None if flags is None else units.digest(np.packbits(flags).tobytes()),
                **settings,
            },
        )
        if (saved := units.finished(task.record, task.identity)) is not None:
            plan.finished[r.index] = saved
        else:
            plan.todo.append(task)
    return plan


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
