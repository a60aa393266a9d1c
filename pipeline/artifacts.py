"""The artifact store: where stage outputs live, how they are committed and verified.

    store = ArtifactStore("runs", "tiny")                 # or "s3://bucket/prefix"
    staging = store.staging("ingest", fp)                 # a local folder the stage writes into
    art = store.commit("ingest", fp, staging, manifest)   # files + manifest.json, atomically
    store.find("ingest", fp)                              # -> Artifact, or None if incomplete

Layout under `<root>/<run>/`:
    <stage>-<fingerprint>/          the artifact; complete only when manifest.json exists and verifies
    .work/<stage>-<fingerprint>/    in-stage checkpoints, progress.json, metrics in progress
    logs/<stage>.log                per-stage logs, worker tracebacks included

On a local root the stage writes into a temporary folder beside the artifact that is renamed into
place after the manifest is written, so a crash leaves either no artifact or a complete one. On an
object store (no atomic folder rename) files are uploaded under the final prefix and the manifest
goes last; the manifest is what makes it complete. Only this module knows paths and formats.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import (
    MANIFEST,
    NO_ARTIFACT,
    Problem,
    describe_files,
    is_remote,
    read_json,
    verify_files,
    write_json_atomic,
)

WORK_STATE = ("progress.json", "metrics.jsonl", "wandb_run.json")
"""A work dir's small state files, mirrored to the shared root when the root is an object store."""


@dataclass(frozen=True)
class Artifact:
    """A complete stage output. `path` is local (downloaded first when the root is remote)."""

    stage: str
    fingerprint: str
    path: Path
    manifest: dict = field(repr=False)

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


class ArtifactError(RuntimeError):
    pass


def _loads(data: bytes | None):
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


