"""Weights with a known SVD and deltas built inside or outside their subspaces, for the metric invariants."""

from __future__ import annotations

import torch

from safetypatch.analysis.metrics import Delta, Reference
from safetypatch.analysis.settings import SubspaceSettings


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    """A seeded d × k matrix with orthonormal columns."""
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def known_weight(d_out: int = 48, d_in: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_0 = U diag(σ) Vᵀ of full rank with distinct σ = (min(d)…1); returns (W_0, U, V) with complete U, V."""
    n = min(d_out, d_in)
    U, V = orthonormal(d_out, n, seed), orthonormal(d_in, n, seed + 1)
    S = torch.arange(n, 0, -1, dtype=torch.float32)
    return (U * S) @ V.T, U, V


def settings(**fields) -> SubspaceSettings:
    return SubspaceSettings(**{"rank": 4, "k": 8, **fields})


def reference(weight: torch.Tensor, cfg: SubspaceSettings) -> Reference:
    return Reference.of(weight, max(cfg.r, cfg.k), "exact", 0)


def dense(matrix: torch.Tensor, cfg: SubspaceSettings) -> Delta:
    return Delta.from_matrix(matrix, max(cfg.r, cfg.k), "exact", 0)
