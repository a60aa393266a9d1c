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
whichever task finishes first.

The work dir holds the units, each recorded as finished once its files are in place (pipeline/units.py):

    parts/<file>.parquet, <file>.hashes.npy, <file>.done.json    a file cleaned: candidates, hashes
    docs/part-<file>-<k>.parquet, <file>.done.json                 a file written: its final shards

A run that dies keeps them: the next one reuses every unit whose record matches what it would make
now (the input file's size and mtime, the settings; for shards also the part and a digest of its
duplicate decisions, which the driver finds again from the saved hashes), says in the log "N of M
units already done" (M: two per file), and redoes the rest, so the artifact is the same byte for
byte. The shards are hard-linked into the artifact, and the units removed once it is complete.
On a multi-node cluster with a shared-filesystem root the tasks spread over the nodes; with an
object-store root (s3://) the work dir is local to the stage's driver, so the runner keeps the tasks
on its node (pipeline/ray_context.py), and a run resumes mid-stage on that node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
from data_prep.readers import resolve_sources
from pipeline import units
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
    tasks = [
        CleanTask(
            index=i,
            path=p,
            part=str(parts / f"{i:05d}.parquet"),
            **settings,
            record=str(units.record_path(parts, f"{i:05d}")),
            identity={"input": units.file_facts(p), **settings},
        )
        for i, p in enumerate(paths)
    ]
    total = 2 * len(tasks)  # units: each file cleaned, then written (nothing to write for a bad file)

    # 1. per file: stream, clean, write candidates + hashes (parallel); finished ones are reused
    results = [finished_clean(t) for t in tasks]
    todo = [t for t, r in zip(tasks, results, strict=True) if r is None]
    writes = None if todo else _writes(c, tasks, results, shards)  # all cleaned: step 3's state too
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

    # 2. exact duplicates across all files, in input order (driver: 8 bytes per candidate + sort)
    if writes is None:
        writes = _writes(c, tasks, results, shards)
        if writes.finished:  # shards an earlier attempt wrote, that the files cleaned since left valid
            ctx.logger.info(
                "ingest: %d of %d files already written",
                len(writes.finished), len(writes.finished) + len(writes.todo),
            )  # fmt: skip

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
    write_json_atomic(out / "stats.json", stats)
    for folder in (shards, parts):  # the artifact holds the result now
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
        "files_skipped": sum(r.status == "skipped" for r in results),
        "text_bytes": stats["text_bytes"],
        "shards": len(stats["shards"]),
    }


@dataclass
class _Writes:
    """Step 3's units: those an earlier attempt finished (file index -> result), those to do, and
    the bad files' (nothing to write: done as they are)."""

    finished: dict[int, dict] = field(default_factory=dict)
    todo: list[WriteTask] = field(default_factory=list)
    bad: int = 0

    def done(self) -> int:
        return len(self.finished) + self.bad


def _writes(c, tasks: list[CleanTask], results: list[FileResult], shards: Path) -> _Writes:
    """Find the duplicates across the good files (counted in their results), and the write unit of
    each: its identity holds its part's and the duplicate decisions (a digest of its occurrences),
    so that a change upstream of a shard never reuses an old one."""
    good = [r for r in results if r.status == "ok"]
    occurrences = find_duplicates([r.hashes for r in good])
    settings = {"dedup": c.dedup, "set_weights": dict(c.set_weights), "docs_per_shard": c.docs_per_shard}
    plan = _Writes(bad=len(results) - len(good))
    for r, occ in zip(good, occurrences, strict=True):
        if c.dedup and (n_dup := int((occ > 0).sum())):
            r.dropped["duplicate"] += n_dup
        task = WriteTask(
            index=r.index,
            part=tasks[r.index].part,
            occurrence=occ,
            out_dir=str(shards),
            **settings,
            record=str(units.record_path(shards, f"{r.index:05d}")),
            identity={
                "part": tasks[r.index].identity,
                "occurrence": units.digest(occ.astype("<i8").tobytes()),
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
