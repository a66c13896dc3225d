"""Apply a safety patch to a model: attach it as an unmerged PEFT adapter, or merge W' = W + γ·ΔW' into the weights,
optionally after the merge-time overlap reduction (docs/methods.md §3.3, §5.1, §5.3, §5.8).

Guards: the patch must fit the model's architecture, module names and shapes (a different fingerprint is allowed
and recorded as ``applied_to``); a patch whose ΔW is zero everywhere is refused; merges are computed in fp32 and
self-tested before any weight is written; and the patched model's logits must differ from the unpatched ones on a
probe batch, else the patch "has no effect".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from safetypatch.errors import ConfigError, PatchError
from safetypatch.patch.factors import Patch, check_compatible, module_weight
from safetypatch.patch.probe import attach_peft, detach_peft, max_abs_diff, probe_input_ids, probe_logits
from safetypatch.patch.reduce import OverlapReduction, ReducedPatch, reduce_overlap

logger = logging.getLogger(__name__)

EFFECT_ATOL = 1e-4  # §4.4 / §5.8: max |Δlogit| on the probe batch must exceed this
ZERO_DELTA_RTOL = 1e-7  # ‖ΔW‖_F / ‖W‖_F below this in every module: the patch is empty
MERGE_SELF_TEST_RTOL = 1e-5
CAST_WARN_RTOL = 1e-2  # storage-dtype rounding that loses this share of ΔW is reported


@dataclass(frozen=True)
class ModuleMerge:
    """One merged module.

    Attributes:
        module: module name.
        delta_norm: ‖γΔW'‖_F.
        relative_delta: ‖γΔW'‖_F / ‖W‖_F.
        cast_error: ‖(W'_stored − W) − γΔW'‖_F / ‖γΔW'‖_F, the share of the update lost to the storage dtype.
    """

    module: str
    delta_norm: float
    relative_delta: float
    cast_error: float


@dataclass(frozen=True)
class ApplyResult:
    """A patched model and what was checked.

    Attributes:
        model: the PEFT model (attach) or the same model with merged weights (merge).
        mode: ``attach`` or ``merge``.
        gamma: the merge scale (1.0 for attach).
        applied_to: the target's fingerprint, the patch base's, and whether they are equal (None if unknown).
        max_logit_change: max |Δlogit| between patched and unpatched model on the probe batch.
        modules: per-module merge report (empty for attach).
        reduction: the overlap reduction applied before merging, if any.
        warnings: human-readable warnings (also logged).
    """

    model: Any
    mode: str
    gamma: float
    applied_to: dict[str, Any]
    max_logit_change: float
    modules: tuple[ModuleMerge, ...] = ()
    reduction: ReducedPatch | None = None
    warnings: tuple[str, ...] = ()


def attach_patch(model: Any, patch: Patch, *, fingerprint: str | None = None, adapter_name: str = "safetypatch",
                 probe_seed: int = 0) -> ApplyResult:
    """Attach ``patch`` to ``model`` as an unmerged PEFT adapter (docs/methods.md §3.3, §5.8).

    Args:
        model: a plain transformers causal LM.
        patch: the patch.
        fingerprint: the model's fingerprint sha256 (``LoadedModel.fingerprint.sha256``), recorded and compared
            with the patch base's.
        adapter_name: the PEFT adapter name.
        probe_seed: seed of the probe batch.

    Returns:
        An :class:`ApplyResult` whose ``model`` is the PEFT model.

    Raises:
        ModelMismatchError: architecture, module names or shapes differ.
        PatchError: ΔW is zero everywhere, or the attached model's logits equal the base's ("no effect").
    """
    warnings = _preflight(model, patch, fingerprint)
    ids = probe_input_ids(model, probe_seed)
    before = probe_logits(model, ids)
    peft_model = attach_peft(model, patch, adapter_name)
    change = max_abs_diff(probe_logits(peft_model, ids), before)
    if change <= EFFECT_ATOL:
        detach_peft(peft_model)
        raise _no_effect(patch, change)
    return ApplyResult(peft_model, "attach", 1.0, _applied_to(patch, fingerprint), change, warnings=warnings)


def merge_patch(model: Any, patch: Patch, *, gamma: float = 1.0, reduction: OverlapReduction | None = None,
                reference: Any | None = None, fingerprint: str | None = None, probe_seed: int = 0) -> ApplyResult:
    """Merge W' = W + γ·ΔW' into ``model``'s weights in place, ΔW' optionally overlap-reduced (docs/methods.md §3.3).

    Args:
        model: a plain transformers causal LM with float weights (quantized weights are refused, §5.3).
        patch: the patch.
        gamma: merge scale γ (warned about when > 1: a secondary source reports sharp utility loss; 0 is refused).
        reduction: §3.3 overlap reduction settings, or None for a plain merge.
        reference: the model whose weights define U_k/V_k (default: ``model``, §3.3 ``reference: target``).
        fingerprint: the model's fingerprint sha256, recorded as ``applied_to``.
        probe_seed: seed of the probe batch.

    Returns:
        An :class:`ApplyResult` whose ``model`` is ``model`` with merged weights.

    Raises:
        ConfigError: γ = 0 or not finite.
        ModelMismatchError: architecture, module names or shapes differ.
        PatchError: ΔW is zero everywhere, non-finite, a weight is not a float tensor, the merge self-test fails,
            or the merged model's logits equal the unmerged ones ("no effect").
    """
    if gamma == 0 or not math.isfinite(gamma):
        raise ConfigError(f"merge scale gamma={gamma}: use a finite non-zero scale (gamma=0 merges nothing; use the "
                          "model as it is).")
    warnings = list(_preflight(model, patch, fingerprint))
    if gamma > 1:
        warnings.append(f"merge scale gamma={gamma} > 1: scales above 1 have been reported to hurt utility sharply "
                        "(docs/methods.md §3.3); sweep 0.5-1.0 first.")
        logger.warning(warnings[-1])
    reference = model if reference is None else reference
    reduced = reduce_overlap(patch, reference, reduction) if reduction is not None else None
    effective = reduced.patch if reduced is not None else patch
    report = [_check_merge(model, effective, name, gamma) for name in effective.factors]
    ids = probe_input_ids(model, probe_seed)
    before = probe_logits(model, ids)
    with torch.no_grad():  # only now, with every module checked, is anything written (one module at a time)
        for name in effective.factors:
            weight = module_weight(model, name)
            weight.copy_(_merged(weight, effective, name, gamma)[0].to(weight.dtype))
    lossy = [m.module for m in report if m.cast_error > CAST_WARN_RTOL]
    if lossy:
        warnings.append(f"{len(lossy)} modules lost over {CAST_WARN_RTOL:.0%} of their update to the storage dtype "
                        f"(e.g. {lossy[0]}); merge in float32 or keep the patch as an adapter.")
        logger.warning(warnings[-1])
    change = max_abs_diff(probe_logits(model, ids), before)
    if change <= EFFECT_ATOL:
        raise _no_effect(effective, change)
    return ApplyResult(model, "merge", gamma, _applied_to(patch, fingerprint), change, tuple(report), reduced,
                       tuple(warnings))


def _preflight(model: Any, patch: Patch, fingerprint: str | None) -> tuple[str, ...]:
    check_compatible(model, patch)
    largest = 0.0
    for name, f in patch.factors.items():
        # ‖s B A‖_F² = s² tr(BᵀB A Aᵀ), without forming ΔW
        norm = abs(patch.scaling) * float(((f.B.T @ f.B) * (f.A @ f.A.T)).sum().clamp_min(0).sqrt())
        weight_norm = float(module_weight(model, name).detach().float().norm())
        if not math.isfinite(norm):
            raise PatchError(f"patch {patch.where}, module {name}: ΔW is not finite (NaN or Inf in the factors).")
        largest = max(largest, norm / weight_norm if weight_norm > 0 else norm)
    if largest < ZERO_DELTA_RTOL:
        raise PatchError(f"patch {patch.where}: ΔW is zero in every one of its {len(patch.factors)} modules (largest "
                         f"‖ΔW‖/‖W‖ = {largest:.1e}); it is untrained or its weights were lost in saving.")
    applied_to = _applied_to(patch, fingerprint)
    if applied_to["same_as_patch_base"] is False:
        message = (f"applying patch {patch.where} to a model with fingerprint {fingerprint[:12]}…, not the patch "
                   f"base {applied_to['patch_base_fingerprint'][:12]}… (recorded as applied_to).")
        logger.warning(message)
        return (message,)
    return ()


def _applied_to(patch: Patch, fingerprint: str | None) -> dict[str, Any]:
    base = ((patch.manifest or {}).get("base_model") or {}).get("fingerprint")
    same = None if fingerprint is None or base is None else fingerprint == base
    return {"fingerprint": fingerprint, "patch_base_fingerprint": base, "same_as_patch_base": same}


def _merged(weight: torch.Tensor, patch: Patch, name: str, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W + γΔW, γΔW) in fp32 for one module."""
    update = gamma * patch.delta(name).to(weight.device)
    return weight.detach().float() + update, update


def _check_merge(model: Any, patch: Patch, name: str, gamma: float) -> ModuleMerge:
    """Self-test one module's merge in fp32 and measure what the storage dtype loses, writing nothing."""
    weight = module_weight(model, name)
    if not weight.dtype.is_floating_point:
        raise PatchError(f"module {name} stores {weight.dtype} weights (a quantized model?); merging into them "
                         "loses the patch (docs/methods.md §5.3). Load the model in bf16/fp32 or attach the patch.")
    new, update = _merged(weight, patch, name, gamma)
    original = weight.detach().float()
    update_norm, weight_norm = float(update.norm()), float(original.norm())
    if not float((new - original - update).norm()) <= MERGE_SELF_TEST_RTOL * max(update_norm, weight_norm):
        raise PatchError(f"merge self-test failed on module {name}: W' − W differs from γΔW in fp32 (or is not "
                         "finite); nothing was written.")
    cast_error = float((new.to(weight.dtype).float() - original - update).norm()) / update_norm if update_norm else 0.0
    return ModuleMerge(name, update_norm, update_norm / max(weight_norm, 1e-30), cast_error)


def _no_effect(patch: Patch, change: float) -> PatchError:
    return PatchError(f"patch {patch.where} has no effect: the patched model's logits differ from the unpatched "
                      f"model's by at most {change:.2e} on the probe batch (threshold {EFFECT_ATOL}). The patch is "
                      "too small, was reduced away, or is not reaching the model (docs/methods.md §5.8).")
