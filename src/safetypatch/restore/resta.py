"""RESTA — safety re-alignment by task arithmetic (Bhardwaj, Anh, Poria, ACL 2024; METHODS.md §3.5).

θ_RESTA = θ_SFT + β δ_safe with δ_safe = θ_aligned − θ_unaligned; optionally DARE first on the fine-tuning delta,
θ_SFT ← θ_aligned + DARE(θ_SFT − θ_aligned). Element-wise, so it applies to tensors of any shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from pydantic import Field

from safetypatch.restore.base import RestoreConfig, RestoreContext, RestoredTensor, RestoreMethod, ratio
from safetypatch.weights.linalg import dare


class RESTAConfig(RestoreConfig):
    """RESTA settings (METHODS.md §3.5 *Defaults*)."""

    beta: float = Field(
        0.5, ge=0, description="β, the scale of the safety vector δ_safe = θ_aligned − θ_unsafe (§3.5 step 3); "
        "0 = no change. Not confirmed in the paper; our default 0.5 (sweep 0.25, 0.5, 0.75, 1.0).")
    dare: bool = Field(
        False, description="Apply DARE to the fine-tuning delta θ_target − θ_aligned first (§3.5 step 2; optional "
        "in the paper, reported as most helpful for PEFT fine-tunes).")
    drop_p: float = Field(
        0.3, ge=0, lt=1, description="DARE drop probability p; kept entries are rescaled by 1/(1 − p); 0 = no DARE. "
        "Not confirmed in the paper; our default 0.3.")
    seed: int = Field(0, description="Seed of the DARE masks; each tensor's mask is seeded by (seed, tensor name).")


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, stable across runs and devices: sha256 of ``"{seed}:{name}"``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RESTA(RestoreMethod):
    """Add a scaled safety vector to a fine-tuned model, optionally after DARE on its fine-tuning delta."""

    name = "resta"
    paper = "https://arxiv.org/abs/2402.11746"
    config_class = RESTAConfig
    config: RESTAConfig

    @property
    def roles(self) -> tuple[str, ...]:
        return ("aligned_model", "unsafe_model", "target_model")

    def restore_tensor(self, name: str, tensors: Mapping[str, torch.Tensor],
                       context: RestoreContext) -> RestoredTensor:
        """θ_SFT + β (θ_aligned − θ_unsafe), with θ_SFT optionally DARE-sparsified against θ_aligned (§3.5).

        Args:
            name: the tensor name (also seeds its DARE mask).
            tensors: ``aligned_model``, ``unsafe_model``, ``target_model``.
            context: unused.

        Returns:
            The new tensor (None when β = 0 or δ_safe = 0 and DARE is off or p = 0) and a report: ‖β δ_safe‖_F /
            ‖W_SFT‖_F and, with DARE, the fraction of fine-tuning delta entries kept.

        Raises:
            ConfigError: a role is missing.
            ModelMismatchError: shapes differ.
        """
        x = self.inputs(name, tensors)
        aligned, target = x["aligned_model"], x["target_model"]
        delta_safe = aligned - x["unsafe_model"]
        use_dare = self.config.dare and self.config.drop_p > 0
        if not use_dare and (self.config.beta == 0 or not delta_safe.any()):
            return RestoredTensor(None, {"skipped": "beta = 0" if self.config.beta == 0 else "δ_safe = 0"})
        report: dict[str, float] = {}
        if use_dare:
            sparse, report["dare_keep_fraction"] = dare(target - aligned, self.config.drop_p,
                                                        tensor_seed(self.config.seed, name))
            target = aligned + sparse
        step = self.config.beta * delta_safe
        report["safety_ratio"] = ratio(step, x["target_model"])
        return RestoredTensor(target + step, report)
