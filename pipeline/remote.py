"""Artifact roots on an object store (s3://bucket/prefix, gs://…) through pyarrow.fs.

Object stores have no atomic folder rename, so an artifact is uploaded file by file under its
final prefix and `manifest.json` goes last: readers treat a prefix without a manifest (or with a
file whose size disagrees) as incomplete. Readers get a local copy in a cache folder keyed by the
root, downloaded once per artifact and checked against the manifest. A deep check (sha256) is
remembered in that cache (`.verified/<name>.json`: the manifest and each object's size and mtime):
a re-plan does not download and hash an artifact again unless one of its objects was rewritten.

The run's working state lives under the same prefix (`.work/<stage>-<key>/`: Ray Train checkpoints
through `storage_filesystem`, and copies of progress.json, metrics.jsonl, wandb_run.json; `logs/`),
so any node, and `status` on any machine, sees it; pipeline/artifacts.py decides what goes where.
`RemoteRoot` is the object-store `Root` (pipeline/roots.py): the interface the artifact store uses.

The data stages' tasks write their files through it from whichever node they run on
(pipeline/units.py `Folder`): `put` uploads a file and hashes it on the way, `get` and `open_input`
fetch one (or the byte ranges a reader asks for), and a commit copies such files server-side into
the artifact (`commit(..., sources=)`) with the digests the tasks returned, so no file is uploaded,
downloaded or hashed twice for it. Transfers of several files run on a thread pool
(`TRANSFER_THREADS`). Every byte moved is counted in `TRANSFERS` (this process), and, when
`KILN_TRANSFER_LOG` names a file, logged there a line per file (bench/data_cluster.py reads it).

S3 credentials come from the usual places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws,
instance roles) through pyarrow; `AWS_ENDPOINT_URL` points at an S3-compatible server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.files import MANIFEST, Problem, verify_files, write_json_atomic
from pipeline.roots import Root, move_dir

S3_ATTEMPTS = 10
"""Attempts per S3 request before an error reaches the caller (pyarrow's default is 3)."""
TRANSFER_THREADS = int(os.environ.get("KILN_TRANSFER_THREADS", "8"))
"""Files uploaded, downloaded or copied at once by one call that moves several."""
CHUNK = 1 << 20
COPY_OBJECT_MAX = 5 << 30
"""The largest object S3's CopyObject copies (5 GiB). pyarrow offers no multipart copy (UploadPartCopy),
so a larger one is streamed through this machine instead: downloaded and uploaded in parts, once."""
STREAM_CHUNK = 64 << 20
TRANSFERS: Counter = Counter()
"""Bytes this process sent to ("up") and received from ("down") object stores, and copied there
server-side ("copied", which cross no network of ours)."""


def _note(op: str, path: str, size: int, whole: bool = True) -> None:
    """Count a transfer (`whole`: the whole file, not ranges of it); with KILN_TRANSFER_LOG set,
    append it there (one short line: appends of that size are atomic, so every process of a node
    can share the file)."""
    TRANSFERS[op] += size
    log = os.environ.get("KILN_TRANSFER_LOG")
    if log:
        line = json.dumps({"op": op, "path": path, "bytes": size, "whole": whole, "host": socket.gethostname(),
                           "cache": os.environ.get("KILN_CACHE", ""), "pid": os.getpid()})  # fmt: skip
        with open(log, "a") as f:
            f.write(line + "\n")


def parallel(fn, items) -> list:
    """fn(item) for each item on TRANSFER_THREADS threads (pyarrow's filesystems are thread-safe);
    results in item order, the first error raised."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


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
        listed = {
            i.path.removeprefix(f"{self.base}/{name}/"): i
            for i in self.fs.get_file_info(_selector(f"{self.base}/{name}"))
        }
        infos = {rel: i.size for rel, i in listed.items()}
        for rel, meta in manifest.get("files", {}).items():
            if infos.get(rel) != meta["size"]:
                reason = f"has {infos.get(rel)} bytes, manifest says {meta['size']}"
                if infos.get(rel) is None:
                    reason = "is missing"
                return None, Problem(reason, f"{self.uri(name)}/{rel}", damaged=True)
        if deep:
            stamp = {
                "manifest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
                "files": {rel: [listed[rel].size, listed[rel].mtime_ns] for rel in sorted(manifest["files"])},
            }
            verified = self.run_dir / ".verified" / f"{name}.json"
            if _loads_file(verified) == stamp:  # hashed here before, and no object rewritten since
                return manifest, None
            with _TempDownload(self, name) as local:
                problem = verify_files(local, manifest["files"], deep=True)
            if problem:
                return None, problem
            write_json_atomic(verified, stamp)
        return manifest, None

    def download(self, name: str, cache_dir: Path) -> Path:
        """A local copy of the artifact: the files the cache lacks, or holds with another size,
        downloaded (each under a temporary name, then renamed), the others kept, files the store does
        not hold removed. What a reader of single files (`fetch_file`) fetched into the cache is not
        fetched again, and no file it holds disappears. Processes on one node share the cache: a lock
        per artifact makes the second wait for the first's copy."""
        dest = Path(cache_dir) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _FileLock(dest.with_name(f".lock-{name}")):
            manifest = self._read_manifest(name)
            if dest.is_dir() and manifest and verify_files(dest, manifest["files"], deep=False) is None:
                return dest
            files = self.list_files(name)
            have = {  # not the temporary files of downloads under way (`get`)
                p.relative_to(dest).as_posix(): p
                for p in (dest.rglob("*") if dest.exists() else ())
                if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))
            }
            for rel in sorted(have.keys() - files.keys()):
                have[rel].unlink()
            todo = sorted(
                rel for rel, size in files.items() if rel not in have or have[rel].stat().st_size != size
            )
            parallel(lambda rel: self.get(f"{name}/{rel}", dest / rel), todo)
        return dest

    def local_path(self, name: str) -> Path:
        return self.download(name, self.run_dir)

    def _copy_down(self, name: str, dest: Path) -> None:
        files = self.list_files(name)
        parallel(lambda rel: self.get(f"{name}/{rel}", dest / rel), sorted(files))

    # -- single files, moved whole or read in ranges ------------------------------------------

    def put(self, local: Path, rel: str, digest: bool = False) -> dict:
        """Upload a local file as `rel`; returns its size, and its sha256 (computed on the way) when
        asked."""
        h = hashlib.sha256() if digest else None
        size = 0
        with open(local, "rb") as src, self.fs.open_output_stream(f"{self.base}/{rel}") as out:
            while block := src.read(CHUNK):
                out.write(block)
                size += len(block)
                if h is not None:
                    h.update(block)
        _note("up", rel, size)
        return {"size": size, **({"sha256": h.hexdigest()} if h is not None else {})}

    def get(self, rel: str, local: Path) -> Path:
        """Download `rel` into `local` (written under a temporary name, then renamed)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{id(local):x}.tmp")
        with self.fs.open_input_stream(f"{self.base}/{rel}") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        _note("down", rel, tmp.stat().st_size)
        os.replace(tmp, local)
        return local

    def open_input(self, rel: str):
        """`rel` opened for reading at any offset: only the ranges read are fetched (and counted)."""
        return _CountedReader(self.fs.open_input_file(f"{self.base}/{rel}"), rel)

    def upload(self, staging: Path, name: str, sources: dict[str, str] | None = None) -> None:
        """Every file under the final prefix (the local ones uploaded, `sources` {rel in the artifact:
        rel in the root} copied server-side), then the manifest: complete only once it lands."""
        prefix = f"{self.base}/{name}"
        if self._read_manifest(name) is not None:  # a forced re-run: make the old one incomplete first,
            self.fs.delete_file(f"{prefix}/{MANIFEST}")  # then drop its files (none may linger)
            self.fs.delete_dir_contents(prefix, missing_dir_ok=True)
        self.fs.create_dir(prefix, recursive=True)
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
        parallel(lambda p: self.put(p, f"{name}/{p.relative_to(staging).as_posix()}"), files)
        parallel(lambda kv: self.copy(kv[1], f"{name}/{kv[0]}"), sorted((sources or {}).items()))
        self.put(staging / MANIFEST, f"{name}/{MANIFEST}")

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy of one object (its bytes cross no network of ours); one over
        COPY_OBJECT_MAX is streamed through this machine (pyarrow's output stream uploads it in parts)."""
        size = self.fs.get_file_info(f"{self.base}/{src}").size or 0
        if size <= COPY_OBJECT_MAX:
            self.fs.copy_file(f"{self.base}/{src}", f"{self.base}/{dst}")
            _note("copied", dst, size)
            return
        try:  # closing the output stream completes the upload whatever was written: check, or remove it
            with (
                self.fs.open_input_stream(f"{self.base}/{src}") as i,
                self.fs.open_output_stream(f"{self.base}/{dst}") as o,
            ):
                while block := i.read(STREAM_CHUNK):
                    o.write(block)
            got = self.fs.get_file_info(f"{self.base}/{dst}").size
            if got != size:
                raise OSError(f"copying {self.uri(src)} to {self.uri(dst)}: {got} of {size} bytes arrived")
        except BaseException:
            self.fs.delete_file(f"{self.base}/{dst}")
            raise
        _note("down", src, size)
        _note("up", dst, size)

    def commit(
        self, staging: Path, name: str, manifest: dict, sources: dict[str, str] | None = None
    ) -> dict | None:
        """Upload (the manifest last; files the tasks left in the root are copied server-side), drop
        the staging folder, and read the manifest back. Nothing is downloaded: readers fetch it."""
        self.upload(staging, name, sources)
        shutil.rmtree(staging, ignore_errors=True)
        return self.check(name, deep=False)[0]

    def artifact_dir(self, name: str) -> Path:
        return self.run_dir / name

    def fetch_file(self, name: str, rel: str, meta: dict, cache_dir: Path | None = None) -> Path:
        """One file of the complete artifact `name` in this node's cache (`meta`: its manifest entry),
        downloaded unless the cache holds it already with that size: a reader fetches what it reads."""
        dest = Path(cache_dir or self.run_dir) / name / rel
        if not (dest.is_file() and dest.stat().st_size == meta["size"]):
            self.get(f"{name}/{rel}", dest)
        return dest

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
        self.put(local, rel)

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
        parallel(lambda f: self.get(f"{rel}/{f}", Path(dest) / f), files)
        return files

    def copy_tree(self, src: str, dst: str, skip: str | None = None, rename: dict | None = None) -> None:
        """Every object under `src/` to `dst/` (server-side copies), but `skip`; a relative path
        starting with a key of `rename` gets its value as prefix instead."""
        for f in sorted(self.list_files(src)):
            if f == skip:
                continue
            to = next((new + f[len(old) :] for old, new in (rename or {}).items() if f.startswith(old)), f)
            self.copy(f"{src}/{f}", f"{dst}/{to}")

    def move_tree(self, src: str, dst: str, rename: dict[str, str]) -> None:
        if not self.list_files(dst):
            self.copy_tree(src, dst, rename=rename)
            self.delete_tree(src)
        move_dir(self.run_dir / src, self.run_dir / dst, rename)

    def delete_file(self, rel: str) -> None:
        self.fs.delete_file(f"{self.base}/{rel}")

    def delete_tree(self, rel: str) -> None:
        """Every object under `rel/`, its manifest first (so it is never read as complete meanwhile)."""
        from pyarrow import fs

        path = f"{self.base}/{rel}"
        if self.fs.get_file_info(f"{path}/{MANIFEST}").type == fs.FileType.File:
            self.fs.delete_file(f"{path}/{MANIFEST}")
        if self.fs.get_file_info(path).type == fs.FileType.Directory:
            self.fs.delete_dir(path)


class _CountedReader(io.RawIOBase):
    """A pyarrow input file as a Python binary file (seek, read), counting the bytes it fetches."""

    def __init__(self, native, rel: str):
        self.native, self.rel, self.fetched = native, rel, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.native.seek(offset, whence)

    def tell(self) -> int:
        return self.native.tell()

    def readinto(self, b) -> int:
        data = self.native.read(len(b))
        b[: len(data)] = data
        self.fetched += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            _note("down", self.rel, self.fetched, whole=False)
            self.native.close()
        super().close()


def _loads_file(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
