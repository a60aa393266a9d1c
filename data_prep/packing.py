"""Tokenizing and packing documents into fixed-length windows (the tokenize stage's work).

The convention (also written into index.json, read by `data_prep.packed.PackedTokens`):
- Each split (train / val, chosen per document: low 32 bits of its content hash / 2^32 < val_fraction)
  is one token stream: every document of the split, in document order (ingest shard order, row order),
  its tokens followed by EOS (`<|endoftext|>`), so EOS sits between documents and after the last.
- Sequence i of a split is stream[i*(seq_len+1) : (i+1)*(seq_len+1)]: windows of seq_len+1 tokens
  (inputs = w[:-1], labels = w[1:]), back to back, no overlap. A sequence may span documents.
- The last len(stream) % (seq_len+1) tokens fill no window: counted as `tail_tokens_dropped`.
- Shard k of a split holds sequences [k*S, (k+1)*S) (S = sequences_per_shard) as a .npy array of
  shape (rows, seq_len+1), uint16 when every token id fits, else uint32.

Work is split in two so the output does not depend on the number of workers:
`pack_partition` tokenizes a contiguous range of documents into a flat stream per split (one task
each, a unit recorded as finished once its streams are in place: pipeline/units.py), and
`assemble` concatenates those streams in partition order and cuts the windows.
"""

from __future__ import annotations

import os
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
    """Streams go to <out_prefix>.train.bin / .val.bin."""
    record: str
    """Where the finished unit is recorded (pipeline/units.py), beside its streams."""
    identity: dict
    """What its streams depend on: the ranges' files (size, mtime), the tokenizer's digest, the settings."""


def pack_partition(task: PackTask) -> dict:
    """Tokenize one range of documents into a raw token stream per split; return the counts."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(task.tokenizer_json)
    tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not EOS
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    tmp = f"{os.getpid()}.tmp"  # a task retried elsewhere writes its own, then renames
    files = {s: open(f"{task.out_prefix}.{s}.bin.{tmp}", "wb") for s in SPLITS}
    texts: list[str] = []
    splits: list[str] = []
    size = 0

    def flush():
        bufs = {s: [] for s in SPLITS}
        for enc, split in zip(tok.encode_batch_fast(texts, add_special_tokens=False), splits, strict=True):
            buf = bufs[split]
            buf.extend(enc.ids)
            buf.append(task.eos_id)
            counts[split]["documents"] += 1
        for s, buf in bufs.items():
            if buf:
                np.asarray(buf, dtype=task.dtype).tofile(files[s])
                counts[s]["tokens"] += len(buf)
        texts.clear()
        splits.clear()

    for path, start, end in task.ranges:
        for text, doc_id in _rows(pq.ParquetFile(path), start, end):
            texts.append(text)
            splits.append("val" if is_val(int(doc_id[:16], 16), task.val_fraction) else "train")
            size += len(text)
            if size >= ENCODE_BATCH_BYTES:
                flush()
                size = 0
    if texts:
        flush()
    for s, f in files.items():
        f.close()
        os.replace(f"{task.out_prefix}.{s}.bin.{tmp}", f"{task.out_prefix}.{s}.bin")
    units.record(task.record, task.identity, counts, [Path(f"{task.out_prefix}.{s}.bin") for s in SPLITS])
    return counts


def _rows(pf, start: int, end: int):
    """(text, id) of rows [start, end) of a Parquet file, one row group at a time."""
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(end, first + n)
        if lo < hi:
            t = pf.read_row_group(g, columns=["text", "id"]).slice(lo - first, hi - lo)
            yield from zip(t.column("text").to_pylist(), t.column("id").to_pylist(), strict=True)
        first += n
        if first >= end:
            return


def assemble(streams: list[Path], out: Path, split: str, seq_len: int, per_shard: int, dtype: str) -> dict:
    """Cut the concatenated streams into windows and write shards <split>-<k>.npy; the split's index."""
    width = seq_len + 1
    item = np.dtype(dtype).itemsize
    total = sum(p.stat().st_size // item for p in streams)
    sequences = total // width
    shards = []
    reader = _Concat(streams, dtype)
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
    return {
        "tokens": int(total),
        "sequences": int(sequences),
        "tokens_in_sequences": int(sequences * width),
        "tail_tokens_dropped": int(total - sequences * width),
        "shards": shards,
    }


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
