"""Large inputs cleaned by several tasks (stages/ingest.py SPLIT_BYTES, data_prep/readers.py
`byte_ranges`): a plain file by byte ranges, a .zst of sized frames by runs of frames. Every line read
by exactly one range whatever the cut (frames cut mid-line too), and the artifact the same bytes as one
task per file makes (stats.json apart from the units it lists), bad records' line numbers included; a
run killed mid-way resumes the finished ranges."""

from __future__ import annotations

import json
import random

import pytest
import zstandard

from data_prep.readers import BadFileError, byte_ranges, read_lines
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


def corpus(folder, zst_frames: int = 0):
    """Three files of some size, with bad records, blank lines, over-long lines and duplicates
    across files and ranges; with `zst_frames`, .jsonl.zst files of frames of that many bytes."""
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
        if zst_frames:
            path = frames(folder / f"big-{k}.jsonl.zst", path.read_bytes(), zst_frames)
            (folder / f"big-{k}.jsonl").unlink()
        files.append(path)
    return files


@pytest.fixture
def small_ranges(monkeypatch):
    monkeypatch.setattr(ingest, "SPLIT_BYTES", 2500)


@pytest.mark.parametrize("zst_frames", [0, 700], ids=["jsonl", "zst-frames"])
def test_split_inputs_give_the_bytes_one_task_per_file_gives(tmp_path, small_ranges, monkeypatch, zst_frames):
    files = corpus(tmp_path / "src", zst_frames)
    ctx = CrashContext("ingest", tmp_path / "w-split")
    split = ingest_with(ctx, files, tmp_path / "split", max_chars=4000, max_errors=1000)
    assert sum(fn == "clean_file" for fn, _ in ctx.ran) > 3 * 10  # ranges, not files
    monkeypatch.setattr(ingest, "SPLIT_BYTES", 1 << 40)
    ref = ingest_with(
        PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref", max_chars=4000, max_errors=1000
    )
    names = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(split) for p in split.rglob("*") if p.is_file())
    for n in names:
        if n.name != "stats.json":
            assert (split / n).read_bytes() == (ref / n).read_bytes(), n
    a, b = (json.loads((d / "stats.json").read_text()) for d in (split, ref))
    assert [u for u in a.pop("units") if u["unit"] == "clean" and "range" in u]
    b.pop("units")
    assert a == b and a["errors_total"] > 20 and a["dropped"]["duplicate"] > 0


def test_a_split_run_killed_mid_clean_resumes_its_finished_ranges(tmp_path, small_ranges, caplog):
    caplog.set_level("INFO", logger="kiln")
    files = corpus(tmp_path / "src")
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref", max_chars=4000)
    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=20), files, tmp_path / "killed", max_chars=4000)
    caplog.clear()
    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out", max_chars=4000)
    said = [m for m in caplog.messages if "units already done" in m]
    assert len(said) == 1 and said[0].startswith("ingest: 20 of ")
    cleaning = [u for u in json.loads((ref / "stats.json").read_text())["units"] if u["unit"] == "clean"]
    assert sum(fn == "clean_file" for fn, _ in again.ran) == len(cleaning) - 20  # not the 20 done
    for p in ref.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p
