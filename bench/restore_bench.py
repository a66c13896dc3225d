"""Benchmark of a restoration method through the real ``restoration`` runner against loading every model whole
(docs/methods.md §5.2; issue 7 acceptance).

On the randomly initialised llama-shaped checkpoints of :mod:`bench.stream_bench` (``base``; ``aligned`` = base +
noise; ``target`` = aligned + noise; size set by ``--size-gb``), RESTA (§3.5, defaults) repairs ``target`` with
δ_safe = aligned − base (``base`` plays the unsafe model). Measured, each in a fresh process so that each peak RSS
is its own:

- ``read``: reading every tensor of the three checkpoints from the page cache, the floor (the faster of a run
  before and one after the others);
- ``streamed``: :func:`safetypatch.restoration.runner.run_restore`, the code ``safetypatch restore`` runs: streamed
  tensor by tensor, written as a checkpoint with its report and provenance;
- ``write``: writing one checkpoint's worth of bytes into a new file (the write side of the floor; reported next
  to the ratios, not in them);
- ``in_memory``: what reference implementations do: the three models loaded whole with ``from_pretrained``, the
  same per-tensor math (the method's own ``restore_tensor``) applied in place, ``save_pretrained``.

Then ``read`` and ``streamed`` once more back to back, each right after the three checkpoints were dropped from the
page cache (``posix_fadvise(DONTNEED)``; the resident fraction left is measured and recorded, and ``evicted`` says
whether the drop worked): the cold floor and the cold run. Dirty pages are written back before every phase.

Acceptance for the streamed run (on ≥ 3 GB checkpoints): peak RSS < 2 GB and time ≤ 2 × the page-cached read time;
the cold ratio is reported next to it, not in place of it. The two outputs are compared on every tensor (they must
be equal). Usage (from the repository root)::

    python -m bench.restore_bench --size-gb 3 --out /data/restore-bench --json restore.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import GB, emit, in_fresh_process, parse, peak_rss_bytes
from bench.stream_bench import (
    RSS_LIMIT_BYTES,
    TIME_RATIO_LIMIT,
    checkpoint_arguments,
    cold_pair,
    generate_phase,
    in_work_folder,
    measure,
    read_phase,
    shape_for,
    write_phase,
)

# The synthetic checkpoints in the method's roles: δ_safe = aligned − base.
RESTA_ROLES = {"aligned_model": "aligned", "unsafe_model": "base", "target_model": "target"}
METHOD = "resta"


def streamed_phase(root: Path, out: Path) -> dict[str, Any]:
    """RESTA through the real runner (readers per role → per-tensor math → writer), in this process."""
    from safetypatch.restoration import METHODS
    from safetypatch.restoration.runner import run_restore

    start = time.perf_counter()
    run = run_restore(METHODS.get(METHOD)(), {role: root / sub for role, sub in RESTA_ROLES.items()}, out,
                      overwrite=True)
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
            "tensors_changed": run.report.summary()["changed"], "planned_peak_bytes": run.plan.peak_host_bytes}


def in_memory_phase(root: Path, out: Path) -> dict[str, Any]:
    """The three models loaded whole, the method applied to each linear weight in place, ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    from safetypatch.restoration import METHODS, RestoreContext
    from safetypatch.weights.stream import CheckpointReader, select_names

    start = time.perf_counter()
    method = METHODS.get(METHOD)()
    models = {role: AutoModelForCausalLM.from_pretrained(root / sub, dtype="auto")
              for role, sub in RESTA_ROLES.items()}
    params = {role: dict(model.named_parameters()) for role, model in models.items()}
    changed = 0
    with torch.no_grad():
        for name in select_names(CheckpointReader(root / RESTA_ROLES["target_model"]), method.scope):
            tensors = {role: params[role][name].float() for role in RESTA_ROLES}
            result = method.restore_tensor(name, tensors, RestoreContext())
            if result.tensor is not None:
                params["target_model"][name].copy_(result.tensor)
                changed += 1
    models["target_model"].save_pretrained(out)
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(), "tensors_changed": changed}


