"""Tokenizing and packing documents into fixed-length windows (the tokenize stage's work).

The convention (also written into index.json, read by `data_prep.packed.PackedTokens`):
- Each split (train / val, chosen per document: low 32 bits of its content hash / 2^32 < val_fraction)
  holds one token stream per source (the document's `source`, its Pile subset): every document of the
  split and source, in document order (ingest shard order, row order), its tokens followed by EOS
  (`<|endoftext|>`), so EOS sits between documents and after the last.
- Each stream is cut into windows of seq_len+1 tokens, window i = stream[i*(seq_len+1) : (i+1)*(seq_len+1)]
  (inputs = w[:-1], labels = w[1:]), back to back, no overlap. A window may span documents, never
  sources: pretraining blends the sources when it draws batches (kiln/mixture.py), so a weight
  changed there re-runs pretraining only.
- The last len(stream) % (seq_len+1) tokens of each stream fill no window: `tail_tokens_dropped`.
- A split's sequences are its sources' windows, source after source in sorted name order; index.json
  gives each source's `first_sequence` and `sequences`.
- Shard k of a split holds sequences [k*S, (k+1)*S) (S = sequences_per_shard) as a .npy array of
  shape (rows, seq_len+1), uint16 when every token id fits, else uint32.

Work is split in two so the output does not depend on the number of workers:
`pack_partition` tokenizes a contiguous range of documents into a flat stream per split and source
(one task each, a unit recorded as finished once its streams are in place: pipeline/units.py);
`plan_shards` lays each source's streams in partition order and cuts the windows, and `write_shard`
writes one shard file from the token ranges it holds (one task each, in parallel: the same bytes).
The tasks run on any node: a partition fetches the document shards it reads (pipeline/units.py
`Inputs`), its streams go through the stage's `Folder`, and a shard reads only the byte ranges of
the streams it holds; each shard comes back with its size and sha256, hashed as it was written.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import units

SPLITS = ("train", "val")
ENCODE_BATCH_BYTES = 1 << 20  # texts per encode_batch call: its Encodings take ~30x the text
COPY_TOKENS = 4 << 20  # tokens copied per read when writing a shard


def is_val(h: int, val_fraction: float) -> bool:
    return (h & 0xFFFFFFFF) / 2**32 < val_fraction


def plan_partitions(shards: list[tuple[Path, int]], partitions: int) -> list[list[tuple[str, int, int]]]:
    """Split the documents into `partitions` contiguous ranges of (nearly) equal document count,
    each a list of (shard, first row, end row); a shard is named as in `shards` (a path, or its
    place in the ingest artifact)."""
    total = sum(n for _, n in shards)
    p = max(1, min(partitions, total))
    bounds = [total * k // p for k in range(p + 1)]
    plans, offset = [[] for _ in range(p)], 0
    for path, n in shards:
        for k in range(p):
            lo, hi = max(bounds[k], offset), min(bounds[k + 1], offset + n)
            if lo < hi:
                plans[k].append((str(path), lo - offset, hi - offset))
        offset += n
    return plans


@dataclass
class PackTask:
    index: int
    ranges: list[tuple[str, int, int]]
    """(document shard in `docs`, first row, end row)."""
    docs: units.Inputs
    """The ingest artifact's files."""
    tokenizer: units.Inputs
    """The tokenizer artifact's files (`tokenizer.json`)."""
    eos_id: int
    dtype: str
    val_fraction: float
    folder: units.Folder
    """Streams go to <name>.<split>.<source slug>.bin there (`stream_name`), with the unit's record."""
    name: str
    identity: dict
    """What its streams depend on: the ranges' files (size, mtime), the tokenizer's digest, the settings."""


