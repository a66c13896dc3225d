"""Safe LoRA — project fine-tuning updates onto the alignment matrix (Hsu et al., NeurIPS 2024; ``IBM/SafeLoRA``;
docs/methods.md §3.6).

Per module, V = W_aligned − W_base and C = V Vᵀ / ‖V‖_F (the paper form: symmetric PSD, not idempotent; the
``orthonormal`` variant C = Q_V Q_Vᵀ is ``ours``). A LoRA update B A of the target becomes C B A (B ← C B, s kept);
a dense update ΔW = W_target − W_aligned (the full-FT variant, ``ours``) becomes C ΔW. A module is projected when
its cosine cos_l between C ΔW and ΔW is low: below ``threshold``, or among the ``num_proj_layers`` lowest. The
ranking is taken on the unmodified updates in :meth:`SafeLoRA.prepare` (the reference's number mode ranked a model
its threshold pass had already changed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field

from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.restoration.base import (
    LORA_A,
    LORA_B,
    RestoreConfig,
    RestoreContext,
    RestoredTensor,
    RestoreMethod,
    frobenius,
)
from safetypatch.weights.linalg import orthonormal_basis

logger = logging.getLogger(__name__)


class SafeLoRAConfig(RestoreConfig):
    """Safe LoRA settings (docs/methods.md §3.6 *Defaults*; reference values from ``IBM/SafeLoRA``)."""

    select_layers_type: Literal["number", "threshold"] = Field(
        "number", description="Which modules are projected (§3.6 step 4): the `num_proj_layers` with the lowest "
        "cosine (`number`, the reference default), or every module with cosine < `threshold`.")
    num_proj_layers: int = Field(
        10, ge=0, description="Modules projected in `number` mode (reference 10, ≈11% of modules works well per a "
        "secondary source); 0 = none.")
    threshold: float = Field(
        0.5, ge=0, description="Cosine threshold τ of `threshold` mode: project iff cos_l < τ (reference 0.5); "
        "0 = none, > 1 = all.")
    projector: Literal["paper", "orthonormal"] = Field(
        "paper", description="C = V Vᵀ / ‖V‖_F (`paper`, the reference code) or the exact projector Q_V Q_Vᵀ onto "
        "range(V) (`orthonormal`, ours).")
    svd_tol: float = Field(
        1e-6, gt=0, lt=1, description="`orthonormal` projector: singular values of V ≤ svd_tol·σ_1 count as zero "
        "(ours).")


def align(V: torch.Tensor, M: torch.Tensor, projector: str, svd_tol: float) -> torch.Tensor:
    """C M without forming C (§3.6 step 2): V (Vᵀ M) / ‖V‖_F, or Q_V (Q_Vᵀ M) for ``orthonormal``.

    Args:
        V: W_aligned − W_base, d_out × d_in, non-zero.
        M: d_out × k (a LoRA B, or a dense ΔW).
        projector: ``paper`` or ``orthonormal``.
        svd_tol: rank tolerance of ``orthonormal``.

    Returns:
        C M, fp32.
    """
    if projector == "orthonormal":
        Q = orthonormal_basis(V, svd_tol)
        return Q @ (Q.T @ M)
    return V @ (V.T @ M) / frobenius(V)


def projection_cosine(CM: torch.Tensor, M: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """cos_l = ⟨C M A, M A⟩ / (‖C M A‖_F ‖M A‖_F) (§3.6 step 3), through r × r matrices when A is given.

    With ``gram`` = A Aᵀ: ⟨X A, Y A⟩ = tr((Xᵀ Y)(A Aᵀ)); without it A = I (a dense ΔW). The value is clamped to
    [0, 1] (C is PSD, so only rounding leaves that range) and is 0 when C M A = 0 (ours).

    Args:
        CM: C M (d_out × r, or d_out × d_in dense).
        M: M (LoRA B, or dense ΔW).
        gram: A Aᵀ (r × r), or None.

    Returns:
        cos_l in [0, 1]; invariant to the LoRA scaling and to rescaling B or A.
    """
    def inner(X: torch.Tensor, Y: torch.Tensor) -> float:
        return float(((X.T @ Y) * gram).sum()) if gram is not None else float((X * Y).sum())

    projected, original = inner(CM, CM), inner(M, M)
    if projected <= 0 or original <= 0:
        return 0.0
    return min(1.0, max(0.0, inner(CM, M) / (projected * original) ** 0.5))


@dataclass(frozen=True)
class _Projection:
    """One module's update M (B or ΔW), its projection C M, cos_l, ‖V‖_F, and the aligned weight."""

    update: torch.Tensor
    projected: torch.Tensor
    cosine: float
    v_norm: float
    aligned: torch.Tensor


