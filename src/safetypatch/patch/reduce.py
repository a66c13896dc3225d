"""Merge-time overlap reduction: shrink a patch's component in the top-k singular subspace of a reference weight
(docs/methods.md §3.3 — a **safetypatch design** (`ours`); Xue & Mirzasoleiman report an intervention of this kind but
neither their paper nor their code confirms the mechanism, so this must not be reported as theirs).

column: ΔW' = ΔW − (1 − λ) U_kU_kᵀ ΔW      → B' = B − (1 − λ) U_k (U_kᵀ B)
row:    ΔW' = ΔW − (1 − λ) ΔW V_kV_kᵀ      → A' = A − (1 − λ) (A V_k) V_kᵀ
both:   ΔW' = (I − (1 − λ)U_kU_kᵀ) ΔW (I − (1 − λ)V_kV_kᵀ) → both replacements.

The result is an adapter of the same rank and scaling; each module's low-rank form is checked against the dense
fp32 operator on the product ΔW before the patch is returned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from safetypatch.config import StrictConfig
from safetypatch.errors import PatchError
from safetypatch.patch.factors import LoraFactors, Patch, module_weight
from safetypatch.weights.linalg import TruncatedSVD, project_columns, project_rows, top_singular

logger = logging.getLogger(__name__)

SELF_TEST_RTOL = 1e-4


class OverlapReduction(StrictConfig):
    """Settings of the §3.3 reduction (all defaults ``ours``)."""

    side: Literal["column", "row", "both"] = Field(
        "column", description="Output side (U_k), input side (V_k), or both.")
    k: int = Field(64, ge=0, description="Top-k singular subspace of the reference weight; 0 = no reduction.")
    retention: float = Field(
        0.0, ge=0, le=1, description="λ: share of the in-subspace component kept; 1 = nothing removed.")
    svd_method: Literal["auto", "exact", "lowrank"] = Field("auto", description="SVD of the reference (§3.2 step 1).")
    seed: int = Field(0, description="Seed of the randomised SVD.")

    @property
    def is_identity(self) -> bool:
        return self.k == 0 or self.retention == 1.0


@dataclass(frozen=True)
class ModuleReduction:
    """What the reduction did to one module (fp32, on the product ΔW).

    Attributes:
        module: module name.
        retained_energy: ‖ΔW'‖_F / ‖ΔW‖_F.
        overlap_before: Xue overlap O_k = ‖U_kᵀΔW‖_F / ‖ΔW‖_F before (docs/methods.md §3.8).
        overlap_after: ‖U_kᵀΔW'‖_F / ‖ΔW'‖_F (0 when ΔW' = 0).
        row_overlap_before: ‖ΔW V_k‖_F / ‖ΔW‖_F before.
        row_overlap_after: ‖ΔW' V_k‖_F / ‖ΔW'‖_F.
        self_test_error: ‖s B'A' − ΔW'_dense‖_F / ‖ΔW‖_F.
    """

    module: str
    retained_energy: float
    overlap_before: float
    overlap_after: float
    row_overlap_before: float
    row_overlap_after: float
    self_test_error: float


@dataclass(frozen=True)
class ReducedPatch:
    """A reduced patch and its per-module report (empty for an identity setting, whose patch is the input)."""

    patch: Patch
    config: OverlapReduction
    modules: tuple[ModuleReduction, ...] = ()


def reduce_factors(B: torch.Tensor, A: torch.Tensor, svd: TruncatedSVD, side: str,
                   retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact low-rank form of the §3.3 operator on one module's factors (no d × d matrix is formed).

    Args:
        B: d_out × r.
        A: r × d_in.
        svd: top-k SVD of the reference weight (U_k on the output side, V_k on the input side).
        side: ``column``, ``row`` or ``both``.
        retention: λ.

    Returns:
        (B', A') in fp32; the scaling s is unchanged.
    """
    strength = 1.0 - retention
    B_new = project_columns(B, svd.U, strength) if side in ("column", "both") else B.float()
    A_new = project_rows(A, svd.V, strength) if side in ("row", "both") else A.float()
    return B_new, A_new


def dense_reduction(delta: torch.Tensor, svd: TruncatedSVD, side: str, retention: float) -> torch.Tensor:
    """The §3.3 operator applied to a dense ΔW (the fp32 reference the low-rank form is checked against)."""
    strength = 1.0 - retention
    out = delta.float()
    if side in ("column", "both"):
        out = out - strength * svd.U @ (svd.U.T @ out)
    if side in ("row", "both"):
        out = out - strength * (out @ svd.V) @ svd.V.T
    return out


def reduce_overlap(patch: Patch, reference: Any, config: OverlapReduction) -> ReducedPatch:
    """Reduce every module of ``patch`` against the top-k subspace of ``reference``'s weights (docs/methods.md §3.3).

    Args:
        patch: the patch.
        reference: the model whose weights define U_k / V_k (§3.3 ``reference: target`` = the model the patch is
            merged into, the default; or the patch base for ``reference: patch_base``).
        config: side, k, λ, SVD method and seed.

    Returns:
        A :class:`ReducedPatch`; for k = 0 or λ = 1 the input patch itself (bitwise identity) and no report.

    Raises:
        PatchError: the low-rank result disagrees with the dense operator (self-test).
        ModelMismatchError: ``reference`` lacks one of the patch's modules.
    """
    if config.is_identity:
        return ReducedPatch(patch, config)
    factors, report = {}, []
    for name, f in patch.factors.items():
        svd = top_singular(module_weight(reference, name).detach(), config.k, config.svd_method, config.seed)
        B, A = reduce_factors(f.B, f.A, svd, config.side, config.retention)
        factors[name] = LoraFactors(A=A, B=B)
        report.append(_module_report(name, patch.delta(name), patch.scaling * (B @ A), svd, config))
    reduced = patch.with_factors(factors, manifest={**(patch.manifest or {}),
                                                    "reduction": config.model_dump(mode="json")})
    retained = sum(m.retained_energy for m in report) / len(report)
    logger.info("overlap reduction (%s, k=%d, λ=%g): mean retained energy %.3f over %d modules",
                config.side, config.k, config.retention, retained, len(report))
    return ReducedPatch(reduced, config, tuple(report))


def _module_report(name: str, delta: torch.Tensor, reduced: torch.Tensor, svd: TruncatedSVD,
                   config: OverlapReduction) -> ModuleReduction:
    norm = float(torch.linalg.matrix_norm(delta))
    expected = dense_reduction(delta, svd, config.side, config.retention)
    error = float(torch.linalg.matrix_norm(reduced - expected)) / norm if norm > 0 else 0.0
    if error > SELF_TEST_RTOL:
        raise PatchError(f"overlap reduction self-test failed on module {name}: the low-rank result differs from "
                         f"the dense operator by {error:.2e} (relative, tolerance {SELF_TEST_RTOL}). This is a bug; "
                         "please report it with the patch and settings.")

    def ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
        denominator = float(torch.linalg.matrix_norm(whole))
        return float(torch.linalg.matrix_norm(part)) / denominator if denominator > 0 else 0.0

    return ModuleReduction(
        module=name, retained_energy=ratio(reduced, delta),
        overlap_before=ratio(svd.U.T @ delta, delta), overlap_after=ratio(svd.U.T @ reduced, reduced),
        row_overlap_before=ratio(delta @ svd.V, delta), row_overlap_after=ratio(reduced @ svd.V, reduced),
        self_test_error=error,
    )
