"""Element-wise tensor arithmetic computed chunk by chunk, while the result is written (docs/methods.md §2.3, §5.2).

Role in the streaming engine (``weights.stream``): an element-wise method (RESTA, DARE, the RESTA-like sum of
``bench.stream_bench``) does not need its inputs upcast to fp32 whole. An :class:`Elementwise` holds the input
tensors as stored (bf16, memory-mapped) and a function of fp32 chunks; the
:class:`~safetypatch.weights.writer.CheckpointWriter` pulls the result from :meth:`Elementwise.chunks` a few Mi
elements at a time, so the upcast, the arithmetic, the report sums, the cast to the storage dtype and the finite
check of one chunk all run while it sits in the CPU cache, and no tensor-sized fp32 temporary is allocated.

Chunking changes no value: every chunk is computed by the same fp32 element-wise operations as the whole tensor
would be. Reductions a method accumulates over chunks (norms for its report) are summed in another order, so they
may differ from a whole-tensor reduction in the last digits (about 1e-7 relative).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping

import torch

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk: 4 MiB per fp32 buffer, so a few inputs and the cast output fit in an L2/L3 cache."""

ChunkFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""role → that role's fp32 chunk (flat; a buffer the function may overwrite) → the fp32 result chunk (flat, of
the same length; it may be one of the input buffers)."""


class _Pool(threading.local):
    """Chunk-sized buffers kept between tensors, per thread: a new 4 MiB buffer per role and tensor pays its page
    faults again each time (the allocator hands blocks this big back to the kernel), about a fifth of a RESTA run.
    At most :data:`_POOL_CAP` buffers per dtype are kept (a few tens of MiB)."""

    def __init__(self) -> None:
        self.free: dict[torch.dtype, list[torch.Tensor]] = {}


_POOL = _Pool()
_POOL_CAP = 8


def borrow(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat buffer of ``n`` elements (uninitialised) from this thread's pool; :func:`give_back` returns it."""
    free = _POOL.free.setdefault(dtype, [])
    for i in range(len(free) - 1, -1, -1):  # the last returned first: the likeliest to be in cache
        if free[i].numel() >= n:
            return free.pop(i)[:n]
    return torch.empty(max(n, CHUNK_ELEMENTS), dtype=dtype)[:n]


def give_back(*buffers: torch.Tensor) -> None:
    """Return buffers from :func:`borrow` to the pool (whole; the caller must not use them any more)."""
    for buffer in buffers:
        whole = torch.empty(0, dtype=buffer.dtype).set_(buffer.untyped_storage())
        free = _POOL.free.setdefault(buffer.dtype, [])
        if len(free) < _POOL_CAP and CHUNK_ELEMENTS <= whole.numel() <= 4 * CHUNK_ELEMENTS:
            free.append(whole)


