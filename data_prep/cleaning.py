"""Cleaning for the ingest stage, in three steps that keep memory flat and output order-independent.

1. `clean_file(task)`  one task per input file, or per byte range of a large plain one (the lines
   that begin in it; `merge_ranges` makes the file's result of its ranges'): stream records, drop bad
   ones (counted by reason, listed with file:line up to a cap) and filtered ones, write the
   candidates to a Parquet part with their 64-bit content hash, return counts and the hashes (8
   bytes per document).
2. `find_duplicates(hashes)`  in the driver: across all files in input order, which candidates
   repeat an earlier one (the first occurrence is kept).
3. `write_docs(task)`  one task per file: its parts minus duplicates (and near-duplicates), each
   document written `copies` times (set weights), as Parquet shards `text, source, id`.

Steps 1 and 3 are units (pipeline/units.py) in a `Folder` of the stage's work dir: each task renames
its files into place, publishes them (on an object-store root: uploads them, from whichever node it
runs on), then records itself done, last; `finished_clean` and `Folder.finished` give an earlier
attempt's result back. Step 3 fetches the part it reads (nothing on the node that cleaned the file)
and returns each shard's size and sha256, so the commit reads none of them again.

With near-duplicate removal on, step 1 also stores each candidate's MinHash band hashes in its part
(data_prep/near_dup.py), and between steps 2 and 3 the stage finds the clusters of near-duplicates
across all files from them; with held-out sets to decontaminate against, step 1 drops the documents
that quote them (data_prep/decontaminate.py).

Every record read ends up in exactly one place: kept, or dropped with one reason, so
`read == kept + sum(dropped)` per file and in total. Check order (first that applies wins):
invalid_utf8, malformed_json, missing_text, text_not_string, empty, excluded_set, too_short,
too_long, contaminated, downsampled, duplicate, near_duplicate.

Ids are the document's content hash (16 hex digits), stable across runs and file names; a copy
(set weight > 1) or a kept duplicate (dedup off) gets `.occurrence.copy` appended. 64-bit hashes
collide with probability ~n^2/2^65: about 1e-3 over the Pile's 2e8 documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from data_prep.decontaminate import MIN_WORDS, HeldOut
from data_prep.near_dup import NearDupSpec, Signer, band_columns, band_hashes
from data_prep.ngrams import ngram_hashes, word_hashes
from data_prep.readers import BadFileError, lines_of, read_hf, read_lines
from pipeline import units

BAD_RECORD = ("invalid_utf8", "malformed_json", "missing_text", "text_not_string", "empty")
PART_COLUMNS = ["text", "source", "hash"]
"""The columns of a part that step 3 reads (the band hashes are step 2's)."""
UNKNOWN_SET = "unknown"
PART_ROWS, PART_BYTES = 4096, 4 << 20  # a Parquet row group is flushed at whichever comes first
SHARD_GROUP_ROWS = 4096  # row group size of the output shards (tokenizer sampling reads by row group)


def content_hash(text_bytes: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "little")


def copies_of(h: int, weight: float) -> int:
    """How many times a document is written: floor(w), plus one more with probability frac(w),
    decided by the high half of its hash (the split in tokenize uses the low half)."""
    whole = int(weight)
    return whole + (((h >> 32) / 2**32) < weight - whole)


@dataclass
class CleanTask:
    index: int
    path: str
    folder: units.Folder
    """Where to write the Parquet part of candidates, its hashes and its record."""
    name: str
    """The unit's name: `<name>.parquet`, `<name>.hashes.npy`, `<name>.done.json`."""
    min_chars: int
    max_chars: int
    include_sets: tuple[str, ...]
    set_weights: dict[str, float]
    max_errors: int
    identity: dict
    """What its output depends on: the input file (size, mtime) and the settings above and below."""
    near_dup: NearDupSpec | None = None
    """With it, the part holds each candidate's band hashes (columns `band_00` ...)."""
    heldout: HeldOut | None = None
    """With it, documents that quote a held-out text are dropped as `contaminated`."""
    byte_range: tuple[int, ...] | None = None
    """The lines of a plain file (or, in decompressed offsets, of a .zst's run of frames) that begin in
    [start, end) (data_prep/readers.py `byte_ranges`); None: all of it."""
    block: int | None = None
    """The block of a file one reader reads (data_prep/blocks.py): its bytes come with the task."""

    @property
    def part(self) -> str:
        return f"{self.name}.parquet"

    @property
    def hashes(self) -> str:
        """The content hashes of the part's rows (uint64 .npy), beside it."""
        return f"{self.name}.hashes.npy"


@dataclass
class FileResult:
    index: int
    path: str
    status: str = "ok"
    """ok | failed | skipped (set by the stage from ingest.on_bad_file)."""
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    errors: list[dict] = field(default_factory=list)
    blank_lines: int = 0
    lines: int = 0
    """Lines read, blank ones included: where the next range's line numbers start."""
    hashes: np.ndarray | None = None
    """uint64 content hash of each candidate, in file order (the rows of the part)."""
    error: str | None = None
    node_id: str | None = None
    """The Ray node that cleaned it (None outside Ray)."""
    files: dict = field(default_factory=dict)
    """The part's and the hashes' {size, sha256} (sha256 on an object-store root), as written."""

    def counts(self) -> dict:
        """Everything but the hashes and the files' facts, as JSON (a unit's record)."""
        return {
            "index": self.index, "path": self.path, "status": self.status, "read": self.read,
            "dropped": dict(self.dropped), "errors": self.errors, "blank_lines": self.blank_lines,
            "lines": self.lines, "error": self.error, "node_id": self.node_id,
        }  # fmt: skip


def finished_clean(task: CleanTask, listing: dict | None = None) -> FileResult | None:
    """Step 1's result for this file if an earlier attempt finished it (pipeline/units.py), else None.
    `listing`: the folder's files in an object-store root (`Folder.listing`), listed once for all."""
    saved = task.folder.finished(task.name, task.identity, listing)
    if saved is None:
        return None
    res = FileResult(**{**saved["result"], "dropped": Counter(saved["result"]["dropped"])})
    digests = saved.get("sha256", {})
    res.files = {n: {"size": size, "sha256": digests.get(n)} for n, size in saved["files"].items()}
    if res.status == "ok":
        res.hashes = np.load(task.folder.fetch(task.hashes, digests.get(task.hashes)))
    return res


def parse_record(raw, task: CleanTask) -> tuple[str | None, str | None, str | None, bytes | None]:
    """(drop reason | None, text, pile set, text as UTF-8) of one JSON line (bytes) or one dict."""
    if isinstance(raw, bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8", None, None, None
        try:
            rec = json.loads(line)
        except ValueError:
            return "malformed_json", None, None, None
    else:
        rec = raw
    if not isinstance(rec, dict) or "text" not in rec:
        return "missing_text", None, None, None
    text = rec["text"]
    if not isinstance(text, str):
        return "text_not_string", None, None, None
    try:
        data = text.encode("utf-8")  # a lone surrogate (\ud800 in JSON) is not valid UTF-8
    except UnicodeEncodeError:
        return "invalid_utf8", None, None, None
    meta = rec.get("meta")
    source = meta.get("pile_set_name") if isinstance(meta, dict) else None
    source = source if isinstance(source, str) and source else UNKNOWN_SET
    n = len(text.strip())
    if n == 0:
        return "empty", None, None, None
    if task.include_sets and source not in task.include_sets:
        return "excluded_set", None, None, None
    if n < task.min_chars:
        return "too_short", None, None, None
    if len(text) > task.max_chars:
        return "too_long", None, None, None
    return None, text, source, data


def max_line_bytes(max_chars: int) -> int:
    """The longest JSON line read as a record: a line may spend up to 12 bytes per character (a
    "\\ud83d\\ude00" pair) plus its meta; a longer one is dropped as `too_long` without being held."""
    return 12 * max_chars + (1 << 16)


def clean_file(task: CleanTask, block: bytes | None = None) -> FileResult:
    """Step 1 for one file, range, or block (whose bytes come as `block`); a truncated/corrupt file
    comes back with status `failed` and its error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    res = FileResult(task.index, task.path, node_id=units.node_id())
    folder = task.folder.local()
    bands = band_columns(task.near_dup) if task.near_dup else []
    schema = pa.schema(
        [("text", pa.string()), ("source", pa.string()), ("hash", pa.uint64())]
        + [(name, pa.uint64()) for name in bands]
    )
    signer = Signer(task.near_dup) if task.near_dup else None
    tmp = folder / f"{task.part}.{os.getpid()}.tmp"
    hashes = []
    batch: dict[str, list] = {"texts": [], "sources": [], "hashes": [], "signatures": []}
    batch_bytes = 0

    def flush(writer):
        columns = [batch["texts"], batch["sources"], batch["hashes"]]
        if signer:
            by_band = band_hashes(np.stack(batch["signatures"]), task.near_dup).T
            columns += [np.ascontiguousarray(b) for b in by_band]
        writer.write_batch(pa.record_batch(columns, schema=schema))
        hashes.append(np.array(batch["hashes"], dtype=np.uint64))
        for v in batch.values():
            v.clear()

    max_line = max_line_bytes(task.max_chars)
    if block is not None:
        lines = lines_of(block, max_line)
    elif task.path.startswith("hf:"):
        lines = read_hf(task.path)
    else:
        lines = read_lines(task.path, max_line, task.byte_range)
    try:
        with pq.ParquetWriter(tmp, schema, compression="lz4") as writer:
            for lineno, raw in lines:
                res.lines = lineno
                if raw is not None and isinstance(raw, bytes) and not raw.strip():
                    res.blank_lines += 1  # not a record: not counted as read
                    continue
                res.read += 1
                if raw is None:
                    reason, text = "too_long", None
                else:
                    reason, text, source, data = parse_record(raw, task)
                if reason is None and (signer or task.heldout):
                    words = word_hashes(text)
                    windows = ngram_hashes(words, MIN_WORDS)  # held-out anchors; shingles by default
                    if task.heldout and task.heldout.contains(words, windows):
                        reason = "contaminated"
                if reason is None:
                    h = content_hash(data)
                    if copies_of(h, task.set_weights.get(source, 1.0)) == 0:
                        reason = "downsampled"
                if reason is not None:
                    res.dropped[reason] += 1
                    if reason in BAD_RECORD and len(res.errors) < task.max_errors:
                        res.errors.append({"file": task.path, "line": lineno, "reason": reason})
                    continue
                batch["texts"].append(text)
                batch["sources"].append(source)
                batch["hashes"].append(h)
                if signer:
                    same = signer.spec.shingle == MIN_WORDS
                    batch["signatures"].append(signer.signature(words, windows if same else None))
                batch_bytes += len(data)
                if len(batch["texts"]) >= PART_ROWS or batch_bytes >= PART_BYTES:
                    flush(writer)
                    batch_bytes = 0
            if batch["texts"]:
                flush(writer)
    except BadFileError as e:
        tmp.unlink(missing_ok=True)
        res.status, res.error = "failed", str(e)
        task.folder.record(task.name, task.identity, res.counts(), {})  # reading it again would fail again
        return res
    os.replace(tmp, folder / task.part)
    res.hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    tmp = folder / f"{task.hashes}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, res.hashes)
    os.replace(tmp, folder / task.hashes)
    res.files = task.folder.publish([task.part, task.hashes])
    task.folder.record(task.name, task.identity, res.counts(), res.files)
    return res


def merge_ranges(ranges: list[FileResult], max_errors: int) -> FileResult:
    """A file's step-1 result from those of its byte ranges, in order: the counts added, each error
    numbered by its line in the file (the first `max_errors` kept, as one task would), the hashes one
    after another: what one task reading the whole file returns."""
    if len(ranges) == 1 or any(r.status != "ok" for r in ranges):
        return next((r for r in ranges if r.status != "ok"), ranges[0])
    res = FileResult(ranges[0].index, ranges[0].path)
    for r in ranges:
        res.errors += [{**e, "line": e["line"] + res.lines} for e in r.errors]
        res.read += r.read
        res.dropped.update(r.dropped)
        res.blank_lines += r.blank_lines
        res.lines += r.lines
    res.errors = res.errors[:max_errors]
    res.hashes = np.concatenate([r.hashes for r in ranges])
    return res


def find_duplicates(hashes: list[np.ndarray]) -> list[np.ndarray]:
    """For each file's candidates, the occurrence number of its content across all files in input
    order: 0 for the first, 1 for the first repeat, ... Stable sort: ~25 bytes per document."""
    sizes = [len(h) for h in hashes]
    allh = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    n = len(allh)
    order = np.argsort(allh, kind="stable")
    sorted_h = allh[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_h[1:] != sorted_h[:-1]
    idx = np.arange(n)
    group_start = np.maximum.accumulate(np.where(starts, idx, 0))
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[order] = idx - group_start
    return np.split(occurrence, np.cumsum(sizes)[:-1]) if hashes else []


@dataclass
class WriteTask:
    index: int
    parts: list[units.FileRef]
    """The file's parts of candidates (step 1's: one per range), in order, as their writers recorded them."""
    occurrence: np.ndarray
    """Per candidate row: 0 = first occurrence; > 0 repeats (dropped when dedup is on)."""
    dedup: bool
    set_weights: dict[str, float]
    folder: units.Folder
    """Where its shards and its record go."""
    name: str
    """The unit's name (`<name>.done.json`)."""
    docs_per_shard: int
    identity: dict
    """What its output depends on: the part's own identity, the occurrences' digest, the settings."""
    near: np.ndarray | None = None
    """Per candidate row: True = dropped as a near-duplicate (stages/ingest.py decides); None: none is."""
    on_node: str | None = None
    """The Ray node that cleaned (most of) the file, whose cache holds its parts: the task runs there
    if it has a free core (pipeline/ray_context.py), reading them without fetching."""


def _candidates(parts: list[units.FileRef]):
    """(text, source, hash) of every row of the parts, in order, one row group (<= PART_BYTES of
    text) at a time."""
    import pyarrow.parquet as pq

    for ref in parts:
        with pq.ParquetFile(ref.fetch()) as part:
            for g in range(part.num_row_groups):
                batch = part.read_row_group(g, columns=PART_COLUMNS, use_threads=False)
                yield from zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True)


