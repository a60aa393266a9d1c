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

A stage's tasks may run on any node. A `Folder` is a folder of units as every task sees it: on a
local or shared (NFS) root the work dir's folder itself; on an object-store root the same folder
under the run's prefix (`.work/<stage>-<key>/<name>/`), of which each node keeps a cache under its
KILN_CACHE. A task writes its files into `local()`, renames them into place, uploads them
(`publish`, which hashes them on the way) and writes its record to the root, last. A reader on
another node fetches only the files it reads (`fetch`, or `open` for byte ranges), and uses its
node's copy when the cache holds the version the writer recorded (its sha256). `Inputs` does the
same for a complete input artifact's files: each task fetches those it reads, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import sha256_file, write_json_atomic

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
    saved = _holds(_read_record(Path(path).read_text), identity, lambda name: _size(Path(path).parent / name))
    return None if saved is None else saved.get("result")


def _read_record(read: Callable) -> dict | None:
    try:
        saved = json.loads(read())
    except (OSError, ValueError, TypeError):
        return None
    return saved if isinstance(saved, dict) else None


def _holds(saved: dict | None, identity: dict, size_of: Callable[[str], int | None]) -> dict | None:
    """The record if it has this identity and each of its files has its recorded size; else None."""
    if saved is None or saved.get("identity") != _plain(identity):
        return None
    if any(size_of(name) != size for name, size in saved.get("files", {}).items()):
        return None
    return saved


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def node_id() -> str | None:
    """The Ray node this process runs on (recorded with each unit, listed in the stages' stats);
    None outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


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


_ROOTS: dict = {}
"""This process's `Root` per (root, run): one S3 client per process, not one per file."""


def _root(root: str, run: str):
    if (root, run) not in _ROOTS:
        from pipeline.artifacts import ArtifactStore

        _ROOTS[root, run] = ArtifactStore(root, run).files
    return _ROOTS[root, run]


@dataclass(frozen=True)
class Folder:
    """A folder of a stage's units, as every task sees it wherever it runs (module docstring).
    `path`: the folder on the driver's node; on an object-store root also `root`, `run` and `rel`
    (the folder under the run's prefix)."""

    path: str
    root: str | None = None
    run: str | None = None
    rel: str | None = None

    @classmethod
    def of(cls, ctx, name: str) -> Folder:
        """The work dir's folder `name` of the stage `ctx` runs."""
        path = str(Path(ctx.work_dir) / name)
        if ctx.shared_work:
            return cls(path)
        store = ctx.store
        return cls(path, store.root, store.run, f".work/{store.name(ctx.stage, ctx.work_key)}/{name}")

    @property
    def remote(self) -> bool:
        return self.rel is not None

    def root_rel(self, name: str) -> str:
        """Where the file `name` is in an object-store root (relative to the run's prefix)."""
        return f"{self.rel}/{name}"

    def local(self) -> Path:
        """The folder on this node: where a task writes, and where the files it fetched are kept."""
        folder = _root(self.root, self.run).run_dir / self.rel if self.remote else Path(self.path)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def publish(self, names: Iterable[str], digest: bool = False) -> dict[str, dict]:
        """Files a task wrote into `local()` (renamed into place), for readers on every node: on an
        object-store root uploaded (in parallel) and hashed on the way. Returns {name: {size,
        sha256}}; on a local root the sha256 only when `digest` (it costs a read there)."""
        local, names = self.local(), list(names)
        if self.remote:
            from pipeline.remote import parallel

            facts = parallel(
                lambda n: _root(self.root, self.run).put(local / n, self.root_rel(n), True), names
            )
            for n, f in zip(names, facts, strict=True):
                _remember(local / n, f["sha256"])
        else:
            facts = [
                {"size": (local / n).stat().st_size, **({"sha256": sha256_file(local / n)} if digest else {})}
                for n in names
            ]
        return dict(zip(names, facts, strict=True))

    def record(self, name: str, identity: dict, result: dict, files: dict[str, dict]) -> None:
        """Record the unit `name` finished, last: once each of its `files` ({name: facts}, from
        `publish`) is in place, on a remote root uploaded."""
        saved = {
            "identity": identity, "result": result, "files": {n: f["size"] for n, f in files.items()},
            "sha256": {n: f["sha256"] for n, f in files.items() if "sha256" in f},
        }  # fmt: skip
        if self.remote:
            _root(self.root, self.run).write_json(self.root_rel(f"{name}{RECORD}"), saved)
        else:
            write_json_atomic(record_path(self.local(), name), saved)

    def listing(self) -> dict[str, int] | None:
        """The folder's files and sizes in an object-store root (one listing for many `finished`)."""
        return _root(self.root, self.run).list_files(self.rel) if self.remote else None

    def recorded(self, listing: dict[str, int] | None = None) -> list[str]:
        """The names of the units recorded in the folder (finished, or finished with another identity)."""
        if self.remote:
            names = self.listing() if listing is None else listing
        else:
            names = [p.name for p in self.local().glob(f"*{RECORD}")]
        return sorted(n[: -len(RECORD)] for n in names if n.endswith(RECORD) and "/" not in n)

    def finished(self, name: str, identity: dict, listing: dict[str, int] | None = None) -> dict | None:
        """The record of unit `name` (its result, files, sha256) if it was finished with this
        identity and its files are all there with their sizes; else None."""
        if not self.remote:
            path = record_path(self.local(), name)
            return _holds(_read_record(path.read_text), identity, lambda n: _size(path.parent / n))
        files = self.listing() if listing is None else listing
        saved = _read_record(lambda: _root(self.root, self.run).read_bytes(self.root_rel(f"{name}{RECORD}")))
        return _holds(saved, identity, files.get)

    def fetch(self, name: str, sha256: str | None = None) -> Path:
        """The file on this node: on an object-store root downloaded, unless this node's cache holds
        the version whose digest is `sha256` already."""
        path = self.local() / name
        if self.remote and not _cached(path, sha256):
            _root(self.root, self.run).get(self.root_rel(name), path)
            _remember(path, sha256)
        return path

    def open(self, name: str, sha256: str | None = None):
        """The file opened for reading: this node's copy if it holds that version, else (object
        store) a reader that fetches only the byte ranges read."""
        path = self.local() / name
        if not self.remote or _cached(path, sha256):
            return open(path, "rb")
        return _root(self.root, self.run).open_input(self.root_rel(name))

    def clear_temporary(self) -> None:
        """The temporary files of tasks killed half-way, on this node."""
        clear_temporary(self.local())

    def discard(self) -> None:
        """Remove the folder once the stage is done with it: in the root (records first) and here."""
        if self.remote:
            files = _root(self.root, self.run)
            for name in files.list_files(self.rel):
                if name.endswith(RECORD):
                    files.delete_file(self.root_rel(name))
            files.delete_tree(self.rel)
        discard(self.local())


