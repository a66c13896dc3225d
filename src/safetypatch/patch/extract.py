"""Turn any weight delta into a LoRA patch of a chosen rank by truncated SVD, reporting the relative Frobenius
error per module and overall (docs/methods.md §2.2, §3.3 ``svd``; the ``extract`` item of the restoration issue).

Role: the bridge from full-weight methods (an LSSF fusion, a RESTA repair, a full-parameter Refusal-SFT patch) to
the adapter world (``patch.artifact.save_patch``, ``patch.apply``). :func:`extract_lora` works on deltas already in
memory or streamed one at a time; :func:`extract_from_checkpoints` streams ΔW = target − reference from two model
folders through ``weights.stream``, one module in memory at a time.

Convention: ΔW ≈ U_r S_r V_rᵀ with sign-fixed singular vectors (``weights.linalg.top_singular``), split evenly as
B = U_r S_r^{1/2}, A = S_r^{1/2} V_rᵀ, and lora_alpha = r, so s = lora_alpha / r = 1 and the patch's
ΔW = s·B·A = U_r S_r V_rᵀ. Modules whose ΔW is exactly zero are left out of the patch (they change nothing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetypatch.errors import ConfigError, PatchError
from safetypatch.patch.factors import LoraFactors, Patch
from safetypatch.weights.linalg import low_rank_factors
from safetypatch.weights.stream import CheckpointReader, aligned, compute_device, select_names

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class ExtractedPatch:
    """A LoRA patch extracted from weight deltas, with its truncation errors.

    Attributes:
        patch: the patch (rank r, lora_alpha = r, so s = 1), one module per non-zero ΔW.
        errors: module → ε = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F.
        error: overall ε = √(Σ‖ΔW_i − s·B_i·A_i‖_F²) / √(Σ‖ΔW_i‖_F²) over the patched modules.
        unchanged: modules whose ΔW is exactly zero, left out of the patch.
    """

    patch: Patch
    errors: dict[str, float]
    error: float
    unchanged: tuple[str, ...] = ()


def extract_lora(delta: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], rank: int, *,
                 manifest: Mapping[str, Any] | None = None) -> ExtractedPatch:
    """Factor each module's ΔW into rank-``rank`` LoRA factors by exact truncated SVD (docs/methods.md §3.3 ``svd``).

    SVDs run on :func:`~safetypatch.weights.stream.compute_device` (a GPU when present) in fp32; the factors come
    back to the CPU. An iterable is consumed one module at a time, so only one ΔW is in memory.

    Args:
        delta: module name (``model.layers.3.mlp.up_proj``, no ``.weight``) → its d_out × d_in ΔW, as a mapping or
            an iterable of pairs.
        rank: the LoRA rank r (≥ 1); a module with min(d_out, d_in) < r gets zero columns, so every module has
            rank r and full rank reconstructs ΔW exactly.
        manifest: extra fields for the patch's in-memory manifest (e.g. the source checkpoints).

    Returns:
        An :class:`ExtractedPatch`.

    Raises:
        ConfigError: ``rank`` < 1, or a name ends in ``.weight`` (a tensor name, not a module name).
        PatchError: a ΔW is not 2-D, has NaN/Inf, a module repeats, or every ΔW is zero.
    """
    if rank < 1:
        raise ConfigError(f"extract_lora: rank must be ≥ 1, got {rank}.")
    pairs = delta.items() if isinstance(delta, Mapping) else delta
    device = compute_device()
    factors: dict[str, LoraFactors] = {}
    errors: dict[str, float] = {}
    unchanged: list[str] = []
    residual_sq = total_sq = 0.0
    for module, matrix in pairs:
        _check_delta(module, matrix, seen=module in factors or module in unchanged)
        matrix = matrix.to(device=device, dtype=torch.float32)
        norm = float(torch.linalg.matrix_norm(matrix))
        if norm == 0.0:
            unchanged.append(module)
            continue
        low = low_rank_factors(matrix, rank)
        factors[module] = LoraFactors(A=low.A.cpu(), B=low.B.cpu())
        errors[module] = low.error
        residual_sq += (low.error * norm) ** 2
        total_sq += norm**2
    if not factors:
        raise PatchError(f"extract_lora: ΔW is zero in all {len(unchanged)} modules, so there is nothing to extract "
                         "(are the two checkpoints the same?).")
    overall = math.sqrt(residual_sq / total_sq)
    document = {"method": "extract:svd", "rank": rank, "relative_error": overall, "errors": errors,
                "unchanged_modules": unchanged, **(manifest or {})}
    patch = Patch(config=_lora_config(rank, sorted(factors)), factors=dict(sorted(factors.items())),
                  manifest=document)
    logger.info("extracted a rank-%d patch over %d modules (%d unchanged): overall relative error %.3g, worst %.3g",
                rank, len(factors), len(unchanged), overall, max(errors.values()))
    return ExtractedPatch(patch, errors, overall, tuple(unchanged))


def extract_from_checkpoints(target: Path, reference: Path, rank: int, *,
                             module_map: Mapping[str, str] | None = None) -> ExtractedPatch:
    """Extract ΔW = target − reference (fp32) of every ``linear``-scope module as a rank-``rank`` LoRA patch.

    The two folders are streamed tensor by tensor (docs/methods.md §5.2), so memory follows the largest module, not the
    models. Only the ``linear`` scope (§2.3) is extracted: a patch holds lora_A/lora_B factors of linear layers,
    and PEFT adapts embeddings with other keys.

    Args:
        target: the model folder whose difference is extracted (e.g. an LSSF-repaired or fully fine-tuned model).
        reference: the model folder the patch will be applied to (e.g. ``aligned_model``).
        rank: the LoRA rank.
        module_map: ``model_type`` → regex for architectures without a shipped pattern
            (:func:`~safetypatch.weights.stream.select_names`).

    Returns:
        An :class:`ExtractedPatch` whose manifest records both folders. Save it with
        :func:`~safetypatch.patch.artifact.save_patch` (``model=`` the reference model).

    Raises:
        ModelError: a folder is not a readable safetensors checkpoint.
        ModelMismatchError: a module is missing from one folder or has another shape.
        ConfigError, PatchError: as :func:`extract_lora` and ``select_names``.
    """
    readers = {"target_model": CheckpointReader(target), "reference": CheckpointReader(reference)}
    names = select_names(readers["target_model"], "linear", module_map)
    deltas = ((name.removesuffix(_WEIGHT_SUFFIX), tensors["target_model"] - tensors["reference"])
              for name, tensors in aligned(readers, names))
    return extract_lora(deltas, rank, manifest={"target": str(target), "reference": str(reference)})


def _check_delta(module: str, matrix: torch.Tensor, *, seen: bool) -> None:
    if module.endswith(_WEIGHT_SUFFIX):
        raise ConfigError(f"extract_lora: {module!r} is a tensor name; give the module name "
                          f"{module.removesuffix(_WEIGHT_SUFFIX)!r} (a patch adapts modules).")
    if seen:
        raise PatchError(f"extract_lora: module {module} appears twice; give each module's ΔW once.")
    if matrix.dim() != 2:
        raise PatchError(f"extract_lora: ΔW of {module} has shape {tuple(matrix.shape)}; LoRA factors need a 2-D "
                         "d_out × d_in weight delta.")
    if not bool(torch.isfinite(matrix).all()):
        raise PatchError(f"extract_lora: ΔW of {module} contains NaN or Inf; check the computation that made it.")


def _lora_config(rank: int, modules: list[str]) -> dict[str, Any]:
    """A plain PEFT LoRA config on exactly ``modules`` with s = lora_alpha / r = 1."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0,
                        task_type="CAUSAL_LM").to_dict()
    return {key: (sorted(value) if isinstance(value, set) else value) for key, value in config.items()}
