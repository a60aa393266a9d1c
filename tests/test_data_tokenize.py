"""The tokenize stage and PackedTokens: packing convention, partition independence, random access.

    pytest tests/test_data_tokenize.py

Fixtures: ingest on ~400 documents (a slice of the bundled sample plus documents written here),
a small trained tokenizer; the expected token stream is rebuilt independently with `tokenizers`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

import stages.ingest as ingest
import stages.tokenize as tokenize
import stages.tokenizer as tokenizer
from data_prep.packed import PackedTokens
from data_prep.packing import stream_name
from pipeline.artifacts import Artifact
from pipeline.config import PipelineConfig
from tests.test_data_ingest import SAMPLE, CrashContext, Killed, PickleContext, doc, same_files, write

SEQ_LEN = 64


def config(**tk):
    cfg = PipelineConfig()
    return dataclasses.replace(
        cfg,
        tokenizer=dataclasses.replace(cfg.tokenizer, vocab_size=512, sample_bytes=300_000),
        tokenize=dataclasses.replace(cfg.tokenize, **{"seq_len": SEQ_LEN, "val_fraction": 0.1, **tk}),
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    reader = zstandard.ZstdDecompressor().stream_reader(SAMPLE.open("rb"))
    lines = [line.rstrip(b"\n") for _, line in zip(range(400), io.BufferedReader(reader), strict=False)]
    extra = write(
        tmp / "extra.jsonl",
        [doc("A document that mentions <|endoftext|> literally, as text, not a separator.")],
    )
    cfg = PipelineConfig()
    cfg = dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(
            cfg.ingest, sources=(str(write(tmp / "a.jsonl.zst", lines)), str(extra)), docs_per_shard=97
        ),
    )
    arts = {}
    for name, mod, stage_cfg in (("ingest", ingest, cfg), ("tokenizer", tokenizer, config())):
        out = tmp / name
        out.mkdir()
        mod.run(stage_cfg, arts, out, PickleContext(name, tmp / "w" / name))
        arts[name] = Artifact(name, "test", out, {})
    return arts


def run_tokenize(tmp_path, inputs, name="out", reverse=False, **tk):
    out = tmp_path / name
    out.mkdir()
    metrics = tokenize.run(
        config(**tk), inputs, out, PickleContext("tokenize", tmp_path / f"w-{name}", reverse=reverse)
    )
    return metrics, out


def expected_streams(inputs, val_fraction=0.1):
    """Each split's and source's stream rebuilt from scratch: documents in order, tokens then EOS."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(inputs["tokenizer"].path / "tokenizer.json"))
    tok.encode_special_tokens = True
    eos = tok.token_to_id("<|endoftext|>")
    stats = json.loads((inputs["ingest"].path / "stats.json").read_text())
    streams = {"train": {}, "val": {}}
    for shard in stats["shards"]:
        for row in pq.read_table(inputs["ingest"].path / "docs" / shard["file"]).to_pylist():
            split = "val" if (int(row["id"][:16], 16) & 0xFFFFFFFF) / 2**32 < val_fraction else "train"
            stream = streams[split].setdefault(row["source"], [])
            stream += tok.encode(row["text"], add_special_tokens=False).ids + [eos]
    return streams, eos


