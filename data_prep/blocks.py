"""A compressed file that one reader must read whole, cleaned by several tasks: one per block.

A .zst of one frame (as the Pile ships) or of frames without sizes, or a .gz, cannot be entered in
the middle, so byte ranges cannot split it. Instead one reader decompresses it once and hands each
block of whole lines, of `size` bytes or a line more (data_prep/readers.py `read_blocks`), to a
cleaning task of its own, while it reads on (`ctx.map_streams`). Each block is a unit of the stage (`<file>-b<k>`), and so is the count of
blocks, recorded once the reader is through (`<file>-blocks`: how many, and whether the file is
damaged). A run that dies keeps them: the next one reads the file again but hands on only the blocks
still to do, and needs no reader at all once the count and every block are recorded.

    blocks = Blocks(i, path, facts, size, max_line, folder, task_of)  # task_of(k, name): its CleanTask
    blocks.find_finished(listing)                                    # what an earlier attempt recorded
    if not blocks.complete:
        (got, summary), = ctx.map_streams(clean_file, [blocks.stream()])
        blocks.read(got, summary)
    pairs = blocks.results()                      # [(CleanTask, FileResult)], in block order
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from data_prep.cleaning import CleanTask, FileResult, finished_clean
from data_prep.readers import read_blocks
from pipeline import units
from pipeline.context import Stream


@dataclass
class Blocks:
    index: int
    path: str
    facts: dict
    """The file's size and mtime when the run was planned (`units.file_facts`): what every record of
    its reading is made from, so that a file changed since is read again by the next run."""
    size: int
    """Decompressed bytes per block."""
    max_line: int
    """A longer line is too long for a record: only its first max_line + 1 bytes are handed on."""
    folder: units.Folder
    task_of: Callable[[int, str], CleanTask]
    """The cleaning task of block k, named as given."""
    finished: dict[int, FileResult] = field(default_factory=dict)
    """Block -> its result, for the blocks done."""
    count: int | None = None
    """How many blocks the file has: known once a reader went through it."""
    error: str | None = None
    """Why the file cannot be read to its end (then none of its blocks counts)."""

    def name(self, k: int) -> str:
        return f"{self.index:05d}-b{k:05d}"

    @property
    def record_name(self) -> str:
        return f"{self.index:05d}-blocks"

    @property
    def identity(self) -> dict:
        return {"input": self.facts, "block_bytes": self.size}

    def task(self, k: int) -> CleanTask:
        return self.task_of(k, self.name(k))

    @property
    def complete(self) -> bool:
        """Nothing to read: the count is recorded, and the file is damaged or every block done."""
        return self.count is not None and (self.error is not None or len(self.finished) == self.count)

    def find_finished(self, listing: dict[str, int] | None = None) -> None:
        """Take in the count and the blocks an earlier attempt recorded (with today's identities)."""
        saved = self.folder.finished(self.record_name, self.identity, listing)
        if saved is not None:
            self.count, self.error = saved["result"]["blocks"], saved["result"]["error"]
        prefix = f"{self.index:05d}-b"
        ks = (
            range(self.count)
            if self.count is not None
            else [
                int(n[len(prefix) :])
                for n in self.folder.recorded(listing)
                if n[len(prefix) :].isdigit() and n.startswith(prefix)
            ]
        )
        for k in ks:
            if (res := finished_clean(self.task(k), listing)) is not None:
                self.finished[k] = res

    def stream(self) -> Stream:
        """The reader of the file, handing on the blocks not done yet."""
        arg = (self.path, self.size, self.max_line, frozenset(self.finished))
        return Stream(produce=_read, arg=arg, item=self.task)

    def read(self, got: list[tuple[int, FileResult]], summary: dict) -> None:
        """The reader is through: its blocks' results, and the count (recorded as a unit)."""
        self.finished.update(got)
        self.count, self.error = summary["blocks"], summary["error"]
        self.folder.record(self.record_name, self.identity, summary, {})

    def results(self) -> list[tuple[CleanTask, FileResult]]:
        """Each block's task and result in order; a damaged file's, one failed result."""
        if self.error is not None:
            return [(self.task(0), FileResult(self.index, self.path, status="failed", error=self.error))]
        return [(self.task(k), self.finished[k]) for k in range(self.count)]


def _read(arg):
    return (yield from read_blocks(*arg))
