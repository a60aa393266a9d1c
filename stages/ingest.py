"""ingest: raw Pile-style shards -> cleaned, de-duplicated, decontaminated document shards + stats.json.

    python launch.py run --only ingest --set 'ingest.sources=[data/*.jsonl.zst]'

Inputs: none (reads `ingest.sources`: paths/globs of .jsonl / .jsonl.zst / .jsonl.gz, relative to
the working directory, then the project; or `hf:NAME[:SPLIT]`; and `ingest.decontaminate`, the
held-out sets pretraining must not see). Artifact:

    docs/part-<file>-<k>.parquet   columns text, source (meta.pile_set_name), id (content hash)
    stats.json                     read, kept, dropped by reason, files, errors (every count reconciles)

One task per input file (`ctx.map`), or per byte range of a plain .jsonl larger than `ingest.split_mb`
(the lines that begin in it: data_prep/readers.py), or per run of frames of a .zst whose frames say
their sizes, or per block of a large file that one reader must read whole (a .zst of one frame, as the
Pile ships, or a .gz: one task decompresses it and hands each block of that size to a cleaning task
while it reads on, `ctx.map_streams`, data_prep/blocks.py), so a cluster spreads the work over its
nodes even with few, large files; each streams its file or range (memory flat whatever the size) into a
Parquet part of candidates, dropping the documents that quote a held-out text
(data_prep/decontaminate.py), and returns their 64-bit content hashes; the part also holds each
candidate's MinHash band hashes (data_prep/near_dup.py). The driver then finds exact duplicates
across files (the first in input order wins), and near-duplicates band by band (in itself, or a task
per band for a large corpus), each cluster's first document in input order kept; a second round of
per-file tasks writes the final shards. Results come back in input order (a split file's ranges
merged in order: `merge_ranges`) and every decision depends only on the data, so the output is the
same byte for byte whichever task finishes first, and however the files are cut.

stats.json lists the Ray node of every unit (`units`: each file's cleaning, per range if it was
split, then its writing; `node_id` None outside Ray).

The work dir holds the units, each recorded as finished once its files are in place (pipeline/units.py):

    parts/<file>.parquet, <file>.hashes.npy, <file>.done.json    a file cleaned: candidates, hashes
    parts/<file>-<range>.parquet, ...                              a range of a large file cleaned
    parts/<file>-b<block>.parquet, ..., <file>-blocks.done.json    a block cleaned; how many (once read)
    docs/part-<file>-<k>.parquet, <file>.done.json                 a file written: its final shards
    bands/<band>.npy                                               a large corpus's band tasks' pairs (not units)

A run that dies keeps them: the next one reuses every unit whose record matches what it would make
now (the input file's size and mtime, the settings, the held-out n-grams; for shards also the parts
and a digest of its duplicate and near-duplicate decisions, which the driver finds again from the
saved hashes), says in the log "N of M units already done" (M: a file's ranges, and one to write
it), and redoes the rest, so the artifact is the same byte for byte. The tasks run on whichever
node has a free core, whatever the root: on an object-store root (s3://) the units are folders of
the run's prefix (`.work/ingest-<key>/`, pipeline/units.py `Folder`), written by the tasks from their
nodes, so a driver on any machine resumes them. On a local or shared root the shards are
hard-linked into the artifact; on an object store the commit copies them there, server-side; each
with the sha256 its task computed, nothing hashed again. The units are removed once the artifact is
complete.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from data_prep.blocks import Blocks
from data_prep.cleaning import (
    BAD_RECORD,
    CleanTask,
    FileResult,
    WriteTask,
    clean_file,
    find_duplicates,
    finished_clean,
    max_line_bytes,
    merge_ranges,
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
from data_prep.readers import byte_ranges, resolve_sources, splittable
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
    parts, shards = units.Folder.of(ctx, "parts"), units.Folder.of(ctx, "docs")
    for folder in (parts, shards):  # kept from an earlier attempt: its finished units are reused
        folder.clear_temporary()
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

    def clean_task(i: int, p: str, facts: dict, name: str, where: dict, **kw) -> CleanTask:
        identity = {"input": facts, **settings, **checks, **where}
        return CleanTask(index=i, path=p, folder=parts, name=name, **settings, identity=identity,
                         near_dup=near_dup, heldout=heldout, **kw)  # fmt: skip

    # each file's cleaning units: itself, its byte ranges, or (a file one reader reads) its blocks
    by_file: list[list[CleanTask]] = []
    blocks: dict[int, Blocks] = {}
    split = int(c.split_mb * 2**20)
    for i, p in enumerate(paths):
        ranges, facts = byte_ranges(p, split), units.file_facts(p)
        if ranges == [None] and _read_in_blocks(p, split):
            task_of = partial(_block_task, clean_task, i, p, facts, split)
            blocks[i] = Blocks(i, p, facts, split, max_line_bytes(c.max_chars), parts, task_of)
            by_file.append([])  # known once it is read
            continue
        by_file.append([
            clean_task(i, p, facts, f"{i:05d}" if len(ranges) == 1 else f"{i:05d}-{k:04d}",
                       {"range": r} if r else {}, byte_range=r)
            for k, r in enumerate(ranges)
        ])  # fmt: skip

    # 1. per file, range or block: stream, clean, write candidates + hashes (parallel); finished
    # ones are reused
    listing = parts.listing()  # an object-store root's: listed once
    cleaned = {t.name: finished_clean(t, listing) for f in by_file for t in f}
    for b in blocks.values():
        b.find_finished(listing)
    todo = [t for f in by_file for t in f if cleaned[t.name] is None]
    to_read = [b for b in blocks.values() if not b.complete]
    for b in blocks.values():
        if b.complete:
            by_file[b.index] = _take_blocks(b, cleaned)
    known = sum(map(len, by_file)) + sum(len(b.finished) for b in to_read)  # units known so far
    total = known + len(paths)  # units: each file (or range, or block) cleaned, each file written
    results = writes = None
    if not todo and not to_read:
        results = _results(c, by_file, cleaned)
        writes = _writes(c, ctx, by_file, cleaned, results, shards, total)
    ctx.logger.info(
        "ingest: %d of %d units already done (%d of %d files cleaned, %d written%s)",
        known - len(todo) + (writes.done() if writes else 0), total,
        sum(bool(f) and all(cleaned[t.name] for t in f) for f in by_file), len(paths),
        len(writes.finished) if writes else 0,
        f"; {len(to_read)} file(s) to read in blocks, counted as they are read" if to_read else "",
    )  # fmt: skip
    if todo:
        got = ctx.map(clean_file, todo, num_cpus=c.num_cpus, progress=(known - len(todo), total))
        cleaned.update(zip((t.name for t in todo), got, strict=True))
    if to_read:  # each file read by one task, its blocks cleaned by others meanwhile
        read = ctx.map_streams(
            clean_file, [b.stream() for b in to_read], num_cpus=c.num_cpus, progress=(known, total)
        )
        for b, (got, summary) in zip(to_read, read, strict=True):
            b.read(got, summary)
            by_file[b.index] = _take_blocks(b, cleaned)
        total = sum(map(len, by_file)) + len(paths)
    if results is None:
        results = _results(c, by_file, cleaned)

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
        writes = _writes(c, ctx, by_file, cleaned, results, shards, total)
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
    for w in written.values():  # into the artifact, with the size and sha256 their tasks computed
        for shard in w["shards"]:
            name, facts = shard["file"], w.get("files", {}).get(shard["file"])
            if shards.remote:  # in the root already: copied there into the artifact at the commit
                ctx.place(f"docs/{name}", facts, source=shards.root_rel(name))
                continue
            units.link_or_copy(shards.local() / name, docs_dir / name)  # the units stay whole until removed
            if facts:
                ctx.place(f"docs/{name}", facts)
    ctx.progress(total, total, unit="units")

    stats = _stats(results, written, c.max_errors, by_file, cleaned)
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
    for folder in (parts, units.Folder.of(ctx, "bands")):  # the artifact holds the result now
        ctx.discard(folder)
    ctx.discard_when_committed(shards)  # on an object store the commit copies its shards
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


def _results(c, by_file: list[list[CleanTask]], cleaned: dict[str, FileResult]) -> list[FileResult]:
    """Each file's step-1 result, from its units' (one, or one per byte range or block), in input order."""
    return [merge_ranges([cleaned[t.name] for t in f], c.max_errors) for f in by_file]


def _read_in_blocks(path: str, split: int) -> bool:
    """A file one reader must read whole (compressed: a .zst that no frames cut, a .gz) and large enough
    to hold more than one block of text, as judged from its compressed size (text compresses 3-5x)."""
    return not splittable(path) and not path.startswith("hf:") and os.path.getsize(path) * 4 > split


def _block_task(clean_task, i: int, p: str, facts: dict, split: int, k: int, name: str) -> CleanTask:
    return clean_task(i, p, facts, name, {"block": [k, split]}, block=k)


def _take_blocks(b: Blocks, cleaned: dict[str, FileResult]) -> list[CleanTask]:
    """A read file's block tasks, their results added to `cleaned`."""
    pairs = b.results()
    cleaned.update((t.name, r) for t, r in pairs)
    return [t for t, _ in pairs]


