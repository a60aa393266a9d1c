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
goes last; the manifest is what makes it complete. Files a stage's tasks wrote to the root
themselves (pipeline/units.py `Folder`) are copied there server-side, with the digests the tasks
computed: a commit uploads only what the driver wrote. This module decides the layout (the names under
`<root>/<run>/`); where and how the files are stored is the store's `files`, a `Root`
(pipeline/roots.py: a local or NFS path; pipeline/remote.py: an object store).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import MANIFEST, Problem, describe_files, is_remote, write_json_atomic
from pipeline.roots import LocalRoot, Root

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


class ArtifactStore:
    """Artifacts of one pipeline run, on a local path or an object store (`files`, a `Root`)."""

    def __init__(self, root: str, run: str, cache_dir: str | Path | None = None):
        self.root, self.run = root, run
        self.files: Root
        if is_remote(root):
            from pipeline.remote import RemoteRoot  # pyarrow only when needed

            self.files = RemoteRoot(f"{root.rstrip('/')}/{run}", cache_dir)
        else:
            self.files = LocalRoot(Path(root.removeprefix("file://")) / run)
        self.run_dir = self.files.run_dir  # on an object store, a cache of it on this machine

    @property
    def remote(self) -> bool:
        """The root is an object store: `run_dir` and the work dirs are local caches of it."""
        return self.files.remote

    # -- where things live --------------------------------------------------------------------

    def name(self, stage: str, fp: str) -> str:
        return f"{stage}-{fp}"

    def artifact_uri(self, stage: str, fp: str) -> str:
        return self.files.uri(self.name(stage, fp))

    def work_dir(self, stage: str, work_key: str) -> Path:
        """In-stage state (checkpoints, progress.json); survives a crash, unlike staging.
        Keyed without budget keys, so a longer run of the same stage continues from it."""
        return self.run_dir / ".work" / self.name(stage, work_key)

    def log_path(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"

    def progress(self, stage: str, work_key: str) -> dict | None:
        return _loads(self.files.read_bytes(self._work_rel(stage, work_key, "progress.json")))

    # -- a stage's working state on a shared root ------------------------------------------------
    # With an object-store root, `work_dir` is a local cache on the node that runs the stage; the
    # shared copy is `<root>/<run>/.work/<stage>-<key>/`: Ray Train writes its checkpoints there
    # directly (`train_storage`), the stage driver mirrors its small state files (`save_work`) and
    # restores them when the stage starts again on any node (`restore_work`). On a local or NFS
    # root the work dir is itself shared and these are no-ops (the root's `push` and `pull`).

    def _work_rel(self, stage: str, work_key: str, rel: str = "") -> str:
        return f".work/{self.name(stage, work_key)}" + (f"/{rel}" if rel else "")

    def work_uri(self, stage: str, work_key: str) -> str:
        return self.files.uri(self._work_rel(stage, work_key))

    def train_storage(self, stage: str, work_key: str):
        """(storage_path, storage_filesystem) for Ray Train's checkpoints of this stage."""
        return self.files.train_storage(self._work_rel(stage, work_key, "ray"))

    def save_work(self, stage: str, work_key: str, names=WORK_STATE) -> None:
        """Copy the work dir's small state files to the shared root (object stores only)."""
        for name in names:
            self.files.push(self._work_rel(stage, work_key, name))

    def restore_work(self, stage: str, work_key: str) -> None:
        """Bring the shared copies of the state files into this node's work dir (object stores
        only). The shared copy wins unless the local one holds more (metrics not yet mirrored)."""
        for name in WORK_STATE:
            self.files.pull(self._work_rel(stage, work_key, name), keep_longer=name == "metrics.jsonl")

    def write_work_file(self, stage: str, work_key: str, rel: str, text: str) -> None:
        """A small file in the stage's shared work dir, from any node (e.g. worker_pids/rank0)."""
        self.files.write_bytes(self._work_rel(stage, work_key, rel), text.encode())

    def read_work_file(self, stage: str, work_key: str, rel: str) -> str | None:
        data = self.files.read_bytes(self._work_rel(stage, work_key, rel))
        return None if data is None else data.decode()

    def delete_work_file(self, stage: str, work_key: str, rel: str) -> None:
        """A file of the stage's work dir in an object-store root, removed."""
        self.files.delete_file(self._work_rel(stage, work_key, rel))

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
        self.files.write_json(self._work_rel(stage, work_key, "progress.json"), prog)

    def save_log(self, stage: str) -> None:
        """The stage's log to the shared root (object stores only; a local root holds it already)."""
        self.files.push(f"logs/{stage}.log")

    # -- reading ----------------------------------------------------------------------------------

    def check(self, stage: str, fp: str, deep: bool = False) -> tuple[dict | None, Problem | None]:
        """(manifest, None) when complete; (None, problem) otherwise. Sizes always, sha256 when deep."""
        return self.files.check(self.name(stage, fp), deep)

    def find(
        self, stage: str, fp: str, deep: bool = False, only: tuple[str, ...] | None = None
    ) -> Artifact | None:
        """The complete artifact, or None. On an object-store root it is downloaded into this machine's
        cache, or with `only` just those of its files (the rest fetched by whoever reads them)."""
        manifest, _ = self.check(stage, fp, deep)
        if manifest is None:
            return None
        name = self.name(stage, fp)
        if only is None:
            return Artifact(stage, fp, self.files.local_path(name), manifest)
        for rel in only:
            self.files.fetch_file(name, rel, manifest["files"][rel])
        return Artifact(stage, fp, self.files.artifact_dir(name), manifest)

    def previous(self, stage: str) -> list[dict]:
        """Manifests of this stage's complete artifacts under other fingerprints, newest first."""
        found = self.files.manifests(f"{stage}-")
        return sorted(found, key=lambda m: m.get("created", 0), reverse=True)

    # -- writing ----------------------------------------------------------------------------------

    def staging(self, stage: str, fp: str) -> Path:
        """A fresh, empty local folder for the stage to write its artifact into."""
        path = self.files.staging_dir / f".tmp-{self.name(stage, fp)}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def commit(
        self, stage: str, fp: str, staging: Path, manifest: dict, placed: dict[str, dict] | None = None
    ) -> Artifact:
        """Describe every file, write the manifest last, and move the folder into place (on an
        object store: upload it, the manifest last). `placed` (`StageContext.place`): files the
        stage's tasks wrote and hashed, {rel in the artifact: {size, sha256[, source]}}, not hashed
        again; those with a `source` are in the object-store root already and are copied there into
        the artifact. On an object store the artifact is not downloaded: `path` is where a reader's
        `find` puts it."""
        manifest = {**manifest, "stage": stage, "fingerprint": fp, "created": time.time()}
        placed = placed or {}
        there = {rel: f for rel, f in placed.items() if f.get("source")}
        files = describe_files(staging, known={rel: f for rel, f in placed.items() if rel not in there})
        files.update({rel: {"size": f["size"], "sha256": f["sha256"]} for rel, f in there.items()})
        manifest["files"] = dict(sorted(files.items()))
        write_json_atomic(staging / MANIFEST, manifest)
        name = self.name(stage, fp)
        sources = {rel: f["source"] for rel, f in there.items()}
        manifest = self.files.commit(staging, name, manifest, sources=sources or None)
        if manifest is None:
            return None
        path = self.files.artifact_dir(name) if self.remote else self.files.local_path(name)
        return Artifact(stage, fp, path, manifest)

    def adopt_artifact(self, stage: str, old_fp: str, new_fp: str, manifest: dict) -> None:
        """Give a complete artifact another fingerprint (a legacy one adopted; pipeline/legacy.py):
        its files linked (copied on an object store) under the new name, the rewritten manifest
        last, then the old folder removed. A crash leaves the old artifact complete (adopted again
        next time), or both."""
        self.files.move_artifact(self.name(stage, old_fp), self.name(stage, new_fp), manifest)

    def adopt_work(self, stage: str, old_key: str, new_key: str) -> None:
        """Give a stage's work dir (checkpoints, progress) another key, unless one is there already.
        Ray Train keeps the checkpoints under `ray/<work dir name>/`: that folder is renamed first."""
        old, new = self.name(stage, old_key), self.name(stage, new_key)
        self.files.move_tree(
            self._work_rel(stage, old_key), self._work_rel(stage, new_key), {f"ray/{old}/": f"ray/{new}/"}
        )

    def remove_work(self, stage: str, work_key: str) -> None:
        """Delete a stage's working state (a rebuild starts over, not from its checkpoints)."""
        self.files.delete_tree(self._work_rel(stage, work_key))
        shutil.rmtree(self.work_dir(stage, work_key), ignore_errors=True)  # an object store's cache

    def clean_stale(self) -> None:
        """Remove staging/trash folders left by a crash (never complete, never read)."""
        for pattern in (".tmp-*", ".trash-*", ".staging/.tmp-*"):
            for p in self.run_dir.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
