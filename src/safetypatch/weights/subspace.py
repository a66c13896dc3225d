"""Subspace math of the analysis metrics (docs/methods.md §3.8): the exact SVD of a LoRA update from its small factors,
principal angles between subspaces, stable rank, and Haar-random orthonormal frames for random baselines.

Pure fp32 torch, like :mod:`safetypatch.weights.linalg`, whose :class:`~safetypatch.weights.linalg.TruncatedSVD`
and sign convention it reuses; nothing here touches a model or a file.
"""

from __future__ import annotations

import torch

from safetypatch.errors import PatchError
from safetypatch.weights.linalg import TruncatedSVD, check_factors, fix_signs

# Below this cosine² an angle is read from its cosine, above it from its sine: arccos loses every digit near
# θ = 0 (cos θ = 1 − θ²/2), arcsin near 90° (Björck & Golub 1973; Knyazev & Argentati 2002).
_COS_SQ_SWITCH = 0.5


def lora_svd(B: torch.Tensor, A: torch.Tensor, scaling: float) -> TruncatedSVD:
    """The thin SVD of ΔW = s·B·A computed from its factors, without forming the d_out × d_in product.

    B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), so ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ; the SVD of the small core
    s R_B R_Aᵀ = U_c Σ V_cᵀ gives U = Q_B U_c and V = Q_A V_c. Cost O((d_out + d_in) r²) instead of an SVD of
    the product.

    Args:
        B: d_out × r factor.
        A: r × d_in factor.
        scaling: s (``lora_scaling``).

    Returns:
        All min(r, d_out, d_in) singular triplets (zeros included, so the spectrum is complete and ΔW =
        U diag(S) Vᵀ exactly), signs fixed as ``top_singular``'s; ``method`` is ``factors``.

    Raises:
        PatchError: the factors do not multiply.
    """
    check_factors(B, A)
    Q_B, R_B = torch.linalg.qr(B.float())
    Q_A, R_A = torch.linalg.qr(A.float().T)
    U_c, S, Vh_c = torch.linalg.svd(scaling * (R_B @ R_A.T), full_matrices=False)
    U, V = fix_signs(Q_B @ U_c, Q_A @ Vh_c.T)
    return TruncatedSVD(U.contiguous(), S, V.contiguous(), "factors")


def principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Principal angles between span(Q1) and span(Q2), in radians, ascending (docs/methods.md §3.8).

    cos θ_i = σ_i(Q1ᵀQ2); small angles are taken from their sines σ(Q2 − Q1Q1ᵀQ2) instead, which keeps them
    accurate to rounding (an angle of a subspace with itself is 0, not 1e-4). The angles do not change under
    Q ↦ Q R for orthogonal R.

    Args:
        Q1: d × p with orthonormal columns.
        Q2: d × q with orthonormal columns.

    Returns:
        min(p, q) angles in [0, π/2].

    Raises:
        PatchError: the bases live in spaces of different dimension.
    """
    if Q1.dim() != 2 or Q2.dim() != 2 or Q1.shape[0] != Q2.shape[0]:
        raise PatchError(f"principal_angles needs two bases of one space, got {tuple(Q1.shape)} and "
                         f"{tuple(Q2.shape)}.")
    Q1, Q2 = Q1.float(), Q2.float()
    if Q2.shape[1] > Q1.shape[1]:
        Q1, Q2 = Q2, Q1
    if Q2.shape[1] == 0:
        return Q2.new_zeros(0)
    cross = Q1.T @ Q2
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)
    small = cos.square() >= _COS_SQ_SWITCH
    if not bool(small.any()):
        return torch.arccos(cos)
    sin = torch.linalg.svdvals(Q2 - Q1 @ cross).clamp(0.0, 1.0).flip(0)
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def stable_rank(S: torch.Tensor, frobenius: float | None = None) -> float:
    """Stable rank sr = ‖M‖_F² / ‖M‖_2² from M's singular values (docs/methods.md §3.8).

    1 for rank one, n for the identity I_n, invariant to scaling, and 1 ≤ sr ≤ rank(M).

    Args:
        S: singular values of M, descending (at least σ_1).
        frobenius: ‖M‖_F when ``S`` is only the top of the spectrum; default ‖S‖_2, exact for a complete spectrum.

    Returns:
        sr, or 0.0 for the zero matrix (it has no direction).
    """
    top = float(S[0]) if S.numel() else 0.0
    if top == 0.0:
        return 0.0
    fro = float(torch.linalg.vector_norm(S.float())) if frobenius is None else frobenius
    return (fro / top) ** 2


def haar_frame(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A d × k matrix with orthonormal columns drawn uniformly (Haar) from the Stiefel manifold.

    QR of a Gaussian matrix with the signs of R's diagonal folded into Q (without that step the distribution is not
    uniform; Mezzadri 2007). Drawn on the CPU from ``generator``, so a seed gives the same frame on any device.

    Args:
        d: ambient dimension.
        k: columns, ≤ d.
        generator: the seeded source.

    Returns:
        The frame, fp32, on the CPU.

    Raises:
        PatchError: k > d.
    """
    if not 0 <= k <= d:
        raise PatchError(f"haar_frame: need 0 ≤ k ≤ d, got k={k}, d={d}.")
    Q, R = torch.linalg.qr(torch.randn(d, k, generator=generator))
    signs = torch.sign(torch.diagonal(R))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)
