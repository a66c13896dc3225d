"""Benchmark of the streaming weight engine (``safetypatch.weights.stream``; docs/methods.md §5.2, issue 5 acceptance).

Role: generates a randomly initialised llama-shaped checkpoint of the requested size (``base``) and two perturbed
copies (``aligned`` = base + noise, ``target`` = aligned + noise) tensor by tensor, then measures in fresh
processes, so that each phase's peak RSS is its own:

- ``read``: reading every tensor of the three checkpoints (each tensor materialised in memory once), the floor
  any method that touches them pays; run before and after the combination, the faster run is the reference;
- ``write``: writing one checkpoint's worth of bytes into a new file (after ``combine``, so that it takes new
  page-cache pages as the combination's output did): the write side of the floor, reported, not in the ratio;
- ``combine``: a per-tensor streamed combination of base, aligned and target over the ``linear`` scope, written
  as a new checkpoint with the untouched tensors copied (default op: RESTA-like target + (aligned − base) in fp32,
  computed chunk by chunk from the stored tensors, :class:`~safetypatch.weights.elementwise.Elementwise`); any
  element-wise op plugs in through the ``op`` argument of :func:`run_benchmark`.

Both run twice: with the inputs in the page cache (they were just written: the acceptance figure) and cold, after
their pages were dropped from the page cache with ``posix_fadvise(DONTNEED)`` (no root needed; the fraction of
pages still resident is measured with ``mincore`` and recorded, so a drop that did not happen is visible). Dirty
pages are written back (``sync``) before every measured phase, so that no phase pays for an earlier one's writes.

It prints one JSON object: sizes, times, their ratios (acceptance: ≤ 2, page-cached) and the combination's peak
RSS (acceptance: < 2 GB for a checkpoint of ≥ 3 GB). The restoration methods themselves, through the real
``restoration`` runner, are measured by :mod:`bench.restore_bench` on the same checkpoints. Usage (from the repository
root)::

    python -m bench.stream_bench --size-gb 3 --out /data/stream-bench --keep --json stream.json
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.common import GB, emit, in_fresh_process, parse, parser, peak_rss_bytes
from safetypatch.weights.stream import CheckpointReader, CheckpointWriter, Elementwise, aligned, plan, select_names

Op = Callable[[str, Mapping[str, torch.Tensor]], torch.Tensor]
ROLES = {"base_model": "base", "aligned_model": "aligned", "target_model": "target"}
RSS_LIMIT_BYTES = 2 * GB
TIME_RATIO_LIMIT = 2.0
VOCAB = 32000
HIDDEN_LADDER = (2048, 1024, 512, 256, 128, 64)
NOISE = 1e-3


@dataclass(frozen=True)
class Shape:
    """A llama-shaped architecture: head_dim 64, 4 query heads per KV head, MLP 2.75 × hidden."""

    hidden: int
    layers: int
    vocab: int = VOCAB

    @property
    def intermediate(self) -> int:
        return 64 * round(2.75 * self.hidden / 64)

    @property
    def kv_dim(self) -> int:
        return 64 * max(1, self.hidden // 256)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape, in the LlamaForCausalLM state-dict naming."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i)}
        return out | {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}

    def config(self, dtype: torch.dtype) -> dict[str, Any]:
        """The transformers LlamaConfig of this shape, as a config.json dict (with ``architectures``, as a saved
        model has it: tools that pick the model class from it, such as mergekit, need it)."""
        from transformers import LlamaConfig

        heads = self.hidden // 64
        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                           num_attention_heads=heads, num_key_value_heads=self.kv_dim // 64, vocab_size=self.vocab,
                           tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."),
                           architectures=["LlamaForCausalLM"]).to_dict()


def shape_for(size_bytes: float, dtype: torch.dtype) -> Shape:
    """The largest hidden size of the ladder with ≥ 2 layers, and enough layers to reach ``size_bytes``."""
    for hidden in HIDDEN_LADDER:
        fixed = _nbytes(Shape(hidden, 0), dtype)
        per_layer = _nbytes(Shape(hidden, 1), dtype) - fixed
        layers = math.ceil((size_bytes - fixed) / per_layer)
        if layers >= 2:
            return Shape(hidden, layers)
    return Shape(HIDDEN_LADDER[-1], 2)


def _nbytes(shape: Shape, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in shape.tensors().values()) * dtype.itemsize


def _noise(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """N(0, 1) noise, reproducible per (tensor name, seed)."""
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator)


def _random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Norms are ones; matrices are N(0, 0.02²)."""
    return torch.ones(shape) if len(shape) == 1 else _noise(name, shape, 0).mul_(0.02)


