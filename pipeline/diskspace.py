"""A stage that ran out of disk space: say so plainly, and leave no partial work to fill it again.

    full = detect(error, store.run_dir, staging)   # before the failed stage's files are removed
    if full:
        raise disk_full_error(error, full, store, stage, work_dir, inputs) from error

A full disk rarely reaches the stage as "No space left on device": numpy's short write is an OSError
without an errno ("4194304 requested and 2062272 written"), and a training stage's error comes
wrapped in Ray Train's. So a failure counts as a full disk when ENOSPC or EDQUOT (or their text)
appears anywhere in the exception's chain, or when the filesystem of the run dir was nearly full
(under `LOW_SPACE`) when the stage failed. An ENOSPC that names a file on another filesystem (a
checkpoint is saved to the system's temporary folder before it is copied) is reported for that one.

What happens to the stage's work dir then: checkpoints in it (Ray Train's storage `ray/*/checkpoint_*`,
or the in-process `local_checkpoints/`) are what the next run resumes from, so they are kept. Without
checkpoints the next run starts the stage over and deletes its partial files itself (ingest's parts,
tokenize's streams), so they are removed now; the small state files (progress.json, metrics) stay.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from shutil import disk_usage

from pipeline import units
from pipeline.artifacts import WORK_STATE
from pipeline.files import MANIFEST, read_json

LOW_SPACE = 64 << 20
"""A failed stage with less than this free on the run dir's filesystem is taken to have run out of
space: a writer fails as soon as its next chunk (a few MiB for numpy or Arrow) does not fit, and the
stage's other writers go on filling the disk until they fail too, so what is left then is next to
nothing. Small, so that a stage failing for another reason on a disk that is merely quite full
keeps its own error."""

CHECKPOINTS = ("ray/*/checkpoint_*", "local_checkpoints/checkpoint_*")
"""Where a stage's checkpoints lie in its work dir (see pipeline/ray_context.py, pipeline/context.py)."""

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(n) for n in _FULL_ERRNOS)


class DiskFullError(RuntimeError):
    """A stage ran out of disk space; the message says where, what it needs and what to do."""


@dataclass(frozen=True)
class Full:
    """The disk when the stage failed."""

    run_dir: Path
    free: int  # on the filesystem that filled: the run dir's, or `elsewhere`'s
    total: int
    written: int  # bytes in the stage's unfinished artifact folder
    certain: bool  # an ENOSPC/EDQUOT was seen (not only a nearly full filesystem)
    elsewhere: Path | None = None  # the file whose write failed, when not on the run dir's filesystem


def detect(exc: BaseException, run_dir: Path, staging: Path | None = None) -> Full | None:
    """A `Full` if `exc` looks like the disk filling up, else None. Call it before removing anything."""
    if not isinstance(exc, Exception):  # Ctrl-C, a worker's exit: never a full disk
        return None
    certain = out_of_space(exc)
    failed = _failed_file(exc) if certain else None
    # e.g. a checkpoint is saved to the system's temporary folder first, then copied to the work dir
    elsewhere = failed if failed and not _same_filesystem(failed, run_dir) else None
    try:
        usage = disk_usage(_existing(elsewhere or run_dir))
    except OSError:
        return None
    if not (certain or usage.free < LOW_SPACE):
        return None
    written = tree_size(staging) if staging else 0
    return Full(Path(run_dir), usage.free, usage.total, written, certain, elsewhere)


def out_of_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT as an errno, or as its text, anywhere in the exception's chain."""
    return any(
        getattr(e, "errno", None) in _FULL_ERRNOS or any(t in str(e) for t in _FULL_TEXTS) for e in chain(exc)
    )


def _failed_file(exc: BaseException) -> Path | None:
    """The file an ENOSPC/EDQUOT in the chain names, if one does."""
    for e in chain(exc):
        if getattr(e, "errno", None) in _FULL_ERRNOS and isinstance(getattr(e, "filename", None), str):
            return Path(e.filename)
    return None


def _same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev
    except OSError:
        return True


def chain(exc: BaseException):
    """The exception, its causes and contexts, and what the wrappers hold: a Ray task error's `cause`,
    Ray Train's `worker_failures` (each a worker's exception, itself wrapped) and `controller_failure`,
    an exception group's members."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        held = [getattr(e, name, None) for name in ("cause", "controller_failure", "_base_exc")]
        failures = getattr(e, "worker_failures", None)
        held += list(failures.values()) if isinstance(failures, dict) else []
        todo += [e.__cause__, e.__context__, *held, *getattr(e, "exceptions", ())]


def disk_full_error(exc, full: Full, store, stage: str, work_dir: Path, inputs: dict) -> DiskFullError:
    """Tidy the stage's work dir (see the module's doc) and describe the situation: the filesystem and
    its free space, about how much the stage needs, what was kept or removed, and what to do."""
    kept_or_removed = tidy_work_dir(Path(work_dir))
    what = "ran out of disk space" if full.certain else "failed with its disk nearly full"
    where = f"the filesystem of {full.run_dir}"
    if full.elsewhere:
        where = (
            f"the filesystem of {full.elsewhere}, which it was writing (not the run dir's, {full.run_dir})"
        )
    free_now = disk_usage(_existing(full.elsewhere or full.run_dir)).free
    lines = [
        f"{stage} {what}: {human(full.free)} of {human(full.total)} free on {where}.",
        estimate(_previous(store, stage), inputs, full.written),
        f"Removed its unfinished artifact ({human(full.written)}); {kept_or_removed}. {human(free_now)} free now.",
        f"To go on: {_advice(store, full, inputs)}. Then run the same command again.",
        f"The error: {type(exc).__name__}: {_last_line(exc)}",
    ]
    return DiskFullError("\n".join(lines))


def _advice(store, full: Full, inputs: dict) -> str:
    if full.elsewhere:
        return "free space on that filesystem"
    free_up = "free space there"
    older = older_artifacts(full.run_dir, keep={f"{name}-{art.fingerprint}" for name, art in inputs.items()})
    if older:
        names = ", ".join(path.name for path, _ in older[:5])
        names += f" and {len(older) - 5} more" if len(older) > 5 else ""
        total = human(sum(size for _, size in older))
        free_up += f", e.g. older artifacts of this run that newer ones replaced: {names} ({total} in all)"
    if store.remote:
        return (
            f"{free_up}; or set KILN_CACHE to a folder on a larger disk ({full.run_dir} caches {store.root})"
        )
    return f"{free_up}; or give --root on a larger disk"


def _last_line(exc: BaseException) -> str:
    """The end of an error's text: a wrapped error's text is a traceback, whose last line says it."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else ""


