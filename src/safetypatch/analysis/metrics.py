"""Per-module metrics of one weight update ΔW against the weight W_0 it is added to (docs/methods.md §3.8).

- Mou et al.'s similarity S = V_Δ,rᵀ V_0,r (top-r right singular vectors): max |S_ij|, |S_11|, ‖S‖_F, ‖S‖_F/√r.
- Principal angles between the top-r input subspaces (the arccosines of S's singular values) and between the top-r
  output subspaces: the smallest angle and ‖sin Θ‖_F.
- Xue & Mirzasoleiman's overlap O_k = ‖U_kᵀΔW‖_F/‖ΔW‖_F, its S_k-weighted form ‖S_kU_kᵀΔW‖_F/(‖S_k‖_F‖ΔW‖_F)
  (√R of the normalised regulariser, §3.2), the row form ‖ΔW V_k‖_F/‖ΔW‖_F and the enrichment O_k²/(k/d_out).
- Magnitude and spectrum: ‖ΔW‖_F, ‖ΔW‖_F/‖W_0‖_F, stable rank, the LSSF entropy curve H_ρ/H_n and entropy rank (§3.4).
- LoX's R_align and R_ft (§3.7) when the alignment delta W_0 − W_base is known.

A :class:`Delta` carries ΔW's singular triplets: exact from a LoRA's factors (``weights.subspace.lora_svd``) or from
an SVD of a dense checkpoint delta, which is then kept for the overlaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from safetypatch.analysis.settings import SubspaceSettings
from safetypatch.weights.linalg import (
    EXACT_SVD_MAX_DIM,
    SVDMethod,
    TruncatedSVD,
    entropy_rank,
    entropy_ratios,
    top_singular,
)
from safetypatch.weights.subspace import lora_svd, principal_angles, stable_rank

CURVE_POINTS = 64
"""Leading entries of the spectrum and of the entropy curve kept per row (a full-FT ΔW has hundreds)."""
RANK_RTOL = 1e-4
"""Singular values at or below this share of σ_1 count as zero: their vectors are arbitrary directions of the null
space (and carry < 1e-8 of the energy), so they never enter r."""


@dataclass(frozen=True)
class Reference:
    """What the metrics need of W_0: its top singular triplets and its Frobenius norm.

    Attributes:
        svd: the top max(k, r) triplets of W_0.
        norm: ‖W_0‖_F.
    """

    svd: TruncatedSVD
    norm: float

    @classmethod
    def of(cls, weight: torch.Tensor, depth: int, method: SVDMethod, seed: int) -> Reference:
        """The top-``depth`` SVD and the norm of ``weight`` (fp32)."""
        return cls(top_singular(weight, depth, method, seed), float(torch.linalg.matrix_norm(weight.float())))


@dataclass(frozen=True)
class Delta:
    """One module's update ΔW as the metrics see it.

    Attributes:
        svd: ΔW's singular triplets, descending.
        frobenius: ‖ΔW‖_F (exact even when ``svd`` is truncated).
        shape: (d_out, d_in).
        complete: whether ``svd`` holds the whole spectrum (a LoRA update, or an exact SVD).
        matrix: the dense ΔW of a checkpoint delta (the overlaps read it), None for a LoRA update.
    """

    svd: TruncatedSVD
    frobenius: float
    shape: tuple[int, int]
    complete: bool
    matrix: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, scaling: float) -> Delta:
        """ΔW = s·B·A, decomposed from its factors (the product is never formed)."""
        svd = lora_svd(B, A, scaling)
        return cls(svd, float(torch.linalg.vector_norm(svd.S)), (B.shape[0], A.shape[1]), complete=True)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, depth: int, method: SVDMethod, seed: int) -> Delta:
        """A dense ΔW: its whole spectrum when the SVD runs exact, else the seeded top-``depth`` triplets (none for
        ΔW = 0, which has no directions)."""
        matrix = matrix.float()
        norm = float(torch.linalg.matrix_norm(matrix))
        exact = method == "exact" or (method == "auto" and max(matrix.shape) <= EXACT_SVD_MAX_DIM)
        depth = 0 if norm == 0.0 else min(matrix.shape) if exact else depth
        svd = top_singular(matrix, depth, "exact" if exact else "lowrank", seed)
        return cls(svd, norm, (matrix.shape[0], matrix.shape[1]), complete=exact, matrix=matrix)

    def left(self, M: torch.Tensor) -> float:
        """‖MᵀΔW‖_F for M with d_out rows."""
        if self.matrix is not None:
            return float(torch.linalg.matrix_norm(M.T @ self.matrix))
        return float(torch.linalg.matrix_norm((M.T @ self.svd.U) * self.svd.S))

    def right(self, M: torch.Tensor) -> float:
        """‖ΔW M‖_F for M with d_in rows."""
        if self.matrix is not None:
            return float(torch.linalg.matrix_norm(self.matrix @ M))
        return float(torch.linalg.matrix_norm(self.svd.S[:, None] * (self.svd.V.T @ M)))


def numerical_rank(S: torch.Tensor) -> int:
    """How many singular values exceed :data:`RANK_RTOL` · σ_1 (0 for the zero matrix)."""
    return int((RANK_RTOL * S[0] < S).sum()) if S.numel() and S[0] > 0 else 0


def depths(ref: Reference, delta: Delta, settings: SubspaceSettings) -> tuple[int, int]:
    """(r, k) clamped to what the SVDs hold: r ≤ ΔW's numerical rank and W_0's triplets, k ≤ W_0's triplets."""
    return min(settings.r, numerical_rank(delta.svd.S), ref.svd.k), min(settings.k, ref.svd.k)


