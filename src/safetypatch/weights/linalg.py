"""Pure fp32 linear algebra shared by every weight method: the one ΔW of a LoRA adapter, sign-fixed truncated SVD,
one-sided projections, low-rank refactorisation with a reported error, PSD eigendecomposition, singular value
entropy and DARE sparsification (docs/methods.md §2.2, §2.3, §3.3, §3.4, §3.5, §5.1).

Everything here is tensors in, tensors out; nothing touches a model or a file. Inputs of any dtype are upcast to
fp32; the caller casts results back to the storage dtype when it writes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from safetypatch.errors import PatchError

SVDMethod = Literal["auto", "exact", "lowrank"]

# §3.2 step 1: exact truncated SVD up to this size, seeded randomised SVD above it.
EXACT_SVD_MAX_DIM = 8192
# Randomised SVD power iterations (the reference `torch.svd_lowrank` default, §3.2).
LOWRANK_NITER = 2

# LoRA variants whose ΔW is not s·B·A (or that carry weights outside A and B): combining or merging them as plain
# LoRA silently gives the wrong model (huggingface/peft #3004, #3111, §5.1), so they are refused.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude vector",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA pools the input in groups",
    "fan_in_fan_out": "fan_in_fan_out stores Conv1D weights transposed",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
}
_UNSUPPORTED_VALUES = ("rank_pattern", "alpha_pattern", "layer_replication", "modules_to_save", "target_parameters",
                       "trainable_token_indices")


@dataclass(frozen=True)
class TruncatedSVD:
    """The top-k singular triplets of a matrix W ≈ U diag(S) Vᵀ (fp32, signs fixed).

    Attributes:
        U: left singular vectors, d_out × k (output space).
        S: singular values, descending, length k.
        V: right singular vectors, d_in × k (input space).
        method: ``exact`` or ``lowrank``, the routine actually used.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str

    @property
    def k(self) -> int:
        return int(self.S.numel())


@dataclass(frozen=True)
class LowRankFactors:
    """A rank-r refactorisation ΔW ≈ B A with its relative Frobenius error (docs/methods.md §3.3 ``svd``).

    Attributes:
        B: d_out × r.
        A: r × d_in.
        error: ε = ‖ΔW − B A‖_F / ‖ΔW‖_F (0 for an exactly representable ΔW, 0 when ΔW = 0).
    """

    B: torch.Tensor
    A: torch.Tensor
    error: float


