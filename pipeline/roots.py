"""Where a run's files live: a `Root`, on a local or NFS path (`LocalRoot`, here) or on an object store
(`RemoteRoot`, pipeline/remote.py, which imports pyarrow).

A root holds one run's folder, `<root>/<run>/`; names are relative to it, POSIX-style (`a-f1`,
`.work/a-k1/progress.json`, `logs/a.log`). `run_dir` is that folder as this machine sees it: on a
local root the folder itself, on an object store a local cache of it, whose files reach the root
only when pushed. The artifact store (pipeline/artifacts.py) decides which names go where; a root
decides how they are stored, and how a committed artifact is made complete atomically.
"""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from pipeline.files import MANIFEST, NO_ARTIFACT, Problem, read_json, verify_files, write_json_atomic


class Root(ABC):
    """One run's folder on a local path or an object store (see the module docstring)."""

    remote: bool
    """An object store: `run_dir` is a cache of the root, not the root itself."""
    run_dir: Path
    """The run's folder on this machine."""
    staging_dir: Path
    """Where a stage writes its artifact before `commit`."""

    # -- single files --------------------------------------------------------------------------

    @abstractmethod
    def uri(self, rel: str) -> str:
        """Where `rel` is, to show: a path, or the object store's URI."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content; None when there is none."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def write_json(self, rel: str, data) -> None:
        """Readers see the old file or the new one, never half of it."""

    @abstractmethod
    def upload_file(self, local: Path, rel: str) -> None:
        """A copy of a local file as `rel`."""

    @abstractmethod
    def push(self, rel: str) -> None:
        """`run_dir/rel`, when it is a file, to the root (nothing to do when run_dir is the root)."""

    @abstractmethod
    def pull(self, rel: str, keep_longer: bool = False) -> None:
        """The root's `rel` into `run_dir` (nothing to do when run_dir is the root). keep_longer: a
        longer local copy stays (rows appended to it that were not pushed yet)."""

    # -- trees ---------------------------------------------------------------------------------

    @abstractmethod
    def list_files(self, rel: str) -> dict[str, int]:
        """Files under `rel/` (relative to it) -> size."""

    @abstractmethod
    def download_tree(self, rel: str, dest: Path) -> list[str]:
        """Every file under `rel/` into `dest`, same relative paths; returns them."""

    @abstractmethod
    def delete_tree(self, rel: str) -> None:
        """Everything under `rel/`."""

    @abstractmethod
    def move_tree(self, src: str, dst: str, rename: dict[str, str]) -> None:
        """`src/` becomes `dst/`, unless that is there already; a folder `src/<key>` of `rename`
        becomes `dst/<value>`. On an object store, in the root and in this machine's cache."""

    # -- artifacts -----------------------------------------------------------------------------

    @abstractmethod
    def check(self, name: str, deep: bool) -> tuple[dict | None, Problem | None]:
        """(manifest, None) when the artifact is complete; (None, problem) otherwise. Sizes always,
        sha256 when deep."""

    @abstractmethod
    def local_path(self, name: str) -> Path:
        """The artifact's folder on this machine (on an object store: downloaded into the cache)."""

    @abstractmethod
    def manifests(self, prefix: str) -> list[dict]:
        """The readable manifests of the artifacts whose name starts with `prefix`."""

    @abstractmethod
    def commit(
        self, staging: Path, name: str, manifest: dict, sources: dict[str, str] | None = None
    ) -> dict | None:
        """Make the staged folder, its manifest written, the complete artifact `name` (a crash leaves
        no artifact or a complete one); returns the manifest as readers see it, None if it does not
        verify. `sources` ({rel in the artifact: rel in the root}): files the stage's tasks already
        wrote to an object-store root, copied into the artifact there (a local root has none: the
        tasks wrote into the staging folder)."""

    @abstractmethod
    def artifact_dir(self, name: str) -> Path:
        """Where the artifact's folder is, or will be once fetched, on this machine."""

    @abstractmethod
    def fetch_file(self, name: str, rel: str, meta: dict, cache_dir: Path | None = None) -> Path:
        """One file of the complete artifact `name` on this machine (`meta`: its manifest entry); on
        an object store, fetched into the cache (`cache_dir`, default the run's) unless there."""

    @abstractmethod
    def move_artifact(self, old: str, new: str, manifest: dict) -> None:
        """The files of artifact `old` under `new` with `manifest`, which goes last, then `old`
        removed. A crash leaves `old` complete, or both."""

    # -- Ray Train -----------------------------------------------------------------------------

    @abstractmethod
    def train_storage(self, rel: str) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray Train to keep checkpoints under `rel`."""


class LocalRoot(Root):
    """A run's folder on a local or shared (NFS) filesystem: `run_dir` is the root itself. A staged
    artifact lies beside its final place and is renamed into it after its manifest is written."""

    remote = False

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        self.staging_dir = self.run_dir  # one filesystem: the rename into place is atomic

    def uri(self, rel: str) -> str:
        return str(self.run_dir / rel)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.run_dir / rel).read_bytes()
        except OSError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def write_json(self, rel: str, data) -> None:
        write_json_atomic(self.run_dir / rel, data)

    def upload_file(self, local: Path, rel: str) -> None:
        (self.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, self.run_dir / rel)

    def push(self, rel: str) -> None:
        pass  # run_dir is the root

    def pull(self, rel: str, keep_longer: bool = False) -> None:
        pass

    def list_files(self, rel: str) -> dict[str, int]:
        base = self.run_dir / rel
        return {p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def download_tree(self, rel: str, dest: Path) -> list[str]:
        files = sorted(self.list_files(rel))
        for f in files:
            (Path(dest) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.run_dir / rel / f, Path(dest) / f)
        return files

    def delete_tree(self, rel: str) -> None:
        shutil.rmtree(self.run_dir / rel, ignore_errors=True)

    def move_tree(self, src: str, dst: str, rename: dict[str, str]) -> None:
        move_dir(self.run_dir / src, self.run_dir / dst, rename)

    def check(self, name: str, deep: bool) -> tuple[dict | None, Problem | None]:
        folder = self.run_dir / name
        if not folder.is_dir():
            return None, NO_ARTIFACT
        try:
            manifest = read_json(folder / MANIFEST)
        except FileNotFoundError:
            return None, Problem("is missing (the stage did not finish)", str(folder / MANIFEST))
        except ValueError:
            return None, Problem("is not valid JSON", str(folder / MANIFEST), damaged=True)
        problem = verify_files(folder, manifest.get("files", {}), deep)
        return (None, problem) if problem else (manifest, None)

    def local_path(self, name: str) -> Path:
        return self.run_dir / name

    def manifests(self, prefix: str) -> list[dict]:
        found = []
        for m in self.run_dir.glob(f"{prefix}*/{MANIFEST}"):
            try:
                found.append(read_json(m))
            except ValueError:
                continue
        return found

    def commit(
        self, staging: Path, name: str, manifest: dict, sources: dict[str, str] | None = None
    ) -> dict | None:
        if sources:
            raise ValueError(f"{name}: a local root's artifact is its staging folder; no files to copy in")
        final = self.run_dir / name
        if final.exists():  # a forced re-run: make the old one incomplete first, then swap
            (final / MANIFEST).unlink(missing_ok=True)
            trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(final)
        return manifest

    def artifact_dir(self, name: str) -> Path:
        return self.run_dir / name

    def fetch_file(self, name: str, rel: str, meta: dict, cache_dir: Path | None = None) -> Path:
        return self.run_dir / name / rel

    def move_artifact(self, old: str, new: str, manifest: dict) -> None:
        """Its files hard-linked (copied where links fail) into a staging folder that is renamed
        into place once the manifest is written."""
        src, final = self.run_dir / old, self.run_dir / new
        staging = self.run_dir / f".tmp-{new}-{uuid.uuid4().hex[:8]}"
        for f in sorted(src.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                (staging / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(f, staging / f.relative_to(src))
        write_json_atomic(staging / MANIFEST, manifest)
        if final.exists():  # an unfinished folder of that name: never complete, never read
            shutil.rmtree(final)
        staging.rename(final)
        shutil.rmtree(src)

    def train_storage(self, rel: str) -> tuple[str, object | None]:
        return str(self.run_dir / rel), None


def move_dir(src: Path, dst: Path, rename: dict[str, str]) -> None:
    """A local folder renamed as `Root.move_tree` says: the `rename` folders inside it first."""
    for old, new in rename.items():
        if (src / old).is_dir() and not (src / new).exists():
            (src / old).rename(src / new)
    if src.is_dir() and not dst.exists():
        src.rename(dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)