def generate_base(folder: Path, shape: Shape, dtype: torch.dtype, shard_bytes: int) -> None:
    """Write the base checkpoint shard by shard (one shard in memory), with its config.json and index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, dims in shape.tensors().items():
        nbytes = math.prod(dims) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = dims
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: _random_tensor(name, dims).to(dtype) for name, dims in shard.items()},
                  str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": _nbytes(shape, dtype)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def perturb(source: Path, folder: Path, seed: int, shard_bytes: int) -> None:
    """Write ``source`` + N(0, NOISE²) on every linear-scope tensor, one tensor at a time."""
    reader = CheckpointReader(source)
    with CheckpointWriter(folder, template=source, max_shard_bytes=shard_bytes, overwrite=True) as writer:
        for name in select_names(reader, "linear"):
            weight = reader.get(name).float()
            writer.add(name, weight.add_(_noise(name, reader.shape(name), seed), alpha=NOISE))
        writer.finish()


def resta_like(name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """target + (aligned − base): three inputs, one fp32 result (a stand-in for a restoration method)."""
    return tensors["target_model"] + (tensors["aligned_model"] - tensors["base_model"])


def generate_phase(root: Path, shape: Shape, dtype_name: str, shard_bytes: int) -> dict[str, float]:
    start = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    base = root / "base"
    if base.exists():
        shutil.rmtree(base)
    generate_base(base, shape, dtype, shard_bytes)
    perturb(base, root / "aligned", seed=1, shard_bytes=shard_bytes)
    perturb(root / "aligned", root / "target", seed=2, shard_bytes=shard_bytes)
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}


def settle() -> None:
    """Write every dirty page back now, so that the next measured phase does not pay for an earlier one's writes."""
    os.sync()


def _files(folders: Sequence[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(folder.iterdir()) if f.is_file()]


def drop_page_cache(folders: Sequence[Path]) -> float | None:
    """Drop the files of ``folders`` from the page cache (``sync``, then ``posix_fadvise(DONTNEED)`` on each file:
    clean pages of one's own files go without root) and return the fraction of their pages still resident (see
    :func:`resident_fraction`; None where that cannot be measured)."""
    settle()
    for path in _files(folders):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(folders)


def resident_fraction(folders: Sequence[Path]) -> float | None:
    """Fraction of the pages of the files of ``folders`` that are in the page cache (``mincore`` on a mapping,
    which reads nothing); None off Linux or without libc."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in _files(folders):
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if address in (None, ctypes.c_void_p(-1).value):
                return None
            pages = (size + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            failed = libc.mincore(ctypes.c_void_p(address), size, vector)
            libc.munmap(ctypes.c_void_p(address), size)
            if failed:
                return None
            resident += sum(b & 1 for b in bytes(vector))
            total += pages
        finally:
            os.close(fd)
    return resident / total if total else None


def measure(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh process, after :func:`settle`."""
    settle()
    return in_fresh_process(fn, *args)


def cold_pair(folders: Sequence[Path], phase: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """The read floor and ``phase(*args)`` back to back, each in a fresh process right after the inputs
    ``folders`` were dropped from the page cache; with the resident fraction measured after each drop."""
    resident_read = drop_page_cache(folders)
    read = in_fresh_process(read_phase, folders)
    resident_run = drop_page_cache(folders)
    run = in_fresh_process(phase, *args)
    fractions = [resident_read, resident_run]
    return {"read": read, "run": run, "resident_fraction_after_drop": fractions,
            "evicted": all(f is not None and f < 0.05 for f in fractions)}


def write_phase(path: Path, nbytes: int) -> dict[str, float]:
    """Write ``nbytes`` into a new file with ``pwrite`` from one 4 MiB buffer, then remove it: what writing an
    output of that size costs by itself (the page-cache pages it needs included), the write side of the floor."""
    chunk = memoryview(b"\x01" * (4 * 2**20))
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, chunk[:min(len(chunk), nbytes - done)], done)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}


def read_phase(folders: list[Path]) -> dict[str, float]:
    start = time.perf_counter()
    for folder in folders:
        reader = CheckpointReader(folder)
        for name in reader.names():
            reader.get(name).clone()  # fault every page of the mapping in: a real read
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}


def _combine_phase(root: Path, out: Path, op: Op, shard_bytes: int) -> dict[str, Any]:
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    readers = {role: CheckpointReader(root / sub) for role, sub in ROLES.items()}
    names = select_names(readers["target_model"], "linear")
    estimate = plan(readers, names, svd=False)
    with CheckpointWriter(out, template=readers["target_model"].folder, max_shard_bytes=shard_bytes,
                          overwrite=True) as writer:
        for name, tensors in aligned(readers, names, dtype=None):
            writer.add(name, Elementwise(tensors, partial(op, name)))
        writer.finish()
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_bytes": baseline, "streamed_tensors": len(names),
            "planned_peak_bytes": estimate.peak_host_bytes}


def _spot_check(root: Path, out: Path, op: Op) -> float:
    """Max |written − op(inputs) cast to the storage dtype| on the first streamed tensor (0 when correct)."""
    readers = {role: CheckpointReader(root / sub) for role, sub in ROLES.items()}
    name = select_names(readers["target_model"], "linear")[0]
    _, tensors = next(aligned(readers, [name]))
    expected = op(name, tensors).to(readers["target_model"].dtype(name))
    return float((CheckpointReader(out).get(name).float() - expected.float()).abs().max())


