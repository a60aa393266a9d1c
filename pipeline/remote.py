"""Artifact roots on an object store (s3://bucket/prefix, gs://…) through pyarrow.fs.

Object stores have no atomic folder rename, so an artifact is uploaded file by file under its
final prefix and `manifest.json` goes last: readers treat a prefix without a manifest (or with a
file whose size disagrees) as incomplete. Readers get a local copy in a cache folder keyed by the
root, downloaded once per artifact and checked against the manifest.

The run's working state lives under the same prefix (`.work/<stage>-<key>/`: Ray Train checkpoints
through `storage_filesystem`, and copies of progress.json, metrics.jsonl, wandb_run.json; `logs/`),
so any node, and `status` on any machine, sees it; pipeline/artifacts.py decides what goes where.
`RemoteRoot` is the object-store `Root` (pipeline/roots.py): the interface the artifact store uses.

S3 credentials come from the usual places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws,
instance roles) through pyarrow; `AWS_ENDPOINT_URL` points at an S3-compatible server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.files import MANIFEST, Problem, verify_files
from pipeline.roots import Root, move_dir

S3_ATTEMPTS = 10
"""Attempts per S3 request before an error reaches the caller (pyarrow's default is 3)."""


def s3_filesystem(uri: str):
    """pyarrow's S3 filesystem for an s3:// root. A store under load can stall a request past the
    SDK's 3-second low-speed limit (seen with a local S3 server on 2 busy cores), so requests are
    retried with backoff S3_ATTEMPTS times, not pyarrow's 3. At `AWS_ENDPOINT_URL` (an S3-compatible
    server) when it is set; else at AWS, in the bucket's own region, as `FileSystem.from_uri` finds it."""
    from pyarrow import fs

    retry = fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        return fs.S3FileSystem(region=fs.resolve_s3_region(bucket), retry_strategy=retry)
    scheme, _, host = endpoint.partition("://")
    return fs.S3FileSystem(
        endpoint_override=host or scheme, scheme=scheme if host else "https",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        allow_bucket_creation=True, retry_strategy=retry,
    )  # fmt: skip


class RemoteRoot(Root):
    """A run's folder on an object store; `run_dir` is its cache on this machine, in `cache_dir`
    (default: $KILN_CACHE, else ~/.cache/kiln), in a folder keyed by the run's URI."""

    remote = True

    def __init__(self, uri: str, cache_dir: str | Path | None = None):
        from pyarrow import fs

        self.uri_root = uri.rstrip("/")
        if uri.startswith("s3://"):
            self.fs, self.base = s3_filesystem(uri), uri.removeprefix("s3://").rstrip("/")
        else:
            self.fs, self.base = fs.FileSystem.from_uri(uri)
            self.base = self.base.rstrip("/")
        cache = Path(cache_dir or os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
        self.run_dir = cache / self.cache_key()
        self.staging_dir = self.run_dir / ".staging"

    def cache_key(self) -> str:
        return hashlib.sha256(self.uri_root.encode()).hexdigest()[:16]

    def uri(self, name: str) -> str:
        return f"{self.uri_root}/{name}"

    def _read_manifest(self, name: str) -> dict | None:
        from pyarrow import fs

        path = f"{self.base}/{name}/{MANIFEST}"
        if self.fs.get_file_info(path).type != fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            try:
                return json.loads(f.read())
            except ValueError:
                return None

    def check(self, name: str, deep: bool) -> tuple[dict | None, Problem | None]:
        manifest = self._read_manifest(name)
        if manifest is None:
            return None, Problem("is missing (the stage did not finish)", f"{self.uri(name)}/{MANIFEST}")
        infos = {
            i.path.removeprefix(f"{self.base}/{name}/"): i.size
            for i in self.fs.get_file_info(_selector(f"{self.base}/{name}"))
        }
        for rel, meta in manifest.get("files", {}).items():
            if infos.get(rel) != meta["size"]:
                reason = f"has {infos.get(rel)} bytes, manifest says {meta['size']}"
                if infos.get(rel) is None:
                    reason = "is missing"
                return None, Problem(reason, f"{self.uri(name)}/{rel}", damaged=True)
        if deep:
            with _TempDownload(self, name) as local:
                problem = verify_files(local, manifest["files"], deep=True)
            if problem:
                return None, problem
        return manifest, None

    def download(self, name: str, cache_dir: Path) -> Path:
        """A verified local copy of the artifact (reused when already cached and intact). Processes on
        one node share the cache: a lock per artifact makes the second wait for the first's copy."""
        dest = Path(cache_dir) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _FileLock(dest.with_name(f".lock-{name}")):
            manifest = self._read_manifest(name)
            if dest.is_dir() and manifest and verify_files(dest, manifest["files"], deep=False) is None:
                return dest
            tmp = dest.with_name(f".tmp-{name}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self._copy_down(name, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        return dest

    def local_path(self, name: str) -> Path:
        return self.download(name, self.run_dir)

    def _copy_down(self, name: str, dest: Path) -> None:
        from pyarrow import fs

        for info in self.fs.get_file_info(_selector(f"{self.base}/{name}")):
            if info.type != fs.FileType.File:
                continue
            target = dest / info.path.removeprefix(f"{self.base}/{name}/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)

    def upload(self, staging: Path, name: str) -> None:
        """Every file under the final prefix, then the manifest: complete only once it lands."""
        prefix = f"{self.base}/{name}"
        if self._read_manifest(name) is not None:  # a forced re-run: make the old one incomplete first,
            self.fs.delete_file(f"{prefix}/{MANIFEST}")  # then drop its files (none may linger)
            self.fs.delete_dir_contents(prefix, missing_dir_ok=True)
        self.fs.create_dir(prefix, recursive=True)
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
        for p in [*files, staging / MANIFEST]:
            with (
                open(p, "rb") as src,
                self.fs.open_output_stream(f"{prefix}/{p.relative_to(staging).as_posix()}") as out,
            ):
                shutil.copyfileobj(src, out, 1 << 20)

    def commit(self, staging: Path, name: str, manifest: dict) -> dict | None:
        """Upload (the manifest last), drop the staging folder, and read the manifest back."""
        self.upload(staging, name)
        shutil.rmtree(staging, ignore_errors=True)
        return self.check(name, deep=False)[0]

    def move_artifact(self, old: str, new: str, manifest: dict) -> None:
        """Server-side copies of its files, the manifest written last, then `old` deleted."""
        self.copy_tree(old, new, skip=MANIFEST)
        self.write_json(f"{new}/{MANIFEST}", manifest)
        self.delete_tree(old)

    def manifests(self, prefix: str) -> list[dict]:
        from pyarrow import fs

        found = []
        for info in self.fs.get_file_info(fs.FileSelector(self.base, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            if info.type == fs.FileType.Directory and name.startswith(prefix):
                manifest = self._read_manifest(name)
                if manifest:
                    found.append(manifest)
        return found

    def train_storage(self, rel: str) -> tuple[str, object | None]:
        return f"{self.base}/{rel}", self.fs

    # -- single files under the run prefix (work dirs, logs) -------------------------------------

    def read_bytes(self, rel: str) -> bytes | None:
        from pyarrow import fs

        path = f"{self.base}/{rel}"
        try:
            if self.fs.get_file_info(path).type != fs.FileType.File:
                return None
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object, replaced whole (object stores have no partial writes)."""
        with self.fs.open_output_stream(f"{self.base}/{rel}") as out:
            out.write(data)

    def write_json(self, rel: str, data) -> None:
        self.write_bytes(rel, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def upload_file(self, local: Path, rel: str) -> None:
        with open(local, "rb") as src, self.fs.open_output_stream(f"{self.base}/{rel}") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def push(self, rel: str) -> None:
        if (self.run_dir / rel).is_file():
            self.upload_file(self.run_dir / rel, rel)

    def pull(self, rel: str, keep_longer: bool = False) -> None:
        mine = self.run_dir / rel
        mine.parent.mkdir(parents=True, exist_ok=True)
        data = self.read_bytes(rel)
        if data is None or (keep_longer and mine.is_file() and mine.stat().st_size > len(data)):
            return
        mine.write_bytes(data)

    def list_files(self, rel: str) -> dict[str, int]:
        """Files under `rel/` (relative to it) -> size."""
        from pyarrow import fs

        prefix = f"{self.base}/{rel}".rstrip("/")
        return {
            i.path.removeprefix(f"{prefix}/"): i.size
            for i in self.fs.get_file_info(_selector(prefix))
            if i.type == fs.FileType.File
        }

    def download_tree(self, rel: str, dest: Path) -> list[str]:
        """Every file under `rel/` into `dest`, same relative paths; returns them."""
        files = sorted(self.list_files(rel))
        for f in files:
            target = Path(dest) / f
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(f"{self.base}/{rel}/{f}") as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return files

    def copy_tree(self, src: str, dst: str, skip: str | None = None, rename: dict | None = None) -> None:
        """Every object under `src/` to `dst/` (server-side copies), but `skip`; a relative path
        starting with a key of `rename` gets its value as prefix instead."""
        for f in sorted(self.list_files(src)):
            if f == skip:
                continue
            to = next((new + f[len(old) :] for old, new in (rename or {}).items() if f.startswith(old)), f)
            self.fs.copy_file(f"{self.base}/{src}/{f}", f"{self.base}/{dst}/{to}")

    def move_tree(self, src: str, dst: str, rename: dict[str, str]) -> None:
        if not self.list_files(dst):
            self.copy_tree(src, dst, rename=rename)
            self.delete_tree(src)
        move_dir(self.run_dir / src, self.run_dir / dst, rename)

    def delete_tree(self, rel: str) -> None:
        """Every object under `rel/`, its manifest first (so it is never read as complete meanwhile)."""
        from pyarrow import fs

        path = f"{self.base}/{rel}"
        if self.fs.get_file_info(f"{path}/{MANIFEST}").type == fs.FileType.File:
            self.fs.delete_file(f"{path}/{MANIFEST}")
        if self.fs.get_file_info(path).type == fs.FileType.Directory:
            self.fs.delete_dir(path)


def _selector(path: str):
    from pyarrow import fs

    return fs.FileSelector(path, recursive=True, allow_not_found=True)


class _TempDownload:
    def __init__(self, remote: RemoteRoot, name: str):
        import tempfile

        self.remote, self.name = remote, name
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-verify-"))

    def __enter__(self) -> Path:
        self.remote._copy_down(self.name, self.dir)
        return self.dir

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


class _FileLock:
    """An exclusive lock on a file (flock): processes of one node queue on it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        import fcntl

        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
