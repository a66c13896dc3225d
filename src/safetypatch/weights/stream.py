"""Stream several checkpoints tensor by tensor into one (docs/methods.md §2.3, §5.2): the engine every weight method
(LSSF, RESTA, Safe LoRA, LoX, delta extraction) runs on, so that combining up to four models holds a few tensors at
a time instead of the models.

Roles of the pieces:

- :class:`~safetypatch.weights.reader.CheckpointReader` (input),
  :class:`~safetypatch.weights.writer.CheckpointWriter` (output) and
  :class:`~safetypatch.weights.elementwise.Elementwise` are re-exported here.
- :func:`select_names` picks the tensors a method touches (``linear`` or ``all_2d`` scope, §2.3).
- :func:`aligned` yields, per name, every role's tensor in fp32 (or as stored) after checking presence and shape
  across roles. Before it reads a tensor it asks the kernel to read that tensor and the next
  :data:`READ_AHEAD_BYTES` of every role, in the order it visits them
  (:meth:`~safetypatch.weights.reader.CheckpointReader.will_need`), so that from a cold page cache the disk reads
  ahead while the CPU computes instead of each page fault waiting for it.
- :class:`Elementwise` is an element-wise result the writer computes chunk by chunk from the stored inputs (no
  fp32 copy of a whole tensor; the same bytes).
- :func:`plan` sizes a run before it starts (tensors, bytes read per role, expected peak memory) for ``--dry-run``.
- :func:`compute_device` is where SVDs run (a GPU when present); results come back to the CPU for writing.

A method is then a loop::

    readers = {"aligned_model": CheckpointReader(a), "target_model": CheckpointReader(t)}
    with CheckpointWriter(out, template=t) as writer:
        for name, tensors in aligned(readers, select_names(readers["target_model"], "linear")):
            writer.add(name, tensors["target_model"] + tensors["aligned_model"])
        writer.finish({"restore.json": report})
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.weights.elementwise import Elementwise
from safetypatch.weights.reader import CheckpointReader
from safetypatch.weights.writer import CheckpointWriter

__all__ = [
    "LINEAR_PATTERNS",
    "READ_AHEAD_BYTES",
    "CheckpointReader",
    "CheckpointWriter",
    "Elementwise",
    "ParamScope",
    "StreamPlan",
    "aligned",
    "compute_device",
    "locate",
    "plan",
    "select_names",
]

ParamScope = Literal["linear", "all_2d"]
# §2.3 default scope: attention q/k/v/o and MLP gate/up/down weights of every decoder block (fused qkv_proj and
# gate_up_proj count as one matrix). Decoder blocks sit under ``model.`` in causal LMs, under
# ``model.language_model.`` (or ``language_model.model.`` in older saves) in multimodal Gemma 3; a vision tower's
# ``encoder.layers`` never matches.
_DECODER_LINEAR = (r"(?:model\.(?:language_model\.)?|language_model\.model\.)layers\.\d+\."
                   r"(?:self_attn\.(?:q|k|v|o|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj)\.weight")
LINEAR_PATTERNS: dict[str, str] = dict.fromkeys(
    ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text"), _DECODER_LINEAR)
"""``config.json`` ``model_type`` → regex (full match) of the tensor names in the ``linear`` scope."""
_TIED_HEAD = "lm_head.weight"
_LAYER = re.compile(r"\.(\d+)\.")
# The working set per streamed tensor, in multiples of its fp32 size: each role's fp32 copy plus the result and
# one temporary; an SVD adds U, Vᵀ and the LAPACK / cuSOLVER workspace (about three more).
_WORK_COPIES = 2
_SVD_COPIES = 3
READ_AHEAD_BYTES = 128 * 2**20
"""Bytes of every role beyond the tensor being yielded that :func:`aligned` asks the kernel to read ahead. They go
to the page cache, not to the process: the peak RSS does not change."""


def select_names(reader: CheckpointReader, scope: ParamScope = "linear",
                 module_map: Mapping[str, str] | None = None) -> list[str]:
    """The tensors of ``reader`` a weight method touches, in storage order (docs/methods.md §2.3).

    Args:
        reader: the checkpoint whose names are selected (normally ``target_model``).
        scope: ``linear``: the 2-D q/k/v/o/gate/up/down weights of every decoder block, matched by the regex of the
            checkpoint's ``model_type``; ``all_2d``: every tensor with ≥ 2 dimensions, embeddings and ``lm_head``
            included (LoX). Tied embeddings are processed once: ``lm_head.weight`` is dropped when the config ties
            it to the input embeddings.
        module_map: extra or replacement ``model_type`` → regex entries for the ``linear`` scope, for
            architectures not in :data:`LINEAR_PATTERNS`.

    Returns:
        The selected names.

    Raises:
        ConfigError: an unknown scope, a ``model_type`` without a pattern, an invalid regex, or a scope that
            selects nothing.
    """
    names = reader.names()
    if scope == "all_2d":
        selected = [n for n in names if len(reader.shape(n)) >= 2]
        if _ties_embeddings(reader.config):
            selected = [n for n in selected if n != _TIED_HEAD]
    elif scope == "linear":
        pattern = _linear_pattern(reader, module_map or {})
        selected = [n for n in names if pattern.fullmatch(n) and len(reader.shape(n)) == 2]
    else:
        raise ConfigError(f"unknown param_scope {scope!r}; one of 'linear', 'all_2d' (docs/methods.md §2.3).")
    if not selected:
        raise ConfigError(f"param_scope {scope!r} selects no tensor of {reader.folder} ({len(names)} tensors, e.g. "
                          f"{names[:2]}); give module_map a regex matching its projection weights.")
    return selected


def locate(name: str) -> tuple[int | None, str]:
    """(layer index, module within the layer) of a tensor name; (None, module) outside the decoder blocks.

    ``model.layers.3.mlp.up_proj.weight`` → (3, ``mlp.up_proj``); ``model.embed_tokens.weight`` →
    (None, ``model.embed_tokens``). Per-layer reports (restoration, analysis) are keyed by it.
    """
    module = name.removesuffix(".weight")
    match = _LAYER.search(module)
    if match is None:
        return None, module
    return int(match.group(1)), module[match.end():]


def _linear_pattern(reader: CheckpointReader, module_map: Mapping[str, str]) -> re.Pattern[str]:
    model_type = reader.config.get("model_type")
    table = {**LINEAR_PATTERNS, **module_map}
    if model_type not in table:
        raise ConfigError(f"{reader.folder} is a {model_type!r} model, which has no linear-scope pattern (shipped: "
                          f"{', '.join(sorted(LINEAR_PATTERNS))}). Pass module_map={{{model_type!r}: '<regex of the "
                          "q/k/v/o/gate/up/down weight names>'}}, or use param_scope 'all_2d'.")
    try:
        return re.compile(table[model_type])
    except re.error as exc:
        raise ConfigError(f"module_map[{model_type!r}] = {table[model_type]!r} is not a valid regex ({exc}).") from exc


def _ties_embeddings(config: Mapping[str, object]) -> bool:
    """Whether ``config.json`` says so explicitly (top level, or the text config of a multimodal model)."""
    text = config.get("text_config")
    sources = [config, text] if isinstance(text, Mapping) else [config]
    return any(source.get("tie_word_embeddings") is True for source in sources)


def _check_aligned(readers: Mapping[str, CheckpointReader], names: Sequence[str]) -> None:
    """Every role must hold every name with one shape (§2.3: exact names, equal shapes, else a hard error)."""
    if not readers:
        raise ConfigError("no checkpoints to stream; pass at least one role → CheckpointReader.")
    for name in names:
        absent = [role for role, reader in readers.items() if name not in reader]
        if absent:
            present = [f"{role} ({reader.folder})" for role, reader in readers.items() if name in reader]
            raise ModelMismatchError(
                f"tensor {name}: missing from {', '.join(f'{r} ({readers[r].folder})' for r in absent)} but present "
                f"in {', '.join(present) or 'no role'}. Tensors are matched by exact name; the checkpoints must be "
                "the same architecture (a base model and its fine-tunes).")
        shapes = {role: reader.shape(name) for role, reader in readers.items()}
        if len(set(shapes.values())) > 1:
            seen = ", ".join(f"{role} has {shape}" for role, shape in shapes.items())
            raise ModelMismatchError(
                f"tensor {name}: {seen}. The checkpoints must be the same model size; a resized vocabulary breaks "
                "param_scope 'all_2d' (use 'linear').")


def aligned(readers: Mapping[str, CheckpointReader], names: Sequence[str], *,
            dtype: torch.dtype | None = torch.float32,
            read_ahead: int | None = READ_AHEAD_BYTES) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield each name with every role's tensor as fp32 CPU, one name at a time (docs/methods.md §2.3, §5.2).

    All names are checked in every role before the first tensor is read, so a mismatch fails before any work.
    Before each name is read, its bytes and the next ``read_ahead`` bytes of the following names are advised to
    the kernel in every role (:class:`_ReadAhead`); the values are the same with or without.

    Args:
        readers: role (``base_model``, ``aligned_model``, ``unsafe_model``, ``target_model``) → its reader.
        names: the tensors to stream, e.g. from :func:`select_names`.
        dtype: what every tensor is converted to; None keeps the storage dtype and the memory-mapped tensor
            itself (no copy), for element-wise methods that upcast chunk by chunk
            (:class:`~safetypatch.weights.elementwise.Elementwise`).
        read_ahead: bytes per role to have read ahead beyond the yielded tensor; None asks nothing.

    Yields:
        (name, {role: tensor}).

    Raises:
        ConfigError: ``readers`` is empty.
        ModelMismatchError: a name is missing from a role, or the roles disagree on its shape; the message names
            the tensor, the roles and their shapes.
    """
    _check_aligned(readers, names)
    ahead = None if read_ahead is None else _ReadAhead(readers.values(), names, read_ahead)
    for i, name in enumerate(names):
        if ahead is not None:
            ahead.advise(i)
        if dtype is None:
            yield name, {role: reader.get(name) for role, reader in readers.items()}
        else:
            yield name, {role: reader.get(name).to(dtype) for role, reader in readers.items()}