def tidy_work_dir(work_dir: Path) -> str:
    """Keep checkpoints, and a data stage's finished units (pipeline/units.py) less the temporary files
    of those in flight; without either, remove all but the small state files. Says what it did."""
    if not work_dir.is_dir():
        return "it had no work dir"
    checkpoints = [p for pattern in CHECKPOINTS for p in work_dir.glob(pattern) if p.is_dir()]
    if checkpoints:
        size = sum(tree_size(p) for p in checkpoints)
        return f"kept {len(checkpoints)} checkpoint(s) ({human(size)}) in {work_dir}; the next run resumes from them"
    records = list(work_dir.rglob(f"*{units.RECORD}"))
    if records:
        for folder in {r.parent for r in records}:
            units.clear_temporary(folder)
        size = tree_size(work_dir)
        return f"kept {len(records)} finished unit(s) ({human(size)}) in {work_dir}; the next run reuses them"
    parts = [p for p in work_dir.iterdir() if p.name not in WORK_STATE]
    if not parts:
        return f"its work dir {work_dir} held no partial work"
    size, files = sum(tree_size(p) for p in parts), sum(_file_count(p) for p in parts)
    for p in parts:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(OSError):
                p.unlink(missing_ok=True)
    kept = [name for name in WORK_STATE if (work_dir / name).exists()]
    return (
        f"removed {files} file(s) of partial work ({human(size)}) from {work_dir}, which the next run "
        "would delete and redo anyway" + (f"; kept {', '.join(kept)}" if kept else "")
    )


def estimate(previous: list[dict], inputs: dict, written: int = 0) -> str:
    """About how much the stage needs, and what that is based on: its last complete artifact in this
    run (`previous`, newest first), else its inputs; or more than it had written when it failed."""
    if previous:
        size = artifact_size(previous[0])
        name = f"{previous[0].get('stage')}-{previous[0].get('fingerprint')}"
        basis = f"the size of its last complete artifact in this run, {name}"
    elif inputs:
        size = sum(artifact_size(art.manifest) for art in inputs.values())
        names = ", ".join(f"{name}-{art.fingerprint}" for name, art in inputs.items())
        basis = f"the total size of its inputs ({names}), as it has no complete artifact yet"
    elif written:
        return f"It needs more than {human(written)}, what it had written of its artifact when it failed."
    else:
        return "How much it needs is unknown: it has no complete artifact yet, and no inputs."
    if written > size:
        return (
            f"It needs more than {human(written)}, what it had written of its artifact when it failed "
            f"({basis}, {human(size)}, is no guide here)."
        )
    return f"It needs about {human(size)}: {basis}."


def older_artifacts(run_dir: Path, keep: set[str] = frozenset()) -> list[tuple[Path, int]]:
    """Complete artifacts in the run dir that a newer one of the same stage replaced, with their
    sizes, biggest first; the names in `keep` (the failed stage's inputs) are never listed."""
    by_stage: dict[str, list[tuple[float, Path, int]]] = {}
    for m in Path(run_dir).glob(f"*/{MANIFEST}"):
        try:
            manifest = read_json(m)
        except (OSError, ValueError):
            continue
        stage = manifest.get("stage") or m.parent.name.rpartition("-")[0]
        by_stage.setdefault(stage, []).append((manifest.get("created", 0), m.parent, artifact_size(manifest)))
    older = [(path, size) for found in by_stage.values() for _, path, size in sorted(found, reverse=True)[1:]]
    return sorted((o for o in older if o[0].name not in keep), key=lambda o: -o[1])


def artifact_size(manifest: dict) -> int:
    """Bytes of an artifact's files, as its manifest lists them."""
    return sum(f.get("size", 0) for f in manifest.get("files", {}).values())


def tree_size(path: Path) -> int:
    path = Path(path)
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def _file_count(path: Path) -> int:
    return 1 if not path.is_dir() else sum(1 for p in path.rglob("*") if not p.is_dir())


def _previous(store, stage: str) -> list[dict]:
    try:
        return store.previous(stage)
    except Exception:  # an unreachable object store must not hide the full disk
        return []


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (the run dir may not exist yet)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
