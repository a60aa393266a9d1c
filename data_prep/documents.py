"""Reading the ingest artifact's document shards: listing, hashing ids, deterministic sampling.

    shards = doc_shards(ingest_artifact.path)        # [(path, rows), ...] in document order
    for text in sample_texts(shards, fraction, seed): ...

A document's id starts with its 64-bit content hash in hex, so decisions taken from the id
(train/validation split, tokenizer sample) give every copy of a text the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

MASK64 = (1 << 64) - 1


def doc_shards(ingest_dir: Path) -> list[tuple[Path, int]]:
    """(shard path, document count) in document order, as listed in the artifact's stats.json."""
    ingest_dir = Path(ingest_dir)
    stats = json.loads((ingest_dir / "stats.json").read_text())
    return [(ingest_dir / "docs" / s["file"], s["docs"]) for s in stats["shards"]]


def id_hash(doc_id: str) -> int:
    return int(doc_id[:16], 16)


def unit(h: int, seed: int = 0) -> float:
    """A uniform number in [0, 1) from a 64-bit hash and a seed (splitmix64 finaliser)."""
    z = (h + (seed + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) / 2**64


def sample_texts(
    shards: list[tuple[Path, int]], lo: float, hi: float, seed: int, budget_bytes: int
) -> Iterator[str]:
    """Texts of the documents whose unit(hash, seed) falls in [lo, hi), in document order, until
    budget_bytes of UTF-8 are reached. Reads the `id` column first and `text` only for row groups
    that hold a chosen document, so a small sample of a large corpus reads little of it."""
    import pyarrow.parquet as pq

    used = 0
    for path, _ in shards:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            ids = pf.read_row_group(g, columns=["id"]).column(0).to_pylist()
            chosen = [i for i, d in enumerate(ids) if lo <= unit(id_hash(d), seed) < hi]
            if not chosen:
                continue
            texts = pf.read_row_group(g, columns=["text"]).column(0)
            for i in chosen:
                text = texts[i].as_py()
                yield text
                used += len(text.encode("utf-8"))
                if used >= budget_bytes:
                    return