class _ReadAhead:
    """Per reader, the bytes of ``names`` in visiting order as one sequence, advised to the kernel up to a moving
    mark: :meth:`advise` before name ``i`` is read moves the mark to ``window`` bytes past its end (a name straddling
    the mark is advised in part, the rest later), so each byte is advised once and at most the current tensor plus
    ``window`` bytes per reader are asked for ahead of the reads."""

    def __init__(self, readers: Iterable[CheckpointReader], names: Sequence[str], window: int) -> None:
        self._names = names
        self._window = max(window, 0)
        self._readers = list(readers)
        self._ends = [list(itertools.accumulate(reader.nbytes(name) for name in names)) for reader in self._readers]
        self._next = [0] * len(self._readers)  # per reader: the first name not advised whole
        self._mark = [0] * len(self._readers)  # per reader: bytes advised so far, in visiting order

    def advise(self, i: int) -> None:
        """Have name ``i`` and the next ``window`` bytes after it advised in every reader."""
        for k, reader in enumerate(self._readers):
            ends, j, mark = self._ends[k], self._next[k], self._mark[k]
            target = ends[i] + self._window
            while j < len(ends) and mark < target:
                begin = ends[j - 1] if j else 0
                stop = min(ends[j], target)
                reader.will_need(self._names[j], mark - begin, stop - mark)
                mark = stop
                if mark == ends[j]:
                    j += 1
            self._next[k], self._mark[k] = j, mark


