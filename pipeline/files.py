"""Files of an artifact: its manifest, what is wrong with it, atomic JSON; and what a root is.

Shared by the artifact store (pipeline/artifacts.py) and its roots (pipeline/roots.py, pipeline/remote.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path


def is_remote(root: str) -> bool:
    """An object-store root (s3://bucket/prefix); a plain path or file:// is a local (or NFS) one."""
    return "://" in root and not root.startswith("file://")


MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Problem:
    """Why an artifact is not complete. `damaged`: its manifest exists but does not hold (a file
    missing, of another size or sha256, or the manifest unreadable); otherwise it was never finished."""

    reason: str
    file: str | None = None
    damaged: bool = False

    def __str__(self) -> str:
        return f"{self.file} {self.reason}" if self.file else self.reason


NO_ARTIFACT = Problem("no artifact")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def describe_files(folder: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """size and sha256 of every file under `folder` (relative POSIX paths), manifest excluded. A file
    in `known` with the size given there keeps the sha256 given there (its writer hashed it)."""
    files, known = {}, known or {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel, size = p.relative_to(folder).as_posix(), p.stat().st_size
            given = known.get(rel, {})
            digest = given["sha256"] if given.get("size") == size and "sha256" in given else sha256_file(p)
            files[rel] = {"size": size, "sha256": digest}
    return files


def verify_files(folder: Path, files: dict[str, dict], deep: bool) -> Problem | None:
    """None if every listed file is there with its size (and sha256 when deep); else what is wrong."""
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return Problem("is missing", str(p), damaged=True)
        if p.stat().st_size != meta["size"]:
            return Problem(
                f"has {p.stat().st_size} bytes, manifest says {meta['size']}", str(p), damaged=True
            )
        if deep and sha256_file(p) != meta["sha256"]:
            return Problem(
                "does not match its sha256 in the manifest (modified or corrupt)", str(p), damaged=True
            )
    return None
