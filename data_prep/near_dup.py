"""Near-duplicate documents: MinHash signatures of word shingles, LSH bands, clusters.

    signer = Signer(NearDupSpec())                     # in each per-file task (ingest's step 1)
    signer.band_hashes(word_hashes(text))              # (bands,) uint64: what a part stores per document
    pairs = distinct_pairs(bucket_pairs(v) for v in band_values(parts, range(14)))  # pairs sharing a band
    near_duplicates(pairs, hashes, occurrences, dedup)  # per file, per document: dropped?

A document's shingles are its 5-word windows (data_prep/ngrams.py; a document of fewer words is one
shingle). Their resemblance, the Jaccard similarity s = |A & B| / |A | B| of two documents' shingle
sets, is what MinHash estimates (Broder, "On the resemblance and containment of documents", 1997):
each of bands x rows random hash functions keeps the smallest hash of a document's shingles, and two
documents keep the same value with probability s. The signature is cut into `bands` bands of `rows`
values; two documents whose values agree over a whole band become a candidate pair (locality-
sensitive hashing by banding: Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3), so
a pair of similarity s is found with probability

    P(s) = 1 - (1 - s^rows)^bands

With 14 bands of 8 rows (112 hash functions; datatrove's default, the setting FineWeb used):

    s     0.5    0.6    0.7    0.75   0.8    0.84   0.9    0.95
    P(s)  0.053  0.21   0.56   0.77   0.92   0.98   0.9996 1.0000

so the threshold is Jaccard ~0.8: a pair from there is found 92% of the time or more (98% at 0.84),
one below 0.5 less than 5% of the time (the curve's midpoint, (1/bands)^(1/rows), is 0.72). A pair
found is taken as near-duplicate without a second check (as datatrove and datasketch's MinHashLSH
do). Pairs are joined into clusters (connected components); of each cluster the first document in
input order is kept, as exact de-duplication keeps the first occurrence, so the result depends on
the data only, not on which task finished first. (A chain of near-duplicates is one cluster: its
ends may differ more than the threshold.)

Signatures are computed with rensa's `RMinHash` (MIT, Rust, 0.5.x: algorithm version 2), about 17x
faster than datasketch's numpy MinHash on the sample (0.08 s vs 1.34 s for 20k documents, one core),
which made the signatures most of ingest's time. It takes the shingles' 64-bit hashes as they are
(no hashing of its own) and fills its 112 slots by Fast Similarity Sketching (Dahlgaard, Knudsen &
Thorup, "Fast Similarity Sketching", FOCS 2017): each shingle picks a slot and a rank in a few seeded
rounds, and only slots still empty fall back to a hash over every shingle. Each slot holds the least
rank of a document's shingles, so a slot of two documents agrees with probability their Jaccard
similarity, as a classical MinHash's does (the slots are not quite independent, which the banding
formula assumes), and the signature does not depend on the shingles' order or repeats. Its seeds are fixed, so a signature is the same on every
machine and run; its version and algorithm version are part of ingest's identity (a new algorithm
re-runs ingest, never mixes signatures). That these slots behave as the formula above assumes is
checked, not proven: tests/test_data_dedup.py measures the share of pairs found against
P(s) over generated pairs of every similarity. Memory: a task keeps one row group of documents; the
band search needs 8 bytes a document and band (~60 while a band is sorted): below a million documents
the driver reads every band at once, above it a task per band reads its own (stages/ingest.py); the
pairs come back, each kept once (`distinct_pairs`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from data_prep.ngrams import mix, ngram_hashes
from pipeline.units import Folder

SEED = 1
"""Seed of the MinHash hash functions (fixed: a signature must mean the same in every run)."""
_BAND_MULT = np.uint64(0xD6E8FEB86659FD93)


@dataclass(frozen=True)
class NearDupSpec:
    bands: int = 14
    rows: int = 8
    shingle: int = 5
    """Words per shingle."""

    def found(self, s: float) -> float:
        """P(s): the probability that a pair of Jaccard similarity s becomes a candidate pair."""
        return 1.0 - (1.0 - s**self.rows) ** self.bands

    def identity(self) -> dict:
        """What a document's band hashes depend on (a unit's identity: pipeline/units.py)."""
        from importlib.metadata import version

        from rensa import RMinHash

        return {
            "bands": self.bands, "rows": self.rows, "shingle": self.shingle, "seed": SEED,
            "rensa": version("rensa"), "algorithm": RMinHash.ALGORITHM_VERSION,
        }  # fmt: skip


def band_columns(spec: NearDupSpec) -> list[str]:
    """The names of the band hash columns of a part: `band_00` ..."""
    return [f"band_{k:02d}" for k in range(spec.bands)]


class Signer:
    """MinHash signatures and their band hashes, for one task: the hash functions are drawn once."""

    def __init__(self, spec: NearDupSpec):
        from rensa import RMinHash

        self.spec = spec
        self._digest = RMinHash.digest_matrix_from_flat_token_hashes
        self._one = np.array([0, 0], np.uint64)  # a document's row offsets: [0, its shingles]

    def signature(self, words: np.ndarray, windows: np.ndarray | None = None) -> np.ndarray:
        """(bands * rows,) uint32 MinHash signature of a document given its word hashes (and, when the
        caller has them, the hashes of its `shingle`-word windows: ngram_hashes(words, shingle))."""
        if windows is None or not len(windows):  # a document shorter than a shingle is one shingle
            windows = ngram_hashes(words, max(1, min(self.spec.shingle, len(words))))
        if not len(windows):  # no words at all: ingest keeps no such document; one fixed signature
            windows = np.zeros(1, np.uint64)
        self._one[1] = len(windows)
        rows = self._digest(windows, self._one, self.spec.bands * self.spec.rows, SEED).to_rows()
        return np.array(rows[0], np.uint32)

    def band_hashes(self, words: np.ndarray) -> np.ndarray:
        """(bands,) uint64: each band's `rows` signature values hashed into one."""
        return band_hashes(self.signature(words)[None], self.spec)[0]


