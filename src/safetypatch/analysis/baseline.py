"""The random-subspace baseline of every similarity (docs/methods.md §3.8): what a random ΔW of the same rank and norm
scores against the same W_0, so that each number can be read as small or large.

A draw keeps ΔW's computed spectrum and replaces its singular vectors by Haar-random orthonormal frames,
ΔW_rand = Q_L diag(S) Q_Rᵀ, and goes through the very :func:`~safetypatch.analysis.metrics.subspace_metrics` the
real ΔW went through. Draws are seeded per module (the run's seed and the tensor name), so a module's baseline does
not depend on which other modules were analysed.

Exact expectations for such an isotropic ΔW, reported as ``analytic_rms`` = √E[x²] next to the draws' ``rms``:
E[O_k²] = k/d_out, E[row overlap²] = k/d_in, E[weighted²] = 1/d_out, E[‖S‖_F²] = r²/d_in (so E[(‖S‖_F/√r)²] =
r/d_in). The enrichment O_k²/(k/d_out) has expectation 1 by construction.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from safetypatch.analysis.metrics import Delta, Reference, depths, subspace_metrics
from safetypatch.analysis.settings import SubspaceSettings
from safetypatch.weights.linalg import TruncatedSVD
from safetypatch.weights.subspace import haar_frame

BASELINE_METRICS = ("mou_max", "mou_top1", "mou_fro", "mou_norm", "angle_row_min_deg", "sin_theta_row",
                    "angle_col_min_deg", "sin_theta_col", "overlap", "overlap_weighted", "overlap_row", "enrichment")
"""The similarities that get a baseline (the scalar outputs of ``subspace_metrics``)."""


def module_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from the run's seed and a tensor name (independent of the module order)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def analytic_rms(ref: Reference, delta: Delta, settings: SubspaceSettings) -> dict[str, float]:
    """√E[x²] of the similarities with a closed form, for a ΔW with isotropic random singular vectors.

    Args:
        ref: W_0's triplets (their count clamps k and r as the metrics do).
        delta: ΔW (its shape and spectrum length clamp r).
        settings: r and k.

    Returns:
        ``overlap``, ``overlap_row``, ``overlap_weighted``, ``mou_fro``, ``mou_norm`` → √E[x²].
    """
    r, k = depths(ref, delta, settings)
    d_out, d_in = delta.shape
    return {"overlap": math.sqrt(k / d_out), "overlap_row": math.sqrt(k / d_in),
            "overlap_weighted": math.sqrt(1 / d_out), "mou_fro": r / math.sqrt(d_in), "mou_norm": math.sqrt(r / d_in)}


def random_baseline(ref: Reference, delta: Delta, settings: SubspaceSettings,
                    generator: torch.Generator) -> dict[str, dict[str, float]]:
    """The similarities of ``settings.baseline_draws`` random ΔW with ``delta``'s spectrum (docs/methods.md §3.8).

    Args:
        ref: W_0's triplets.
        delta: the real ΔW (its spectrum and shape are kept).
        settings: r, k, the number of draws and the quantile.
        generator: the seeded source (:func:`module_generator`).

    Returns:
        metric → ``mean``, ``quantile`` (at ``baseline_quantile``) and ``rms`` over the draws, plus
        ``analytic_rms`` where it is exact.
    """
    S = delta.svd.S
    d_out, d_in = delta.shape
    draws: dict[str, list[float]] = {name: [] for name in BASELINE_METRICS}
    for _ in range(settings.baseline_draws):
        U = haar_frame(d_out, S.numel(), generator).to(S.device)
        V = haar_frame(d_in, S.numel(), generator).to(S.device)
        rand = Delta(TruncatedSVD(U, S, V, "random"), float(torch.linalg.vector_norm(S)), delta.shape,
                     delta.complete)
        values = subspace_metrics(ref, rand, settings)
        for name in BASELINE_METRICS:
            draws[name].append(values[name])
    exact = analytic_rms(ref, delta, settings)
    out: dict[str, dict[str, Any]] = {}
    for name, values in draws.items():
        sample = torch.tensor(values, dtype=torch.float64)
        out[name] = {"mean": float(sample.mean()),
                     "quantile": float(torch.quantile(sample, settings.baseline_quantile)),
                     "rms": float(sample.square().mean().sqrt())}
        if name in exact:
            out[name]["analytic_rms"] = exact[name]
    return out