class ArtifactStore:
    """Artifacts of one pipeline run, on a local path or an object store."""

    def __init__(self, root: str, run: str, cache_dir: str | Path | None = None):
        self.root, self.run = root, run
        self.remote = is_remote(root)
        local_root = Path(root.removeprefix("file://")) if not self.remote else None
        if self.remote:
            from pipeline.remote import RemoteRoot  # pyarrow only when needed

            self._remote = RemoteRoot(f"{root.rstrip('/')}/{run}")
            cache = Path(cache_dir or os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
            self.run_dir = cache / self._remote.cache_key()
        else:
            self.run_dir = (local_root / run).resolve()

    # -- where things live --------------------------------------------------------------------

    def name(self, stage: str, fp: str) -> str:
        return f"{stage}-{fp}"

    def artifact_uri(self, stage: str, fp: str) -> str:
        if self.remote:
            return self._remote.uri(self.name(stage, fp))
        return str(self.run_dir / self.name(stage, fp))

    def work_dir(self, stage: str, work_key: str) -> Path:
        """In-stage state (checkpoints, progress.json); survives a crash, unlike staging.
        Keyed without budget keys, so a longer run of the same stage continues from it."""
        return self.run_dir / ".work" / self.name(stage, work_key)

    def log_path(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"

    def progress(self, stage: str, work_key: str) -> dict | None:
        if self.remote:
            return _loads(self._remote.read_bytes(self._work_rel(stage, work_key, "progress.json")))
        path = self.work_dir(stage, work_key) / "progress.json"
        try:
            return read_json(path)
        except (OSError, ValueError):
            return None

    # -- a stage's working state on a shared root ------------------------------------------------
    # With an object-store root, `work_dir` is a local cache on the node that runs the stage; the
    # shared copy is `<root>/<run>/.work/<stage>-<key>/`: Ray Train writes its checkpoints there
    # directly (`train_storage`), the stage driver mirrors its small state files (`save_work`) and
    # restores them when the stage starts again on any node (`restore_work`). On a local or NFS
    # root the work dir is itself shared and these are no-ops.

    def _work_rel(self, stage: str, work_key: str, rel: str = "") -> str:
        return f".work/{self.name(stage, work_key)}" + (f"/{rel}" if rel else "")

    def work_uri(self, stage: str, work_key: str) -> str:
        if self.remote:
            return self._remote.uri(self._work_rel(stage, work_key))
        return str(self.work_dir(stage, work_key))

    def train_storage(self, stage: str, work_key: str):
        """(storage_path, storage_filesystem) for Ray Train's checkpoints of this stage."""
        if self.remote:
            return f"{self._remote.base}/{self._work_rel(stage, work_key, 'ray')}", self._remote.fs
        return str(self.work_dir(stage, work_key) / "ray"), None

    def save_work(self, stage: str, work_key: str, names=WORK_STATE) -> None:
        """Copy the work dir's small state files to the shared root (object stores only)."""
        if not self.remote:
            return
        local = self.work_dir(stage, work_key)
        for name in names:
            if (local / name).is_file():
                self._remote.upload_file(local / name, self._work_rel(stage, work_key, name))

    def restore_work(self, stage: str, work_key: str) -> None:
        """Bring the shared copies of the state files into this node's work dir (object stores
        only). The shared copy wins unless the local one holds more (metrics not yet mirrored)."""
        if not self.remote:
            return
        local = self.work_dir(stage, work_key)
        local.mkdir(parents=True, exist_ok=True)
        for name in WORK_STATE:
            data = self._remote.read_bytes(self._work_rel(stage, work_key, name))
            if data is None:
                continue
            mine = local / name
            if mine.is_file() and name == "metrics.jsonl" and mine.stat().st_size > len(data):
                continue
            mine.write_bytes(data)

    def write_work_file(self, stage: str, work_key: str, rel: str, text: str) -> None:
        """A small file in the stage's shared work dir, from any node (e.g. worker_pids/rank0)."""
        if self.remote:
            self._remote.write_bytes(self._work_rel(stage, work_key, rel), text.encode())
            return
        path = self.work_dir(stage, work_key) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def read_work_file(self, stage: str, work_key: str, rel: str) -> str | None:
        if self.remote:
            data = self._remote.read_bytes(self._work_rel(stage, work_key, rel))
            return None if data is None else data.decode()
        try:
            return (self.work_dir(stage, work_key) / rel).read_text()
        except OSError:
            return None

    def note_waiting(self, stage: str, work_key: str, why: str | None) -> None:
        """Record in progress.json what a running stage waits for (None: nothing any more), so
        that `status` on any machine can say it."""
        prog = self.progress(stage, work_key) or {}
        if (prog.get("waiting") or None) == why:
            return
        prog.pop("waiting", None)
        if why:
            prog.update(waiting=why, waiting_since=time.time())
        else:
            prog.pop("waiting_since", None)
        if self.remote:
            data = json.dumps(prog, indent=2, sort_keys=True).encode()
            self._remote.write_bytes(self._work_rel(stage, work_key, "progress.json"), data)
        else:
            write_json_atomic(self.work_dir(stage, work_key) / "progress.json", prog)

    def save_log(self, stage: str) -> None:
        """The stage's log to the shared root (object stores only; a local root holds it already)."""
        if self.remote and self.log_path(stage).is_file():
            self._remote.upload_file(self.log_path(stage), f"logs/{stage}.log")

    # -- reading ----------------------------------------------------------------------------------

    def check(self, stage: str, fp: str, deep: bool = False) -> tuple[dict | None, Problem | None]:
        """(manifest, None) when complete; (None, problem) otherwise. Sizes always, sha256 when deep."""
        if self.remote:
            return self._remote.check(self.name(stage, fp), deep)
        folder = self.run_dir / self.name(stage, fp)
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

    def find(self, stage: str, fp: str, deep: bool = False) -> Artifact | None:
        manifest, _ = self.check(stage, fp, deep)
        if manifest is None:
            return None
        path = self._remote.download(self.name(stage, fp), self.run_dir) if self.remote else None
        return Artifact(stage, fp, path or self.run_dir / self.name(stage, fp), manifest)

    def previous(self, stage: str) -> list[dict]:
        """Manifests of this stage's complete artifacts under other fingerprints, newest first."""
        if self.remote:
            return self._remote.previous(stage)
        found = []
        for m in self.run_dir.glob(f"{stage}-*/{MANIFEST}"):
            try:
                found.append(read_json(m))
            except ValueError:
                continue
        return sorted(found, key=lambda m: m.get("created", 0), reverse=True)

    # -- writing ----------------------------------------------------------------------------------

    def staging(self, stage: str, fp: str) -> Path:
        """A fresh, empty local folder for the stage to write its artifact into."""
        base = self.run_dir if not self.remote else self.run_dir / ".staging"
        path = base / f".tmp-{self.name(stage, fp)}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def commit(self, stage: str, fp: str, staging: Path, manifest: dict) -> Artifact:
        """Describe every file, write the manifest last, and move the folder into place."""
        manifest = {**manifest, "stage": stage, "fingerprint": fp, "created": time.time()}
        manifest["files"] = describe_files(staging)
        write_json_atomic(staging / MANIFEST, manifest)
        if self.remote:
            self._remote.upload(staging, self.name(stage, fp))
            shutil.rmtree(staging, ignore_errors=True)
            return self.find(stage, fp)
        final = self.run_dir / self.name(stage, fp)
        if final.exists():  # a forced re-run: make the old one incomplete first, then swap
            (final / MANIFEST).unlink(missing_ok=True)
            trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(final)
        return Artifact(stage, fp, final, manifest)

    def adopt_artifact(self, stage: str, old_fp: str, new_fp: str, manifest: dict) -> None:
        """Give a complete artifact another fingerprint (a legacy one adopted; pipeline/legacy.py):
        its files linked (copied on an object store) under the new name, the rewritten manifest
        last, then the old folder removed. A crash leaves the old artifact complete (adopted again
        next time), or both."""
        old, new = self.name(stage, old_fp), self.name(stage, new_fp)
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        if self.remote:
            self._remote.copy_tree(old, new, skip=MANIFEST)
            self._remote.write_bytes(f"{new}/{MANIFEST}", text.encode())
            self._remote.delete_tree(old)
            return
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

    def adopt_work(self, stage: str, old_key: str, new_key: str) -> None:
        """Give a stage's work dir (checkpoints, progress) another key, unless one is there already.
        Ray Train keeps the checkpoints under `ray/<work dir name>/`: that folder is renamed first."""
        old, new = self.name(stage, old_key), self.name(stage, new_key)
        rename = {f"ray/{old}/": f"ray/{new}/"}
        if self.remote and not self._remote.list_files(self._work_rel(stage, new_key)):
            self._remote.copy_tree(
                self._work_rel(stage, old_key), self._work_rel(stage, new_key), rename=rename
            )
            self._remote.delete_tree(self._work_rel(stage, old_key))
        src, dst = self.work_dir(stage, old_key), self.work_dir(stage, new_key)
        if (src / "ray" / old).is_dir() and not (src / "ray" / new).exists():
            (src / "ray" / old).rename(src / "ray" / new)
        if src.is_dir() and not dst.exists():
            src.rename(dst)

    def remove_work(self, stage: str, work_key: str) -> None:
        """Delete a stage's working state (a rebuild starts over, not from its checkpoints)."""
        if self.remote:
            self._remote.delete_tree(self._work_rel(stage, work_key))
        shutil.rmtree(self.work_dir(stage, work_key), ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove staging/trash folders left by a crash (never complete, never read)."""
        for pattern in (".tmp-*", ".trash-*", ".staging/.tmp-*"):
            for p in self.run_dir.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