def test_packing_keeps_every_token_in_order_and_each_source_apart(tmp_path, inputs):
    metrics, out = run_tokenize(tmp_path, inputs, sequences_per_shard=50)
    index = json.loads((out / "index.json").read_text())
    by_source, eos = expected_streams(inputs)
    width = SEQ_LEN + 1
    assert index["eos_id"] == eos and index["dtype"] == "uint16" and index["tokens_per_sequence"] == width
    for split, sources in by_source.items():
        info = index["splits"][split]
        data = PackedTokens(out, split)
        assert len(sources) > 3 and list(info["sources"]) == sorted(sources)  # the sample's Pile subsets
        windows, first = [], 0
        for name in sorted(sources):  # each source's windows, one source after another
            stream, src = sources[name], info["sources"][name]
            n = len(stream) // width
            assert (src["first_sequence"], src["sequences"], src["tokens"]) == (first, n, len(stream))
            assert src["tail_tokens_dropped"] == len(stream) - n * width < width
            assert data.sources[name] == (first, n)
            windows += stream[: n * width]  # every token, in order, no overlap, no window across sources
            first += n
        n = first
        assert (info["tokens"], info["sequences"], len(data)) == (sum(map(len, sources.values())), n, n)
        assert info["tokens_in_sequences"] + info["tail_tokens_dropped"] == info["tokens"]
        assert sum(s["documents"] for s in info["sources"].values()) == info["documents"]
        packed = np.concatenate([data[i] for i in range(len(data))]) if n else np.zeros(0)
        assert packed.tolist() == windows
        files = sorted(p.name for p in out.glob(f"{split}-*.npy"))
        assert files == [s["file"] for s in info["shards"]] and len(files) == -(-n // 50)
    assert index["splits"]["val"]["documents"] > 0 and index["splits"]["train"]["documents"] > 0
    assert sum(s["documents"] for s in index["splits"].values()) == index["documents"]
    assert metrics["train_tokens"] == sum(map(len, by_source["train"].values())) and metrics[
        "val_sequences"
    ] == len(PackedTokens(out, "val"))


def test_literal_special_token_in_text_is_not_eos(tmp_path, inputs):
    _, out = run_tokenize(tmp_path, inputs)
    streams, eos = expected_streams(inputs)
    n_docs = json.loads((out / "index.json").read_text())["documents"]
    assert (
        sum(s.count(eos) for split in streams.values() for s in split.values()) == n_docs
    )  # one EOS per document


def test_one_or_many_partitions_and_any_task_order_give_the_same_bytes(tmp_path, inputs):
    _, one = run_tokenize(tmp_path, inputs, name="one", partitions=1, sequences_per_shard=40)
    _, many = run_tokenize(tmp_path, inputs, name="many", partitions=7, sequences_per_shard=40, reverse=True)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in many.iterdir()) and len(files) > 3
    for name in files:
        if name not in ("index.json", "units.json"):
            assert (one / name).read_bytes() == (many / name).read_bytes(), name
    i1, i7 = (json.loads((d / "index.json").read_text()) for d in (one, many))
    assert (i1.pop("partitions"), i7.pop("partitions")) == (1, 7) and i1 == i7
    if "units.json" in files:  # under a Ray session: the node of each unit, as many as there were units
        u1, u7 = (json.loads((d / "units.json").read_text()) for d in (one, many))
        assert (len(u1["partitions"]), len(u7["partitions"])) == (1, 7)
        assert [s["file"] for s in u1["shards"]] == [s["file"] for s in u7["shards"]]


def test_packed_tokens_random_access(tmp_path, inputs):
    _, out = run_tokenize(tmp_path, inputs, sequences_per_shard=30)
    data = PackedTokens(out, "train")
    flat = np.concatenate(
        [
            np.load(out / s["file"]).reshape(-1)
            for s in json.loads((out / "index.json").read_text())["splits"]["train"]["shards"]
        ]
    )
    width = data.seq_len + 1
    assert data.seq_len == SEQ_LEN and data.tokens == len(flat) == len(data) * width
    rng = np.random.default_rng(0)
    for i in [0, 29, 30, 31, len(data) - 1, *rng.integers(0, len(data), 20).tolist()]:  # across shard edges
        assert data[i].tolist() == flat[i * width : (i + 1) * width].tolist()
        assert data[i].shape == (width,) and data[i].dtype == np.uint16
    assert data[-1].tolist() == data[len(data) - 1].tolist()
    assert data[np.int64(5)].tolist() == data[5].tolist()
    with pytest.raises(IndexError):
        data[len(data)]
    assert data.batch([3, 1]).tolist() == [data[3].tolist(), data[1].tolist()]
    _ = data[0]
    clone = pickle.loads(pickle.dumps(data))  # sends the index, not the mapped shards
    assert (
        len(pickle.dumps(data)) < data.tokens * data.dtype.itemsize / 50
        and clone[7].tolist() == data[7].tolist()
    )
    with pytest.raises(KeyError, match="no split 'test'"):
        PackedTokens(out, "test")