def chunk_ranges(numel: int, chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) element ranges covering ``range(numel)``, each at most ``chunk`` (default
    :data:`CHUNK_ELEMENTS`) long."""
    chunk = chunk or CHUNK_ELEMENTS
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


class Elementwise:
    """A tensor defined element-wise from same-shaped inputs, computed chunk by chunk when it is consumed.

    It is consumed once: ``fn`` may accumulate figures for a report (norms, counts) while it runs, and ``on_done``
    is called after the last chunk, so a report built from them is complete once the tensor has been written.

    Args:
        inputs: role → tensor, all of one shape, any dtype and device (they are read chunk by chunk, on the CPU).
        fn: the per-chunk computation, see :data:`ChunkFn`; it sees the chunks in order.
        on_done: called once after the last chunk.
        chunk_elements: elements per chunk (default :data:`CHUNK_ELEMENTS`).

    Raises:
        ValueError: the inputs are empty or differ in shape, or ``chunk_elements`` is not positive.
    """

    def __init__(self, inputs: Mapping[str, torch.Tensor], fn: ChunkFn, *, on_done: Callable[[], None] | None = None,
                 chunk_elements: int | None = None) -> None:
        shapes = {tuple(t.shape) for t in inputs.values()}
        if len(shapes) != 1:
            raise ValueError(f"Elementwise needs inputs of one shape, got {sorted(shapes) or 'none'}.")
        chunk_elements = chunk_elements or CHUNK_ELEMENTS
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}.")
        self.shape: tuple[int, ...] = shapes.pop()
        self.numel = math.prod(self.shape)
        self._flat = {role: t.detach().reshape(-1) for role, t in inputs.items()}
        self._fn = fn
        self._on_done = on_done
        self._chunk = chunk_elements
        self._consumed = False

    def __repr__(self) -> str:
        return f"Elementwise(shape={self.shape}, roles={sorted(self._flat)})"

    def chunks(self, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
        """The result as consecutive flat CPU chunks cast to ``dtype``.

        Each chunk is a view of a buffer reused for the next one (and, once this is exhausted, by the next
        Elementwise): use (write, copy) it before asking for the next.

        Raises:
            RuntimeError: the tensor was already consumed.
        """
        if self._consumed:
            raise RuntimeError(f"{self!r} was already consumed; each Elementwise is computed once.")
        self._consumed = True
        size = min(self._chunk, self.numel)
        buffers = {role: borrow(size) for role in self._flat}
        out = None if dtype == torch.float32 else borrow(size, dtype)
        try:
            for start, stop in chunk_ranges(self.numel, self._chunk):
                n = stop - start
                views = {role: buffers[role][:n] for role in self._flat}
                for role, flat in self._flat.items():
                    views[role].copy_(flat[start:stop])  # the upcast (or a copy), into a cache-resident buffer
                result = self._fn(views)
                if out is None:
                    yield result
                else:
                    yield out[:n].copy_(result)
        finally:
            give_back(*buffers.values(), *([] if out is None else [out]))
        if self._on_done is not None:
            self._on_done()

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole result as one tensor of ``dtype`` and the input shape (for callers that need one)."""
        whole = torch.empty(self.numel, dtype=dtype)
        start = 0
        for chunk in self.chunks(dtype):
            whole[start:start + chunk.numel()].copy_(chunk)
            start += chunk.numel()
        return whole.reshape(self.shape)


def chunk_sum_of_squares(chunk: torch.Tensor, scratch: torch.Tensor | None = None) -> float:
    """Σ x² of one flat fp32 chunk (of :func:`chunk_ranges`), the squares summed by torch's cascade sum:
    about 1e-7 relative, where ``torch.linalg.vector_norm`` of a few Mi fp32 elements on a CPU is off by up to
    1e-4. ``scratch``: a buffer of at least the chunk's length for the squares."""
    squares = torch.mul(chunk, chunk) if scratch is None else torch.mul(chunk, chunk, out=scratch[:chunk.numel()])
    return float(squares.sum())


def sum_of_squares(tensor: torch.Tensor) -> float:
    """Σ x² of a tensor (upcast to fp32), summed chunk by chunk as :class:`Elementwise` methods do with
    :func:`chunk_sum_of_squares`, so a whole tensor and its chunks give the same value bit for bit."""
    flat = tensor.reshape(-1)
    return sum(chunk_sum_of_squares(flat[start:stop].float()) for start, stop in chunk_ranges(flat.numel()))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or Inf, in one pass without a tensor-sized temporary.

    Any NaN or Inf makes the sum NaN or Inf (IEEE arithmetic, in any summation order); a non-finite sum of finite
    values (an overflow of the sum alone) falls back to the exact element test.
    """
    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def any_difference(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``bool((a.float() - b.float()).any())`` (same shape), chunk by chunk, stopping at the first non-zero
    difference, which in the checkpoints of two different models is within the first few thousand elements."""
    a, b = a.reshape(-1), b.reshape(-1)
    start, size = 0, min(4096, CHUNK_ELEMENTS)
    while start < a.numel():
        stop = min(start + size, a.numel())
        if bool((a[start:stop].float() - b[start:stop].float()).any()):
            return True
        start, size = stop, CHUNK_ELEMENTS
    return False
