"""ingest -> tokenizer -> tokenize on the whole bundled sample, with the tiny preset's defaults.

pytest tests/test_data_pipeline.py        (~20 s on 2 cores)
"""

from __future__ import annotations

import hashlib
import json
import time

import stages.ingest as ingest
import stages.tokenize as tokenize
import stages.tokenizer as tokenizer
from data_prep.packed import PackedTokens
from pipeline.artifacts import Artifact
from pipeline.config import PipelineConfig
from tests.test_data_ingest import SAMPLE, PickleContext, assert_reconciles


def test_sample_matches_its_provenance():
    prov = json.loads((SAMPLE.parent / "provenance.json").read_text())
    assert prov["file_sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert len(prov["sets"]) >= 4 and 15e6 <= prov["text_bytes"] <= 30e6
    assert (SAMPLE.parent / "README.md").is_file()


def test_three_data_stages_on_the_bundled_sample(tmp_path):
    cfg = PipelineConfig()
    arts, metrics, seconds = {}, {}, {}
    for name, mod in (("ingest", ingest), ("tokenizer", tokenizer), ("tokenize", tokenize)):
        out = tmp_path / name
        out.mkdir()
        t0 = time.perf_counter()
        metrics[name] = mod.run(cfg, arts, out, PickleContext(name, tmp_path / "work" / name))
        seconds[name] = time.perf_counter() - t0
        arts[name] = Artifact(name, "test", out, {})
    print(seconds, metrics)

    stats = json.loads((arts["ingest"].path / "stats.json").read_text())
    prov = json.loads((SAMPLE.parent / "provenance.json").read_text())
    assert stats["read"] == prov["docs"] and stats["errors_total"] == 0
    assert stats["dropped"]["duplicate"] > 0 and stats["dropped"]["too_short"] > 0
    assert stats["dropped"]["near_duplicate"] > 100 and stats["dropped"]["contaminated"] > 300
    assert len(stats["sets"]) >= 4 and metrics["ingest"]["docs_kept"] == stats["kept"]
    assert_reconciles(stats)

    tok = metrics["tokenizer"]
    assert tok["vocab_size"] == cfg.tokenizer.vocab_size and tok["heldout_roundtrip_failures"] == 0
    assert 0.9 * cfg.tokenizer.sample_bytes <= tok["train_bytes"] <= 1.01 * cfg.tokenizer.sample_bytes
    assert tok["chars_per_token"] > 2.5

    index = json.loads((arts["tokenize"].path / "index.json").read_text())
    train, val = PackedTokens(arts["tokenize"].path, "train"), PackedTokens(arts["tokenize"].path, "val")
    assert len(train) == metrics["tokenize"]["train_sequences"] > 10_000
    assert len(val) == metrics["tokenize"]["val_sequences"] > 100
    val_docs = index["splits"]["val"]["documents"] / index["documents"]
    assert abs(val_docs - cfg.tokenize.val_fraction) < 0.01
    assert index["documents"] == stats["written"]