class SafeLoRA(RestoreMethod):
    """Project low-similarity modules' fine-tuning updates onto the alignment matrix of aligned − base."""

    name = "safe_lora"
    paper = "https://arxiv.org/abs/2405.16833"
    config_class = SafeLoRAConfig
    repairs_adapters = True
    config: SafeLoRAConfig

    @property
    def roles(self) -> tuple[str, ...]:
        return ("base_model", "aligned_model", "target_model")

    def prepare(self, context: RestoreContext) -> RestoreContext:
        """Number mode: rank every module's cos_l on the unmodified updates and choose the lowest (§3.6 step 4).

        Ties are broken by tensor name, so the choice does not depend on iteration order; modules with V = 0 or no
        update are not ranked.

        Args:
            context: ``tensors``, a fresh pass over every ``(name, {role: tensor})``.

        Returns:
            The context with ``statistics[name]`` = whether the module is projected, for every ranked module
            (the input context in threshold mode or with ``num_proj_layers`` = 0).

        Raises:
            ConfigError: number mode without ``context.tensors``.
        """
        if self.config.select_layers_type != "number" or self.config.num_proj_layers == 0:
            return context
        if context.tensors is None:
            raise ConfigError("Safe LoRA number mode ranks every module before projecting any; pass "
                              "context.tensors, a callable that streams (name, {role: tensor}) over all modules.")
        cosines = {}
        for name, tensors in context.tensors():
            projection = self._project(name, tensors)
            if projection is not None:
                cosines[name] = projection.cosine
        chosen = set(sorted(cosines, key=lambda n: (cosines[n], n))[: self.config.num_proj_layers])
        logger.info("Safe LoRA: projecting %d of %d modules (lowest cosine %.3f)", len(chosen), len(cosines),
                    min(cosines.values(), default=float("nan")))
        return replace(context, statistics={**context.statistics, **{n: n in chosen for n in cosines}})

    def restore_tensor(self, name: str, tensors: Mapping[str, torch.Tensor],
                       context: RestoreContext) -> RestoredTensor:
        """The projected update of one module, if it is selected (§3.6 steps 1–4, 7).

        Args:
            name: the module's weight name.
            tensors: ``base_model`` and ``aligned_model``, plus either ``target_model`` (dense update
                ΔW = W_target − W_aligned) or the target adapter's ``lora_A`` and ``lora_B`` for this module.
            context: in number mode, from :meth:`prepare`.

        Returns:
            With an adapter: the new ``lora_B`` = C B (scaling unchanged); else W_aligned + C ΔW. None when the
            module is not selected, V = 0, or the tensor is not 2-D. Report: cosine, projected, ‖V‖_F.

        Raises:
            ConfigError: a role is missing, or number mode was not prepared.
            ModelMismatchError: shapes differ, or the LoRA factors do not fit the weight.
        """
        if self.config.select_layers_type == "threshold" and self.config.threshold == 0:
            return RestoredTensor(None, {"skipped": "threshold = 0"})
        if self.config.select_layers_type == "number" and self.config.num_proj_layers == 0:
            return RestoredTensor(None, {"skipped": "num_proj_layers = 0"})
        projection = self._project(name, tensors)
        if projection is None:
            return RestoredTensor(None, {"skipped": "not a 2-D weight, V = 0, or no update"})
        if self.config.select_layers_type == "threshold":
            selected = projection.cosine < self.config.threshold
        elif name in context.statistics:
            selected = bool(context.statistics[name])
        else:
            raise ConfigError(f"Safe LoRA number mode: tensor {name} was not ranked; call prepare(context) with "
                              "context.tensors streaming every module first.")
        report = {"cosine": projection.cosine, "projected": selected, "v_norm": projection.v_norm}
        if not selected:
            return RestoredTensor(None, report)
        new = projection.projected if LORA_B in tensors else projection.aligned + projection.projected
        return RestoredTensor(new, report)

    def _project(self, name: str, tensors: Mapping[str, torch.Tensor]) -> _Projection | None:
        """C M and cos_l for one module; None for a 1-D tensor, V = 0 (warned) or a zero update."""
        lora = LORA_B in tensors or LORA_A in tensors
        x = self.inputs(name, tensors, ("base_model", "aligned_model") if lora else self.roles)
        aligned = x["aligned_model"]
        if aligned.dim() != 2:
            return None
        V = aligned - x["base_model"]
        v_norm = frobenius(V)
        if v_norm == 0:
            logger.warning("Safe LoRA: W_aligned = W_base for %s, so C is undefined; the module is left as is.", name)
            return None
        if lora:
            update, A = _lora_factors(name, tensors, tuple(aligned.shape))
            gram = A @ A.T
        else:
            update, gram = x["target_model"] - aligned, None
        if not update.any():
            return None
        projected = align(V, update, self.config.projector, self.config.svd_tol)
        return _Projection(update, projected, projection_cosine(projected, update, gram), v_norm, aligned)


def _lora_factors(name: str, tensors: Mapping[str, torch.Tensor],
                  shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in fp32, checked against the weight's (d_out, d_in)."""
    if LORA_A not in tensors or LORA_B not in tensors:
        raise ConfigError(f"Safe LoRA: tensor {name} has only one of {LORA_A}/{LORA_B}; pass both factors of the "
                          "target adapter's module.")
    B, A = tensors[LORA_B].float(), tensors[LORA_A].float()
    if B.dim() != 2 or A.dim() != 2 or B.shape[0] != shape[0] or A.shape[1] != shape[1] or B.shape[1] != A.shape[0]:
        raise ModelMismatchError(f"Safe LoRA: the adapter factors of {name} are B {tuple(B.shape)} and A "
                                 f"{tuple(A.shape)}, but the weight is {shape}; expected B (d_out × r) and A "
                                 "(r × d_in). The adapter was trained on another model.")
    return B, A