def test_packed_tokens_in_a_torch_dataloader_with_workers(tmp_path, inputs):
    import torch

    _, out = run_tokenize(tmp_path, inputs, sequences_per_shard=30)
    data = PackedTokens(out, "train")
    loader = torch.utils.data.DataLoader(
        data, batch_size=8, num_workers=2, collate_fn=lambda b: torch.from_numpy(np.stack(b).astype(np.int64))
    )
    batches = list(loader)
    got = torch.cat(batches)
    assert got.shape == (len(data), SEQ_LEN + 1)
    assert got[13].tolist() == data[13].tolist()


def test_tiny_corpus_without_validation(tmp_path):
    """30 short documents, val_fraction=0: the tokenizer trains on all of it, val is empty but valid."""
    src = write(
        tmp_path / "tiny.jsonl",
        [doc(f"Tiny document number {i}, long enough to pass the filter. " * 2) for i in range(30)],
    )
    cfg = config(val_fraction=0.0)
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, sources=(str(src),)))
    arts = {}
    for name, mod in (("ingest", ingest), ("tokenizer", tokenizer), ("tokenize", tokenize)):
        (tmp_path / name).mkdir()
        metrics = mod.run(cfg, arts, tmp_path / name, PickleContext(name, tmp_path / "w" / name))
        arts[name] = Artifact(name, "test", tmp_path / name, {})
    assert metrics["val_tokens"] == 0 and len(PackedTokens(tmp_path / "tokenize", "val")) == 0
    assert len(PackedTokens(tmp_path / "tokenize", "train")) == metrics["train_sequences"] > 0


def packed(ctx) -> list[tuple[str, int]]:
    """The partitions a CrashContext ran (not the shards it wrote after them)."""
    return [r for r in ctx.ran if r[0] == "pack_partition"]


def test_tokenize_killed_mid_way_resumes_from_its_finished_partitions(tmp_path, inputs, caplog):
    caplog.set_level(logging.INFO, logger="kiln")
    _, ref = run_tokenize(tmp_path, inputs, name="ref", partitions=8, sequences_per_shard=40)

    def tokenize_with(ctx, name, **tk):
        (tmp_path / name).mkdir()
        tokenize.run(config(**{"sequences_per_shard": 40, **tk}), inputs, tmp_path / name, ctx)
        return tmp_path / name

    def already_done():
        return [m for m in caplog.messages if "units already done" in m]

    work = tmp_path / "work"
    with pytest.raises(Killed):
        tokenize_with(CrashContext("tokenize", work, crash_after=3), "killed", partitions=8)
    assert json.loads((work / "progress.json").read_text())["step"] == 3
    (work / "streams" / "00001.done.json").unlink()  # killed between its streams and its record
    source = json.loads((ref / "index.json").read_text())["splits"]["train"]["sources"]
    partial = stream_name(str(work / "streams" / "00003"), "train", next(iter(source)))
    Path(partial).write_bytes(b"\0" * 10)  # the unit in flight, half written
    caplog.clear()
    again = CrashContext("tokenize", work)
    out = tokenize_with(again, "out", partitions=8)
    assert already_done() == ["tokenize: 2 of 8 units already done"]
    assert packed(again) == [("pack_partition", k) for k in (1, *range(3, 8))]
    assert len(same_files(out, ref)) > 4  # every shard and index.json, byte for byte
    assert not (work / "streams").exists()

    # another setting, or other partitions (how it runs: the same work dir), reuse nothing stale
    for crash, setting in ((4, {"partitions": 8, "val_fraction": 0.2}), (5, {"partitions": 5})):
        with pytest.raises(Killed):
            tokenize_with(CrashContext("tokenize", work, crash_after=crash), f"killed-{crash}", partitions=8)
        caplog.clear()
        again = CrashContext("tokenize", work)
        out = tokenize_with(again, f"out-{crash}", **setting)
        n = setting["partitions"]
        assert already_done() == [f"tokenize: 0 of {n} units already done"]
        assert packed(again) == [("pack_partition", k) for k in range(n)]
        _, ref = run_tokenize(tmp_path, inputs, name=f"ref-{crash}", sequences_per_shard=40, **setting)
        same_files(out, ref)