def stream_name(prefix: str, split: str, source: str) -> str:
    """The file of one split's and source's token stream: the source's name made safe for a path, and
    its CRC32 so that two names made alike stay apart."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", source)[:40]
    return f"{prefix}.{split}.{slug}-{zlib.crc32(source.encode()):08x}.bin"


def pack_partition(task: PackTask) -> dict:
    """Tokenize one range of documents into a raw token stream per split and source; return the
    counts: per split, documents and tokens in all, and per source those and its stream's file name."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(task.tokenizer.fetch("tokenizer.json")))
    out_prefix = str(task.folder.local() / task.name)
    tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not EOS
    counts = {s: {"documents": 0, "tokens": 0, "sources": {}} for s in SPLITS}
    tmp = f"{os.getpid()}.tmp"  # a task retried elsewhere writes its own, then renames
    files: dict[tuple[str, str], tuple] = {}  # (split, source) -> (open file, final path)
    texts: list[str] = []
    keys: list[tuple[str, str]] = []
    size = 0

    def flush():
        bufs: dict[tuple[str, str], list[int]] = {}
        for enc, key in zip(tok.encode_batch_fast(texts, add_special_tokens=False), keys, strict=True):
            buf = bufs.setdefault(key, [])
            buf.extend(enc.ids)
            buf.append(task.eos_id)
        for key, buf in bufs.items():
            split, source = key
            if key not in files:
                final = stream_name(out_prefix, split, source)
                files[key] = (open(f"{final}.{tmp}", "wb"), final)
                counts[split]["sources"][source] = {"documents": 0, "tokens": 0, "file": Path(final).name}
            np.asarray(buf, dtype=task.dtype).tofile(files[key][0])
            counts[split]["sources"][source]["tokens"] += len(buf)
        for split, source in keys:
            counts[split]["sources"][source]["documents"] += 1
        texts.clear()
        keys.clear()

    for rel, start, end in task.ranges:
        for text, doc_id, source in _rows(pq.ParquetFile(task.docs.fetch(rel)), start, end):
            texts.append(text)
            split = "val" if is_val(int(doc_id[:16], 16), task.val_fraction) else "train"
            keys.append((split, source))
            size += len(text)
            if size >= ENCODE_BATCH_BYTES:
                flush()
                size = 0
    if texts:
        flush()
    for f, final in files.values():
        f.close()
        os.replace(f"{final}.{tmp}", final)
    facts = task.folder.publish([Path(final).name for _, final in files.values()])
    for split in SPLITS:
        counts[split]["sources"] = dict(sorted(counts[split]["sources"].items()))
        for key in ("documents", "tokens"):
            counts[split][key] = sum(c[key] for c in counts[split]["sources"].values())
        for c in counts[split]["sources"].values():  # which version a reader on another node needs
            if "sha256" in facts[c["file"]]:
                c["sha256"] = facts[c["file"]]["sha256"]
    counts["node_id"] = units.node_id()
    task.folder.record(task.name, task.identity, counts, facts)
    return counts


def _rows(pf, start: int, end: int):
    """(text, id, source) of rows [start, end) of a Parquet file, one row group at a time."""
    first = 0
    columns = ["text", "id", "source"]
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(end, first + n)
        if lo < hi:
            t = pf.read_row_group(g, columns=columns).slice(lo - first, hi - lo)
            yield from zip(*(t.column(c).to_pylist() for c in columns), strict=True)
        first += n
        if first >= end:
            return


@dataclass
class ShardTask:
    """One shard file to write: `rows` windows of `width` tokens, read from `pieces`, each (stream file
    in `streams`, first token, tokens) of the sources' streams, in order. Written as `path` (in the
    staging folder of a local or shared root), or into `folder` (an object-store root's work folder,
    from which the commit copies it)."""

    path: str
    rows: int
    width: int
    dtype: str
    pieces: list[tuple[str, int, int]]
    streams: units.Folder
    digests: dict[str, str]
    """The sha256 of each stream file of `pieces` (on an object-store root: the version to read)."""
    folder: units.Folder | None = None


