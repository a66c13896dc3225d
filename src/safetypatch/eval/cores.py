"""Independent batches side by side on a CPU's cores: one Python thread per core, each torch operator on one thread.

torch spreads every operator over its intra-op threads, which pays for large matrix products but not for the
hundreds of small operators of a decoding step (each one waits for every thread). Evaluation batches are
independent of one another, so on a CPU they can instead run side by side, one per core, each operator on one
thread: the GIL is released inside every operator, and what is left of Python is a small share of a step. On 2
cores: 1.2× for SmolLM2 generation and scoring alone on the machine, and no collapse when another job takes a core
(two intra-op threads then wait on each other at every operator).

The numbers are those torch computes with one thread, whatever the core count. torch's own results can depend on
its thread count in the last bits: on the `standard` preset, the one-thread numbers equalled the two-thread ones for
all 708 generated answers and 799 of 800 multiple-choice items (one ARC-Easy score 6e-6 apart, the same choice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def cpu_workers(device: Any) -> int:
    """How many batches run side by side on ``device``: torch's intra-op thread count on a CPU, else 1."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


# What torch's intra-op threads achieve per thread on one batch: two threads run a SmolLM2 generation or scoring
# batch 1.6 times as fast as one on a 2-core CPU. Side by side pays only where the items balance better than that.
_THREAD_EFFICIENCY = 0.8


def side_by_side(costs: Sequence[float], workers: int) -> bool:
    """Whether items of these estimated costs finish sooner on ``workers`` single-thread workers, each taking the
    next item in order when it is free, than one at a time on ``workers`` intra-op threads."""
    if workers <= 1 or len(costs) <= 1:
        return False
    finish = [0.0] * workers
    for cost in costs:
        finish[finish.index(min(finish))] += cost
    return max(finish) * _THREAD_EFFICIENCY * workers < sum(costs)


def map_on_cores(fn: Callable[[T], R], items: Sequence[T], workers: int,
                 costs: Sequence[float] | None = None) -> Iterator[R]:
    """``fn`` over ``items``, results in order, ``workers`` items at a time, torch on one thread meanwhile.

    ``fn`` runs on worker threads: it enters its own ``torch.inference_mode`` (a per-thread state), and must not
    change shared state (module training flags, seeds). Sampling, which draws from the global generator, must run
    with ``workers`` 1. Items are taken in order, so a caller lists the largest first.

    Args:
        fn: the work on one item.
        items: independent items.
        workers: threads; 1 (or a single item) runs ``fn`` in the caller's thread with torch's threads unchanged.
        costs: estimated cost of each item; when given, items that would not balance over the workers (say one
            large and one small) run one at a time on torch's threads instead (:func:`side_by_side`).

    Yields:
        ``fn(item)`` for each item, in the order of ``items``.
    """
    if workers <= 1 or len(items) <= 1 or (costs is not None and not side_by_side(costs, workers)):
        for item in items:
            yield fn(item)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="safetypatch-core") as pool:
            yield from pool.map(fn, items)
    finally:
        torch.set_num_threads(threads)
