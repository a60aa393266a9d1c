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
"""

from __future__ import annotations

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
    each a list of (shard path, first row, end row)."""
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
    tokenizer_json: str
    eos_id: int
    dtype: str
    val_fraction: float
    out_prefix: str
    """Streams go to <out_prefix>.<split>.<source slug>.bin (`stream_name`)."""
    record: str
    """Where the finished unit is recorded (pipeline/units.py), beside its streams."""
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

    tok = Tokenizer.from_file(task.tokenizer_json)
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
                final = stream_name(task.out_prefix, split, source)
                files[key] = (open(f"{final}.{tmp}", "wb"), final)
                counts[split]["sources"][source] = {"documents": 0, "tokens": 0, "file": Path(final).name}
            np.asarray(buf, dtype=task.dtype).tofile(files[key][0])
            counts[split]["sources"][source]["tokens"] += len(buf)
        for split, source in keys:
            counts[split]["sources"][source]["documents"] += 1
        texts.clear()
        keys.clear()

    for path, start, end in task.ranges:
        for text, doc_id, source in _rows(pq.ParquetFile(path), start, end):
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
    for split in SPLITS:
        counts[split]["sources"] = dict(sorted(counts[split]["sources"].items()))
        for key in ("documents", "tokens"):
            counts[split][key] = sum(c[key] for c in counts[split]["sources"].values())
    units.record(task.record, task.identity, counts, [Path(final) for _, final in files.values()])
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
    """One shard file to write: `rows` windows of `width` tokens, read from `pieces`, each (stream file,
    first token, tokens) of the sources' streams, in order."""

    path: str
    rows: int
    width: int
    dtype: str
    pieces: list[tuple[str, int, int]]


def plan_shards(
    sources: dict[str, list[Path]], out: Path, split: str, seq_len: int, per_shard: int, dtype: str
) -> tuple[dict, list[ShardTask]]:
    """The split's index and the shards that hold it: each source's streams (in partition order) cut into
    windows, the sources one after another in sorted name order, shard k the windows [k*S, (k+1)*S).
    Each shard is written by `write_shard` on its own, so the shards of a split can be written in parallel
    and give the bytes one writer would."""
    width = seq_len + 1
    item = np.dtype(dtype).itemsize
    layout, runs, first = {}, [], 0  # runs: (first window, windows, that source's stream files and sizes)
    for source in sorted(sources):
        sizes = [(str(p), p.stat().st_size // item) for p in sources[source]]
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
        tasks.append(ShardTask(str(out / name), hi - lo, width, dtype, pieces))
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


def write_shard(task: ShardTask) -> str:
    """Write one shard (`plan_shards`): header, then its windows' tokens copied piece by piece, memory
    flat; under a temporary name, renamed into place."""
    item = np.dtype(task.dtype).itemsize
    if sum(n for _, _, n in task.pieces) != task.rows * task.width:
        raise RuntimeError(f"{task.path}: its pieces do not hold {task.rows} windows; a stream file changed")
    tmp = Path(task.path).with_name(f".{Path(task.path).name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(task.dtype)), "fortran_order": False,
                  "shape": (task.rows, task.width)}  # fmt: skip
        np.lib.format.write_array_header_1_0(f, header)
        for path, first, n in task.pieces:
            with open(path, "rb") as src:
                src.seek(first * item)
                while n:
                    chunk = np.fromfile(src, dtype=task.dtype, count=min(n, COPY_TOKENS))
                    if not len(chunk):
                        raise RuntimeError(
                            f"{path} ended {n} tokens early: a stream file changed while packing"
                        )
                    chunk.tofile(f)
                    n -= len(chunk)
    os.replace(tmp, task.path)
    return task.path