def run_benchmark(size_gb: float, root: Path, *, dtype: str = "bfloat16", shard_gb: float = 1.0,
                  op: Op = resta_like) -> dict[str, Any]:
    """Generate the three checkpoints under ``root`` and measure reading them against streaming ``op`` over them.

    Args:
        size_gb: size of each checkpoint in GB (10⁹ bytes); the generated one is at least this big.
        root: working folder (``base``, ``aligned``, ``target`` and ``out`` are written into it).
        dtype: storage dtype of the checkpoints (``bfloat16`` or ``float32``).
        shard_gb: shard size of every checkpoint written.
        op: the per-tensor combination, (name, {role: fp32 tensor}) → fp32 tensor; element-wise (it is applied
            chunk by chunk) and picklable (a module-level function), since it runs in a fresh process.

    Returns:
        The measurements as a JSON-ready dict.
    """
    torch_dtype = getattr(torch, dtype)
    shape = shape_for(size_gb * GB, torch_dtype)
    shard_bytes = int(shard_gb * GB)
    generated = in_fresh_process(generate_phase, root, shape, dtype, shard_bytes)
    folders = [root / sub for sub in ROLES.values()]
    read = measure(read_phase, folders)
    combine = measure(_combine_phase, root, root / "out", op, shard_bytes)
    read_again = measure(read_phase, folders)
    read_s = min(read["seconds"], read_again["seconds"])
    checkpoint_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    write = measure(write_phase, root / "write.bin", checkpoint_bytes)
    cold = cold_pair(folders, _combine_phase, root, root / "out_cold", op, shard_bytes)
    return {
        "shape": {**asdict(shape), "intermediate": shape.intermediate, "kv_dim": shape.kv_dim, "dtype": dtype},
        "checkpoint_bytes": checkpoint_bytes,
        "tensors": len(shape.tensors()),
        "streamed_tensors": combine["streamed_tensors"],
        "generate_seconds": round(generated["seconds"], 3),
        "read_three_seconds": [round(read["seconds"], 3), round(read_again["seconds"], 3)],
        "write_one_seconds": round(write["seconds"], 3),
        "combine_seconds": round(combine["seconds"], 3),
        "time_ratio": round(combine["seconds"] / read_s, 3),
        "cold": {"read_three_seconds": round(cold["read"]["seconds"], 3),
                 "combine_seconds": round(cold["run"]["seconds"], 3),
                 "time_ratio": round(cold["run"]["seconds"] / cold["read"]["seconds"], 3),
                 "combine_peak_rss_bytes": cold["run"]["peak_rss_bytes"],
                 "resident_fraction_after_drop": cold["resident_fraction_after_drop"], "evicted": cold["evicted"]},
        "combine_peak_rss_bytes": combine["peak_rss_bytes"],
        "combine_rss_before_work_bytes": combine["rss_before_bytes"],
        "read_peak_rss_bytes": max(read["peak_rss_bytes"], read_again["peak_rss_bytes"]),
        "planned_peak_bytes": combine["planned_peak_bytes"],
        "max_abs_error_spot_check": _spot_check(root, root / "out", op),
        "acceptance": {"checkpoint_at_least_3GB": checkpoint_bytes >= 3 * GB,
                       "peak_rss_under_2GB": combine["peak_rss_bytes"] < RSS_LIMIT_BYTES,
                       "time_ratio_at_most_2": combine["seconds"] / read_s <= TIME_RATIO_LIMIT},
    }


def checkpoint_arguments(description: str) -> Any:
    """The flags of the benchmarks over generated checkpoints (this one and :mod:`bench.restore_bench`)."""
    arguments = parser(description)
    arguments.add_argument("--size-gb", type=float, default=3.0, help="size of each checkpoint in GB (default 3)")
    arguments.add_argument("--out", type=Path, default=None, help="working folder (default: a new temporary one)")
    arguments.add_argument("--keep", action="store_true", help="keep the generated checkpoints and the output")
    arguments.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="storage dtype")
    arguments.add_argument("--shard-gb", type=float, default=1.0, help="shard size in GB (default 1)")
    return arguments


def in_work_folder(args: Any, run: Callable[[Path], dict[str, Any]], outputs: tuple[str, ...]) -> dict[str, Any]:
    """``run(root)`` in ``--out`` (or a temporary folder); the checkpoints and ``outputs`` are removed afterwards
    unless ``--keep``."""
    root = args.out or Path(tempfile.mkdtemp(prefix="checkpoint-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run(root)
    finally:
        if not args.keep:
            for sub in (*ROLES.values(), *outputs):
                shutil.rmtree(root / sub, ignore_errors=True)
            if args.out is None:
                shutil.rmtree(root, ignore_errors=True)
    return {**result, "folder": str(root) if args.keep else None}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print (and with ``--json`` write) its JSON; clean up unless
    ``--keep``."""
    args = parse(checkpoint_arguments(__doc__.split("\n\n")[0]), argv)
    result = in_work_folder(args, lambda root: run_benchmark(args.size_gb, root, dtype=args.dtype,
                                                             shard_gb=args.shard_gb), ("out", "out_cold"))
    emit(result, args, argv, __spec__.name)


if __name__ == "__main__":
    main()
