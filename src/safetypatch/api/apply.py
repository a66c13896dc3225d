"""``safetypatch apply``: put one or more safety patches onto a model (the base they were trained on or a fine-tuned
descendant) as an unmerged PEFT adapter, or merged into the weights (docs/methods.md §3.3, §5.1, §5.3, §5.8).

Several patch folders (Mou's successive patches) are combined exactly in ΔW space first (``linear``:
ΔW = Σ_i w_i s_i B_i A_i, independent of the order). :func:`apply_patch_folders` is the one code path that loads,
combines and attaches or merges patches; ``safetypatch eval --adapter`` uses it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from safetypatch.config import Dtype, StrictConfig
from safetypatch.errors import ConfigError
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.models.loading import load_model
from safetypatch.utils.environment import package_versions
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import ensure_writable

if TYPE_CHECKING:
    from safetypatch.patch import ApplyResult, OverlapReduction, Patch, PatchManifest, ReducedPatch

APPLIED_RECORD = "safety_patch_applied.json"
# Keys save_patch writes afresh into every manifest; a re-saved patch must not carry the old values along.
_WRITTEN_BY_SAVE = ("adapter", "library_versions", "created")


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, (str, Path)) else value


PathList = Annotated[list[Path], BeforeValidator(_one_or_many), Field(min_length=1)]
"""One or more folders; a single path is read as a one-element list."""


class ApplyConfig(StrictConfig):
    """Options of ``safetypatch apply`` (docs/methods.md §3.3): which patches go onto which model, and how."""

    model: str = Field(DEFAULT_MODEL, description="Target: the patch base or a fine-tuned descendant of it (catalog "
                                                  "name, local folder, .gguf or Hub id).")
    revision: str | None = Field(None, description="Hub revision (Hub ids only).")
    patches: PathList = Field(description="Patch folders; several are combined exactly in ΔW first (linear, "
                                          "independent of their order).")
    weights: list[float] | None = Field(None, description="Weight w_i per patch (default 1 each; negative subtracts).")
    mode: Literal["attach", "merge"] = Field(
        "attach", description="attach: an unmerged PEFT adapter (docs/methods.md §5.3 default); merge: W' = W + γ·ΔW.")
    scale: float = Field(1.0, description="Merge scale γ (merge only; above 1 is warned about, 0 refused).")
    reduce_k: int = Field(0, ge=0, description="Merge-time overlap reduction (§3.3, ours): top-k singular subspace "
                                               "of the target's weight removed from ΔW; 0 = none (merge only).")
    reduce_side: Literal["column", "row", "both"] = Field(
        "column", description="Side of the reduction: output space (U_k), input space (V_k) or both.")
    reduce_retention: float = Field(
        0.0, ge=0, le=1, description="λ: share of ΔW's in-subspace component kept (1 = nothing removed).")
    output: Path | None = Field(None, description="merge: a complete HF model folder; attach: a PEFT adapter folder; "
                                                  "none: the patched model stays in memory only.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    dtype: Dtype = Field("auto", description="Weights dtype, also of the merged folder: auto, float32, bfloat16 or "
                                             "float16.")

    @model_validator(mode="after")
    def _consistent(self) -> ApplyConfig:
        check_weights(self, self.patches, self.weights)
        ignored = sorted({"reduce_side", "reduce_retention"} & self.model_fields_set)
        if ignored and self.reduce_k == 0:
            raise ConfigError(f"ApplyConfig: {', '.join(ignored)} set but reduce_k is 0, so nothing would be "
                              "reduced. Set reduce_k (e.g. 64) or drop them.")
        merge_only = [name for name, on in (("scale", self.scale != 1.0), ("reduce_k", self.reduce_k > 0)) if on]
        if merge_only and self.mode == "attach":
            raise ConfigError(f"ApplyConfig: {', '.join(merge_only)} act on merged weights, but mode is attach. "
                              "Set mode: merge, or drop them (to attach a scaled patch, give weights, e.g. [0.5]).")
        return self

    def overlap_reduction(self) -> OverlapReduction | None:
        """The §3.3 reduction settings, or None when ``reduce_k`` is 0."""
        from safetypatch.patch import OverlapReduction

        if self.reduce_k == 0:
            return None
        return OverlapReduction(k=self.reduce_k, side=self.reduce_side, retention=self.reduce_retention)


def check_weights(config: StrictConfig, patches: Sequence[Path], weights: Sequence[float] | None) -> None:
    """Refuse a weight list whose length is not the number of patch folders (``config`` names the option set).

    Raises:
        ConfigError: naming both counts.
    """
    if weights is not None and len(weights) != len(patches):
        raise ConfigError(f"{type(config).__name__}: {len(patches)} patches but {len(weights)} weights; give one "
                          "weight per patch, in the same order.")


@dataclass(frozen=True)
class PatchSource:
    """One applied patch folder: where it is, the sha256 of its ``safety_patch.json`` (None for a plain PEFT
    adapter) and its rank."""

    path: Path
    manifest_sha256: str | None
    rank: int


@dataclass(frozen=True)
class AppliedPatches:
    """Patch folders applied to a model in memory (see :func:`apply_patch_folders`).

    Attributes:
        result: the attach or merge result: the model, the checks, warnings, per-module merge and reduction reports.
        patch: the patch applied, before any reduction: the single input, or the exact linear combination.
        sources: the folders, in the order given.
        weights: w_i per folder, or None (all 1).
        combination: ``linear`` when several folders (or weights) were combined, else None.
    """

    result: ApplyResult
    patch: Patch
    sources: tuple[PatchSource, ...]
    weights: tuple[float, ...] | None
    combination: str | None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account: the ``config.adapter`` block of a results file and the core of
        ``safety_patch_applied.json``."""
        result = self.result
        return {
            "name": "+".join(source.path.name for source in self.sources),
            "paths": [str(source.path) for source in self.sources],
            "manifest_sha256": [source.manifest_sha256 for source in self.sources],
            "weights": list(self.weights) if self.weights is not None else None,
            "combination": self.combination,
            "mode": result.mode, "scale": result.gamma, "rank": self.patch.rank, "modules": len(self.patch.factors),
            "applied_to": result.applied_to, "max_logit_change": result.max_logit_change,
            "max_cast_error": max((m.cast_error for m in result.modules), default=None),
            "reduction": _reduction_summary(result.reduction), "warnings": list(result.warnings),
        }


