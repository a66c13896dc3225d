"""LSSF — Low-Rank Safety Subspace Fusion (Zhou et al., ACL 2025; docs/methods.md §3.4; no official code).

Per linear module: the safety vector δ_safe = θ_safe − θ_unsafe (Eq. 1; data-free variant θ_safe − θ_base); an
activation-aware SVD Z = W X̂ = U Σ Vᵀ over the anchor set (Eq. 4); the entropy rank r (Eqs. 5–7); the weighted
projector P'^(r) = U^(r) diag(α_i²) U^(r)ᵀ (Eqs. 8–11); the fusion θ'_DST = θ_DST + α P'^(r) δ_safe (Eq. 13),
computed as B A with B = U'^(r) = U^(r) diag(α_i) and A = α U'^(r)ᵀ δ_safe, which is also the patch form (§3.4
step 8, ``ours``). P' is never formed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field, model_validator

from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.restoration.anchors import ActNorm, TokenSet, collect_input_moments, linear_modules
from safetypatch.restoration.base import RestoreConfig, RestoreContext, RestoredTensor, RestoreMethod, frobenius, ratio
from safetypatch.weights.linalg import (
    cumulative_entropy,
    entropy_rank,
    entropy_ratios,
    fix_column_signs,
    project_columns,
    psd_eigh,
)

logger = logging.getLogger(__name__)

Side = Literal["input", "output"]
_BYTES_PER_FLOAT = 4


class LSSFConfig(RestoreConfig):
    """LSSF settings (docs/methods.md §3.4 *Defaults*; every value the paper leaves open is ``ours``)."""

    safety_vector: Literal["aligned_minus_unsafe", "aligned_minus_base"] = Field(
        "aligned_minus_unsafe", description="δ_safe (§3.4 step 1): θ_aligned − θ_unsafe, the paper's Eq. 1 "
        "(secondary); or θ_aligned − θ_base, a data-free variant of a third-party re-implementation, not the paper's "
        "definition: label its results so.")
    decompose: Literal["weight", "safety_vector"] = Field(
        "weight", description="The matrix of the activation-aware SVD Z = M X̂ (§3.4 step 3): W_safe or δ_safe. "
        "Not confirmed in the paper; our default `weight`.")
    act_norm: ActNorm = Field(
        "global", description="Activation normalisation X̂ (§3.4 step 3): `global` = X / √N (U, p and r do not "
        "depend on it) or `token_l2` (each token to unit norm). Not confirmed in the paper; our default.")
    tokens: TokenSet = Field(
        "all", description="Tokens whose activations count (§3.4 step 3): `all` non-pad tokens of query and "
        "refusal, or `response_only`. Not confirmed in the paper; our default `all`.")
    eta: float = Field(
        0.9, gt=0, le=1, description="η of the entropy rank r = min{ρ : H_ρ/H_n ≥ η} (§3.4 Eq. 7). Not confirmed "
        "in the paper; our default (a third party suggests 0.8–0.9).")
    alpha_1: float = Field(
        1.0, gt=0, description="α_1, the weight of the top direction in the weighted projection, falling linearly "
        "to 1 at the r-th (§3.4 Eqs. 10–11); 1 = unweighted. Ablated, value not confirmed in the paper; our "
        "default 1.0 (sweep 1.0, 1.5, 2.0).")
    alpha: float = Field(
        1.0, ge=0, description="α, the fusion scale of the projected safety vector (§3.4 Eq. 13); 0 = no change. "
        "Not confirmed in the paper (secondary sources conflict); our default 1.0 (sweep 0.5–2.0).")
    r_min: int = Field(1, ge=1, description="Lower clamp of the entropy rank (§3.4 step 4, ours).")
    r_max: int | None = Field(
        None, ge=1, description="Upper clamp of the entropy rank; None = d_out (§3.4 step 4, ours).")
    rank_override: int | Literal["full"] | None = Field(
        None, description="Bypass the entropy rank: a fixed r, or `full` = d_out with a complete orthonormal U, "
        "so P = I (§3.4 step 4, ours). A fixed r is capped at the number of singular directions of Z.")
    anchor_batch_size: int = Field(8, ge=1, description="Anchors per forward pass while collecting moments "
                                   "(changes only rounding).")
    anchor_max_length: int = Field(1024, ge=1, description="Most tokens per templated anchor; longer is an error.")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Memory for anchor moments per forward pass over the anchors; modules are split "
        "into groups that fit, one pass per group (§3.4 step 3). None = one pass.")

    @model_validator(mode="after")
    def _rank_bounds(self) -> LSSFConfig:
        if self.r_max is not None and self.r_max < self.r_min:
            raise ValueError(f"r_max ({self.r_max}) is below r_min ({self.r_min}); raise r_max or lower r_min.")
        if isinstance(self.rank_override, int) and self.rank_override < 1:
            raise ValueError(f"rank_override must be ≥ 1 or 'full', got {self.rank_override}.")
        return self


def moment_side(shape: tuple[int, ...], decompose: str) -> Side:
    """Where a module's anchor moment lives (§3.4 step 3): the input side (G, d_in × d_in) if d_in ≤ d_out, else the
    output side (ZZᵀ, d_out × d_out) — which needs the decomposed matrix while the model runs, so ``safety_vector``
    decomposition always uses the input side."""
    d_out, d_in = shape
    return "input" if d_in <= d_out or decompose == "safety_vector" else "output"


def safety_subspace(matrix: torch.Tensor, moment: torch.Tensor, side: Side,
                    complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The output-space basis U and singular values σ of Z = M X̂ from a second moment (§3.4 Eq. 4, step 3).

    Input side: G = X̂X̂ᵀ = Q diag(λ) Qᵀ and Z's U, σ are those of M G^{1/2} = M Q diag(√λ) Qᵀ, hence of
    M Q diag(√λ) (a right rotation changes neither). Output side: ``moment`` is ZZᵀ itself, σ_i² its eigenvalues.

    Args:
        matrix: M (d_out × d_in): W_safe or δ_safe (ignored on the output side, where it is already in ZZᵀ).
        moment: G (input side) or ZZᵀ (output side).
        side: ``input`` or ``output``.
        complete: return a complete d_out × d_out basis (σ padded with zeros) even when d_in < d_out.

    Returns:
        (U, σ): U d_out × n sign-fixed orthonormal columns, σ of length n, descending; n = min(d_out, d_in) on the
        input side (d_out when ``complete``), d_out on the output side.
    """
    if side == "output":
        evals, U = psd_eigh(moment)
        return U, evals.sqrt()
    evals, Q = psd_eigh(moment)
    U, S, _ = torch.linalg.svd((matrix.float() @ Q) * evals.sqrt(), full_matrices=complete)
    return fix_column_signs(U), torch.cat([S, S.new_zeros(U.shape[1] - S.numel())])


