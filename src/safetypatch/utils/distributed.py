"""Process helpers for runs started by ``accelerate launch`` (or torchrun): which process this is, the main process
first, a value required equal on every process, and work split across processes and gathered back in order.

Thin wrappers over accelerate's ``PartialState`` (imported when first used). A plain ``python`` run is one
process, and every helper then does the work directly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from safetypatch.errors import DataError

T = TypeVar("T")
R = TypeVar("R")


# transformers' ddp_timeout default. The process group is set up here, before Trainer would, and the other processes
# may wait that long at a barrier while the first fills the caches (a download, a model conversion).
PROCESS_GROUP_TIMEOUT = timedelta(seconds=1800)


@functools.cache
def process_state() -> Any:
    """accelerate's ``PartialState``: initialises the process group under a launcher (once per process)."""
    from accelerate import PartialState

    return PartialState(timeout=PROCESS_GROUP_TIMEOUT)


def is_main_process() -> bool:
    """Whether this process writes outputs (always true outside a launcher)."""
    return bool(process_state().is_main_process)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (cache fills, downloads, conversions)."""
    with process_state().main_process_first():
        yield


def require_same_everywhere(value: str, what: str) -> None:
    """Raise unless every process holds the same ``value`` (a digest of what it is about to train on).

    Args:
        value: this process's value.
        what: what the value describes, for the error.

    Raises:
        DataError: naming the processes whose value differs from the main process's.
    """
    state = process_state()
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    values = gather_object([value])
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        raise DataError(f"{what} differ between processes: process(es) {differing} hold {values[differing[0]]!r}, "
                        f"the main process {values[0]!r}. Every process must build the same data; run from one "
                        "checkout with one cache folder (SAFETYPATCH_HOME) on every node.")


def map_in_order(chunks: Sequence[Sequence[T]], work: Callable[[list[T]], list[R]]) -> list[R]:
    """``work`` over the concatenated ``chunks``, with whole chunks spread over the processes.

    Each process runs ``work`` once on its contiguous share of the chunks (flattened); the results are gathered
    in chunk order, so every process returns what one process running ``work`` chunk by chunk would. ``work`` must
    return one result per item.

    Args:
        chunks: units of work that must not be split (e.g. generation batches).
        work: items → one result per item.

    Returns:
        The results of every item of every chunk, in order, on every process.
    """
    state = process_state()
    if state.num_processes == 1:
        return work([item for chunk in chunks for item in chunk])
    from accelerate.utils import gather_object

    with state.split_between_processes(list(chunks)) as mine:
        local = work([item for chunk in mine for item in chunk])
    return gather_object(local)
