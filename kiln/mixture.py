"""Which windows each global batch of pretraining draws: the sources blended by weight when batches are drawn.

    mix = Mixture(train.sources, len(train), weights={"Pile-CC": 2.0, "Github": 1.0}, seed=1234)
    ids = mix.batch(step, global_batch_size)      # (global_batch_size,) window ids, a pure function of step
    mix.windows_per_source(steps, global_batch_size)   # {"Pile-CC": 2731, "Github": 1365}: drawn so far

The tokenize stage keeps each source's windows apart (no window spans two sources), so a weight is
applied here, in pretraining, as GPT-NeoX, Megatron and OLMo blend datasets, rather than by copying
documents at ingest: changing `pretrain.mixture` re-runs pretraining and what follows, not the data
stages.

Without weights (the default) the sources keep their natural proportions: every window once per epoch,
in one seeded permutation of them all (`kiln.training.global_batch`). With weights, the first N
windows drawn in a run are divided between the sources by the D'Hondt rule (`allocation`): each source
gets at least the whole part of its weight's share of N and stays within fewer windows of that share
than there are sources (a large source leads by a window or two), and, N growing step after step, no
count ever falls, so every step's draws are a difference of two closed-form allocations and resuming
at any step needs no replay. Within a source the windows are drawn once per
epoch of that source, in a permutation seeded by the seed, the source and the epoch (a small source
with a large weight is repeated, a large one with a small weight is not read to its end); the batch is
then shuffled, so that every rank and micro-batch gets a blend.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from fractions import Fraction
from functools import lru_cache

import numpy as np


def integer_weights(weights: Mapping[str, float]) -> dict[str, int]:
    """The weights as integers in the same ratios (each rounded to a fraction of denominator at most 10^6),
    so that allocations compare exactly, whatever the platform's floating point."""
    fractions = {k: Fraction(w).limit_denominator(10**6) for k, w in weights.items()}
    common = math.lcm(*(f.denominator for f in fractions.values()))
    return {k: int(f * common) for k, f in fractions.items()}


def allocation(weights: Mapping[str, int], n: int) -> dict[str, int]:
    """How many of the first `n` draws each source gets, by the D'Hondt rule: the n largest of the values
    weight / (k + 1), k = 0, 1, ... of every source (ties to the source listed first). `weights` are integers
    (`integer_weights`). Each source gets at least floor(n * its share) (D'Hondt meets the lower quota) and an
    allocation never falls as n grows (house monotonicity), so draws [a, b) of one source are
    allocation(b) - allocation(a) of them. Starts from the lower quota less one and adds the rest greedily:
    O(sources^2), not O(n)."""
    total = sum(weights.values())
    got = {k: max(0, w * n // total - 1) for k, w in weights.items()}
    for _ in range(n - sum(got.values())):
        best = None
        for k, w in weights.items():  # the largest next value w / (got + 1), compared as integers
            if w and (best is None or w * (got[best] + 1) > weights[best] * (got[k] + 1)):
                best = k
        got[best] += 1
    return got


@lru_cache(maxsize=64)
def _source_permutation(n: int, seed: int, source: str, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, zlib.crc32(source.encode()), epoch]).permutation(n)


class Mixture:
    """The window ids of every global batch, from the sources' windows (`PackedTokens.sources`: name ->
    (first window, windows)) and their weights (None: natural proportions)."""

    def __init__(
        self, sources: Mapping[str, tuple[int, int]], n: int, weights: Mapping[str, float] | None, seed: int
    ):
        self.sources, self.n, self.seed = dict(sources), n, seed
        self.weights = None
        if weights:
            problems = mixture_problems(weights, self.sources)
            if problems:
                raise ValueError("; ".join(problems))
            self.weights = integer_weights({k: weights.get(k, 0.0) for k in self.sources})

    def batch(self, step: int, size: int) -> np.ndarray:
        """Window ids of global batch `step` (0-based), (size,) int64."""
        from kiln.training import global_batch

        if self.weights is None:
            return global_batch(step, size, self.n, self.seed)
        lo, hi = allocation(self.weights, step * size), allocation(self.weights, (step + 1) * size)
        ids = np.concatenate([self._draws(k, lo[k], hi[k]) for k in self.sources])
        order = np.random.default_rng([self.seed, step, zlib.crc32(b"mixture")]).permutation(size)
        return ids[order]

    def _draws(self, source: str, start: int, stop: int) -> np.ndarray:
        """Window ids of this source's draws [start, stop): each of its windows once per epoch of it."""
        first, n = self.sources[source]
        out = []
        for j in range(start, stop):
            epoch, offset = divmod(j, n)
            out.append(first + int(_source_permutation(n, self.seed, source, epoch)[offset]))
        return np.asarray(out, dtype=np.int64)

    def windows_per_source(self, steps: int, size: int) -> dict[str, int]:
        """Windows each source gave the first `steps` global batches."""
        if self.weights is not None:
            return allocation(self.weights, steps * size)
        from kiln.training import epoch_permutation

        epochs, offset = divmod(steps * size, self.n)
        tail = np.sort(epoch_permutation(self.n, self.seed, epochs)[:offset]) if offset else np.zeros(0)
        return {
            k: epochs * n + int(np.searchsorted(tail, first + n) - np.searchsorted(tail, first))
            for k, (first, n) in self.sources.items()
        }


def mixture_problems(weights: Mapping[str, float], sources: Mapping[str, tuple[int, int]]) -> list[str]:
    """What is wrong with `pretrain.mixture` for these packed sources, one message per problem."""
    problems = []
    for k, w in weights.items():
        if k not in sources:
            problems.append(
                f"pretrain.mixture.{k}: no such source in the token shards; they hold {sorted(sources)}"
            )
        elif not (w >= 0 and math.isfinite(w)):
            problems.append(f"pretrain.mixture.{k}: {w} is not a weight (a finite number >= 0)")
        elif w > 0 and sources[k][1] == 0:
            problems.append(
                f"pretrain.mixture.{k}: the source has no training window (its documents are shorter than "
                "one window in all); give it weight 0 or lower tokenize.seq_len"
            )
    if not problems and not any(w > 0 for w in weights.values()):
        problems.append("pretrain.mixture: no source has a weight > 0; give one a weight > 0")
    return problems
