"""Read a Hugging Face safetensors checkpoint folder one tensor at a time (docs/methods.md §5.2).

Role in the streaming engine (``weights.stream``): :class:`CheckpointReader` is the input side. It reads the
shard index and every shard's header once (names, dtypes, shapes, byte offsets: a few kB, no tensor data), and
serves one named tensor at a time, memory-mapped through safetensors ``safe_open`` (mergekit's
``LazyTensorLoader`` is the model). The shard is opened for each read and closed right after: a handle kept open
keeps every page it has served resident (measured: the process RSS grows by the whole shard), so memory would
follow the shard size instead of the tensors in flight. A tensor returned by :meth:`CheckpointReader.get` is a
copy-on-write view of the file's pages and holds only its own.

Reading a tensor faults its pages in as they are touched, so from a cold page cache each read waits for the disk.
:meth:`CheckpointReader.will_need` asks the kernel to start reading a tensor's bytes in the background
(``posix_fadvise(WILLNEED)``); ``weights.stream`` calls it a bounded window ahead of the tensor being computed, so
that the disk works while the CPU does. It is a hint: a no-op where the platform has no ``posix_fadvise``.

The safetensors dtype table and :class:`TensorInfo` are shared with ``weights.writer``, which writes the same
format.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetypatch.errors import ModelError
from safetypatch.utils.io import read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# safetensors' dtype names (the ``dtype`` field of a header entry).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# A header larger than this is not a real checkpoint's (safetensors itself refuses above 100 MB).
_MAX_HEADER_BYTES = 100 * 2**20
# Linux reads at most max(the device's read-ahead window, its largest request) per WILLNEED call (commonly 1-8 MiB)
# and drops the rest of a longer range, so a long range is advised in steps of this size.
_ADVISE_STEP = 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor is stored and what it is, read from its shard's header.

    Attributes:
        file: the shard file name inside the folder.
        dtype: the storage dtype.
        shape: the tensor's shape.
        offset: start of its bytes in the shard's data section.
        nbytes: its size in bytes.
    """

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class CheckpointReader:
    """A safetensors checkpoint folder (``model.safetensors`` or shards + ``model.safetensors.index.json``),
    read tensor by tensor.

    Usable as a context manager; after :meth:`close` every read raises.

    Args:
        folder: the Hugging Face model folder.

    Raises:
        ModelError: the folder, its index or a shard is missing, or a header is corrupt or disagrees with the
            index; the message names the file and what to do.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError(f"{self.folder} is not a folder; expected a Hugging Face model folder with "
                             f"{SINGLE_FILE} or {INDEX_FILE}.")
        self._infos = _read_infos(self.folder, _weight_map(self.folder))
        self._config: dict[str, Any] | None = None
        self._data_starts: dict[str, int] = {}
        self._closed = False

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.folder)!r}, {len(self._infos)} tensors)"

    def close(self) -> None:
        """Refuse further reads (no handle stays open between reads, so there is nothing else to release)."""
        self._closed = True

    def names(self) -> list[str]:
        """Every tensor name, in storage order (shard by shard, by offset), the order that reads fastest."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """The stored file, dtype, shape and size of ``name``.

        Raises:
            ModelError: the checkpoint has no tensor ``name`` (close names are suggested).
        """
        info = self._infos.get(name)
        if info is None:
            close = difflib.get_close_matches(name, self._infos, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"{self.folder} has no tensor {name!r} ({len(self._infos)} tensors).{hint} Tensors are "
                             "matched by exact name: the checkpoints must come from the same architecture.")
        return info

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``."""
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The storage dtype of ``name``."""
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        """The stored size of ``name`` in bytes."""
        return self.info(name).nbytes

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(shard path, absolute offset, size in bytes) of ``name``'s stored bytes, for copying them unchanged.

        Raises:
            ModelError: no such tensor, the reader is closed, or the shard's header cannot be read.
        """
        if self._closed:
            raise ModelError(f"CheckpointReader({self.folder}) is closed; open a new one to read {name}.")
        info = self.info(name)
        path = self.folder / info.file
        if info.file not in self._data_starts:
            self._data_starts[info.file] = _data_start(path)
        return path, self._data_starts[info.file] + info.offset, info.nbytes

    def will_need(self, name: str, start: int = 0, length: int | None = None) -> None:
        """Ask the kernel to start reading ``name``'s stored bytes ``start`` to ``start + length`` (default: to its
        end) into the page cache, without waiting for the disk; a later :meth:`get` then finds them there. A hint:
        it does nothing where the platform has no ``posix_fadvise``, or where the file system refuses it.

        Raises:
            ModelError: no such tensor, the reader is closed, or the shard's header cannot be read.
        """
        path, offset, nbytes = self.byte_range(name)
        stop = nbytes if length is None else min(nbytes, start + length)
        if start < stop:
            will_need(path, offset + start, stop - start)

    @property
    def config(self) -> dict[str, Any]:
        """The folder's ``config.json`` as a dict (empty when the folder has none).

        Raises:
            ModelError: ``config.json`` is not a valid JSON object.
        """
        if self._config is None:
            path = self.folder / CONFIG_FILE
            self._config = read_json_file(path, "model config") if path.is_file() else {}
        return self._config

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, storage dtype), memory-mapped and copy-on-write.

        Raises:
            ModelError: no such tensor, the reader is closed, or the shard cannot be read.
        """
        from safetensors import safe_open

        if self._closed:
            raise ModelError(f"CheckpointReader({self.folder}) is closed; open a new one to read {name}.")
        path = self.folder / self.info(name).file
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for truncated or changed files
            raise ModelError(f"{path}: cannot read tensor {name} ({exc}); the file changed or is truncated. "
                             "Download or write the checkpoint again.") from exc


def will_need(path: Path, offset: int, length: int) -> None:
    """``posix_fadvise(WILLNEED)`` on bytes ``offset`` to ``offset + length`` of ``path``, in steps the kernel reads
    whole; nothing where the platform lacks it or the file system refuses it (it is only a hint)."""
    if not hasattr(os, "posix_fadvise") or length <= 0:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the read that follows reports a missing or unreadable shard
    try:
        for step in range(offset, offset + length, _ADVISE_STEP):
            os.posix_fadvise(fd, step, min(_ADVISE_STEP, offset + length - step), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a checkpoint folder (``config.json``, the shard index).

    Raises:
        ModelError: it is missing, not JSON or not an object; the message names the file.
    """
    return read_json(path, ModelError, what=what, advice="Download or write the checkpoint again.")


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name → shard file name, from the index or from the single file's header."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json_file(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index} has no 'weight_map' (tensor name → shard file); the index is corrupt. "
                             "Download or write the checkpoint again.")
        return {str(name): str(file) for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        return dict.fromkeys(_read_header(folder / SINGLE_FILE), SINGLE_FILE)
    raise ModelError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}; convert .bin checkpoints with "
                     "transformers (save_pretrained(..., safe_serialization=True)) first.")


