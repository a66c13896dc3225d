"""LoX — low-rank extrapolation of the alignment delta (Perin et al., COLM 2025; ``VITA-Group/LoX``;
docs/methods.md §3.7).

Applied to the aligned model **before** downstream fine-tuning (hardening, not repair):
W_LoX = W_aligned + coef · SVD_k(W_aligned − W_base), with SVD_k the top-k truncation and k = 0 meaning full rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from safetypatch.restoration.base import RestoreConfig, RestoreContext, RestoredTensor, RestoreMethod, ratio
from safetypatch.weights.linalg import top_singular
from safetypatch.weights.stream import ParamScope

LOWRANK_MAX_K = 256


class LoXConfig(RestoreConfig):
    """LoX settings (docs/methods.md §3.7 *Defaults*)."""

    param_scope: ParamScope = Field(
        "all_2d", description="Which tensors are touched (§2.3): the reference extrapolates every ≥2-D parameter, "
        "embeddings and lm_head included (`all_2d`, code); `linear` skips those slow SVDs. 1-D tensors are never "
        "changed.")
    k: int = Field(
        16, ge=0, description="Rank of the extrapolated subspace of ΔW_align = W_aligned − W_base; 0 = full rank. "
        "Not confirmed in the paper; our default 16 (sweep 4, 16, 64, 100; the R-metrics script uses 100).")
    coef: float = Field(
        0.5, ge=0, description="Extrapolation coefficient; 0 = no change. Not confirmed in the paper; our default "
        "0.5 (sweep 0.25, 0.5, 1.0).")
    svd: Literal["exact", "lowrank"] = Field(
        "exact", description="Full fp32 SVD (`exact`, the reference) or seeded torch.svd_lowrank (`lowrank`, for "
        f"1 ≤ k ≤ {LOWRANK_MAX_K}).")
    seed: int = Field(0, description="Seed of `lowrank`.")
    apply_to: Literal["aligned", "target"] = Field(
        "aligned", description="`aligned`: harden the aligned model (the paper). `target`: add the same term to a "
        "fine-tuned model, a third-party variant that is not the paper's method; label results so.")

    @model_validator(mode="after")
    def _lowrank_needs_small_k(self) -> LoXConfig:
        if self.svd == "lowrank" and not 1 <= self.k <= LOWRANK_MAX_K:
            raise ValueError(f"svd 'lowrank' needs 1 ≤ k ≤ {LOWRANK_MAX_K}, got k={self.k}; use svd 'exact'.")
        return self


class LoX(RestoreMethod):
    """Extrapolate the aligned model along the top-k singular subspace of its alignment delta."""

    name = "lox"
    paper = "https://arxiv.org/abs/2506.15606"
    config_class = LoXConfig
    config: LoXConfig

    @property
    def roles(self) -> tuple[str, ...]:
        return ("base_model", "aligned_model") + (("target_model",) if self.config.apply_to == "target" else ())

    def restore_tensor(self, name: str, tensors: Mapping[str, torch.Tensor],
                       context: RestoreContext) -> RestoredTensor:
        """W + coef · SVD_k(W_aligned − W_base), W the aligned (or target) weight (§3.7 steps 1–4).

        Args:
            name: the tensor name.
            tensors: ``base_model``, ``aligned_model`` (and ``target_model`` with ``apply_to: target``).
            context: unused.

        Returns:
            The extrapolated tensor (None when coef = 0, ΔW_align = 0, or the tensor is 1-D) and a report: the
            top-k spectrum S of ΔW_align, R_align = ‖P_k ΔW_align‖_F / ‖ΔW_align‖_F (§3.8), and the rank used.

        Raises:
            ConfigError: a role is missing.
            ModelMismatchError: shapes differ.
        """
        x = self.inputs(name, tensors)
        aligned = x["aligned_model"]
        if aligned.dim() < 2:
            return RestoredTensor(None, {"skipped": "1-D tensor"})
        delta = aligned - x["base_model"]
        if self.config.coef == 0 or not delta.any():
            return RestoredTensor(None, {"skipped": "coef = 0" if self.config.coef == 0 else "ΔW_align = 0"})
        matrix = delta.reshape(delta.shape[0], -1)
        report: dict[str, Any]
        if 0 < self.config.k < min(matrix.shape):
            svd = top_singular(matrix, self.config.k, self.config.svd, self.config.seed)
            low = (svd.U * svd.S) @ svd.V.T
            report = {"rank": svd.k, "spectrum": svd.S.tolist(), "r_align": ratio(low, matrix)}
            delta = low.reshape(delta.shape)
        else:
            report = {"rank": min(matrix.shape), "r_align": 1.0}
        start = x["target_model"] if self.config.apply_to == "target" else aligned
        return RestoredTensor(start + self.config.coef * delta, report)