def _max_difference(first: Path, second: Path) -> float:
    """Max |a − b| over every tensor of the two outputs (0 when both ways agree)."""
    from safetypatch.weights.stream import CheckpointReader

    a, b = CheckpointReader(first), CheckpointReader(second)
    return max((float((a.get(name).float() - b.get(name).float()).abs().max()) for name in a.names()), default=0.0)


def run_benchmark(size_gb: float, root: Path, *, dtype: str = "bfloat16", shard_gb: float = 1.0) -> dict[str, Any]:
    """Generate the checkpoints under ``root`` and measure reading them, the streamed run and the in-memory run.

    Args:
        size_gb: size of each checkpoint in GB (10⁹ bytes).
        root: working folder (``base``, ``aligned``, ``target``, ``streamed``, ``in_memory``).
        dtype: storage dtype (``bfloat16`` or ``float32``).
        shard_gb: shard size of every checkpoint written.

    Returns:
        The measurements as a JSON-ready dict.
    """
    import torch

    shape = shape_for(size_gb * GB, getattr(torch, dtype))
    generated = in_fresh_process(generate_phase, root, shape, dtype, int(shard_gb * GB))
    folders = [root / sub for sub in ("base", "aligned", "target")]
    read = measure(read_phase, folders)
    streamed = measure(streamed_phase, root, root / "streamed")
    in_memory = measure(in_memory_phase, root, root / "in_memory")
    read_again = measure(read_phase, folders)
    read_s = min(read["seconds"], read_again["seconds"])
    checkpoint_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    write = measure(write_phase, root / "write.bin", checkpoint_bytes)
    cold = cold_pair(folders, streamed_phase, root, root / "streamed_cold")
    return {
        "method": METHOD, "roles": RESTA_ROLES, "checkpoint_bytes": checkpoint_bytes,
        "shape": {"hidden": shape.hidden, "layers": shape.layers, "vocab": shape.vocab, "dtype": dtype},
        "generate_seconds": round(generated["seconds"], 3),
        "read_three_seconds": [round(read["seconds"], 3), round(read_again["seconds"], 3)],
        "write_one_seconds": round(write["seconds"], 3),
        "streamed": {**streamed, "seconds": round(streamed["seconds"], 3)},
        "in_memory": {**in_memory, "seconds": round(in_memory["seconds"], 3)},
        "cold": {"read_three_seconds": round(cold["read"]["seconds"], 3),
                 "streamed": {**cold["run"], "seconds": round(cold["run"]["seconds"], 3)},
                 "resident_fraction_after_drop": cold["resident_fraction_after_drop"], "evicted": cold["evicted"]},
        "ratios": {"streamed_over_read_time": round(streamed["seconds"] / read_s, 3),
                   "cold_streamed_over_cold_read_time": round(cold["run"]["seconds"] / cold["read"]["seconds"], 3),
                   "streamed_over_in_memory_time": round(streamed["seconds"] / in_memory["seconds"], 3),
                   "streamed_over_in_memory_peak_rss": round(streamed["peak_rss_bytes"]
                                                             / in_memory["peak_rss_bytes"], 3)},
        "max_abs_difference_streamed_vs_in_memory": _max_difference(root / "streamed", root / "in_memory"),
        "acceptance": {"checkpoint_at_least_3GB": checkpoint_bytes >= 3 * GB,
                       "streamed_peak_rss_under_2GB": streamed["peak_rss_bytes"] < RSS_LIMIT_BYTES,
                       "streamed_time_at_most_2x_read": streamed["seconds"] / read_s <= TIME_RATIO_LIMIT},
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print (and with ``--json`` write) its JSON."""
    args = parse(checkpoint_arguments(__doc__.split("\n\n")[0]), argv)
    result = in_work_folder(args, lambda root: run_benchmark(args.size_gb, root, dtype=args.dtype,
                                                             shard_gb=args.shard_gb),
                            ("streamed", "in_memory", "streamed_cold"))
    emit(result, args, argv, __spec__.name)


if __name__ == "__main__":
    main()