def subspace_metrics(ref: Reference, delta: Delta, settings: SubspaceSettings) -> dict[str, Any]:
    """Mou's similarity, the principal angles and Xue's overlaps of a non-zero ΔW (docs/methods.md §3.8).

    Args:
        ref: W_0's triplets and norm.
        delta: ΔW (‖ΔW‖_F > 0).
        settings: r and k.

    Returns:
        ``mou_max``, ``mou_top1``, ``mou_fro``, ``mou_norm`` (r = min(configured r, ΔW's numerical rank));
        ``angles_row_deg``, ``angle_row_min_deg``,
        ``sin_theta_row`` (input side, V) and the same three for the output side (``col``, U); ``overlap``,
        ``overlap_weighted``, ``overlap_row``, ``enrichment``.
    """
    r, k = depths(ref, delta, settings)
    d_out = delta.shape[0]
    S = delta.svd.V[:, :r].T @ ref.svd.V[:, :r]
    out: dict[str, Any] = {
        "mou_max": float(S.abs().max()), "mou_top1": float(S[0, 0].abs()),
        "mou_fro": float(torch.linalg.matrix_norm(S)), "mou_norm": float(torch.linalg.matrix_norm(S)) / math.sqrt(r),
    }
    for side, ours, theirs in (("row", delta.svd.V, ref.svd.V), ("col", delta.svd.U, ref.svd.U)):
        angles = principal_angles(ours[:, :r], theirs[:, :r])
        out[f"angles_{side}_deg"] = torch.rad2deg(angles).tolist()
        out[f"angle_{side}_min_deg"] = float(torch.rad2deg(angles[0]))
        out[f"sin_theta_{side}"] = float(torch.linalg.vector_norm(torch.sin(angles)))
    U_k, S_k, V_k = ref.svd.U[:, :k], ref.svd.S[:k], ref.svd.V[:, :k]
    overlap = _share(delta.left(U_k), delta.frobenius)
    weight = float(torch.linalg.vector_norm(S_k))
    out.update(
        overlap=overlap,
        overlap_weighted=_share(delta.left(U_k * S_k), weight * delta.frobenius) if weight > 0 else 0.0,
        overlap_row=_share(delta.right(V_k), delta.frobenius),
        enrichment=overlap**2 / (k / d_out),
    )
    return out


def spectral_metrics(ref: Reference, delta: Delta, eta: float) -> dict[str, Any]:
    """Size and shape of ΔW's spectrum (docs/methods.md §3.4, §3.8).

    Args:
        ref: W_0's norm.
        delta: ΔW (‖ΔW‖_F > 0).
        eta: the entropy-rank threshold η.

    Returns:
        ``rank`` (numerical, of the computed spectrum), ``norm`` ‖ΔW‖_F, ``relative_norm`` ‖ΔW‖_F/‖W_0‖_F,
        ``stable_rank``, ``entropy_rank`` r(η), ``spectrum`` (leading σ_i) and ``entropy_curve`` (leading
        H_ρ/H_n), both over the computed spectrum, which ``spectrum_complete`` says is whole or truncated.
    """
    S = delta.svd.S
    return {
        "rank": numerical_rank(S),
        "norm": delta.frobenius,
        "relative_norm": delta.frobenius / ref.norm if ref.norm > 0 else None,
        "stable_rank": stable_rank(S, delta.frobenius),
        "entropy_rank": entropy_rank(S, eta),
        "spectrum_complete": delta.complete,
        "spectrum": S[:CURVE_POINTS].tolist(),
        "entropy_curve": entropy_ratios(S)[:CURVE_POINTS].tolist(),
    }


def lox_metrics(align: torch.Tensor, update: torch.Tensor, k: int, method: SVDMethod, seed: int) -> dict[str, Any]:
    """LoX's R_align and R_ft (docs/methods.md §3.7, §3.8), P_k from the top-k SVD of ΔW_align.

    R_align = ‖P_k ΔW_align‖_F/‖ΔW_align‖_F and R_ft = ‖P_k(ΔW_ft + ΔW_align)‖_F/‖ΔW_ft + ΔW_align‖_F, with
    ΔW_ft the analysed update (so ΔW_ft + ΔW_align = W_ft − W_base).

    Args:
        align: ΔW_align = W_aligned − W_base (here W_0 − W_base).
        update: ΔW_ft, dense.
        k: depth of P_k.
        method: SVD routine of ΔW_align.
        seed: its seed.

    Returns:
        ``r_align`` and ``r_ft`` (None when the denominator is zero).
    """
    svd = top_singular(align, k, method, seed)
    shifted = update.float() + align.float()
    return {"r_align": _ratio(float(torch.linalg.vector_norm(svd.S)), float(torch.linalg.matrix_norm(align))),
            "r_ft": _ratio(float(torch.linalg.matrix_norm(svd.U.T @ shifted)),
                           float(torch.linalg.matrix_norm(shifted)))}


def _share(part: float, whole: float) -> float:
    """part / whole for a projection's norm over the whole's (≤ 1 in exact arithmetic; fp32 rounding is clipped)."""
    return min(part / whole, 1.0)


def _ratio(part: float, whole: float) -> float | None:
    return _share(part, whole) if whole > 0 else None