def _writes(
    c, ctx, by_file: list[list[CleanTask]], cleaned: dict[str, FileResult], results: list[FileResult],
    shards: units.Folder, total: int,
) -> _Writes:  # fmt: skip
    """Find the duplicates and near-duplicates across the good files (counted in their results), and
    the write unit of each: its identity holds its parts' and the decisions about its documents (a
    digest of its occurrences and near-duplicate flags), so that a change upstream of a shard never
    reuses an old one."""
    good = [r for r in results if r.status == "ok"]
    hashes = [r.hashes for r in good]
    plan = _Writes(bad=len(results) - len(good))
    refs, cleaned_on = {}, {}  # each file's parts, as their tasks recorded
    for f in by_file:
        done = [cleaned[t.name] for t in f]
        refs[f[0].index] = [
            units.FileRef(t.folder, t.part, u.files.get(t.part, {}).get("sha256"))
            for t, u in zip(f, done, strict=True)
        ]
        cleaned_on[f[0].index] = Counter(u.node_id for u in done).most_common(1)[0][0]
    occurrences = find_duplicates(hashes)
    settings = {"dedup": c.dedup, "set_weights": dict(c.set_weights), "docs_per_shard": c.docs_per_shard}
    listing = shards.listing()  # an object-store root's: listed once
    near = [None] * len(good)
    if c.near_dedup:
        parts = [ref for r in good for ref in refs[r.index]]
        if sum(map(len, hashes)) >= BAND_TASK_MIN_DOCS:  # a task per band, each saving its pairs
            folder = units.Folder.of(ctx, "bands")
            bands = [BandTask(k, parts, folder) for k in range(c.near_dedup_bands)]
            plan.band_tasks = len(bands)
            step = len(cleaned)
            saved = ctx.map(band_pairs, bands, num_cpus=c.num_cpus, progress=(step, total + len(bands)))
            pairs = (np.load(folder.fetch(s["name"], s.get("sha256"))) for s in saved)  # a band at a time
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
            parts=refs[r.index],
            occurrence=occ,
            near=flags,
            folder=shards,
            name=f"{r.index:05d}",
            **settings,
            on_node=cleaned_on[r.index],  # where most of its parts are: run there if it can
            identity={
                "part": [t.identity for t in by_file[r.index]]
                if len(by_file[r.index]) > 1
                else by_file[r.index][0].identity,
                "occurrence": units.digest(occ.astype("<i8").tobytes()),
                "near": None if flags is None else units.digest(np.packbits(flags).tobytes()),
                **settings,
            },
        )
        if (saved := shards.finished(task.name, task.identity, listing)) is not None:
            plan.finished[r.index] = saved["result"]
        else:
            plan.todo.append(task)
    return plan


def _stats(results, written: dict, max_errors: int, by_file, cleaned) -> dict:
    """stats.json: totals, one entry per input file (in input order), the capped error list, and the
    Ray node of every unit (`units`: each file's cleaning, per byte range if it was split, then its
    writing)."""
    files, dropped, errors, sets, set_bytes = [], Counter(), [], Counter(), Counter()
    shards, placed = [], []
    for r in results:
        w = written.get(r.index, {"kept": 0, "written": 0, "shards": [], "sets": {}, "set_bytes": {}})
        for t in by_file[r.index]:
            where = (
                {"range": list(t.byte_range)}
                if t.byte_range
                else {"block": t.block}
                if t.block is not None
                else {}
            )
            placed.append({"file": r.index, "unit": "clean", **where, "node_id": cleaned[t.name].node_id})
        if r.index in written:
            placed.append({"file": r.index, "unit": "write", "node_id": w.get("node_id")})
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
        "units": placed,
    }