def plan_shards(
    sources: dict[str, list[tuple[str, int]]], out: Path, split: str, seq_len: int, per_shard: int,
    dtype: str, streams: units.Folder, digests: dict[str, str], folder: units.Folder | None = None,
) -> tuple[dict, list[ShardTask]]:  # fmt: skip
    """The split's index and the shards that hold it: each source's streams ((file, tokens) in `streams`,
    in partition order) cut into windows, the sources one after another in sorted name order, shard k
    the windows [k*S, (k+1)*S). Each shard is written by `write_shard` on its own, so the shards of a
    split can be written in parallel and give the bytes one writer would."""
    width = seq_len + 1
    layout, runs, first = {}, [], 0  # runs: (first window, windows, that source's stream files and sizes)
    for source in sorted(sources):
        sizes = list(sources[source])
        tokens = sum(n for _, n in sizes)
        n = tokens // width
        layout[source] = {"first_sequence": first, "sequences": n, "tokens": int(tokens),
                          "tail_tokens_dropped": int(tokens - n * width)}  # fmt: skip
        runs.append((first, n, sizes))
        first += n
    sequences = first
    shards, tasks = [], []
    for k, lo in enumerate(range(0, sequences, per_shard)):
        hi = min(lo + per_shard, sequences)
        name = f"{split}-{k:05d}.npy"
        pieces = []
        for start, n, sizes in runs:  # the sources' windows in [lo, hi), as token ranges of their streams
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                pieces += _token_range(sizes, (a - start) * width, (b - a) * width)
        used = {p for p, _, _ in pieces}
        mine = {p: d for p, d in digests.items() if p in used}
        tasks.append(ShardTask(str(out / name), hi - lo, width, dtype, pieces, streams, mine, folder))
        shards.append({"file": name, "sequences": hi - lo, "first_sequence": lo})
    total = sum(v["tokens"] for v in layout.values())
    index = {
        "tokens": int(total),
        "sequences": int(sequences),
        "tokens_in_sequences": int(sequences * width),
        "tail_tokens_dropped": int(total - sequences * width),
        "shards": shards,
        "sources": layout,
    }
    return index, tasks


def _token_range(sizes: list[tuple[str, int]], start: int, count: int) -> list[tuple[str, int, int]]:
    """Tokens [start, start + count) of files read one after another, as (file, first token, tokens) pieces."""
    pieces, offset = [], 0
    for path, n in sizes:
        a, b = max(start, offset), min(start + count, offset + n)
        if a < b:
            pieces.append((path, a - offset, b - a))
        offset += n
    return pieces


def write_shard(task: ShardTask) -> dict:
    """Write one shard (`plan_shards`): header, then its windows' tokens copied piece by piece, memory
    flat; under a temporary name, renamed into place. Returns its file name, size, sha256 (hashed as
    it is written) and the node that wrote it."""
    item = np.dtype(task.dtype).itemsize
    if sum(n for _, _, n in task.pieces) != task.rows * task.width:
        raise RuntimeError(f"{task.path}: its pieces do not hold {task.rows} windows; a stream file changed")
    name = Path(task.path).name
    dest = task.folder.local() / name if task.folder else Path(task.path)
    tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as raw:

        def write(data: bytes) -> None:
            raw.write(data)
            digest.update(data)

        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(task.dtype)), "fortran_order": False,
                  "shape": (task.rows, task.width)}  # fmt: skip
        with io.BytesIO() as head:
            np.lib.format.write_array_header_1_0(head, header)
            write(head.getvalue())
        for path, first, n in task.pieces:
            with task.streams.open(path, task.digests.get(path)) as src:
                src.seek(first * item)
                left = n * item
                while left:
                    chunk = src.read(min(left, COPY_TOKENS * item))
                    if not chunk:
                        raise RuntimeError(
                            f"{path} ended {left // item} tokens early: a stream file changed while packing"
                        )
                    write(chunk)
                    left -= len(chunk)
    os.replace(tmp, dest)
    facts = {"size": dest.stat().st_size, "sha256": digest.hexdigest()}
    if task.folder is not None:
        facts = task.folder.publish([name])[name]
    return {"file": name, **facts, "node_id": units.node_id()}
