"""Large plain inputs cleaned by several tasks, one per byte range (stages/ingest.py SPLIT_BYTES,
data_prep/readers.py `byte_ranges`): every line read by exactly one range whatever the cut, and the
artifact the same bytes as one task per file makes (stats.json apart from the units it lists),
bad records' line numbers included; a run killed mid-way resumes the finished ranges."""

from __future__ import annotations

import json
import random

import pytest

from data_prep.readers import byte_ranges, read_lines
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


def corpus(folder):
    """Three files of some size, with bad records, blank lines, over-long lines and duplicates
    across files and ranges."""
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
        files.append(write(folder / f"big-{k}.jsonl", lines))
    return files


@pytest.fixture
def small_ranges(monkeypatch):
    monkeypatch.setattr(ingest, "SPLIT_BYTES", 2500)


def test_split_inputs_give_the_bytes_one_task_per_file_gives(tmp_path, small_ranges, monkeypatch):
    files = corpus(tmp_path / "src")
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
