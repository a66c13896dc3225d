"""RESTA — safety re-alignment by task arithmetic (Bhardwaj, Anh, Poria, ACL 2024; docs/methods.md §3.5).

θ_RESTA = θ_SFT + β δ_safe with δ_safe = θ_aligned − θ_unaligned; optionally DARE first on the fine-tuning delta,
θ_SFT ← θ_aligned + DARE(θ_SFT − θ_aligned). Element-wise, so it applies to tensors of any shape, and the streamed
runner computes it chunk by chunk (:meth:`RESTA.restore_chunked`, the same fp32 operations in the same order).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from pydantic import Field

from safetypatch.restoration.base import RestoreConfig, RestoreContext, RestoredTensor, RestoreMethod
from safetypatch.weights.elementwise import (
    Elementwise,
    any_difference,
    borrow,
    chunk_sum_of_squares,
    give_back,
    sum_of_squares,
)
from safetypatch.weights.linalg import dare


class RESTAConfig(RestoreConfig):
    """RESTA settings (docs/methods.md §3.5 *Defaults*)."""

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
        report["safety_ratio"] = _norm_ratio(sum_of_squares(step), sum_of_squares(x["target_model"]))
        return RestoredTensor(target + step, report)

    def restore_chunked(self, name: str, tensors: Mapping[str, torch.Tensor],
                        context: RestoreContext) -> RestoredTensor:
        """:meth:`restore_tensor` chunk by chunk from the tensors as stored: the same fp32 operations in the same
        order on each chunk (so the same values, bit for bit), the DARE mask drawn from the same random stream, the
        report's norms and kept fraction summed over chunks (equal to about 1e-7 relative).

        Args:
            name: the tensor name (also seeds its DARE mask).
            tensors: ``aligned_model``, ``unsafe_model``, ``target_model``, as stored (any dtype, CPU).
            context: unused.

        Returns:
            As :meth:`restore_tensor`, with an :class:`~safetypatch.weights.elementwise.Elementwise` for the new
            tensor; the report row is complete once it has been consumed.

        Raises:
            ConfigError: a role is missing.
            ModelMismatchError: shapes differ.
        """
        x = self.stored_inputs(name, tensors)
        beta, drop_p = self.config.beta, self.config.drop_p
        use_dare = self.config.dare and drop_p > 0
        if not use_dare and (beta == 0 or not any_difference(x["aligned_model"], x["unsafe_model"])):
            return RestoredTensor(None, {"skipped": "beta = 0" if beta == 0 else "δ_safe = 0"})
        generator = torch.Generator().manual_seed(tensor_seed(self.config.seed, name)) if use_dare else None
        sums = {"step": 0.0, "target": 0.0, "kept": 0}
        report: dict[str, float] = {}
        scratch = torch.empty(0)  # squares and mask draws; sized by the first (largest) chunk

        def chunk(c: dict[str, torch.Tensor]) -> torch.Tensor:
            nonlocal scratch
            aligned, target = c["aligned_model"], c["target_model"]
            if scratch.numel() < target.numel():
                scratch = borrow(target.numel())
            sums["target"] += chunk_sum_of_squares(target, scratch)
            delta_safe = torch.sub(aligned, c["unsafe_model"], out=c["unsafe_model"])
            if generator is not None:  # as linalg.dare on target − aligned, then aligned + the sparse delta
                delta = torch.sub(target, aligned, out=target)
                keep = torch.rand(delta.numel(), generator=generator, out=scratch[:delta.numel()]) >= drop_p
                sums["kept"] += int(keep.sum())
                target = torch.add(aligned, torch.where(keep, delta / (1.0 - drop_p), 0.0), out=target)
            step = delta_safe.mul_(beta)
            sums["step"] += chunk_sum_of_squares(step, scratch)
            return target.add_(step)

        def done() -> None:
            give_back(scratch)
            if generator is not None:
                numel = math.prod(x["target_model"].shape)
                report["dare_keep_fraction"] = sums["kept"] / numel if numel else 1.0
            report["safety_ratio"] = _norm_ratio(sums["step"], sums["target"])

        return RestoredTensor(Elementwise(x, chunk, on_done=done), report)


def _norm_ratio(part: float, whole: float) -> float:
    """‖part‖_F / ‖whole‖_F from their sums of squares, 0 when the whole is zero."""
    return math.sqrt(part) / math.sqrt(whole) if whole > 0 else 0.0