AFTER_COMMIT = "after_commit.json"
"""In an object-store stage's shared work dir: the folders of units its commit copies from, to remove
once the artifact is committed (`note_after_commit`)."""


def note_after_commit(store, stage: str, work_key: str, folders: list[Folder]) -> None:
    """Note, before the commit, the folders of units (on an object-store root) that the commit copies
    from and the stage removes once its artifact is committed. Should the driver die between the
    commit and their removal, the stage is complete and never runs again: the next run of the pipeline
    finds the note and removes them (`discard_after_commit`)."""
    store.write_work_file(stage, work_key, AFTER_COMMIT, json.dumps(sorted(f.rel for f in folders)))


def discard_after_commit(store, stage: str, work_key: str) -> list[str]:
    """The folders a committed stage noted (`note_after_commit`) and had not removed yet, removed now:
    in the root (records first) and in this node's cache; then the note. Other nodes' caches keep their
    copies (they are caches, emptied with KILN_CACHE). Returns the folders, relative to the run."""
    text = store.read_work_file(stage, work_key, AFTER_COMMIT)
    if text is None:
        return []
    rels = json.loads(text)
    for rel in rels:
        Folder(str(store.run_dir / rel), store.root, store.run, rel).discard()
    store.delete_work_file(stage, work_key, AFTER_COMMIT)
    return rels


@dataclass(frozen=True)
class FileRef:
    """One file of a `Folder`, in the version its writer recorded: what a task on any node opens."""

    folder: Folder
    name: str
    sha256: str | None = None

    def open(self):
        return self.folder.open(self.name, self.sha256)

    def fetch(self) -> Path:
        return self.folder.fetch(self.name, self.sha256)


@dataclass(frozen=True)
class Inputs:
    """Files of a complete input artifact, as a task on any node reads them: `path` is its folder on
    the driver's node (on a local or shared root, on every node); on an object-store root a task
    fetches each file it reads into its node's cache (`files`: their manifest entries), no other."""

    path: str
    root: str | None = None
    run: str | None = None
    name: str | None = None
    files: dict = field(default_factory=dict)

    @classmethod
    def of(cls, ctx, artifact, rels: Iterable[str]) -> Inputs:
        if ctx.shared_work:
            return cls(str(artifact.path))
        files = artifact.manifest.get("files", {})
        name = ctx.store.name(artifact.stage, artifact.fingerprint)
        return cls(str(artifact.path), ctx.store.root, ctx.store.run, name, {r: files[r] for r in rels})

    def fetch(self, rel: str) -> Path:
        if self.name is None:
            return Path(self.path) / rel
        return _root(self.root, self.run).fetch_file(self.name, rel, self.files[rel])


def _stamp(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def _remember(path: Path, sha256: str | None) -> None:
    """Note beside a cached file which version it is (its sha256), with its size and mtime then."""
    if sha256:
        st = path.stat()
        write_json_atomic(_stamp(path), {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def _cached(path: Path, sha256: str | None) -> bool:
    """This node's copy is the version `sha256` (noted when it was written or fetched, unchanged since)."""
    if not sha256:
        return False
    try:
        noted = json.loads(_stamp(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return noted == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
