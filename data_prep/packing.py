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
(one task each, a unit recorded as finished once its streams are in place: pipeline/units.py), and
`assemble` concatenates each source's streams in partition order and cuts the windows.
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
COPY_TOKENS = 4 << 20  # tokens copied per read when assembling shards


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


def assemble(
    sources: dict[str, list[Path]], out: Path, split: str, seq_len: int, per_shard: int, dtype: str
) -> dict:
    """Cut each source's streams (in partition order) into windows, the sources one after another in
    sorted name order, and write them as shards <split>-<k>.npy; the split's index."""
    width = seq_len + 1
    item = np.dtype(dtype).itemsize
    layout, first = {}, 0
    for source in sorted(sources):
        tokens = sum(p.stat().st_size // item for p in sources[source])
        n = tokens // width
        layout[source] = {"first_sequence": first, "sequences": n, "tokens": int(tokens),
                          "tail_tokens_dropped": int(tokens - n * width)}  # fmt: skip
        first += n
    sequences = first
    shards = []
    reader = _Windows([(sources[s], layout[s]["sequences"] * width) for s in layout], dtype)
    for k, first in enumerate(range(0, sequences, per_shard)):
        rows = min(per_shard, sequences - first)
        name = f"{split}-{k:05d}.npy"
        tmp = out / f".{name}.tmp"
        with open(tmp, "wb") as f:  # header + raw rows, streamed: memory stays flat
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": (rows, width),
                },
            )
            left = rows * width
            while left:
                chunk = reader.read(min(left, COPY_TOKENS))
                chunk.tofile(f)
                left -= len(chunk)
        os.replace(tmp, out / name)
        shards.append({"file": name, "sequences": rows, "first_sequence": first})
    reader.close()
    total = sum(v["tokens"] for v in layout.values())
    return {
        "tokens": int(total),
        "sequences": int(sequences),
        "tokens_in_sequences": int(sequences * width),
        "tail_tokens_dropped": int(total - sequences * width),
        "shards": shards,
        "sources": layout,
    }


class _Windows:
    """The tokens of every window, source after source: of each (streams, n) the first n tokens of
    the streams read as one, the rest (the source's tail) skipped."""

    def __init__(self, segments: list[tuple[list[Path], int]], dtype: str):
        self.segments, self.dtype = [(s, n) for s, n in segments if n], dtype
        self.reader, self.left = None, 0

    def read(self, n: int) -> np.ndarray:
        parts = []
        while n:
            if not self.left:
                if self.reader is not None:
                    self.reader.close()
                streams, self.left = self.segments.pop(0)
                self.reader = _Concat(streams, self.dtype)
            got = self.reader.read(min(n, self.left))
            self.left -= len(got)
            n -= len(got)
            parts.append(got)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self):
        if self.reader is not None:
            self.reader.close()


class _Concat:
    """Read a list of raw token files as one stream."""

    def __init__(self, paths: list[Path], dtype: str):
        self.paths, self.dtype, self.i, self.f = list(paths), dtype, 0, None

    def read(self, n: int) -> np.ndarray:
        parts, need = [], n
        while need and self.i < len(self.paths):
            if self.f is None:
                self.f = open(self.paths[self.i], "rb")
            got = np.fromfile(self.f, dtype=self.dtype, count=need)
            if len(got) < need:
                self.f.close()
                self.f, self.i = None, self.i + 1
            parts.append(got)
            need -= len(got)
        if need:
            raise RuntimeError(
                f"token streams ended {need} tokens early: a partition file changed while packing"
            )
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self):
        if self.f is not None:
            self.f.close()
