"""Finished units of a data stage, recorded in its work dir, so that a re-run after a crash redoes
only the units that were not finished.

    result = units.finished(record, identity)           # the driver: a unit done earlier, or None
    ...                                                  # the task: its files, renamed into place
    units.record(record, identity, result, files)        # the task, last: the unit counts as done

A unit is a piece of a stage's work done by one task: one input file cleaned, one file's shards
written, one range of documents tokenized. Its task writes each output file under a temporary name
and renames it into place, then writes its record (`<name>.done.json`, atomically, last): the unit's
identity (every input and setting its output depends on, the input files' size and mtime among
them), the result the driver needs from it, and the size of each file it wrote. A record is reused
only when its identity is the one the unit has now and its files are all there with their sizes;
otherwise the unit is done again and overwrites what an earlier attempt left (a file without a
record is never read). So a crash loses at most the units its tasks were running.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from pipeline.files import write_json_atomic

RECORD = ".done.json"
"""A unit's record is `<its name>.done.json`, beside the files it wrote."""


def record_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}{RECORD}"


def file_facts(path: str) -> dict:
    """What says an input file is the one a unit was made from: its path, size and mtime (a path
    that is no file, e.g. `hf:NAME`, by its name alone)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path)}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def digest(data: bytes) -> str:
    """A short content hash for an identity (e.g. of a numpy array's bytes)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _plain(identity: dict):
    """The identity as its record holds it (JSON: tuples become lists, keys strings)."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def finished(path: Path, identity: dict) -> dict | None:
    """The result recorded for this unit, if it was finished with this identity and every file it
    wrote is still there with its size; else None (the unit is to be done, again)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("identity") != _plain(identity):
        return None
    folder = Path(path).parent
    for name, size in saved.get("files", {}).items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return saved.get("result")


def record(path: Path, identity: dict, result: dict, files: Iterable[Path]) -> None:
    """Record a finished unit at `path`: call it last, once each of its `files` (beside the record,
    or under its folder) has been renamed into place."""
    path = Path(path)
    sizes = {Path(f).relative_to(path.parent).as_posix(): Path(f).stat().st_size for f in files}
    write_json_atomic(path, {"identity": identity, "result": result, "files": sizes})


def clear_temporary(folder: Path) -> None:
    """Remove the temporary files that tasks killed half-way left in `folder` (`*.tmp`)."""
    for p in Path(folder).glob("*.tmp"):
        p.unlink(missing_ok=True)


def discard(folder: Path) -> None:
    """Remove a folder of units once the stage is done with them: the records first, so that a crash
    half-way leaves no record whose files are gone (and `finished` checks that anyway)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.rglob(f"*{RECORD}"):
        p.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (instant, and the unit keeps its file until the stage is done),
    or a copy where the two are on different filesystems."""
    dst = Path(dst)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
