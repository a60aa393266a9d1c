"""Large inputs cleaned by several tasks (`ingest.split_mb`, data_prep/readers.py
`byte_ranges`): a plain file by byte ranges, a .zst of sized frames by runs of frames, a file one reader
reads whole (one-frame .zst, .gz) by the blocks it hands on (data_prep/blocks.py). Every line read
by exactly one range whatever the cut (frames cut mid-line too), and the artifact the same bytes as one
task per file makes (stats.json apart from the units it lists), bad records' line numbers included; a
run killed mid-way resumes the finished ranges."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
import zstandard

from data_prep import readers
from data_prep.readers import BadFileError, byte_ranges, lines_of, read_blocks, read_lines
from stages import ingest
from tests.test_data_ingest import CrashContext, Killed, PickleContext, doc, ingest_with, prose, write


def test_the_ranges_of_a_file_hold_each_line_once_whatever_the_cut(tmp_path):
    rng = random.Random(0)
    for trial in range(60):
        lines = [b"x" * rng.choice([0, 0, 1, 3, 10, 25, 60]) for _ in range(rng.randint(0, 30))]
        path = tmp_path / f"{trial}.jsonl"
        path.write_bytes(b"\n".join(lines) + (b"\n" if trial % 2 else b""))
        longest = rng.choice([5, 20, 100])
        whole = list(read_lines(str(path), longest))
        for size in (1, 2, 3, 7, 13, 50, 1000):
            got = []
            for r in byte_ranges(str(path), size):
                got += [(len(got) + n, line) for n, line in read_lines(str(path), longest, r)]
            assert got == whole, (trial, size)
    assert byte_ranges(str(write(tmp_path / "a.jsonl.zst", [doc("x")])), 1) == [None]  # read whole


SKIPPABLE = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
"""A skippable zstd frame (RFC 8878 §3.1.2): 3 bytes of user data that readers pass over."""


def frames(path, raw: bytes, every: int, extras: bool = False):
    """`raw` as a .zst of frames of `every` bytes each (cut anywhere, mid-line too), each saying its size;
    with `extras`, an empty frame and a skippable frame after each, and an empty one at the end."""
    z = zstandard.ZstdCompressor(write_checksum=True)
    pad = z.compress(b"") + SKIPPABLE if extras else b""
    body = b"".join(z.compress(raw[i : i + every]) + pad for i in range(0, len(raw), every))
    path.write_bytes(body + (z.compress(b"") if extras else b""))
    return path


def test_the_runs_of_frames_of_a_zst_hold_each_line_once_whatever_the_cut(tmp_path):
    rng = random.Random(1)
    for trial in range(40):
        lines = [b"y" * rng.choice([0, 1, 4, 9, 30, 70]) for _ in range(rng.randint(1, 40))]
        raw = b"\n".join(lines) + (b"\n" if trial % 2 else b"")
        every = rng.choice([1, 5, 17, 64])
        path = frames(tmp_path / f"{trial}.jsonl.zst", raw, every, extras=trial % 3 == 0)
        longest = rng.choice([5, 20, 100])
        whole = list(read_lines(str(path), longest))
        for size in (1, 3, 10, 40, 10_000):
            got, ranges = [], byte_ranges(str(path), size)
            for r in ranges:
                got += [(len(got) + n, line) for n, line in read_lines(str(path), longest, r)]
            assert got == whole, (trial, size)
            # split unless small, one frame, or frames larger than a range (whose blocks are not walked)
            assert (len(ranges) > 1) == (len(raw) > size and len(raw) > every and every <= size)
            assert all(r[0] < r[1] for r in ranges if r)  # no range of nothing (the trailing empty frame)
    one = b"".join(b"z" * 50 + b"\n" for _ in range(40))
    unsized = tmp_path / "unsized.jsonl.zst"
    with open(unsized, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:  # no frame says its size
        w.write(one[:1000])
        w.flush(zstandard.FLUSH_FRAME)
        w.write(one[1000:])
    assert byte_ranges(str(unsized), 100) == [None]
    first = tmp_path / "skippable-first.jsonl.zst"  # a skippable frame first: split all the same
    first.write_bytes(SKIPPABLE + frames(tmp_path / "x.jsonl.zst", one, 300).read_bytes())
    got, ranges = [], byte_ranges(str(first), 500)
    for r in ranges:
        got += [(len(got) + n, line) for n, line in read_lines(str(first), 100, r)]
    assert len(ranges) > 1 and got == list(read_lines(str(tmp_path / "x.jsonl.zst"), 100))
    one_frame = frames(tmp_path / "one.jsonl.zst", one, len(one))  # one frame larger than a range
    assert byte_ranges(str(one_frame), 500) == [None]
    cut = frames(tmp_path / "cut.jsonl.zst", one, 300)
    cut.write_bytes(cut.read_bytes()[:-30])  # truncated: read whole, and the reader says so
    assert byte_ranges(str(cut), 100) == [None]
    with pytest.raises(BadFileError, match="truncated zstd stream"):
        list(read_lines(str(cut), 100))


def blocks_of(path, size: int, skip=frozenset(), max_line: int = 1 << 20) -> tuple[dict[int, bytes], dict]:
    gen, got = read_blocks(str(path), size, max_line, skip), {}
    while True:
        try:
            k, data = next(gen)
        except StopIteration as end:
            return got, end.value
        got[k] = data


def test_the_blocks_one_reader_cuts_hold_each_line_once_wherever_the_chunks_end(tmp_path, monkeypatch):
    """The blocks of a one-frame .zst hold the file's lines in order, each once, every block but the
    last at least `size` bytes; the cuts depend on the data alone, not on the chunks the reader
    decompresses; an over-long line is handed on cut short, still too long; skipped blocks are not
    yielded, and the count is the same."""
    rng = random.Random(2)
    for trial in range(160):
        lines = [b"x" * rng.choice([0, 1, 5, 40, 300]) for _ in range(rng.randint(0, 60))]
        raw = b"\n".join(lines) + (b"\n" if trial % 2 else b"")
        zst = tmp_path / f"{trial}.jsonl.zst"
        zst.write_bytes(zstandard.ZstdCompressor().compress(raw))
        size, longest = rng.choice([1, 3, 17, 100, 5000]), rng.choice([3, 50, 1 << 20])
        want = list(read_lines(str(zst), longest))
        first = None
        for chunk in (1 << 20, rng.choice([7, 64])):
            monkeypatch.setattr(readers, "CHUNK", chunk)
            got, summary = blocks_of(zst, size, max_line=longest)
            assert summary["error"] is None and sorted(got) == list(range(summary["blocks"]))
            cuts = [[line for _, line in lines_of(got[k], longest)] for k in sorted(got)]
            assert cuts == (first or cuts), (trial, chunk)  # each block the same lines
            first = cuts
        read = [line for k in sorted(got) for _, line in lines_of(got[k], longest)]
        assert read == [line for _, line in want], (trial, size)
        if longest > 300:  # no line cut short: the blocks are the text, cut at line ends
            assert b"".join(got[k] for k in sorted(got)) == raw
            assert all(len(got[k]) >= size and got[k].endswith(b"\n") for k in sorted(got)[:-1])
        skip = frozenset(rng.sample(sorted(got), rng.randint(0, len(got))))
        assert blocks_of(zst, size, skip, longest) == (
            {k: v for k, v in got.items() if k not in skip},
            summary,
        )
    huge = tmp_path / "one-line.json.gz"  # a 3 MB line (a minified JSON array, say): not held whole
    huge.write_bytes(gzip.compress(b"[" + b"1," * 1_500_000 + b"1]\n" + b"{}\n"))
    got, summary = blocks_of(huge, 100, max_line=1000)
    assert summary == {"blocks": 2, "error": None} and len(got[0]) == 1000 + 1 + 1  # and its newline
    assert [line for _, line in lines_of(got[0], 1000)] == [None] and got[1] == b"{}\n"


def test_a_damaged_gz_is_a_bad_file_for_either_reader(tmp_path):
    """Bad compressed data in a .gz (zlib's error): a BadFileError naming the file for the reader of the
    whole file, and the verdict in the summary of the reader of blocks, not an exception."""
    data = bytearray(gzip.compress(b"".join(doc(prose(i)).encode() + b"\n" for i in range(300))))
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(BadFileError, match=r"bad\.jsonl\.gz: corrupt or truncated"):
        list(read_lines(str(bad), 1 << 20))
    _, summary = blocks_of(bad, 1000)
    assert str(bad) in summary["error"] and "corrupt or truncated" in summary["error"]


def corpus(folder, form: str = "jsonl"):
    """Three files of some size, with bad records, blank lines, over-long lines and duplicates
    across files and ranges, as plain .jsonl, or as .jsonl.zst of frames of 700 bytes (`zst-frames`),
    of one frame (`zst-one-frame`, as the Pile's), of frames without sizes (`zst-unsized`), or .jsonl.gz."""
    folder.mkdir()
    files = []
    for k in range(3):
        lines = []
        for i in range(60):
            lines.append(doc(prose(100 * k + i, 300 + 7 * i), f"Set {'AB'[i % 2]}"))
            if i % 9 == 4:
                lines += [b'{"text": "unterminated', b"", json.dumps({"text": 42})]
            if i % 13 == 6:
                lines.append(doc("y" * 5000))  # too long for max_chars
                lines.append(doc(prose(100 * k + i - 1, 300 + 7 * (i - 1))))  # an exact duplicate
        path = write(folder / f"big-{k}.jsonl", lines)
        raw, zst = path.read_bytes(), folder / f"big-{k}.jsonl.zst"
        if form == "zst-frames":
            path = frames(zst, raw, 700)
        elif form == "zst-one-frame":
            zst.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
            path = zst
        elif form == "zst-unsized":
            with zstandard.ZstdCompressor().stream_writer(open(zst, "wb")) as w:  # no size given: none said
                for i in range(0, len(raw), 1000):
                    w.write(raw[i : i + 1000])
            path = zst
        elif form == "gz":
            path = folder / f"big-{k}.jsonl.gz"
            path.write_bytes(gzip.compress(raw, mtime=0))
        if path.suffix != ".jsonl":
            (folder / f"big-{k}.jsonl").unlink()
        files.append(path)
    return files


@pytest.fixture
def small_ranges():
    return {"split_mb": 2500 / 2**20}  # 2500 bytes of text per task


FORMS = ["jsonl", "zst-frames", "zst-one-frame", "zst-unsized", "gz"]


@pytest.mark.parametrize("form", FORMS)
def test_split_inputs_give_the_bytes_one_task_per_file_gives(tmp_path, small_ranges, form):
    """Ranges of a plain file, runs of frames of a .zst, or blocks of a file one reader reads whole:
    the same output as one task per file."""
    files = corpus(tmp_path / "src", form)
    ctx = CrashContext("ingest", tmp_path / "w-split")
    split = ingest_with(ctx, files, tmp_path / "split", max_chars=4000, max_errors=1000, **small_ranges)
    assert sum(fn == "clean_file" for fn, _ in ctx.ran) > 3 * 10  # ranges or blocks, not files
    ref = ingest_with(
        PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref", max_chars=4000, max_errors=1000
    )
    names = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(split) for p in split.rglob("*") if p.is_file())
    for n in names:
        if n.name != "stats.json":
            assert (split / n).read_bytes() == (ref / n).read_bytes(), n
    a, b = (json.loads((d / "stats.json").read_text()) for d in (split, ref))
    how = "range" if form in ("jsonl", "zst-frames") else "block"
    assert [u for u in a.pop("units") if u["unit"] == "clean" and how in u]
    b.pop("units")
    assert a == b and a["errors_total"] > 20 and a["dropped"]["duplicate"] > 0


@pytest.mark.parametrize("form", ["jsonl", "zst-one-frame"])
def test_a_split_run_killed_mid_clean_resumes_its_finished_ranges(tmp_path, small_ranges, caplog, form):
    """Killed with 20 ranges (or blocks, handed on by a reader) cleaned: the next run cleans only the
    others (a file read in blocks is read again, its finished blocks not handed on) and makes the
    same bytes."""
    caplog.set_level("INFO", logger="kiln")
    files = corpus(tmp_path / "src", form)
    ref = ingest_with(
        PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref", max_chars=4000, **small_ranges
    )
    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(
            CrashContext("ingest", work, crash_after=20),
            files,
            tmp_path / "killed",
            max_chars=4000,
            **small_ranges,
        )
    caplog.clear()
    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out", max_chars=4000, **small_ranges)
    said = [m for m in caplog.messages if "units already done" in m]
    assert len(said) == 1 and said[0].startswith("ingest: 20 of ")
    cleaning = [u for u in json.loads((ref / "stats.json").read_text())["units"] if u["unit"] == "clean"]
    assert sum(fn == "clean_file" for fn, _ in again.ran) == len(cleaning) - 20  # not the 20 done
    for p in ref.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p


def test_a_damaged_file_read_in_blocks_fails_then_is_skipped_without_reading_again(tmp_path, small_ranges):
    """A one-frame .zst cut short, read in blocks: the run stops naming the file, as a whole-file
    reader does; run again with on_bad_file=skip, it skips it without reading anything again (the
    good file's blocks and the bad file's verdict are kept), and every count reconciles."""
    good, bad = corpus(tmp_path / "src", "zst-one-frame")[:2]
    bad.write_bytes(bad.read_bytes()[:-300])
    work = tmp_path / "work"
    with pytest.raises(ingest.IngestError) as err:
        ingest_with(PickleContext("ingest", work), [good, bad], tmp_path / "fail", **small_ranges)
    msg = str(err.value)
    assert str(bad) in msg and "truncated zstd stream" in msg and "on_bad_file=skip" in msg
    again = CrashContext("ingest", work)
    out = ingest_with(again, [good, bad], tmp_path / "skip", on_bad_file="skip", **small_ranges)
    assert [fn for fn, _ in again.ran if fn == "clean_file"] == []
    stats = json.loads((out / "stats.json").read_text())
    assert [f["status"] for f in stats["files"]] == ["ok", "skipped"] and stats["files"][1]["read"] == 0
    assert "truncated" in stats["files"][1]["error"] and stats["kept"] > 0
    assert stats["read"] == stats["kept"] + sum(stats["dropped"].values())


@pytest.mark.timeout(300)
def test_ray_hands_a_readers_blocks_to_tasks_and_makes_one_tasks_bytes(tmp_path, small_ranges, ray_session):
    """On Ray, each one-frame .zst and .gz is read by one producer task whose blocks go, through the
    object store, to cleaning tasks that run while it reads: the output is the bytes one task per
    file makes, and stats.json names the node of every block."""
    from pipeline.ray_context import RayStageContext

    files = corpus(tmp_path / "zst", "zst-one-frame")[:2] + corpus(tmp_path / "gz", "gz")[2:]
    got = ingest_with(
        RayStageContext("ingest", tmp_path / "w-ray"), files, tmp_path / "ray", max_chars=4000, **small_ranges
    )
    stats = json.loads((got / "stats.json").read_text())
    blocks = [u for u in stats.pop("units") if u["unit"] == "clean"]
    assert len(blocks) > 3 * 10 and all(u["node_id"] and "block" in u for u in blocks)
    assert [u["block"] for u in blocks if u["file"] == 0] == list(range(sum(u["file"] == 0 for u in blocks)))
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref", max_chars=4000)
    want = json.loads((ref / "stats.json").read_text())
    want.pop("units")
    assert stats == want
    for p in ref.rglob("*.parquet"):
        assert (got / p.relative_to(ref)).read_bytes() == p.read_bytes(), p


def test_a_file_that_changes_while_it_is_read_in_blocks_is_read_again_by_the_next_run(
    tmp_path, small_ranges, monkeypatch
):
    """A .gz still being downloaded when ingest plans: read cut short, the run stops on it. It is
    whole by the time the reader's verdict is recorded; the verdict is the planned file's, so the
    next run reads it again, and it is good."""
    from data_prep import blocks

    (path,) = corpus(tmp_path / "src", "gz")[:1]
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    real = blocks._read

    def read_then_finish(arg):  # the download completes while the reader is through
        summary = yield from real(arg)
        path.write_bytes(whole)
        os.utime(path, ns=(1, 1))
        return summary

    monkeypatch.setattr(blocks, "_read", read_then_finish)
    work = tmp_path / "work"
    with pytest.raises(ingest.IngestError, match="corrupt or truncated"):
        ingest_with(PickleContext("ingest", work), [path], tmp_path / "first", **small_ranges)
    monkeypatch.setattr(blocks, "_read", real)
    out = ingest_with(PickleContext("ingest", work), [path], tmp_path / "again", **small_ranges)
    stats = json.loads((out / "stats.json").read_text())
    assert [f["status"] for f in stats["files"]] == ["ok"] and stats["read"] > 60
