"""Write a model folder tensor by tensor, shaped like a template checkpoint (docs/methods.md §5.2).

Role in the streaming engine (``weights.stream``): :class:`CheckpointWriter` is the output side. The output has
the template's tensors, shapes and storage dtypes (a repaired model is a modified copy of the target), so the
shard layout (size-capped shards, mergekit's ``TensorWriter`` is the model) and every safetensors header are
fixed when the writer opens. Each tensor handed to :meth:`CheckpointWriter.add` is cast to the template's dtype
(fp32 arithmetic is cast only on write, §2.3) and written straight to its place in its shard, so the writer
buffers no shard: memory follows the tensor in flight, not the shard size. An element-wise result
(:class:`~safetypatch.weights.elementwise.Elementwise`) is computed, cast, checked and written a chunk at a time, so
not even that tensor is held whole. :meth:`CheckpointWriter.finish` copies the tensors nobody wrote from the
template (:meth:`CheckpointWriter.copy_rest`; byte for byte, file to file, when the dtypes agree), checks the
written headers, writes the index, copies config, generation config, tokenizer and chat template files, and moves
the folder into place atomically; on any error nothing is left at the output path. Shards are written with
``pwrite`` on descriptors kept open until the writer finishes, and written back as they go (:class:`_WriteBack`):
every ``WRITE_BACK_BYTES`` of new data, the kernel is asked to start writing it to disk, and the window before it,
on disk by then, is dropped from the page cache, so the output never holds more than two windows of dirty pages and
its pages are recycled rather than taken fresh (``docs/performance.md``). Nothing is fsynced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import cast

import torch

from safetypatch.errors import ConfigError, ModelError, ModelMismatchError
from safetypatch.utils.io import atomic_path
from safetypatch.weights.elementwise import Elementwise, all_finite
from safetypatch.weights.reader import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, CheckpointReader, TensorInfo

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # docs/methods.md §5.2
# Files of the template that describe the model rather than its weights: copied when present.
METADATA_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
METADATA_FOLDERS = ("additional_chat_templates",)
WRITE_BACK_BYTES = 64 * 2**20  # the write-back window of each shard (see _WriteBack)


class CheckpointWriter:
    """Write a model folder shaped like ``template`` one tensor at a time.

    Use it as a context manager and call :meth:`finish` inside it; leaving the block by an exception (or without
    :meth:`finish`) removes everything written.

    Args:
        folder: the output model folder.
        template: the checkpoint folder whose tensor names, shapes and dtypes the output has, and whose config and
            tokenizer files are copied (normally ``target_model``).
        max_shard_bytes: the largest shard; a tensor bigger than this gets a shard of its own.
        overwrite: replace an existing ``folder``.

    Raises:
        OutputExistsError: ``folder`` exists and ``overwrite`` is false.
        ConfigError: ``max_shard_bytes`` is not positive.
        ModelError: ``template`` cannot be read.
    """

    def __init__(self, folder: Path, *, template: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False) -> None:
        if max_shard_bytes < 1:
            raise ConfigError(f"CheckpointWriter({folder}): max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.folder = Path(folder)
        self.template = CheckpointReader(template)
        self._output = atomic_path(self.folder, overwrite)
        self._tmp = self._output.__enter__()
        self._written: set[str] = set()
        self._fds: dict[str, int] = {}
        self._write_back: dict[int, _WriteBack] = {}
        self._open = True
        try:
            self._tmp.mkdir()
            self._shards = _shard_layout(self.template, max_shard_bytes)
            self._places = _write_headers(self._tmp, self._shards)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._open:
            return
        self.abort()
        if exc_type is None:
            raise ModelError(f"CheckpointWriter({self.folder}) was closed without finish(); nothing was written. "
                             "Call finish() at the end of the with block.")

    def add(self, name: str, tensor: torch.Tensor | Elementwise) -> None:
        """Write one tensor, cast to the template's dtype, straight into its shard.

        Args:
            name: a tensor name of the template.
            tensor: its new value (any float dtype, any device; fp32 results are cast here), or an
                :class:`~safetypatch.weights.elementwise.Elementwise`, computed, cast, checked and written chunk by
                chunk (the same bytes as its whole value cast at once).

        Raises:
            ModelError: ``name`` is not in the template or was already written, or ``tensor`` holds NaN or Inf
                (checked after the cast, so an overflow of the storage dtype is caught too).
            ModelMismatchError: ``tensor`` has another shape than the template's.
        """
        if isinstance(tensor, Elementwise):
            file, start, info = self._place(name, tensor.shape)
            self._write_chunks(name, file, start, info, tensor.chunks(info.dtype))
        else:
            self._write(name, tensor.detach(), check_finite=True)

    def copy_rest(self, reader: CheckpointReader) -> int:
        """Copy from ``reader`` every template tensor not written yet (norms, embeddings a method leaves alone).

        Args:
            reader: a checkpoint with the template's names and shapes (normally the template itself).

        Returns:
            How many tensors were copied.

        Raises:
            ModelError: ``reader`` lacks a tensor that is still missing from the output.
            ModelMismatchError: a copied tensor has another shape than the template's.
        """
        missing = [name for name in self.template.names() if name not in self._written]
        for name in missing:
            if not self._copy_bytes(name, reader):
                self._write(name, reader.get(name), check_finite=False)
        return len(missing)

    def finish(self, extra_files: Mapping[str, str] | None = None) -> Path:
        """Complete the folder and move it into place.

        Args:
            extra_files: file name → text written at the top of the folder (a method's report, a manifest).

        Returns:
            The output folder.

        Raises:
            ConfigError: an extra file name is not a plain file name or names a file the folder already has.
            ModelError: the written shards do not read back with the template's names, shapes and dtypes.
        """
        self._require_open()
        try:
            copied = self.copy_rest(self.template)
            self._close_files()
            if len(self._shards) > 1:
                weight_map = {name: file for file, infos in self._shards.items() for name in infos}
                total = sum(info.nbytes for infos in self._shards.values() for info in infos.values())
                document = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (self._tmp / INDEX_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            self._check_headers()
            self._copy_metadata()
            self._write_extra(extra_files or {})
        except BaseException:
            self.abort()
            raise
        self._open = False
        self._output.__exit__(None, None, None)  # moves the folder into place
        logger.info("wrote %s (%d tensors, %d copied unchanged from %s, %d shards)", self.folder,
                    len(self._written), copied, self.template.folder, len(self._shards))
        return self.folder

    def abort(self) -> None:
        """Remove everything written; the output path is left as it was."""
        if self._open:
            self._open = False
            self._close_files()
            # atomic_path removes its temporary folder, and moves nothing into place, when an exception reaches it.
            self._output.__exit__(_Aborted, _Aborted(), None)

    def _require_open(self) -> None:
        if not self._open:
            raise ModelError(f"CheckpointWriter({self.folder}) is finished or aborted; open a new one to write.")

    def _place(self, name: str, shape: tuple[int, ...]) -> tuple[str, int, TensorInfo]:
        """(shard file, absolute offset, template info) of a tensor not written yet, of the template's shape."""
        self._require_open()
        if name not in self._places:
            close = difflib.get_close_matches(name, self._places, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"tensor {name!r} is not in the template {self.template.folder}, so {self.folder} "
                             f"would not load as that model.{hint}")
        if name in self._written:
            raise ModelError(f"tensor {name} was already written to {self.folder}; each tensor is written once.")
        file, start, info = self._places[name]
        if tuple(shape) != info.shape:
            raise ModelMismatchError(f"tensor {name} for {self.folder} is {tuple(shape)}, but the template "
                                     f"{self.template.folder} has {info.shape}.")
        return file, start, info

    def _write(self, name: str, tensor: torch.Tensor, *, check_finite: bool) -> None:
        file, start, info = self._place(name, tuple(tensor.shape))
        data = tensor.to(device="cpu", dtype=info.dtype).contiguous()  # no copy when it already is
        self._write_chunks(name, file, start, info, [data.reshape(-1)], check_finite=check_finite)

    def _write_chunks(self, name: str, file: str, start: int, info: TensorInfo, chunks: Iterable[torch.Tensor], *,
                      check_finite: bool = True) -> None:
        """Write consecutive flat pieces of ``name``, already in the storage dtype, from ``start`` on."""
        fd = self._fd(file)
        write_back = self._write_back[fd]
        offset = start
        for chunk in chunks:
            if check_finite and chunk.is_floating_point() and not all_finite(chunk):
                raise ModelError(f"tensor {name} for {self.folder} contains NaN or Inf as {info.dtype}; the "
                                 "computation that produced it diverged or overflows the storage dtype (check its "
                                 "inputs and strength). It was not written.")
            end = offset + _pwrite_all(fd, chunk.view(torch.uint8).numpy().data, offset)
            write_back.wrote(offset, end)
            offset = end
        if offset - start != info.nbytes:
            raise ModelError(f"tensor {name} for {self.folder}: {offset - start} bytes were produced for its "
                             f"{info.nbytes}. Please report this bug.")
        self._written.add(name)

    def _copy_bytes(self, name: str, reader: CheckpointReader) -> bool:
        """Copy ``name`` as stored from ``reader``'s shard into ours, in the kernel; False when it cannot be (another
        dtype, or a file system without ``copy_file_range``): the caller then writes it through memory."""
        file, start, info = self._place(name, reader.shape(name))
        if reader.dtype(name) != info.dtype or not hasattr(os, "copy_file_range"):
            return False
        source, source_offset, nbytes = reader.byte_range(name)
        dst = self._fd(file)
        with source.open("rb") as fh:
            src = fh.fileno()
            done = 0
            while done < nbytes:
                try:
                    n = os.copy_file_range(src, dst, nbytes - done, source_offset + done, start + done)
                except OSError as exc:
                    if done == 0 and exc.errno in _NO_COPY_RANGE:
                        return False
                    raise ModelError(f"{self.folder}: cannot copy tensor {name} from {source} ({exc}).") from exc
                if n == 0:
                    raise ModelError(f"{source}: tensor {name} ends early; the file changed or is truncated. "
                                     "Download or write the checkpoint again.")
                done += n
        self._written.add(name)
        return True

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self._tmp / file, os.O_RDWR)
            self._write_back[fd] = _WriteBack(fd)
        return fd

    def _close_files(self) -> None:
        self._write_back.clear()
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _check_headers(self) -> None:
        """The shards must parse back (our own header writing) with exactly the template's tensors."""
        written = CheckpointReader(self._tmp)
        for name in self.template.names():
            want = self.template.info(name)
            got = written.info(name) if name in written else None
            if got is None or (got.dtype, got.shape) != (want.dtype, want.shape):
                raise ModelError(f"{self.folder}: tensor {name} reads back as {got}, expected {want}. Please "
                                 "report this bug.")

    def _copy_metadata(self) -> None:
        for file in METADATA_FILES:
            if (self.template.folder / file).is_file():
                shutil.copy2(self.template.folder / file, self._tmp / file)
        for sub in METADATA_FOLDERS:
            if (self.template.folder / sub).is_dir():
                shutil.copytree(self.template.folder / sub, self._tmp / sub)

    def _write_extra(self, extra_files: Mapping[str, str]) -> None:
        for file, text in extra_files.items():
            if Path(file).name != file or file in ("", ".", ".."):
                raise ConfigError(f"extra file {file!r} for {self.folder} is not a plain file name; give a name such "
                                  "as 'restore.json' (extra files are written at the top of the model folder).")
            if (self._tmp / file).exists():
                raise ConfigError(f"extra file {file!r} for {self.folder} would replace the file of that name the "
                                  "checkpoint already has; choose another name.")
            (self._tmp / file).write_text(text, encoding="utf-8")