def compute_device() -> torch.device:
    """Where SVDs and projections run: the first CUDA GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class StreamPlan:
    """What a streamed run will read and how much memory it needs (docs/methods.md §5.2, ``--dry-run``).

    Attributes:
        n_tensors: tensors streamed.
        bytes_read: role → bytes read from its checkpoint.
        largest: name of the largest streamed tensor (by element count).
        largest_shape: its shape.
        svd: whether each tensor gets an SVD.
        device: where SVDs run (:func:`compute_device`).
        peak_host_bytes: expected peak CPU memory beyond the Python process itself.
        peak_device_bytes: expected peak GPU memory (0 without a GPU or without SVDs).
    """

    n_tensors: int
    bytes_read: dict[str, int]
    largest: str
    largest_shape: tuple[int, ...]
    svd: bool
    device: str
    peak_host_bytes: int
    peak_device_bytes: int = 0

    def describe(self) -> str:
        """A few human-readable lines for ``--dry-run``."""
        reads = ", ".join(f"{role} {_gib(n)}" for role, n in self.bytes_read.items())
        lines = [
            f"tensors streamed: {self.n_tensors} ({'with' if self.svd else 'no'} SVD, compute on {self.device})",
            f"read per role: {reads} (total {_gib(sum(self.bytes_read.values()))})",
            f"largest tensor: {self.largest} {list(self.largest_shape)}",
            f"expected peak memory: {_gib(self.peak_host_bytes)} RAM"
            + (f", {_gib(self.peak_device_bytes)} GPU" if self.peak_device_bytes else ""),
            "untouched tensors are copied from the template one at a time; the writer buffers no shard",
        ]
        return "\n".join(lines)


def plan(readers: Mapping[str, CheckpointReader], names: Sequence[str], *, svd: bool) -> StreamPlan:
    """Size a streamed run without reading any tensor data (docs/methods.md §5.2).

    The peak is set by the largest tensor: every role's stored copy plus its fp32 copy, the fp32 result and one
    temporary; with ``svd``, U, Vᵀ and the solver's workspace on :func:`compute_device` (GPU memory when there is
    one, else RAM). The writer writes each tensor in place and holds no shard; the tensors it copies unchanged
    (from a template among ``readers``) are held one at a time at their stored size, which bounds the peak too.

    Args:
        readers: role → reader, as for :func:`aligned`.
        names: the tensors to stream.
        svd: whether the method takes an SVD of each tensor.

    Returns:
        A :class:`StreamPlan`.

    Raises:
        ConfigError: ``readers`` or ``names`` is empty.
        ModelMismatchError: as :func:`aligned`.
    """
    if not names:
        raise ConfigError("nothing to stream: the list of tensor names is empty.")
    _check_aligned(readers, names)
    first = next(iter(readers.values()))
    largest = max(names, key=lambda n: math.prod(first.shape(n)))
    numel = math.prod(first.shape(largest))
    stored = sum(reader.dtype(largest).itemsize for reader in readers.values()) * numel
    working = (len(readers) + _WORK_COPIES) * numel * 4
    solver = _SVD_COPIES * numel * 4 if svd else 0
    device = compute_device()
    on_gpu = device.type == "cuda"
    return StreamPlan(
        n_tensors=len(names),
        bytes_read={role: sum(reader.nbytes(n) for n in names) for role, reader in readers.items()},
        largest=largest,
        largest_shape=first.shape(largest),
        svd=svd,
        device=str(device),
        peak_host_bytes=max(stored + working + (0 if on_gpu else solver), _largest_copied(readers, names)),
        peak_device_bytes=(numel * 4 + solver) if on_gpu and svd else 0,
    )


def _largest_copied(readers: Mapping[str, CheckpointReader], names: Sequence[str]) -> int:
    """The stored size of the largest tensor outside ``names``, which the writer copies unchanged."""
    streamed = set(names)
    return max((r.nbytes(n) for r in readers.values() for n in r.names() if n not in streamed), default=0)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