def direction_weights(sigma: torch.Tensor, r: int, alpha_1: float) -> torch.Tensor:
    """α_i = 1 + (α_1 − 1)(σ_i − σ_r)/(σ_1 − σ_r), i = 1..r (§3.4 Eqs. 10–11); all α_1 when σ_1 = σ_r (ours).

    Args:
        sigma: singular values, descending, at least r of them.
        r: the rank.
        alpha_1: the top direction's weight.

    Returns:
        The r weights, from α_1 down to 1.
    """
    top = sigma[:r].float()
    spread = top[0] - top[-1]
    if spread <= 0:
        return torch.full_like(top, alpha_1)
    return 1.0 + (alpha_1 - 1.0) * (top - top[-1]) / spread


def fusion_factors(delta_safe: torch.Tensor, U: torch.Tensor, weights: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused update α P'^(r) δ_safe as exact factors B A (§3.4 Eq. 13 and step 8).

    Args:
        delta_safe: δ_safe, d_out × d_in.
        U: U^(r), d_out × r, orthonormal columns.
        weights: α_1..α_r.
        alpha: the fusion scale α.

    Returns:
        (B, A): B = U^(r) diag(α_i) (d_out × r), A = α Bᵀ δ_safe (r × d_in); B A = α P'^(r) δ_safe.
    """
    B = U * weights
    return B, alpha * (B.T @ delta_safe.float())


class LSSF(RestoreMethod):
    """Low-Rank Safety Subspace Fusion: add the anchor-weighted top-r part of the safety vector to a fine-tune."""

    name = "lssf"
    paper = "https://arxiv.org/abs/2602.00038"
    config_class = LSSFConfig
    needs_anchors = True
    config: LSSFConfig

    @property
    def roles(self) -> tuple[str, ...]:
        reference = "unsafe_model" if self.config.safety_vector == "aligned_minus_unsafe" else "base_model"
        return ("aligned_model", reference, "target_model")

    def prepare(self, context: RestoreContext) -> RestoreContext:
        """Collect the anchor moment of every 2-D tensor in ``context.names`` that lacks one (§3.4 steps 2–3).

        Args:
            context: ``names``; the loaded aligned ``model``, its ``tokenizer`` and the ``anchors`` unless every
                moment is already in ``statistics`` (keyed by tensor name).

        Returns:
            The context with ``statistics[name]`` = the tensor's moment (CPU, fp32).

        Raises:
            ConfigError: moments are needed but the model, tokenizer or anchors are missing, or a name is not the
                weight of a linear module.
        """
        missing = [name for name in context.names if name not in context.statistics]
        if not missing:
            return context
        if context.model is None or context.tokenizer is None or not context.anchors:
            raise ConfigError(f"LSSF needs anchor statistics for {len(missing)} tensors (first: {missing[0]}); pass "
                              "the loaded aligned model, its tokenizer and the anchor set in the context, or "
                              "precomputed moments in context.statistics.")
        modules = {}
        for name in missing:
            module = name.removesuffix(".weight")
            if module == name:
                raise ConfigError(f"LSSF fuses linear weights only; tensor {name} is not a `.weight`. Use "
                                  "param_scope `linear`.")
            modules[module] = name
        shapes = {m: tuple(linear.weight.shape) for m, linear in linear_modules(context.model, list(modules)).items()}
        output_side = {m for m, shape in shapes.items() if moment_side(shape, self.config.decompose) == "output"}
        statistics = dict(context.statistics)
        for group in _groups(shapes, output_side, self.config.memory_budget_gb):
            moments = collect_input_moments(
                context.model, context.tokenizer, context.anchors, group,
                output_side=[m for m in group if m in output_side], tokens=self.config.tokens,
                act_norm=self.config.act_norm, batch_size=self.config.anchor_batch_size,
                max_length=self.config.anchor_max_length)
            statistics.update({modules[m]: moment for m, moment in moments.items()})
        return replace(context, statistics=statistics)

    def restore_tensor(self, name: str, tensors: Mapping[str, torch.Tensor],
                       context: RestoreContext) -> RestoredTensor:
        """θ'_DST = θ_DST + α P'^(r) δ_safe for one linear weight (§3.4 Eqs. 1, 4–13).

        Args:
            name: the weight's name.
            tensors: ``aligned_model``, ``unsafe_model`` (or ``base_model`` for the data-free variant),
                ``target_model``.
            context: with ``statistics[name]``, the anchor moment from :meth:`prepare`.

        Returns:
            The fused weight (None when α = 0, δ_safe = 0, or the tensor is not 2-D) and a report: rank, entropy
            H_n, the curve H_ρ/H_n, the σ spectrum, ‖α P' δ_safe‖/‖δ_safe‖, ‖(I − P) δ_DST‖/‖δ_DST‖.

        Raises:
            ConfigError: a role or the tensor's moment is missing.
            ModelMismatchError: shapes differ, or the moment does not fit the tensor.
        """
        x = self.inputs(name, tensors)
        aligned, target = x["aligned_model"], x["target_model"]
        if aligned.dim() != 2:
            return RestoredTensor(None, {"skipped": "not a 2-D weight"})
        delta_safe = aligned - x[self.roles[1]]
        if self.config.alpha == 0 or not delta_safe.any():
            return RestoredTensor(None, {"skipped": "alpha = 0" if self.config.alpha == 0 else "δ_safe = 0"})
        side = moment_side(tuple(aligned.shape), self.config.decompose)
        moment = self._moment(name, context, side, tuple(aligned.shape)).to(aligned.device)
        matrix = aligned if self.config.decompose == "weight" else delta_safe
        U, sigma = safety_subspace(matrix, moment, side, complete=self.config.rank_override == "full")
        r = self._rank(sigma, aligned.shape[0])
        B, A = fusion_factors(delta_safe, U[:, :r], direction_weights(sigma, r, self.config.alpha_1),
                              self.config.alpha)
        update = B @ A
        delta_dst = target - aligned
        return RestoredTensor(target + update, {
            "rank": r, "entropy": float(cumulative_entropy(sigma)[-1]),
            "entropy_curve": entropy_ratios(sigma).tolist(), "spectrum": sigma.tolist(),
            "safety_norm": frobenius(delta_safe), "fused_ratio": ratio(update, delta_safe),
            "residual_ratio": ratio(project_columns(delta_dst, U[:, :r]), delta_dst),
        })

    def _moment(self, name: str, context: RestoreContext, side: Side, shape: tuple[int, int]) -> torch.Tensor:
        moment = context.statistics.get(name)
        if moment is None:
            raise ConfigError(f"LSSF: no anchor moment for tensor {name}; call prepare(context) with the aligned "
                              "model, tokenizer and anchors, or put the moment in context.statistics.")
        size = shape[1] if side == "input" else shape[0]
        if tuple(moment.shape) != (size, size):
            raise ModelMismatchError(f"LSSF: the anchor moment of tensor {name} is {tuple(moment.shape)}, but a "
                                     f"{side}-side moment of a {shape} weight is ({size}, {size}); it was collected "
                                     "on another model or with another `decompose`.")
        return moment

    def _rank(self, sigma: torch.Tensor, d_out: int) -> int:
        """r: ``rank_override``, or the entropy rank clamped to [r_min, r_max] and to the available directions."""
        override = self.config.rank_override
        if override == "full":
            return d_out
        if override is not None:
            return min(override, sigma.numel())
        r = max(entropy_rank(sigma, self.config.eta), self.config.r_min)
        return min(r, self.config.r_max or d_out, sigma.numel())


def _groups(shapes: Mapping[str, tuple[int, ...]], output_side: set[str], budget_gb: float | None) -> list[list[str]]:
    """Modules split, in order, into groups whose moments fit the budget (each module alone at least)."""
    if budget_gb is None:
        return [list(shapes)]
    budget = budget_gb * 1024**3
    groups: list[list[str]] = [[]]
    used = 0
    for module, (d_out, d_in) in shapes.items():
        size = (d_out if module in output_side else d_in) ** 2 * _BYTES_PER_FLOAT
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(module)
        used += size
    if len(groups) > 1:
        logger.info("LSSF anchor moments: %d passes over the anchors to stay under %.2f GB", len(groups), budget_gb)
    return groups
