"""Random access to the tokenize stage's packed sequences by global index.

    from data_prep.packed import PackedTokens
    train = PackedTokens(tokens_artifact.path, "train")
    len(train), train.seq_len          # sequences, tokens the model sees per sequence
    w = train[i]                       # np.ndarray of seq_len + 1 token ids: inputs w[:-1], labels w[1:]
    b = train.batch([i, j, k])         # (3, seq_len + 1)
    train.sources                      # {"Pile-CC": (first sequence, sequences), ...}: no window spans two

Sequence i is the same tokens whatever the number of workers that packed them or that read them,
so resuming pretraining at sample k needs only k (index arithmetic, no iterator replay).
A map-style dataset: torch's DataLoader takes it as is (len + __getitem__; convert with
`torch.from_numpy(w.astype(np.int64))`). Shards are memory-mapped lazily, per process: pickling
(DataLoader workers, Ray) sends the index, not the mapped data.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np


class PackedTokens:
    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        if split not in index["splits"]:
            raise KeyError(f"{self.folder}: no split {split!r}; index.json has {sorted(index['splits'])}")
        info = index["splits"][split]
        self.split = split
        self.seq_len: int = index["seq_len"]
        self.dtype = np.dtype(index["dtype"])
        self.eos_id: int = index["eos_id"]
        self._files = [sh["file"] for sh in info["shards"]]
        self._starts = [sh["first_sequence"] for sh in info["shards"]]
        self._len: int = info["sequences"]
        self.sources: dict[str, tuple[int, int]] = {
            name: (src["first_sequence"], src["sequences"]) for name, src in info.get("sources", {}).items()
        }
        """Each source's windows, contiguous: (first sequence, how many), in sequence order. Empty for
        packed data that does not keep its sources apart."""
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sequence {i} out of range: {self.split} has {self._len}")
        k = bisect.bisect_right(self._starts, i) - 1
        return np.array(self._shard(k)[i - self._starts[k]])

    def batch(self, indices) -> np.ndarray:
        """(len(indices), seq_len + 1) array of the given sequences."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=self.dtype)
        for row, i in enumerate(indices):
            out[row] = self[i]
        return out

    @property
    def tokens(self) -> int:
        """Tokens held in sequences (seq_len + 1 per sequence)."""
        return self._len * (self.seq_len + 1)

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            arr = np.load(self.folder / self._files[k], mmap_mode="r")
            if arr.shape[1] != self.seq_len + 1 or arr.dtype != self.dtype:
                raise ValueError(
                    f"{self.folder / self._files[k]}: shape {arr.shape} {arr.dtype} does not match index.json"
                )
            self._maps[k] = arr
        return self._maps[k]

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"PackedTokens({str(self.folder)!r}, {self.split!r}: {self._len} x {self.seq_len + 1} {self.dtype})"