def lora_scaling(config: Mapping[str, Any]) -> float:
    """The scale s of ΔW = s·B·A read from a PEFT LoRA ``adapter_config.json`` dict.

    s = lora_alpha / r, or lora_alpha / √r with ``use_rslora`` (Kalajdzievski 2023; PEFT ``LoraLayer.update_layer``).

    Args:
        config: the adapter config as a dict (``LoraConfig.to_dict()`` or the JSON file's contents).

    Returns:
        The scaling factor s.

    Raises:
        PatchError: the adapter is not plain LoRA (DoRA, ``lora_bias``, per-module rank/alpha patterns, saved full
            modules, …) or has a non-positive rank; docs/methods.md §5.1.
    """
    peft_type = config.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()  # PeftType is a str enum
    if peft_type != "LORA":
        raise PatchError(f"adapter has peft_type {peft_type!r}; safetypatch handles plain LoRA adapters only.")
    for flag, why in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise PatchError(f"adapter sets {flag}=true: {why}, so ΔW ≠ s·B·A. Only plain LoRA patches can be "
                             "combined or merged exactly; retrain the patch without it.")
    for key in _UNSUPPORTED_VALUES:
        if config.get(key):
            raise PatchError(f"adapter sets {key}={config[key]!r}, which safetypatch does not support (ΔW would not "
                             "be one s·B·A per module). Retrain the patch with a uniform rank and alpha and no "
                             "extra trained modules.")
    r = config.get("r")
    alpha = config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or alpha is None:
        raise PatchError(f"adapter config has r={r!r}, lora_alpha={alpha!r}; expected a positive integer rank "
                         "and a number alpha.")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def lora_delta(B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A in fp32: the only place the toolkit forms a LoRA update (docs/methods.md §2.2).

    Args:
        B: d_out × r factor (PEFT ``lora_B.weight``).
        A: r × d_in factor (PEFT ``lora_A.weight``).
        scaling: s from :func:`lora_scaling`.

    Returns:
        The d_out × d_in update, fp32, on the factors' device.

    Raises:
        PatchError: the inner dimensions of B and A differ.
    """
    check_factors(B, A)
    return scaling * (B.float() @ A.float())


def check_factors(B: torch.Tensor, A: torch.Tensor) -> None:
    """Refuse LoRA factors that do not multiply (B must be d_out × r and A r × d_in).

    Raises:
        PatchError: naming both shapes.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise PatchError(f"LoRA factors do not multiply: B is {tuple(B.shape)}, A is {tuple(A.shape)}; expected "
                         "B (d_out × r) and A (r × d_in) with the same r.")


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs so that each left vector's entry of largest |value| is positive (docs/methods.md §2.3).

    The matching right vector is flipped with it, so U diag(S) Vᵀ is unchanged; ties in |value| go to the first
    index. A zero column is left as is.

    Args:
        U: d_out × k left singular vectors.
        V: d_in × k right singular vectors.

    Returns:
        (U, V) with fixed signs.
    """
    signs = _column_signs(U)
    return U * signs, V * signs


def fix_column_signs(U: torch.Tensor) -> torch.Tensor:
    """U with each column flipped so that its entry of largest |value| is positive (docs/methods.md §2.3).

    The one-sided form of :func:`fix_signs`, for bases with no partner (eigenvectors, orthonormal completions).

    Args:
        U: d × k.

    Returns:
        U with fixed column signs (a zero column is left as is).
    """
    return U * _column_signs(U)


def _column_signs(U: torch.Tensor) -> torch.Tensor:
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def top_singular(W: torch.Tensor, k: int, method: SVDMethod = "auto", seed: int = 0) -> TruncatedSVD:
    """The top-k singular triplets of W in fp32 with fixed signs (docs/methods.md §2.3, §3.2 step 1).

    Args:
        W: a 2-D matrix (any float dtype; upcast to fp32).
        k: how many triplets; clamped to min(d_out, d_in).
        method: ``exact`` (``torch.linalg.svd``), ``lowrank`` (``torch.svd_lowrank``, niter 2, seeded: the Xue
            reference), or ``auto`` (exact when max(d_out, d_in) ≤ 8192, else lowrank).
        seed: seed of the randomised SVD (ignored by ``exact``); the global RNG state is left untouched.

    Returns:
        A :class:`TruncatedSVD` with k' = min(k, d_out, d_in) columns.

    Raises:
        PatchError: W is not 2-D, k is negative, or ``method`` is unknown.
    """
    if W.dim() != 2:
        raise PatchError(f"top_singular needs a 2-D matrix, got shape {tuple(W.shape)}.")
    if k < 0:
        raise PatchError(f"top_singular: k must be ≥ 0, got {k}.")
    if method not in ("auto", "exact", "lowrank"):
        raise PatchError(f"unknown SVD method {method!r}; one of 'auto', 'exact', 'lowrank'.")
    W = W.float()
    k = min(k, *W.shape)
    if method == "auto":
        method = "exact" if max(W.shape) <= EXACT_SVD_MAX_DIM else "lowrank"
    if k == 0:
        empty = W.new_zeros
        return TruncatedSVD(empty(W.shape[0], 0), empty(0), empty(W.shape[1], 0), method)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    else:
        devices = [W.device] if W.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=k, niter=LOWRANK_NITER)
    U, V = fix_signs(U.contiguous(), V.contiguous())
    return TruncatedSVD(U, S, V, method)


def project_columns(M: torch.Tensor, U: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """M − strength·U(UᵀM): remove (a share of) M's component in span(U), acting on the output side.

    With orthonormal U and strength 1 this is (I − UUᵀ)M; applied to the B factor it gives the exact low-rank
    form of the §3.3 column reduction, B' = B − (1 − λ)U_k(U_kᵀB). No d_out × d_out matrix is formed.

    Args:
        M: d_out × n.
        U: d_out × k with orthonormal columns.
        strength: the share removed (1 − λ in §3.3).

    Returns:
        The projected matrix, fp32.
    """
    M = M.float()
    return M - strength * (U @ (U.T @ M))


def project_rows(M: torch.Tensor, V: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """M − strength·(MV)Vᵀ: remove (a share of) M's component in span(V), acting on the input side.

    Applied to the A factor it gives the §3.3 row reduction A' = A − (1 − λ)(A V_k)V_kᵀ.

    Args:
        M: n × d_in.
        V: d_in × k with orthonormal columns.
        strength: the share removed (1 − λ in §3.3).

    Returns:
        The projected matrix, fp32.
    """
    M = M.float()
    return M - strength * ((M @ V) @ V.T)


def orthonormal_basis(M: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of M's column space (sign-fixed SVD, numerically rank-revealing).

    Args:
        M: d × n.
        rtol: singular values ≤ rtol·σ_1 count as zero.

    Returns:
        d × rank(M) with orthonormal columns (d × 0 when M = 0).
    """
    M = M.float()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = int((rtol * S[0] < S).sum()) if S.numel() and S[0] > 0 else 0
    U, _ = fix_signs(U[:, :keep], Vh[:keep].T)
    return U


def low_rank_factors(delta: torch.Tensor, rank: int) -> LowRankFactors:
    """Refactor ΔW into rank-``rank`` factors by exact SVD, split evenly (B = U√S, A = √S Vᵀ), with error ε.

    Args:
        delta: the d_out × d_in update.
        rank: the target rank (clamped to min(d_out, d_in)); zero columns are kept so the rank is exact.

    Returns:
        :class:`LowRankFactors` with B (d_out × rank), A (rank × d_in) and ε = ‖ΔW − BA‖_F / ‖ΔW‖_F.

    Raises:
        PatchError: ``rank`` < 1.
    """
    if rank < 1:
        raise PatchError(f"low_rank_factors: rank must be ≥ 1, got {rank}.")
    delta = delta.float()
    svd = top_singular(delta, rank, "exact")
    root = svd.S.sqrt()
    B = delta.new_zeros(delta.shape[0], rank)
    A = delta.new_zeros(rank, delta.shape[1])
    B[:, : svd.k] = svd.U * root
    A[: svd.k] = (svd.V * root).T
    norm = torch.linalg.matrix_norm(delta)
    error = float(torch.linalg.matrix_norm(delta - B @ A) / norm) if norm > 0 else 0.0
    return LowRankFactors(B, A, error)


def psd_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix (a Gram or second-moment matrix) in fp32 (docs/methods.md §3.4
    step 3).

    Eigenvalues come in descending order and are clamped at 0 (rounding makes tiny ones negative); eigenvectors are
    sign-fixed with :func:`fix_column_signs`. G = Q diag(λ) Qᵀ, so G^{1/2} = Q diag(√λ) Qᵀ.

    Args:
        G: d × d, symmetric positive semi-definite.

    Returns:
        (λ, Q): λ of length d, descending, ≥ 0; Q d × d orthonormal.

    Raises:
        PatchError: G is not square.
    """
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise PatchError(f"psd_eigh needs a square matrix, got shape {tuple(G.shape)}.")
    evals, evecs = torch.linalg.eigh(G.float())
    return evals.flip(0).clamp_min(0.0), fix_column_signs(evecs.flip(1))


def cumulative_entropy(S: torch.Tensor) -> torch.Tensor:
    """Cumulative singular value entropy H_ρ = −Σ_{i≤ρ} p_i log p_i (docs/methods.md §3.4 Eqs. 5–6).

    p_i = σ_i² / Σ_j σ_j²; natural log; 0·log 0 := 0 (`ours`). All zeros give H = 0.

    Args:
        S: singular values σ_1 ≥ … ≥ σ_n ≥ 0.

    Returns:
        H_ρ for ρ = 1..n (fp32, non-decreasing); the last entry is H_n.
    """
    energy = S.float().square()
    total = energy.sum()
    p = energy / total if total > 0 else energy
    return torch.special.entr(p).cumsum(0)


def entropy_ratios(S: torch.Tensor) -> torch.Tensor:
    """The curve H_ρ / H_n, ρ = 1..n, of :func:`cumulative_entropy` (docs/methods.md §3.4 Eq. 7).

    When H_n = 0 (at most one non-zero σ) the curve is all ones, so the entropy rank is 1 (`ours`).

    Args:
        S: singular values, descending.

    Returns:
        The non-decreasing ratios in [0, 1], ending at exactly 1.
    """
    H = cumulative_entropy(S)
    return H / H[-1] if H.numel() and H[-1] > 0 else torch.ones_like(H)


def entropy_rank(S: torch.Tensor, eta: float) -> int:
    """Safety singular value entropy rank r = min{ρ : H_ρ / H_n ≥ η} (docs/methods.md §3.4 Eq. 7).

    Args:
        S: n ≥ 1 singular values, descending.
        eta: the threshold η ∈ (0, 1].

    Returns:
        r ∈ [1, n]; non-decreasing in η.

    Raises:
        PatchError: S is empty or η is outside (0, 1].
    """
    if S.numel() == 0:
        raise PatchError("entropy_rank needs at least one singular value, got none.")
    if not 0 < eta <= 1:
        raise PatchError(f"entropy_rank: eta must be in (0, 1], got {eta}.")
    return int((entropy_ratios(S) < eta).sum()) + 1


def dare(delta: torch.Tensor, drop_p: float, seed: int) -> tuple[torch.Tensor, float]:
    """DARE: drop each entry of a delta with probability p and rescale the rest by 1/(1 − p) (Yu et al. 2024).

    δ̃ = (m ⊙ δ) / (1 − p), m ~ Bernoulli(1 − p) elementwise (docs/methods.md §3.5 step 2), so E[δ̃] = δ. The mask is
    drawn on the CPU from a private generator seeded with ``seed``: the same seed gives the same mask on any device,
    and the global RNG is untouched.

    Args:
        delta: the delta (any shape; upcast to fp32).
        drop_p: p ∈ [0, 1).
        seed: seed of the mask.

    Returns:
        (δ̃ in fp32 on ``delta``'s device, the fraction of entries kept).

    Raises:
        PatchError: p is outside [0, 1).
    """
    if not 0 <= drop_p < 1:
        raise PatchError(f"dare: drop_p must be in [0, 1), got {drop_p}.")
    generator = torch.Generator().manual_seed(seed)
    keep = (torch.rand(delta.shape, generator=generator) >= drop_p).to(delta.device)
    kept = int(keep.sum()) / keep.numel() if keep.numel() else 1.0  # exact (an fp32 mean is off by ~1e-8)
    return torch.where(keep, delta.float() / (1.0 - drop_p), 0.0), kept
