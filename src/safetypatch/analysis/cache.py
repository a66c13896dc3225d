"""A disk cache of W_0's top singular triplets, keyed by the model's fingerprint, so that analysing several patches
or deltas of one model decomposes each of its weights once (docs/methods.md §3.8).

Layout: ``$SAFETYPATCH_HOME/analysis/svd/<fingerprint>-<depth>-<method>-<seed>/<tensor name>.safetensors`` with U, S,
V and ‖W_0‖_F. One file per tensor, each written atomically when it is computed and read lazily, so memory follows
one module and an interrupted run keeps what it finished. Two processes filling one entry write identical files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from safetypatch.analysis.metrics import Reference
from safetypatch.errors import ModelError
from safetypatch.utils.io import atomic_path
from safetypatch.utils.paths import home
from safetypatch.weights.linalg import SVDMethod, TruncatedSVD

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_folder(fingerprint: str, depth: int, method: SVDMethod, seed: int, root: Path | None = None) -> Path:
    """The cache entry of one model's top-``depth`` SVDs (under ``$SAFETYPATCH_HOME`` unless ``root`` is given)."""
    base = (root or home()) / "analysis" / "svd"
    return base / f"v{CACHE_VERSION}-{fingerprint[:32]}-k{depth}-{method}-seed{seed}"


class ReferenceCache:
    """Top-``depth`` SVDs of one model's weights, computed on first use and kept on disk.

    Args:
        folder: the entry (:func:`cache_folder`), or None to keep nothing (every reference is computed).
        depth: how many triplets each reference holds.
        method: the SVD routine.
        seed: its seed.
    """

    def __init__(self, folder: Path | None, depth: int, method: SVDMethod, seed: int) -> None:
        self.folder, self.depth, self.method, self.seed = folder, depth, method, seed
        self.hits = self.misses = 0

    def get(self, name: str, weight: torch.Tensor) -> Reference:
        """The reference of tensor ``name`` (whose value is ``weight``): read from the entry, else computed and stored.

        Raises:
            ModelError: a cached file is unreadable or does not fit ``weight``'s shape (the message says to delete
                the entry).
        """
        path = None if self.folder is None else self.folder / f"{name}.safetensors"
        if path is not None and path.is_file():
            self.hits += 1
            return self._read(path, weight)
        self.misses += 1
        ref = Reference.of(weight, self.depth, self.method, self.seed)
        if path is not None:
            self._write(path, ref)
        return ref

    def _read(self, path: Path, weight: torch.Tensor) -> Reference:
        from safetensors.torch import load_file

        try:
            tensors = {key: t.to(weight.device) for key, t in load_file(str(path)).items()}
            ref = Reference(TruncatedSVD(tensors["U"], tensors["S"], tensors["V"], "cached"), float(tensors["norm"]))
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise ModelError(f"{path}: cached SVD unreadable ({exc}); delete {self.folder} and run again.") from exc
        shape = (ref.svd.U.shape[0], ref.svd.V.shape[0])
        if shape != tuple(weight.shape):
            raise ModelError(f"{path}: cached SVD is of a {shape} weight, but the tensor is {tuple(weight.shape)}; "
                             f"the cache entry is stale. Delete {self.folder} and run again.")
        return ref

    def _write(self, path: Path, ref: Reference) -> None:
        from safetensors.torch import save_file

        svd = ref.svd
        tensors = {"U": svd.U, "S": svd.S, "V": svd.V, "norm": torch.tensor(ref.norm)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True) as tmp:
            save_file({key: t.detach().cpu().contiguous() for key, t in tensors.items()}, str(tmp),
                      metadata={"method": svd.method, "version": str(CACHE_VERSION)})