def _read_infos(folder: Path, weight_map: dict[str, str]) -> dict[str, TensorInfo]:
    """Every indexed tensor's :class:`TensorInfo`, in storage order."""
    infos: list[TensorInfo | None] = []
    names: list[str] = []
    for file in sorted(set(weight_map.values())):
        path = folder / file
        if not path.is_file():
            raise ModelError(f"{folder / INDEX_FILE} lists shard {file}, which is missing from {folder}; the "
                             "download or copy is incomplete. Download the checkpoint again.")
        header = _read_header(path)
        wanted = [name for name, owner in weight_map.items() if owner == file]
        for name in wanted:
            if name not in header:
                raise ModelError(f"{folder / INDEX_FILE} places tensor {name} in {file}, but that shard does not "
                                 "hold it; the index and the shards come from different saves. Download the "
                                 "checkpoint again.")
        for name in sorted(wanted, key=lambda n: header[n].offset):
            names.append(name)
            infos.append(header[name])
    return dict(zip(names, infos, strict=True))


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without reading tensor data."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise _corrupt(path, f"header length {length} for a {size}-byte file")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise _corrupt(path, f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    data_size = size - 8 - length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"tensor {name} has the unreadable entry {entry!r} ({exc!r})") from exc
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes or not 0 <= start <= end <= data_size:
            raise _corrupt(path, f"tensor {name} ({entry['dtype']} {list(shape)}) claims bytes {start}..{end} of a "
                           f"{data_size}-byte data section")
        infos[name] = TensorInfo(path.name, dtype, shape, start, nbytes)
    return infos


def _data_start(path: Path) -> int:
    """Where the data section of a safetensors file starts (after the 8-byte length and the header)."""
    try:
        with path.open("rb") as fh:
            prefix = fh.read(8)
    except OSError as exc:
        raise ModelError(f"{path} cannot be read ({exc}); download or write the checkpoint again.") from exc
    if len(prefix) != 8:
        raise _corrupt(path, "the file is shorter than its 8-byte header length")
    return 8 + int.from_bytes(prefix, "little")


def _corrupt(path: Path, what: str) -> ModelError:
    return ModelError(f"{path} is not a valid safetensors file: {what}. The file is truncated or corrupt; download "
                      "or write the checkpoint again.")