# copy_file_range is missing, or refuses these two files (another file system, an old kernel).
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


class _WriteBack:
    """Keep one output file's dirty pages to two windows, and its pages recycled.

    Writing a checkpoint through the page cache takes a fresh page for every 4 KiB of output and leaves all of it
    dirty until the kernel writes it back, after the run. On a virtual machine a page the guest has not touched
    recently costs a host fault (0.3-0.8 GB/s on the 2-core CI machine, ``docs/performance.md``), and the output
    competes with the inputs for the page cache. So every ``WRITE_BACK_BYTES`` of new data, the pages of that window
    are handed to the disk (``sync_file_range(WRITE)``, which returns at once), and those of the window before it are
    waited for and dropped from the page cache (``posix_fadvise(DONTNEED)``): the next writes get pages just freed,
    and the disk writes while the CPU computes. The data written is the same either way (these calls only move it to
    the disk sooner); where ``sync_file_range`` or ``posix_fadvise`` is missing, or the file system refuses them,
    the file is written through the page cache as usual.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.enabled = _SYNC_FILE_RANGE is not None and hasattr(os, "posix_fadvise")
        self.pending: list[tuple[int, int]] = []  # written, not yet handed to the disk
        self.pending_bytes = 0
        self.in_flight: list[tuple[int, int]] = []  # handed to the disk at the previous window

    def wrote(self, start: int, end: int) -> None:
        """Record that bytes ``start`` to ``end`` of the file were just written."""
        if not self.enabled or end <= start:
            return
        if self.pending and self.pending[-1][1] == start:
            self.pending[-1] = (self.pending[-1][0], end)
        else:
            self.pending.append((start, end))
        self.pending_bytes += end - start
        if self.pending_bytes >= WRITE_BACK_BYTES:
            self._next_window()

    def _next_window(self) -> None:
        try:
            for start, end in self.in_flight:
                _sync_range(self.fd, start, end, _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER)
                os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
            for start, end in self.pending:
                _sync_range(self.fd, start, end, _SYNC_WRITE)
        except OSError as exc:  # a file system without them: the page cache writes the file back as usual
            logger.debug("write-back off for descriptor %d: %s", self.fd, exc)
            self.enabled = False
        self.in_flight, self.pending, self.pending_bytes = self.pending, [], 0


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4  # <linux/fs.h>


def _sync_range(fd: int, start: int, end: int, flags: int) -> None:
    if _SYNC_FILE_RANGE is None or _SYNC_FILE_RANGE(fd, start, end - start, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked); returns its length."""
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return total


def _shard_layout(template: CheckpointReader, max_shard_bytes: int) -> dict[str, dict[str, TensorInfo]]:
    """Shard file name → (tensor name → its info in that shard), filling shards in the template's storage order."""
    groups: list[dict[str, TensorInfo]] = [{}]
    size = 0
    for name in template.names():
        info = template.info(name)
        if groups[-1] and size + info.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = TensorInfo("", info.dtype, info.shape, size, info.nbytes)
        size += info.nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i:05d}-of-{n:05d}.safetensors": group for i, group in enumerate(groups, start=1)}


class _Aborted(Exception):
    """Thrown into ``atomic_path`` so that it discards the partial output."""


def _write_headers(folder: Path, shards: dict[str, dict[str, TensorInfo]]) -> dict[str, tuple[str, int, TensorInfo]]:
    """Create every shard at its final size with its header; return name → (file, absolute offset, info)."""
    places = {}
    for file, infos in shards.items():
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for name, info in infos.items():
            header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [info.offset, info.offset + info.nbytes]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        data_start = 8 + len(raw)
        with (folder / file).open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            fh.truncate(data_start + sum(info.nbytes for info in infos.values()))
        places.update({name: (file, data_start + info.offset, info) for name, info in infos.items()})
    return places
