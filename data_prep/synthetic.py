"""Synthetic packed-token folders (random ids, the tokenize stage's layout) for benchmarks and tests.

folder = synthetic_tokens(tmp / "tokens", sequences=512, seq_len=64, vocab=512)
PackedTokens(folder, "train")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def synthetic_tokens(
    folder: Path, *, sequences: int, seq_len: int, vocab: int, val_sequences: int = 64, seed: int = 0
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    splits = {}
    for split, count in (("train", sequences), ("val", val_sequences)):
        name = f"{split}-00000.npy"
        np.save(folder / name, rng.integers(2, vocab, size=(count, seq_len + 1)).astype(dtype))
        splits[split] = {"sequences": count, "shards": [{"file": name, "first_sequence": 0}]}
    index = {"seq_len": seq_len, "dtype": np.dtype(dtype).name, "eos_id": 1, "splits": splits}
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    return folder
