"""Safetensors files written and read tensor by tensor, laid out as `save_pretrained` lays out a
folder's weights.

The safetensors library writes a file from a complete state dict; an export that streams a model one
gathered tensor at a time needs each tensor's bytes written as it arrives (kiln/export.py). Shapes and
dtypes are known before the values, so every file's header is written first.

Its reader maps the file into memory, and every page a tensor is read from stays in the process's
resident set until the file is closed (measured: eight 100 MB tensors read one by one and each
dropped, resident set +766 MB of file pages; with plain reads +98 MB, one tensor). A load that keeps
about one tensor resident at a time (kiln/sharded.py, rank 0 filling a partitioned model) reads
each tensor's bytes with a plain file read instead (`CheckpointReader`).

The safetensors format, as written here: an 8-byte little-endian header length, a JSON header
`{"__metadata__": {"format": "pt"}, name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}`
padded with spaces to a multiple of 8, then the raw little-endian bytes, each tensor at its offsets.
Within a file tensors are ordered by element size, largest first, so each starts aligned to its own.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# ---------------------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write, known before its values: its key, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsFile:
    """One safetensors file written tensor by tensor, in any order: the header (from `specs`) goes out
    first, then `write` puts each tensor's bytes at its offsets. `close` checks every tensor came."""

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian bytes; this host is big-endian")
        unknown = sorted({str(s.dtype) for s in specs if s.dtype not in SAFETENSORS_DTYPES})
        if unknown:
            raise ValueError(f"safetensors has no dtype for {unknown}")
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        self.places: dict[str, tuple[int, TensorSpec]] = {}
        offset = 0
        for spec in sorted(specs, key=lambda s: -s.dtype.itemsize):  # stable: the given order within a size
            if spec.name in header:
                raise ValueError(f"{spec.name!r} twice in one file")
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self.places[spec.name] = (offset, spec)
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.data_start, self.size = Path(path), 8 + len(raw), 8 + len(raw) + offset
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, spec = self.places.pop(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        self.file.seek(self.data_start + offset)
        self.file.write(tensor_bytes(tensor))

    def close(self) -> None:
        if self.file.closed:
            return
        try:
            if self.places:
                raise RuntimeError(f"{self.path.name}: never written: {sorted(self.places)[:5]}")
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()


def shard_plan(specs: Sequence[TensorSpec], max_shard_size: int | str = MAX_SHARD_SIZE):
    """huggingface_hub's split (the one `save_pretrained` uses): in order, a shard closes before the
    tensor that would take it past `max_shard_size`; a tensor larger than that has a shard of its own.
    Returns its StateDictSplit: `filename_to_tensors`, `tensor_to_filename`, `metadata.total_size`."""
    from huggingface_hub import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(
        {s.name: s for s in specs},
        get_storage_size=lambda s: s.nbytes,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )


class CheckpointWriter:
    """The weights of a folder as `save_pretrained` lays them out, written tensor by tensor: every
    shard's file is opened (its header written) up front, each `write` goes to its file and offset,
    `close` writes the index of a sharded checkpoint. Use as a context manager."""

    def __init__(
        self,
        folder: str | Path,
        specs: Sequence[TensorSpec],
        max_shard_size: int | str = MAX_SHARD_SIZE,
        total_parameters: int | None = None,
    ):
        self.folder, self.split = Path(folder), shard_plan(specs, max_shard_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        by_name = {s.name: s for s in specs}
        self.files: dict[str, SafetensorsFile] = {}
        try:
            for filename, names in self.split.filename_to_tensors.items():
                self.files[filename] = SafetensorsFile(self.folder / filename, [by_name[n] for n in names])
        except BaseException:
            self.abort()
            raise
        self.total_parameters = total_parameters

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.files[self.split.tensor_to_filename[name]].write(name, tensor)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.split.is_sharded:
            metadata = dict(self.split.metadata)
            if self.total_parameters is not None:
                metadata["total_parameters"] = self.total_parameters
            index = {"metadata": metadata, "weight_map": dict(self.split.tensor_to_filename)}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        for f in self.files.values():
            f.file.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class _Stored:
    path: Path
    begin: int  # the tensor's first byte in its file
    spec: TensorSpec


class CheckpointReader:
    """The weights of a folder saved by `save_pretrained` (one `model.safetensors`, or shards and their
    index), each tensor read on its own with a plain file read: `names()`, `spec(name)`, `read(name)`."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / INDEX_NAME
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / WEIGHTS_NAME).exists():
            files = [WEIGHTS_NAME]
        else:
            raise FileNotFoundError(
                f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}; is it a saved model folder?"
            )
        self._stored: dict[str, _Stored] = {}
        for name in files:
            self._stored.update(_header(folder / name))

    def names(self) -> list[str]:
        return list(self._stored)

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def spec(self, name: str) -> TensorSpec:
        return self._stored[name].spec

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in its stored dtype, in memory of its own (no mapping of the file)."""
        stored = self._stored[name]
        out = torch.empty(stored.spec.shape, dtype=stored.spec.dtype)
        if out.numel():
            with open(stored.path, "rb") as f:
                f.seek(stored.begin)
                got = f.readinto(out.reshape(-1).view(torch.uint8).numpy())
            if got != stored.spec.nbytes:
                raise ValueError(f"{stored.path}: {name} is cut short ({got} of {stored.spec.nbytes} bytes)")
        return out


def _header(path: Path) -> dict[str, _Stored]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    stored = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in TORCH_DTYPES:
            raise ValueError(f"{path}: {name} has dtype {entry['dtype']}, which torch cannot hold")
        begin, end = entry["data_offsets"]
        spec = TensorSpec(name, tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]])
        if end - begin != spec.nbytes:
            raise ValueError(
                f"{path}: {name}'s offsets span {end - begin} bytes, its shape and dtype {spec.nbytes}"
            )
        stored[name] = _Stored(path, 8 + size + begin, spec)
    return stored
