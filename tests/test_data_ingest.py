"""The ingest stage on bad-input fixtures built here: `pytest tests/test_data_ingest.py`.

Each test writes small shards to a tmp folder, runs `stages.ingest.run` with an in-process context
that pickles every task and result (as Ray would), and checks counts, messages and outputs.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import pickle
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

import stages.ingest as ingest
from data_prep.cleaning import content_hash
from data_prep.readers import check_zstd_frames, read_lines
from pipeline.config import PipelineConfig
from pipeline.context import LocalContext

SAMPLE = Path(__file__).resolve().parent.parent / "data_prep" / "sample" / "pile_sample.jsonl.zst"


class PickleContext(LocalContext):
    """Runs tasks in-process, but sends fn, items and results through pickle as Ray does;
    `reverse=True` runs the items last-to-first (results still in item order)."""

    def __init__(self, *a, reverse=False, **kw):
        super().__init__(*a, **kw)
        self.reverse = reverse

    def map(self, fn, items, *, num_cpus=1, progress=None):
        items = list(items)
        fn = pickle.loads(pickle.dumps(fn))
        done, total = progress or (0, len(items))
        results = [None] * len(items)
        for k, i in enumerate(reversed(range(len(items))) if self.reverse else range(len(items))):
            results[i] = pickle.loads(pickle.dumps(fn(pickle.loads(pickle.dumps(items[i])))))
            self.progress(done + k + 1, total, unit="units")
        return results


class Killed(Exception):
    """The stage's driver dying mid-stage, as far as the stage can tell."""


class CrashContext(PickleContext):
    """A PickleContext that records the units it runs, (function name, task index; a shard task by its
    file), and with `crash_after=k` dies as the task after the k-th starts: k units finished, the rest
    never ran."""

    def __init__(self, *a, crash_after=None, **kw):
        super().__init__(*a, **kw)
        self.crash_after, self.ran = crash_after, []

    def map(self, fn, items, *, num_cpus=1, progress=None):
        items = list(items)
        done, total = progress or (0, len(items))
        results = []
        for item in items:
            unit = getattr(item, "index", None)
            unit = Path(item.path).name if unit is None else unit
            if len(self.ran) == self.crash_after:
                raise Killed(f"killed as {fn.__name__} started on unit {unit}")
            self.ran.append((fn.__name__, unit))
            results.append(pickle.loads(pickle.dumps(fn(pickle.loads(pickle.dumps(item))))))
            self.progress(done + len(results), total, unit="units")
        return results