@dataclass(frozen=True)
class AppliedModel:
    """A patched model, in memory and (with ``output``) on disk.

    Attributes:
        model: the PEFT model carrying the patch (attach) or the transformers model with merged weights (merge).
        tokenizer: the target's tokenizer.
        output: where the merged model folder or the adapter folder was written, or None.
        mode: ``attach`` or ``merge``.
        scale: the merge scale γ (1.0 for attach).
        applied_to: the target's fingerprint, the patch base's, and whether they are equal (None when the patch
            records no base fingerprint); a fine-tuned descendant differs, which is allowed and warned about.
        max_logit_change: max |Δlogit| between patched and unpatched target on the probe batch.
        warnings: human-readable warnings (also logged).
        reduction: the §3.3 overlap reduction report, or None.
        record: what ``safety_patch_applied.json`` holds (target provenance, patch folders and manifest sha256s,
            scale, reduction summary, warnings, max_logit_change, and the written folder's fingerprint).
    """

    model: Any
    tokenizer: Any
    output: Path | None
    mode: str
    scale: float
    applied_to: dict[str, Any]
    max_logit_change: float
    warnings: tuple[str, ...]
    reduction: ReducedPatch | None
    record: dict[str, Any]


def apply_patch_folders(
    model: Any, folders: Sequence[Path], *, weights: Sequence[float] | None = None,
    mode: Literal["attach", "merge"] = "attach", scale: float = 1.0, reduction: OverlapReduction | None = None,
    fingerprint: str | None = None,
) -> AppliedPatches:
    """Load patch folders, combine several exactly in ΔW space, and attach or merge the result onto ``model`` with
    the fingerprint, no-effect and merge self-test checks (docs/methods.md §3.3, §5.1, §5.8).

    Args:
        model: a plain transformers causal LM; a merge changes its weights in place.
        folders: patch folders (safetypatch patches or plain PEFT LoRA adapters).
        weights: w_i per folder for the ``linear`` combination (default all 1).
        mode: ``attach`` (unmerged PEFT adapter) or ``merge``.
        scale: merge scale γ (merge only).
        reduction: §3.3 merge-time overlap reduction against ``model``'s own weights (merge only), or None.
        fingerprint: ``model``'s fingerprint sha256, compared with the patch base's and recorded as ``applied_to``.

    Returns:
        An :class:`AppliedPatches`.

    Raises:
        ConfigError: no folder, a weight count mismatch, γ = 0, or a scale or reduction with mode ``attach``.
        ModelMismatchError: the patch's architecture, module names or shapes do not fit ``model`` (named).
        PatchError: a folder is not a readable LoRA adapter, the patches disagree on a module's shape, ΔW is zero,
            the merge self-test fails, or the patch does not change the model's logits.
    """
    from safetypatch.patch import attach_patch, merge_patch

    if mode == "attach" and (scale != 1.0 or reduction is not None):
        raise ConfigError(f"scale={scale} and overlap reduction act on merged weights; use mode 'merge' (to attach "
                          "a scaled patch, give it a weight instead).")
    loaded = load_patch_folders(folders, weights)
    if mode == "merge":
        result = merge_patch(model, loaded.patch, gamma=scale, reduction=reduction, fingerprint=fingerprint)
    else:
        result = attach_patch(model, loaded.patch, fingerprint=fingerprint)
    return AppliedPatches(result, loaded.patch, loaded.sources, loaded.weights, loaded.combination)


@dataclass(frozen=True)
class LoadedPatches:
    """Patch folders read and combined (see :func:`load_patch_folders`).

    Attributes:
        patch: the single input, or the exact linear combination of all of them.
        patches: each folder's patch, in the order given.
        sources: the folders, in the same order.
        weights: w_i per folder, or None (all 1).
        combination: ``linear`` when several folders (or weights) were combined, else None.
    """

    patch: Patch
    patches: tuple[Patch, ...]
    sources: tuple[PatchSource, ...]
    weights: tuple[float, ...] | None
    combination: str | None