def band_hashes(signatures: np.ndarray, spec: NearDupSpec) -> np.ndarray:
    """(documents, bands) uint64 from (documents, bands * rows) signatures: equal bands, equal hashes."""
    v = signatures.reshape(len(signatures), spec.bands, spec.rows).astype(np.uint64)
    h = np.zeros(v.shape[:2], np.uint64)
    for j in range(spec.rows):
        h *= _BAND_MULT
        h ^= v[:, :, j]
    return mix(h)


@dataclass
class BandTask:
    band: int
    parts: list
    """The good files' parts (paths, or pipeline/units.py `FileRef`s), in input order: a document's
    number is its row across all of them."""
    folder: Folder
    """Where the task saves its pairs (`<band>.npy`): the driver reads them one band at a time."""

    @property
    def name(self) -> str:
        return f"{self.band:02d}.npy"


def band_pairs(task: BandTask) -> dict:
    """`bucket_pairs` of one band, read from the parts and saved in `task.folder` (a task of its own,
    for a large corpus: its pairs stay on disk until the driver merges them); returns the file's name
    and facts (`Folder.publish`)."""
    pairs = bucket_pairs(band_values(task.parts, [task.band])[0])
    folder = task.folder.local()
    tmp = folder / f"{task.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, pairs)
    os.replace(tmp, folder / task.name)
    return {"name": task.name, **task.folder.publish([task.name])[task.name]}


def band_values(parts: list, bands) -> np.ndarray:
    """(len(bands), documents) uint64: the hashes of these bands, documents in input order. A part
    is a path, or a `FileRef` (read where it is: only its band columns cross a network)."""
    import pyarrow.parquet as pq

    bands, columns = list(bands), [f"band_{k:02d}" for k in bands]

    @contextlib.contextmanager
    def opened(p):
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(p.open()) if hasattr(p, "open") else p
            yield stack.enter_context(pq.ParquetFile(src))

    sizes = []
    for p in parts:
        with opened(p) as pf:
            sizes.append(pf.metadata.num_rows)
    out = np.zeros((len(bands), sum(sizes)), np.uint64)
    for p, at, size in zip(parts, np.cumsum([0, *sizes]), sizes, strict=False):  # a part at a time
        with opened(p) as pf:
            table = pf.read(columns=columns, use_threads=False)
        for i in range(len(bands)):
            out[i, at : at + size] = table.column(i).to_numpy()
    return out


def bucket_pairs(values: np.ndarray) -> np.ndarray:
    """(pairs, 2) int64: (first document of a bucket, another in it) for every bucket of documents
    with the same hash in one band (`values`, in input order)."""
    order = np.argsort(values, kind="stable")  # equal hashes stay in input order
    sorted_v = values[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = sorted_v[1:] != sorted_v[:-1]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    return np.stack([first[~starts], order[~starts]], axis=1).astype(np.int64)


def distinct_pairs(pairs: Iterable[np.ndarray]) -> np.ndarray:
    """The distinct pairs of all bands, merged one band at a time: each band of a cluster finds most
    of its pairs again, so what is kept stays near one pair per near-duplicate, not one per band."""
    keys = np.zeros(0, np.int64)
    for p in pairs:  # (first, other): first < other < 2^31 documents
        keys = np.union1d(keys, (p[:, 0] << 31) | p[:, 1])
    return np.stack([keys >> 31, keys & ((1 << 31) - 1)], axis=1)


def near_duplicates(
    pairs: np.ndarray, hashes: list[np.ndarray], occurrences: list[np.ndarray], dedup: bool
) -> list[np.ndarray]:
    """Per file (the good ones, in input order), per candidate: is it dropped as a near-duplicate?
    A first occurrence is, when its cluster's first document is another. An exact repeat (occurrence
    > 0) is exact de-duplication's to drop; with that off, it shares its first occurrence's fate."""
    sizes = [len(h) for h in hashes]
    if not sizes:
        return []
    drop = np.zeros(sum(sizes), dtype=bool)
    drop[cluster_members(pairs)] = True
    drop &= np.concatenate(occurrences) == 0
    if not dedup and drop.any():
        contents = np.concatenate(hashes)
        drop = np.isin(contents, contents[drop])
    return np.split(drop, np.cumsum(sizes)[:-1])


def cluster_members(pairs: np.ndarray) -> np.ndarray:
    """Sorted numbers of the documents that are in a cluster (a connected component of `pairs`)
    whose first document is another: the ones near-duplicate removal drops."""
    if not len(pairs):
        return np.zeros(0, np.int64)
    nodes, edges = np.unique(pairs, return_inverse=True)  # only the documents in some pair
    a, b = edges.reshape(-1, 2).T
    label = np.arange(len(nodes))  # -> the smallest node of its component: its first document
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]  # a label's own label is no larger: jump along the chain
        if np.array_equal(new, label):
            return nodes[label != np.arange(len(nodes))]
        label = new
