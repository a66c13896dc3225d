"""Combine several patches exactly in ΔW space (docs/methods.md §3.3 *several patches*, §5.1).

``linear``: ΔW = Σ_i w_i s_i B_i A_i, emitted exactly by concatenation B_cat = [w_1 s_1 B_1, …], A_cat = [A_1; …],
rank Σ r_i and lora_alpha = rank (s = 1); negative weights are fine. ``svd``: the same ΔW truncated to a rank with
the relative error ε reported per module. ``orthogonal`` (``ours``): every patch after the first (the task adapter)
is first made orthogonal to the task adapter's column space, B' = B − Q(QᵀB) with Q = orth(B_task), then ``linear``.
PEFT's A/B-space ``add_weighted_adapter`` is never used: with several adapters it adds cross-terms and mishandles
negative weights. A self-test (one patch with weight 1 reproduces its own ΔW) runs before any result is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from safetypatch.errors import ConfigError, PatchError
from safetypatch.patch.factors import LoraFactors, Patch
from safetypatch.weights.linalg import low_rank_factors, orthonormal_basis, project_columns

logger = logging.getLogger(__name__)

Combination = Literal["linear", "svd", "orthogonal"]
SELF_TEST_RTOL = 1e-5


@dataclass(frozen=True)
class CombineResult:
    """A combined patch.

    Attributes:
        patch: the combined patch (s = 1: lora_alpha = r).
        method: ``linear``, ``svd`` or ``orthogonal``.
        weights: the weight w_i of each input.
        errors: relative truncation error ε per module (0 for exact methods).
    """

    patch: Patch
    method: str
    weights: tuple[float, ...]
    errors: dict[str, float] = field(default_factory=dict)


def combine_patches(patches: Sequence[Patch], weights: Sequence[float] | None = None, *,
                    method: Combination = "linear", svd_rank: int | None = None) -> CombineResult:
    """Combine patches in ΔW space (docs/methods.md §3.3).

    Args:
        patches: the patches; for ``orthogonal`` the first is the task adapter, the others are safety patches.
        weights: w_i per patch (default all 1.0); negative values subtract a patch.
        method: ``linear`` (exact concatenation), ``svd`` (truncated), or ``orthogonal``.
        svd_rank: target rank of ``svd`` (default: the largest input rank).

    Returns:
        A :class:`CombineResult`.

    Raises:
        ConfigError: no patches, a weight count mismatch, or an unknown method.
        PatchError: patches disagree on a module's shape, or the self-test fails.
    """
    if not patches:
        raise ConfigError("combine_patches: pass at least one patch.")
    weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(patches)))
    if len(weights) != len(patches):
        raise ConfigError(f"combine_patches: {len(patches)} patches but {len(weights)} weights.")
    if method not in ("linear", "svd", "orthogonal"):
        raise ConfigError(f"unknown combination {method!r}; one of 'linear', 'svd', 'orthogonal'.")
    shapes = _module_shapes(patches)
    _self_test(patches[0], method, svd_rank)
    inputs = _orthogonalized(patches) if method == "orthogonal" else list(patches)
    factors, errors = _combine(inputs, weights, shapes, method, svd_rank)
    rank = next(iter(factors.values())).A.shape[0]
    manifest = {
        "method": f"combine:{method}", "weights": list(weights),
        "sources": [{"folder": str(p.folder) if p.folder else None, "method": (p.manifest or {}).get("method"),
                     "base_model": (p.manifest or {}).get("base_model")} for p in patches],
        "base_model": (patches[0].manifest or {}).get("base_model", {}),
        "truncation_errors": errors,
    }
    config = {**patches[0].config, "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0,
              "target_modules": sorted(factors), "layers_to_transform": None, "layers_pattern": None}
    combined = Patch(config=config, factors=factors, manifest=manifest)
    if errors:
        logger.info("svd combination: max relative truncation error %.2e", max(errors.values()))
    return CombineResult(combined, method, weights, errors)


def _module_shapes(patches: Sequence[Patch]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for patch in patches:
        for name, f in patch.factors.items():
            if shapes.setdefault(name, f.shape) != f.shape:
                raise PatchError(f"module {name} is {shapes[name]} in one patch and {f.shape} in {patch.where}; "
                                 "patches for different models cannot be combined.")
    return dict(sorted(shapes.items()))


def _combine(patches: Sequence[Patch], weights: Sequence[float], shapes: dict[str, tuple[int, int]],
             method: str, svd_rank: int | None) -> tuple[dict[str, LoraFactors], dict[str, float]]:
    if method == "svd":
        rank = svd_rank or max(p.rank for p in patches)
        factors, errors = {}, {}
        for name in shapes:
            delta = sum(w * p.delta(name) for p, w in zip(patches, weights, strict=True) if name in p.factors)
            low = low_rank_factors(delta, rank)
            factors[name], errors[name] = LoraFactors(A=low.A, B=low.B), low.error
        return factors, errors
    factors = {}
    for name, (d_out, d_in) in shapes.items():
        Bs, As = [], []
        for p, w in zip(patches, weights, strict=True):
            f = p.factors.get(name)  # a module a patch lacks contributes zero blocks, keeping one uniform rank
            Bs.append(w * p.scaling * f.B if f is not None else torch.zeros(d_out, p.rank))
            As.append(f.A.float() if f is not None else torch.zeros(p.rank, d_in))
        factors[name] = LoraFactors(A=torch.cat(As, dim=0), B=torch.cat(Bs, dim=1).float())
    return factors, {}


def _orthogonalized(patches: Sequence[Patch]) -> list[Patch]:
    """The task adapter unchanged, then each safety patch with B' = B − Q(QᵀB), Q = orth(B_task) per module."""
    task, *safety = patches
    bases = {name: orthonormal_basis(f.B) for name, f in task.factors.items()}
    out = [task]
    for patch in safety:
        factors = {name: LoraFactors(A=f.A, B=project_columns(f.B, bases[name]) if name in bases else f.B)
                   for name, f in patch.factors.items()}
        out.append(patch.with_factors(factors))
    return out


def _self_test(patch: Patch, method: str, svd_rank: int | None) -> None:
    """One patch combined with weight 1 must reproduce its own ΔW (docs/methods.md §3.3 test (f), §5.1)."""
    method = "linear" if method == "orthogonal" else method
    rank = max(svd_rank or patch.rank, patch.rank)
    factors, _ = _combine([patch], [1.0], _module_shapes([patch]), method, rank)
    for name, f in factors.items():
        expected = patch.delta(name)
        error = float((f.B @ f.A - expected).norm()) / max(float(expected.norm()), 1e-30)
        if expected.norm() > 0 and error > SELF_TEST_RTOL * (10 if method == "svd" else 1):
            raise PatchError(f"combination self-test failed on module {name}: one patch with weight 1 gives a ΔW "
                             f"that differs from its own by {error:.2e} (relative). This is a bug; please report it.")
