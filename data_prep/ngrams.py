"""Word n-grams of a text as 64-bit hashes: what near-duplicate removal and decontamination compare.

    w = word_hashes("The quick brown fox jumps over the lazy dog")   # uint64, one per word
    ngram_hashes(w, 5)                                                # uint64, one per 5-word window

Words are the tokens of the lowercased text between ASCII whitespace (punctuation stays on its
word), so a copy that differs only in case or spacing has the same n-grams. Each word is hashed
once (xxh3, 64 bits: stable across runs, machines and Python's hash seed), and an n-gram's hash
chains its words' hashes (multiply, xor: modulo 2^64) and mixes the result, for every window at
once in numpy, so that a document costs one hash call per word, not one per n-gram. Two distinct
n-grams share a hash with probability ~2^-64.
"""

from __future__ import annotations

import numpy as np
import xxhash

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial step is a bijection of the running hash
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def word_hashes(text: str) -> np.ndarray:
    """uint64 hash of each word of `text`, in order."""
    ws = text.lower().encode().split()  # bytes: split at ASCII whitespace, hashed as they are
    return np.fromiter(map(xxhash.xxh3_64_intdigest, ws), dtype=np.uint64, count=len(ws))


def ngram_hashes(w: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of each n-word window of the word hashes `w` (len(w) - n + 1 of them; none when
    the text has fewer than n words)."""
    count = len(w) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    h = w[:count].copy()
    for j in range(1, n):
        h *= _MULT  # wraps modulo 2^64, as intended
        h ^= w[j : j + count]
    return mix(h)


def mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every output bit depends on every input bit."""
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h
