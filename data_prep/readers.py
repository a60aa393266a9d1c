"""Streaming readers for Pile-style shards: .jsonl, .jsonl.zst, .jsonl.gz, and `hf:NAME[:SPLIT]`.

    for lineno, raw in read_lines("00.jsonl.zst", max_line_bytes=1 << 24):
        ...   # raw: the line's bytes, or None when the line is longer than max_line_bytes

Memory stays flat whatever the file size: data is decompressed 1 MiB at a time and an over-long
line is skipped, not buffered. A plain file can be read in byte ranges by several tasks
(`read_lines(..., byte_range=(start, end))`, `byte_ranges`): a range holds the lines that begin in
it, so each line is read by exactly one of them, whatever the cut. So can a .zst of several frames
whose headers give their decompressed sizes, the first no larger than a range (as `pzstd` and
frame-per-chunk writers make them): its ranges are runs of whole frames, in decompressed offsets, and a
reader starts decompressing at the frame before its range (to see whether the range begins a line). A
.zst of one frame (the Pile's, the `zstd` CLI's) or of frames without sizes, and a .gz, are read whole
by one reader. A compressed file that is truncated or corrupt raises `BadFileError` naming the file
and how far reading got. zstd readers (python-zstandard's stream_reader among them)
return what they could decode from a truncated frame without complaint, so after the stream ends
`check_zstd_frames` walks the frame and block headers and fails if the last frame is incomplete.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import io
import os
import struct
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path

CHUNK = 1 << 20
GZIP_ERRORS = (EOFError, OSError, gzip.BadGzipFile, zlib.error)
"""What a damaged .gz raises: a truncated one EOFError, bad data zlib.error, a bad header BadGzipFile."""
ZSTD_MAGIC = 0xFD2FB528
SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.zst", ".jsonl.zstd", ".json.zst", ".jsonl.gz", ".json.gz")


class BadFileError(Exception):
    """A file that cannot be read to its end: truncated, corrupt, or not what its name says."""

    def __init__(self, path: str, reason: str, lines: int = 0, bytes_read: int = 0):
        self.path, self.reason, self.lines, self.bytes_read = path, reason, lines, bytes_read
        super().__init__(
            f"{path}: {reason} (after {lines} complete lines, {bytes_read:,} bytes decompressed)"
        )


def resolve_sources(patterns, roots: tuple[Path, ...], key: str = "ingest.sources") -> list[str]:
    """Expand paths/globs (relative ones against each root in turn) and keep `hf:` names.

    Raises ValueError listing every pattern that matches nothing or names an unsupported file
    (each problem prefixed with `key`, the config key that named them)."""
    found, seen, problems = [], set(), []
    for pattern in patterns:
        if pattern.startswith("hf:"):
            found.append(pattern)
            continue
        candidates = [Path(pattern)] if Path(pattern).is_absolute() else [r / pattern for r in roots]
        matches = []
        for c in candidates:
            matches = sorted(p for p in glob.glob(str(c), recursive=True) if Path(p).is_file())
            if matches:
                break
        if not matches:
            where = " and ".join(str(r) for r in roots)
            problems.append(f"{key}: no file matches {pattern!r} (relative to {where})")
        for m in matches:
            if not m.endswith(SUFFIXES):
                problems.append(f"{key}: {m} is not one of {', '.join(SUFFIXES)}")
            elif (resolved := str(Path(m).resolve())) not in seen:  # overlapping globs: read once
                seen.add(resolved)
                found.append(resolved)
    if problems:
        raise ValueError("\n".join(problems))
    return found


def splittable(path: str) -> bool:
    """A plain (uncompressed) file: any byte offset can start a range."""
    return not path.startswith("hf:") and not path.endswith((".zst", ".zstd", ".gz"))


def byte_ranges(path: str, size_each: int) -> list[tuple[int, ...] | None]:
    """A plain file larger than `size_each` bytes cut into ranges of about that size, [start, end);
    a .zst of several sized frames whose content is larger, into runs of whole frames of about that
    many decompressed bytes, (start, end, at, base): [start, end) in decompressed offsets, decompressed
    from the frame at compressed offset `at`, which begins at decompressed offset `base` (the frame
    before the range's); [None] (the whole file, one reader) otherwise."""
    if path.endswith((".zst", ".zstd")):
        return _frame_ranges(path, size_each)
    size = os.path.getsize(path) if splittable(path) else 0
    if size <= size_each:
        return [None]
    n = -(-size // size_each)
    bounds = [size * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _frame_ranges(path: str, size_each: int) -> list[tuple[int, ...] | None]:
    if not _small_first_frame(path, size_each):
        return [None]  # one large frame (the `zstd` CLI's) or unsized ones: its blocks are not walked
    with open(path, "rb") as f:
        frames, problem = zstd_frames(f)
    if problem or len(frames) < 2 or any(size is None for _, size in frames):
        return [None]  # one frame, a frame of unknown size, or a damaged file (its reader says so)
    starts, total = [], 0  # (compressed offset, decompressed offset) of each frame
    for at, size in frames:
        starts.append((at, total))
        total += size
    if total <= size_each:
        return [None]
    n = -(-total // size_each)
    offsets = [d for _, d in starts]  # each run begins at the first frame at or after its share's start
    cuts = sorted({bisect.bisect_left(offsets, total * k // n) for k in range(n)})
    cuts = [a for a in cuts if a < len(starts) and offsets[a] < total]  # none of only empty frames
    ranges = []
    for a, b in zip(cuts, [*cuts[1:], len(starts)], strict=True):
        start, end = starts[a][1], starts[b][1] if b < len(starts) else total
        at, base = starts[a - 1] if a > 0 else starts[0]
        ranges.append((start, end, at, base))
    return ranges


def read_lines(
    path: str, max_line_bytes: int, byte_range: tuple[int, ...] | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line bytes without the newline | None if over-long). Blank lines too.
    With `byte_range` (one of `byte_ranges`): the lines that begin in [start, end) of a plain file, or
    of a .zst's decompressed bytes, numbered from 1 there (a BadFileError's counts are the range's)."""
    with open(path, "rb") as raw:
        if byte_range is not None:
            if len(byte_range) == 4:  # runs of frames of a .zst: decompressed from the frame before
                import zstandard

                start, end, at, base = byte_range
                source = _Decompressed(raw, at, base)
                errors: tuple[type[BaseException], ...] = (zstandard.ZstdError,)
            elif splittable(path):
                (start, end), source, errors = byte_range, raw, ()
            else:
                raise ValueError(f"{path}: only a plain file or a .zst of sized frames can be read in ranges")
            lineno, total = 0, 0
            try:
                for item in _split_lines(_Range(source, start, end), max_line_bytes):
                    lineno, total, line = item  # kept after the loop: how far reading got
                    yield lineno, line
            except errors as e:
                raise BadFileError(path, f"corrupt ({type(e).__name__}: {e})", lineno, total) from e
            return
        stream, errors = _decompressing(raw, path)
        lineno, total = 0, 0
        try:
            for item in _split_lines(stream, max_line_bytes):
                lineno, total, line = item  # kept after the loop: how far reading got
                yield lineno, line
        except errors as e:
            raise BadFileError(path, f"corrupt or truncated ({type(e).__name__}: {e})", lineno, total) from e
        if path.endswith((".zst", ".zstd")):
            problem = check_zstd_frames(raw)
            if problem:
                raise BadFileError(path, problem, lineno, total)


def read_blocks(
    path: str, size_each: int, max_line_bytes: int, skip=frozenset()
) -> Generator[tuple[int, bytes], None, dict]:
    """Read a whole file once, as one reader must (a .zst of one frame, a .gz), and cut its
    (decompressed) bytes into blocks of whole lines for several tasks: each block runs from where the
    one before ended to the first line start at least `size_each` bytes further (the last, to the
    end), so each line is in one block, and where a block ends depends on the data alone. A line
    longer than `max_line_bytes` keeps only its first max_line_bytes + 1 bytes: enough for its reader
    (`lines_of`) to see it is too long. Yields (k, block bytes) for each block not in `skip`, in
    order; returns {"blocks": how many, "error": why the file cannot be read to its end, or None}: a
    file that turns out corrupt or truncated is one whose blocks do not count (the reader of a whole
    file says the same). Memory: about two blocks (one yielded, one being cut)."""
    zst = path.endswith((".zst", ".zstd"))
    with open(path, "rb") as raw:
        stream, errors = _decompressing(raw, path)
        block, k, start = _Block(max_line_bytes + 1), 0, 0  # block k begins at byte `start`
        off, lines = 0, 0  # the decompressed offset of `chunk`, the newlines before it
        try:
            while chunk := stream.read(CHUNK):
                i = 0
                while (nl := chunk.find(b"\n", max(start + size_each - 1 - off, i))) >= 0:
                    cut = nl + 1  # the first line start at or after start + size_each
                    if k not in skip:
                        block.add(chunk[i:cut])
                        yield k, block.take()
                    k, i, start = k + 1, cut, off + cut
                if k not in skip and i < len(chunk):
                    block.add(chunk[i:])
                off, lines = off + len(chunk), lines + chunk.count(b"\n")
        except errors as e:
            bad = BadFileError(path, f"corrupt or truncated ({type(e).__name__}: {e})", lines, off)
            return {"blocks": k + 1, "error": str(bad)}
        problem = check_zstd_frames(raw) if zst else None
    if start < off or k == 0:  # the last block, unless the one before ended with the file
        if k not in skip:
            yield k, block.take()
        k += 1
    return {"blocks": k, "error": str(BadFileError(path, problem, lines, off)) if problem else None}


class _Block:
    """The bytes of a block being cut, each line kept to at most `cap` bytes (lines that begin and
    end inside one piece added are kept whole: a piece is at most a CHUNK)."""

    def __init__(self, cap: int):
        self.cap, self.pieces, self.line = cap, [], 0  # line: bytes kept of the unfinished last line

    def add(self, piece: bytes) -> None:
        first = piece.find(b"\n")
        keep = max(0, min(len(piece) if first < 0 else first, self.cap - self.line))
        if first < 0:  # all of it continues the unfinished line
            self.pieces.append(piece[:keep])
            self.line += keep
            return
        self.pieces += [piece[:keep], piece[first:]]  # then its newline, whole lines, the next one begun
        self.line = len(piece) - piece.rfind(b"\n") - 1

    def take(self) -> bytes:
        data, self.pieces, self.line = b"".join(self.pieces), [], 0
        return data


def _decompressing(raw, path: str):
    """(a binary stream of the file's decompressed bytes, the errors that say it is damaged)."""
    if path.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), (
            zstandard.ZstdError,
        )
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), GZIP_ERRORS
    return raw, ()


def lines_of(data: bytes, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """`read_lines` of bytes in memory (a block `read_blocks` cut)."""
    for lineno, _, line in _split_lines(io.BytesIO(data), max_line_bytes):
        yield lineno, line


def _small_first_frame(path: str, size_each: int) -> bool:
    """The file's first zstd frame says its decompressed size (a skippable frame its data's), and it is at
    most `size_each`: only then can the file be runs of frames worth walking (planning reads its block
    headers, not its data; a file of one large frame, as the `zstd` CLI writes, is not walked at all)."""
    import zstandard

    with open(path, "rb") as f:
        head = f.read(18)
    try:
        size = zstandard.get_frame_parameters(head).content_size
    except zstandard.ZstdError:
        return False  # not zstd: read whole (the reader says what is wrong)
    return size != zstandard.CONTENTSIZE_UNKNOWN and size <= size_each


class _Decompressed:
    """The decompressed bytes of a .zst from the frame at compressed offset `at` on, which begins at
    decompressed offset `base`, as `_Range` uses a file: read, seek forward (by decompressing), and
    seek back into the bytes the last read returned (as `_Range` does after looking for a newline)."""

    def __init__(self, raw, at: int, base: int):
        import zstandard

        raw.seek(at)
        self.stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        self.pos, self.last, self.pending = base, b"", b""

    def seek(self, pos: int) -> int:
        if pos < self.pos:
            back = self.pos - pos
            if back > len(self.last):
                raise ValueError(f"cannot seek back from {self.pos} to {pos} in a zstd stream")
            self.pending = self.last[len(self.last) - back :] + self.pending
            self.pos, self.last = pos, self.last[: len(self.last) - back]
        while self.pos < pos and self.read(min(CHUNK, pos - self.pos)):
            pass
        return self.pos

    def read(self, n: int) -> bytes:
        if self.pending:
            data, self.pending = self.pending[:n], self.pending[n:]
        else:
            data = self.stream.read(n)
        self.pos += len(data)
        self.last = data
        return data


class _Range:
    """The bytes of the lines that begin in [start, end) of a binary file, as a stream: from the
    first line start at or after `start` (a line begun before it is the previous range's) to the
    end of the line that holds byte end - 1."""

    def __init__(self, f, start: int, end: int):
        self.f, self.pos, self.end, self.done = f, start, end, False
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # mid-line: skip to the next line's start
                self.pos = start + self._skip_line()
        f.seek(self.pos)
        self.done = self.pos >= end

    def _skip_line(self) -> int:
        """Bytes up to and including the next newline (all that is left when there is none)."""
        skipped = 0
        while chunk := self.f.read(CHUNK):
            nl = chunk.find(b"\n")
            if nl >= 0:
                return skipped + nl + 1
            skipped += len(chunk)
        return skipped

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.pos < self.end:  # inside the range
            data = self.f.read(min(n, self.end - self.pos))
            self.pos += len(data)
            self.done = not data or (self.pos == self.end and data.endswith(b"\n"))
            return data
        data = self.f.read(n)  # past it: the rest of its last line
        nl = data.find(b"\n")
        self.done = not data or nl >= 0
        return data[: nl + 1] if nl >= 0 else data


def _split_lines(stream, max_line_bytes: int) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, bytes decompressed so far, line) from a binary stream, read CHUNK at a time."""
    pending: list[bytes] = []
    pending_len, overlong, lineno, total = 0, False, 0, 0
    while chunk := stream.read(CHUNK):
        total += len(chunk)
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:nl]
            lineno += 1
            if overlong or pending_len + len(piece) > max_line_bytes:
                yield lineno, total, None
            else:
                yield lineno, total, b"".join(pending) + piece if pending else piece
            pending, pending_len, overlong, start = [], 0, False, nl + 1
        if not overlong and start < len(chunk):
            pending.append(chunk[start:])
            pending_len += len(chunk) - start
            if pending_len > max_line_bytes:  # stop buffering: the rest of this line is only counted
                pending, overlong = [], True
    if pending or overlong:  # a last line without a newline
        yield lineno + 1, total, None if overlong else b"".join(pending)


def check_zstd_frames(f) -> str | None:
    """Walk the zstd frames of an open binary file by their headers; None if every frame is complete."""
    return zstd_frames(f)[1]


def zstd_frames(f) -> tuple[list[tuple[int, int | None]], str | None]:
    """The zstd frames of an open binary file, walked by their headers: [(offset, decompressed size
    or None when its header does not say)], and what is wrong with the file (None if every frame is
    complete; the frames listed are those before the problem).

    Frame = magic, header, blocks (3-byte header: last flag, type, size), optional 4-byte checksum
    (RFC 8878 §3.1). Skippable frames are skipped. Reads a few bytes per block, never decompresses."""
    import zstandard

    size = f.seek(0, io.SEEK_END)
    pos, frames = 0, []

    def bad(problem: str):
        return frames, problem

    while pos < size:
        f.seek(pos)
        head = f.read(18)
        if len(head) < 4:
            return bad(f"truncated zstd frame header at byte {pos:,} of {size:,}")
        magic = struct.unpack("<I", head[:4])[0]
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
            if len(head) < 8:
                return bad(f"truncated skippable frame at byte {pos:,} of {size:,}")
            pos += 8 + struct.unpack("<I", head[4:8])[0]
            continue
        if magic != ZSTD_MAGIC:
            return bad(f"not a zstd frame at byte {pos:,} (magic {head[:4].hex()})")
        try:
            header = zstandard.frame_header_size(head)
            params = zstandard.get_frame_parameters(head)
        except zstandard.ZstdError:
            return bad(f"truncated zstd frame header at byte {pos:,} of {size:,}")
        has_checksum = params.has_checksum
        content = None if params.content_size == zstandard.CONTENTSIZE_UNKNOWN else params.content_size
        frame_start, pos = pos, pos + header
        while True:
            f.seek(pos)
            b = f.read(3)
            if len(b) < 3:
                return bad(
                    f"truncated zstd stream: the frame begun at byte {frame_start:,} ends at byte {size:,} without its last block"
                )
            word = int.from_bytes(b, "little")
            last, kind, block = word & 1, (word >> 1) & 3, word >> 3
            pos += 3 + (1 if kind == 1 else block)  # RLE blocks store one byte
            if pos > size:
                return bad(
                    f"truncated zstd stream: a block of the frame begun at byte {frame_start:,} needs {pos:,} bytes, the file has {size:,}"
                )
            if last:
                break
        pos += 4 if has_checksum else 0
        if pos > size:
            return bad(
                f"truncated zstd stream: the checksum of the frame begun at byte {frame_start:,} is cut off"
            )
        frames.append((frame_start, content))
    return frames, None


def read_hf(name: str) -> Iterator[tuple[int, dict]]:
    """Records of a `datasets` hub dataset, streamed: `hf:NAME[:SPLIT]` (needs a network)."""
    import datasets

    dataset, _, split = name.removeprefix("hf:").partition(":")
    for i, record in enumerate(datasets.load_dataset(dataset, split=split or "train", streaming=True)):
        yield i + 1, record