def write_docs(task: WriteTask) -> dict:
    """Step 3 for one file: shards `part-<file>-<k>.parquet` of `text, source, id` (zstd), written
    a row group (<= SHARD_GROUP_ROWS documents / PART_BYTES of text) at a time: memory stays flat.
    Published with their size and sha256 (`files`) and recorded as a finished unit once every shard
    is in place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("id", pa.string())])
    shards, sets, set_bytes = [], Counter(), Counter()
    buf: dict[str, list] = {"text": [], "source": [], "id": []}
    state = {"writer": None, "tmp": None, "rows": 0, "bytes": 0}
    kept = written = 0
    out_dir = task.folder.local()

    def flush_group():
        if state["writer"] is None:
            name = f"part-{task.index:05d}-{len(shards):05d}.parquet"
            state["tmp"] = out_dir / f".{name}.{os.getpid()}.tmp"  # a retried task writes its own
            state["writer"] = pq.ParquetWriter(state["tmp"], schema, compression="zstd")
            shards.append({"file": name, "docs": 0})
        state["writer"].write_table(pa.table(buf, schema=schema))
        shards[-1]["docs"] += len(buf["id"])
        for v in buf.values():
            v.clear()
        state["bytes"] = 0

    def close_shard():
        if buf["id"]:
            flush_group()
        if state["writer"] is not None:
            state["writer"].close()
            os.replace(state["tmp"], out_dir / shards[-1]["file"])
            state["writer"] = None

    row = 0
    for text, source, h in _candidates(task.parts):
        occ = int(task.occurrence[row])
        near = task.near is not None and task.near[row]
        row += 1
        if (occ and task.dedup) or near:
            continue
        kept += 1
        size = len(text.encode("utf-8"))
        for c in range(max(1, copies_of(h, task.set_weights.get(source, 1.0)))):
            buf["text"].append(text)
            buf["source"].append(source)
            buf["id"].append(f"{h:016x}" if not (occ or c) else f"{h:016x}.{occ}.{c}")
            sets[source] += 1
            set_bytes[source] += size
            written += 1
            state["bytes"] += size
            in_shard = shards[-1]["docs"] if state["writer"] else 0
            if in_shard + len(buf["id"]) >= task.docs_per_shard:
                close_shard()
            elif len(buf["id"]) >= SHARD_GROUP_ROWS or state["bytes"] >= PART_BYTES:
                flush_group()
    close_shard()
    files = task.folder.publish([s["file"] for s in shards], digest=True)
    result = {
        "kept": kept,
        "written": written,
        "shards": shards,
        "sets": dict(sets),
        "set_bytes": dict(set_bytes),
        "files": files,
        "node_id": units.node_id(),
    }
    task.folder.record(task.name, task.identity, result, files)
    return result