def same_files(a: Path, b: Path) -> list[Path]:
    """The files under two folders, asserted to be the same names with the same bytes."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    return names


def doc(text, pile_set="Set A"):
    return json.dumps({"text": text, "meta": {"pile_set_name": pile_set}})


WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bold wizards mix hot jam for pale "
    "kings and queens who sing of rivers stone clay fire kiln glaze wheel potter ash smoke"
).split()


def prose(i, n=120):
    """A distinct document of about n characters: words drawn at random (seeded by i), so that two of
    them share no run of a few words and near-duplicate removal keeps them all."""
    rng = random.Random(i)
    text = f"Document {i}:"
    while len(text) < n:
        text += " " + rng.choice(WORDS)
    return text[:n]


def write(path: Path, lines, kind=None) -> Path:
    raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    kind = kind or path.suffix
    if kind == ".zst":
        raw = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw)
    elif kind == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def run_ingest(tmp_path, sources, reverse=False, **overrides):
    cfg = PipelineConfig()
    cfg = dataclasses.replace(
        cfg, ingest=dataclasses.replace(cfg.ingest, sources=tuple(str(s) for s in sources), **overrides)
    )
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    metrics = ingest.run(cfg, {}, out, PickleContext("ingest", tmp_path / "work", reverse=reverse))
    return metrics, json.loads((out / "stats.json").read_text()), out


def read_docs(out: Path) -> list[dict]:
    rows = []
    for s in json.loads((out / "stats.json").read_text())["shards"]:
        rows.extend(pq.read_table(out / "docs" / s["file"]).to_pylist())
    return rows


def assert_reconciles(stats):
    for f in stats["files"]:
        assert f["read"] == f["kept"] + sum(f["dropped"].values()), f
    assert stats["read"] == stats["kept"] + sum(stats["dropped"].values())
    assert stats["read"] == sum(f["read"] for f in stats["files"])


def test_every_bad_record_reason_is_counted_and_listed(tmp_path):
    lines = [
        doc(prose(0)),  # 1 kept
        b'{"text": "unterminated',  # 2 malformed_json
        json.dumps({"meta": {"pile_set_name": "Set A"}}),  # 3 missing_text
        json.dumps({"text": 42}),  # 4 text_not_string
        b'{"text": "caf\xe9 au lait, invalid UTF-8 in the middle of a long enough text ......"}',  # 5 invalid_utf8
        json.dumps({"text": "   \n\t "}),  # 6 empty
        b"",  # 7 blank line: not a record
        '{"text": "lone surrogate \\ud800 in an otherwise fine and long enough document text ...."}',  # 8
        json.dumps(["text", "a list, not an object"]),  # 9 missing_text
        doc("too short"),  # 10 too_short
        doc(prose(1)),  # 11 kept
    ]
    path = write(tmp_path / "bad.jsonl", lines)
    metrics, stats, out = run_ingest(tmp_path, [path], max_errors=4)
    assert stats["dropped"] == {
        "empty": 1,
        "invalid_utf8": 2,
        "malformed_json": 1,
        "missing_text": 2,
        "text_not_string": 1,
        "too_short": 1,
    }
    assert (stats["read"], stats["kept"]) == (10, 2)
    assert stats["files"][0]["blank_lines"] == 1
    assert stats["errors_total"] == 7 and len(stats["errors"]) == 4  # capped, in line order
    assert stats["errors"] == [
        {"file": str(path), "line": 2, "reason": "malformed_json"},
        {"file": str(path), "line": 3, "reason": "missing_text"},
        {"file": str(path), "line": 4, "reason": "text_not_string"},
        {"file": str(path), "line": 5, "reason": "invalid_utf8"},
    ]
    assert [d["text"] for d in read_docs(out)] == [prose(0), prose(1)]
    assert metrics["bad_records"] == 7 and metrics["docs_kept"] == 2
    assert_reconciles(stats)


def test_truncated_zst_stops_with_file_and_position_or_is_skipped(tmp_path):
    good = write(tmp_path / "a.jsonl.zst", [doc(prose(i)) for i in range(50)])
    frames = b"".join(
        zstandard.ZstdCompressor(level=3).compress(b"".join(doc(prose(i)).encode() + b"\n" for i in r))
        for r in (range(100, 400), range(400, 700))
    )
    bad = tmp_path / "b.jsonl.zst"
    bad.write_bytes(frames[: len(frames) - 200])  # cut inside the second frame
    # the stock reader does not notice: that is why ingest checks the frames itself
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bad.read_bytes()), read_across_frames=True)
    assert len(reader.read()) > 0

    with pytest.raises(ingest.IngestError) as err:
        run_ingest(tmp_path, [good, bad])
    msg = str(err.value)
    assert str(bad) in msg and "truncated zstd stream" in msg and "on_bad_file=skip" in msg
    assert "complete lines" in msg and "bytes decompressed" in msg

    _, stats, out = run_ingest(tmp_path, [good, bad], on_bad_file="skip")
    assert [f["status"] for f in stats["files"]] == ["ok", "skipped"]
    assert stats["files"][1]["read"] == 0 and "truncated" in stats["files"][1]["error"]
    assert stats["files_skipped"] == 1 and stats["kept"] == 50 and len(read_docs(out)) == 50
    assert_reconciles(stats)


def test_file_named_zst_that_is_not_zstd(tmp_path):
    fake = write(tmp_path / "fake.jsonl.zst", [doc(prose(0))], kind=".jsonl")
    with pytest.raises(ingest.IngestError, match=r"fake\.jsonl\.zst: corrupt or truncated \(ZstdError"):
        run_ingest(tmp_path, [fake])


def test_truncated_gzip(tmp_path):
    path = write(tmp_path / "c.jsonl.gz", [doc(prose(i)) for i in range(2000)])
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ingest.IngestError, match=r"c\.jsonl\.gz: corrupt or truncated \(EOFError"):
        run_ingest(tmp_path, [path])


def test_zstd_frame_walk():
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    data = cctx.compress(b"x" * 100_000) + skippable + cctx.compress(b"hello\n" * 5000)
    assert check_zstd_frames(io.BytesIO(data)) is None
    for cut in (1, 3, 5, len(data) - len(skippable) - 40):
        problem = check_zstd_frames(io.BytesIO(data[:-cut]))
        assert problem and "truncated" in problem, (cut, problem)
    assert "not a zstd frame" in check_zstd_frames(io.BytesIO(b"plain text, not zstd"))


def test_huge_document_is_dropped_without_buffering_it(tmp_path):
    huge = "All work and no play makes Jack a dull boy. " * 50_000  # 2.2 MB in one line
    medium = prose(99, 5_000)  # over max_chars but short enough to be parsed
    path = write(tmp_path / "h.jsonl", [doc(prose(0)), doc(huge), doc(medium), doc(prose(1))])
    _, stats, out = run_ingest(tmp_path, [path], max_chars=1_000)
    assert stats["dropped"] == {"too_long": 2} and stats["kept"] == 2
    lines = list(read_lines(str(path), max_line_bytes=12 * 1_000 + (1 << 16)))
    assert [raw is None for _, raw in lines] == [False, True, False, False]  # line 2 never buffered
    assert [d["text"] for d in read_docs(out)] == [prose(0), prose(1)]


def test_duplicates_across_files_keep_the_first_in_input_order(tmp_path):
    a = write(tmp_path / "a.jsonl", [doc(prose(i)) for i in range(10)] + [doc(prose(3))])
    b = write(tmp_path / "b.jsonl.gz", [doc(prose(i), "Set B") for i in range(5, 15)])
    _, stats, out = run_ingest(tmp_path, [a, b])
    assert [f["dropped"].get("duplicate", 0) for f in stats["files"]] == [1, 5]
    assert [f["kept"] for f in stats["files"]] == [10, 5]
    docs = read_docs(out)
    assert [d["text"] for d in docs] == [prose(i) for i in range(15)]
    assert [d["source"] for d in docs] == ["Set A"] * 10 + ["Set B"] * 5
    assert docs[0]["id"] == f"{content_hash(prose(0).encode()):016x}"
    assert len({d["id"] for d in docs}) == 15
    assert_reconciles(stats)

    _, stats, out = run_ingest(tmp_path, [a, b], dedup=False)
    docs = read_docs(out)
    assert stats["kept"] == 21 and "duplicate" not in stats["dropped"]
    assert len({d["id"] for d in docs}) == 21  # repeats get .occurrence.copy suffixes
    assert sum(d["id"].endswith(".1.0") for d in docs) == 6


def test_output_identical_whichever_task_runs_first(tmp_path):
    files = [
        write(tmp_path / f"s{k}.jsonl", [doc(prose(i), f"S{k % 2}") for i in range(k, k + 30)])
        for k in range(0, 60, 20)
    ]
    _, _, out1 = run_ingest(tmp_path, files, docs_per_shard=7)
    _, _, out2 = run_ingest(tmp_path, files, docs_per_shard=7, reverse=True)
    names = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert len([n for n in names if n.suffix == ".parquet"]) > 3
    for n in names:
        assert (out1 / n).read_bytes() == (out2 / n).read_bytes(), n


def test_set_filter_and_weights(tmp_path):
    lines = [doc(prose(i), "A") for i in range(200)] + [doc(prose(i), "B") for i in range(200, 400)]
    lines += [doc(prose(i), "C") for i in range(400, 450)]
    path = write(tmp_path / "w.jsonl", lines)
    _, stats, out = run_ingest(tmp_path, [path], include_sets=("A", "B"), set_weights={"A": 2.0, "B": 0.5})
    docs = read_docs(out)
    by_set = {s: [d for d in docs if d["source"] == s] for s in "ABC"}
    assert stats["dropped"]["excluded_set"] == 50 and not by_set["C"]
    assert len(by_set["A"]) == 400 and len({d["text"] for d in by_set["A"]}) == 200
    assert 70 <= len(by_set["B"]) <= 130 and stats["dropped"]["downsampled"] == 200 - len(by_set["B"])
    assert stats["kept"] == 200 + len(by_set["B"]) and stats["written"] == len(docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert_reconciles(stats)


def test_missing_source_names_the_pattern_and_where_it_looked(tmp_path):
    with pytest.raises(
        ingest.IngestError, match=r"ingest\.sources: no file matches 'nowhere/\*\.zst' \(relative to"
    ):
        run_ingest(tmp_path, ["nowhere/*.zst"])
    odd = tmp_path / "data.parquet"
    odd.write_bytes(b"PAR1")
    with pytest.raises(ingest.IngestError, match=r"data\.parquet is not one of \.jsonl"):
        run_ingest(tmp_path, [odd])


def test_sample_slice_reconciles(tmp_path):
    """The first 3,000 records of the bundled sample: real text, several sets, natural duplicates."""
    reader = zstandard.ZstdDecompressor().stream_reader(SAMPLE.open("rb"))
    lines = [line.rstrip(b"\n") for _, line in zip(range(3000), io.BufferedReader(reader), strict=False)]
    path = write(tmp_path / "slice.jsonl.zst", lines)
    _, stats, out = run_ingest(tmp_path, [path])
    assert stats["read"] == 3000 and len(stats["sets"]) >= 4
    assert stats["dropped"].get("too_short", 0) > 0
    assert len(read_docs(out)) == stats["kept"] == stats["written"]
    assert_reconciles(stats)


@pytest.mark.parametrize("chunk", [1, 2, 7, 64])
def test_line_splitting_across_chunk_edges(monkeypatch, chunk):
    from data_prep import readers

    monkeypatch.setattr(readers, "CHUNK", chunk)
    rng = random.Random(chunk)
    lines = [bytes(rng.choice(b'ab{}" ') for _ in range(rng.choice([0, 1, 5, 30, 90]))) for _ in range(200)]
    lines[-1] = b"last line, no newline after it"
    data = b"\n".join(lines)
    got = list(readers._split_lines(io.BytesIO(data), max_line_bytes=40))
    assert [n for n, _, _ in got] == list(range(1, len(lines) + 1))
    assert [line for _, _, line in got] == [x if len(x) <= 40 else None for x in lines]


# -- resuming mid-stage -------------------------------------------------------------------------


def corpus(folder: Path, files: int = 40) -> list[Path]:
    """Small shards in all three formats; each repeats 5 documents of the one before (duplicates
    across files) and has a document too short to keep."""
    folder.mkdir(exist_ok=True)
    kinds = (".jsonl", ".jsonl.gz", ".jsonl.zst")
    return [
        write(
            folder / f"shard-{k:02d}{kinds[k % 3]}",
            [doc(prose(i), f"Set {'AB'[i % 2]}") for i in range(10 * k, 10 * k + 15)] + [doc("short")],
        )
        for k in range(files)
    ]


def ingest_with(ctx, sources, out: Path, **overrides) -> Path:
    cfg = PipelineConfig()
    section = {"sources": tuple(map(str, sources)), "docs_per_shard": 4, **overrides}
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, **section))
    out.mkdir()
    ingest.run(cfg, {}, out, ctx)
    return out


def already_done(caplog, stage: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "units already done" in r.getMessage() and stage in r.name
    ]


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="kiln")
    return caplog


def test_ingest_killed_mid_clean_resumes_from_its_finished_files(tmp_path, logs):
    files = corpus(tmp_path / "src")
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref")

    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=17), files, tmp_path / "killed")
    assert len(list((work / "parts").glob("*.done.json"))) == 17
    assert json.loads((work / "progress.json").read_text())["step"] == 17  # of 80: 40 cleaned, 40 written
    (work / "parts" / "00017.parquet").write_bytes(b"half a part, never recorded")  # the unit in flight
    logs.clear()

    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out")
    assert already_done(logs, "ingest") == [
        "ingest: 17 of 80 units already done (17 of 40 files cleaned, 0 written)"
    ]
    assert [i for fn, i in again.ran if fn == "clean_file"] == list(range(17, 40))  # not the 17 done
    assert [i for fn, i in again.ran if fn == "write_docs"] == list(range(40))
    assert len(same_files(out, ref)) > 40  # every shard and stats.json, byte for byte
    assert_reconciles(json.loads((out / "stats.json").read_text()))
    progress = json.loads((work / "progress.json").read_text())
    assert (progress["step"], progress["total"]) == (80, 80)
    assert not (work / "parts").exists() and not (work / "docs").exists()  # removed once done


def test_ingest_killed_mid_write_redoes_only_the_unwritten_files(tmp_path, logs):
    files = corpus(tmp_path / "src")
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref")

    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=52), files, tmp_path / "killed")
    logs.clear()
    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out")
    assert already_done(logs, "ingest") == [
        "ingest: 52 of 80 units already done (40 of 40 files cleaned, 12 written)"
    ]
    assert again.ran == [("write_docs", i) for i in range(12, 40)]
    same_files(out, ref)


def test_ingest_redoes_a_unit_without_its_record_or_with_a_damaged_file(tmp_path, logs):
    files = corpus(tmp_path / "src", 12)
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref")
    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=18), files, tmp_path / "killed")  # 6 written
    (work / "parts" / "00004.done.json").unlink()  # killed between renaming its part and recording it
    part = work / "parts" / "00007.parquet"
    part.write_bytes(part.read_bytes()[:-10])  # a damaged part: its record no longer holds
    shard = next((work / "docs").glob("part-00002-*.parquet"))
    shard.write_bytes(b"")  # a damaged shard: its write unit no longer holds
    logs.clear()

    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out")
    assert already_done(logs, "ingest") == [
        "ingest: 10 of 24 units already done (10 of 12 files cleaned, 0 written)"
    ]
    assert [i for fn, i in again.ran if fn == "clean_file"] == [4, 7]
    # of the 6 files written, file 2 has a damaged shard; file 4's shards still hold: its part, cleaned
    # again, is the same part (same identity, same duplicates)
    assert [i for fn, i in again.ran if fn == "write_docs"] == [2, *range(6, 12)]
    assert "ingest: 5 of 12 files already written" in logs.messages
    same_files(out, ref)


def test_ingest_never_reuses_units_made_with_other_settings_or_inputs(tmp_path, logs):
    files = corpus(tmp_path / "src", 10)
    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=14), files, tmp_path / "killed")  # 4 written

    # a cleaning setting: nothing is reused
    logs.clear()
    again = CrashContext("ingest", work, crash_after=14)
    with pytest.raises(Killed):
        ingest_with(again, files, tmp_path / "killed-2", min_chars=100)
    assert already_done(logs, "ingest") == [
        "ingest: 0 of 20 units already done (0 of 10 files cleaned, 0 written)"
    ]

    # a setting of the shards only (the run above cleaned every file and wrote 4 with min_chars=100):
    # the cleaned files are reused, the shards written again
    logs.clear()
    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out", min_chars=100, docs_per_shard=3)
    assert already_done(logs, "ingest") == [
        "ingest: 10 of 20 units already done (10 of 10 files cleaned, 0 written)"
    ]
    assert again.ran == [("write_docs", i) for i in range(10)]
    ref = ingest_with(
        PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref", min_chars=100, docs_per_shard=3
    )
    same_files(out, ref)

    # an input edited after it was cleaned and written: that file is cleaned and written again, and
    # so is a file written after it whose duplicates it now decides; the others keep their shards
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=18), files, tmp_path / "killed-4")  # 8 written
    write(files[3], [doc(prose(i)) for i in range(40, 46)])  # now holds the first 6 documents of file 4
    logs.clear()
    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out-2")
    assert already_done(logs, "ingest") == [
        "ingest: 9 of 20 units already done (9 of 10 files cleaned, 0 written)"
    ]
    assert [i for fn, i in again.ran if fn == "clean_file"] == [3]
    assert [i for fn, i in again.ran if fn == "write_docs"] == [3, 4, 8, 9]
    assert "ingest: 6 of 10 files already written" in logs.messages
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref-2"), files, tmp_path / "ref-2")
    same_files(out, ref)