def load_patch_folders(folders: Sequence[Path], weights: Sequence[float] | None = None) -> LoadedPatches:
    """Load patch folders and combine several exactly in ΔW space (``linear``: ΔW = Σ_i w_i s_i B_i A_i).

    Raises:
        ConfigError: no folder, or a weight count mismatch.
        PatchError: a folder is not a readable LoRA adapter, or the patches disagree on a module's shape.
    """
    from safetypatch.patch import combine_patches, load_patch
    from safetypatch.patch.artifact import MANIFEST

    patches = tuple(load_patch(Path(folder)) for folder in folders)
    weights = tuple(float(w) for w in weights) if weights is not None else None
    combination = None if len(patches) == 1 and weights in (None, (1.0,)) else "linear"
    patch = patches[0] if combination is None else combine_patches(patches, weights, method="linear").patch
    sources = tuple(
        PatchSource(p.folder, sha256_file(p.folder / MANIFEST) if (p.folder / MANIFEST).is_file() else None, p.rank)
        for p in patches
    )
    return LoadedPatches(patch, patches, sources, weights, combination)


def apply_patch(config: ApplyConfig) -> AppliedModel:
    """Apply safety patches to a model and keep it in memory; with ``output``, also write it atomically: a complete
    HF model folder plus ``safety_patch_applied.json`` (merge), or the (combined) patch as a verified PEFT adapter
    folder (attach) (docs/methods.md §3.3, §5.8).

    Args:
        config: target model, patch folders, mode, scale, reduction and output.

    Returns:
        An :class:`AppliedModel`.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false, or it is not this tool's to replace (a
            folder of other files, the current folder; checked before the model is loaded).
        ModelError: the target cannot be resolved or loaded, or a tensor of the merged folder does not read back
            as it is in memory (nothing is left at ``output``).
        ModelMismatchError: a patch was made for another architecture, other module names or other shapes.
        PatchError: a patch is unreadable or empty, changes nothing, or the written adapter fails its check.
        ConfigError: see :func:`apply_patch_folders`.
    """
    cfg = config
    if cfg.output is not None:
        ensure_writable(cfg.output, cfg.overwrite, folder=True)
    loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype)
    applied = apply_patch_folders(loaded.model, cfg.patches, weights=cfg.weights, mode=cfg.mode, scale=cfg.scale,
                                  reduction=cfg.overlap_reduction(), fingerprint=loaded.fingerprint.sha256)
    record = {"schema_version": 1, "target": loaded.provenance(), **applied.summary(),
              "library_versions": package_versions(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if cfg.output is not None and cfg.mode == "merge":
        record["output_fingerprint"] = _write_merged(applied, loaded.tokenizer, record, cfg.output, cfg.overwrite)
    elif cfg.output is not None:
        from safetypatch.patch import save_patch

        save_patch(applied.result.model, cfg.output, _adapter_manifest(applied.patch, record),
                   overwrite=cfg.overwrite)
    result = applied.result
    return AppliedModel(result.model, loaded.tokenizer, cfg.output, result.mode, result.gamma, result.applied_to,
                        result.max_logit_change, result.warnings, result.reduction, record)


def _write_merged(applied: AppliedPatches, tokenizer: Any, record: dict[str, Any], folder: Path,
                  overwrite: bool) -> str:
    """Write the merged model, its tokenizer and the record atomically; returns the written folder's fingerprint."""
    from safetypatch.models.saving import save_model_folder

    def record_text(fingerprint: str) -> str:
        return json.dumps({**record, "output_fingerprint": fingerprint}, indent=2, default=str) + "\n"

    return save_model_folder(applied.result.model, tokenizer, folder, sidecars={APPLIED_RECORD: record_text},
                             overwrite=overwrite).sha256


def _adapter_manifest(patch: Patch, record: dict[str, Any]) -> PatchManifest:
    """The applied patch's own manifest fields (its patch base stays the model it was trained on), with anything
    else it records (combination sources, weights) and the application ``record`` under ``extra``."""
    from safetypatch.patch import PatchManifest

    source = {key: value for key, value in (patch.manifest or {}).items() if key not in _WRITTEN_BY_SAVE}
    fields = {key: source.pop(key) for key in list(source) if key in PatchManifest.model_fields}
    extra = {**fields.pop("extra", {}), **source, "applied": record}
    return PatchManifest(**{"method": "peft_adapter", **fields, "extra": extra})


def _reduction_summary(reduced: ReducedPatch | None) -> dict[str, Any] | None:
    if reduced is None:
        return None
    modules = reduced.modules
    means = {f"mean_{key}": sum(getattr(m, key) for m in modules) / len(modules)
             for key in ("retained_energy", "overlap_before", "overlap_after")} if modules else {}
    return {**reduced.config.model_dump(mode="json"), "modules": len(modules), **means}
