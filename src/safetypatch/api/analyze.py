"""``safetypatch analyze``: where a weight update lives relative to the weights it changes (docs/methods.md §3.8).

The update is a safety patch on the model it was trained on (ΔW = s·B·A per module) or the difference of two
checkpoints (ΔW = target − model, e.g. a full-parameter Refusal-SFT model minus its base). Per module and layer it
measures Mou et al.'s similarity, principal angles, Xue & Mirzasoleiman's overlaps, stable rank, norms, the LSSF
entropy rank and, with an unaligned ``base_model``, LoX's R_align / R_ft, each similarity next to a seeded
random-subspace baseline; and the hidden-state shift per layer on benign and harmful prompts. The output folder holds
``analysis.json`` and PNG figures; ``safetypatch report --analysis`` renders it into the HTML report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from safetypatch.analysis.settings import SubspaceSettings
from safetypatch.api._progress import Progress
from safetypatch.config import Dtype
from safetypatch.errors import ConfigError
from safetypatch.models.catalog import DEFAULT_MODEL

if TYPE_CHECKING:
    from safetypatch.analysis import AnalysisDocument
    from safetypatch.analysis.cache import ReferenceCache
    from safetypatch.models.resolve import ResolvedModel
    from safetypatch.patch import Patch


class AnalyzeConfig(SubspaceSettings):
    """Options of ``safetypatch analyze``: the update (a patch, or target − model), the metric depths, the prompts of
    the hidden-state shift, and where the report goes."""

    model: str = Field(DEFAULT_MODEL, description="W_0: the model a patch was trained on, or the reference of "
                                                  "target − model (catalog name, folder, .gguf or Hub id).")
    revision: str | None = Field(None, description="Hub revision of model (Hub ids only).")
    patch: Path | None = Field(None, description="Safety patch (PEFT LoRA adapter folder) whose ΔW = s·B·A is "
                                                 "analysed on model.")
    target: str | None = Field(None, description="Checkpoint whose difference from model is analysed (e.g. a "
                                                 "full-parameter Refusal-SFT model).")
    base_model: str | None = Field(None, description="Unaligned base of model, for LoX's R_align / R_ft "
                                                     "(ΔW_align = W_model − W_base).")
    module_map: dict[str, str] = Field(
        default_factory=dict, description="model_type → regex of the linear weight names (target mode), for "
        "architectures without a shipped pattern.")
    hidden_shift: bool = Field(True, description="Measure the hidden-state shift per layer (loads the model).")
    n_prompts: int = Field(32, ge=1, description="Prompts per set for the hidden-state shift.")
    harmful_set: str = Field("harmbench", description="Harmful prompts (evaluation half of its canonical split).")
    benign_set: str = Field("xstest-safe", description="Benign prompts (evaluation half of its canonical split).")
    position: Literal["last", "mean"] = Field(
        "last", description="Hidden state at the last prompt token (§3.8 default) or averaged over the prompt.")
    dtype: Dtype = Field("auto", description="Dtype of the models run for the hidden-state shift.")
    cache: bool = Field(True, description="Keep W_0's SVDs under $SAFETYPATCH_HOME, keyed by its fingerprint.")
    output_dir: Path = Field(Path("runs/analysis"), description="Output folder: analysis.json and PNG figures.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")

    @model_validator(mode="after")
    def _one_update(self) -> AnalyzeConfig:
        if (self.patch is None) == (self.target is None):
            raise ConfigError("AnalyzeConfig: give exactly one of patch (a LoRA adapter folder on model) and target "
                              "(a checkpoint; ΔW = target − model).")
        if self.module_map and self.patch is not None:
            raise ConfigError("AnalyzeConfig: module_map selects checkpoint tensors (target mode); a patch names "
                              "its own modules. Drop module_map.")
        return self


@dataclass(frozen=True)
class AnalyzeResult:
    """What ``analyze`` wrote.

    Attributes:
        output: the output folder.
        document: the analysis document (also at ``output / "analysis.json"``).
        figures: the PNG files written.
        seconds: wall time.
    """

    output: Path
    document: AnalysisDocument
    figures: tuple[Path, ...]
    seconds: float


def analyze(config: AnalyzeConfig, progress: Progress | None = None) -> AnalyzeResult:
    """Analyse a patch or a checkpoint delta module by module and write the report folder (docs/methods.md §3.8).

    Args:
        config: the update, the metric settings and the output.
        progress: called as ``("weights", done, total)`` per module and ``("hidden states", done, total)`` per
            prompt forward.

    Returns:
        An :class:`AnalyzeResult`.

    Raises:
        OutputExistsError: ``output_dir`` exists and ``overwrite`` is false (checked before any work).
        ModelError: a model cannot be resolved or read.
        ModelMismatchError: the patch or the target does not fit the model (tensor and file named).
        PatchError: the patch folder is missing, partial or not plain LoRA.
        DataError: a prompt set cannot be loaded.
    """
    from safetypatch.analysis.modules import BASE, MODEL, TARGET
    from safetypatch.patch import load_patch
    from safetypatch.utils.io import ensure_writable
    from safetypatch.weights.stream import CheckpointReader

    start = time.perf_counter()
    ensure_writable(config.output_dir, config.overwrite, folder=True)
    refs = {MODEL: config.model, TARGET: config.target, BASE: config.base_model}
    roles = {role: _resolve(role, ref, config.revision if role == MODEL else None)
             for role, ref in refs.items() if ref is not None}
    readers = {role: CheckpointReader(resolved.path) for role, resolved in roles.items()}
    patch = load_patch(config.patch) if config.patch is not None else None
    settings = config.resolved(patch.rank if patch is not None else None)
    models = _model_records(roles)
    rows, cache = _weight_rows(patch, readers, settings, models[MODEL]["fingerprint"], progress)
    hidden = _hidden_shift(settings, roles, patch, progress) if config.hidden_shift else None
    provenance = _provenance(models, patch, cache, time.perf_counter() - start)
    document, figures = _write(rows, settings, roles, patch, hidden, provenance)
    return AnalyzeResult(config.output_dir, document, figures, time.perf_counter() - start)


def _resolve(role: str, ref: str, revision: str | None) -> ResolvedModel:
    """A role's local folder; a failure names the role (and so the flag) it came from."""
    from safetypatch.errors import ModelError
    from safetypatch.models.resolve import resolve_model

    try:
        return resolve_model(ref, revision)
    except ModelError as exc:
        raise ModelError(f"{role} {ref!r}: {exc}") from exc


def _weight_rows(patch: Patch | None, readers: dict[str, Any], settings: AnalyzeConfig, fingerprint: str,
                 progress: Progress | None) -> tuple[list[dict[str, Any]], ReferenceCache]:
    """Every module's row, W_0's SVDs through the fingerprint-keyed cache."""
    from safetypatch.analysis.cache import ReferenceCache, cache_folder
    from safetypatch.analysis.modules import (
        MODEL,
        analyze_modules,
        checkpoint_inputs,
        checkpoint_tensor_names,
        patch_inputs,
        patch_tensor_names,
    )

    if patch is not None:
        names = patch_tensor_names(patch, readers[MODEL])
        items = patch_inputs(patch, readers, names)
    else:
        names = checkpoint_tensor_names(readers, settings.module_map or None)
        items = checkpoint_inputs(readers, names, settings)
    depth = max(settings.r, settings.k)
    folder = cache_folder(fingerprint, depth, settings.svd_method, settings.seed) if settings.cache else None
    cache = ReferenceCache(folder, depth, settings.svd_method, settings.seed)
    return analyze_modules(items, len(names), cache, settings, progress), cache


def _hidden_shift(settings: AnalyzeConfig, roles: dict[str, ResolvedModel], patch: Patch | None,
                  progress: Progress | None) -> dict[str, Any]:
    """The per-layer shift on the benign and harmful prompt sets; one model in memory at a time."""
    from safetypatch.analysis.document import hidden_shift_layers
    from safetypatch.analysis.hidden import layer_shift, residual_states, select_prompts
    from safetypatch.analysis.modules import MODEL, TARGET
    from safetypatch.models.loading import load_model
    from safetypatch.patch.probe import peft_attached

    sets = [select_prompts("benign", settings.benign_set, settings.n_prompts, settings.seed),
            select_prompts("harmful", settings.harmful_set, settings.n_prompts, settings.seed)]
    prompts = [prompt for prompt_set in sets for prompt in prompt_set.prompts]
    done = 0

    def tick(step: int) -> None:
        nonlocal done
        done += step
        if progress is not None:
            progress("hidden states", done, 2 * len(prompts))

    loaded = load_model(str(roles[MODEL].path), dtype=settings.dtype)
    tokenizer = loaded.tokenizer
    before = residual_states(loaded.model, tokenizer, prompts, settings.position, tick)
    if patch is not None:
        with peft_attached(loaded.model, patch) as attached:
            after = residual_states(attached, tokenizer, prompts, settings.position, tick)
    else:
        del loaded
        target = load_model(str(roles[TARGET].path), dtype=settings.dtype)
        after = residual_states(target.model, tokenizer, prompts, settings.position, tick)
    shifts, offset = {}, 0
    for prompt_set in sets:
        part = slice(offset, offset + len(prompt_set.prompts))
        shifts[prompt_set.kind] = layer_shift(before[part], after[part])
        offset = part.stop
    return {"position": settings.position, "sets": {s.kind: s.record for s in sets},
            "layers": hidden_shift_layers(shifts)}


def _model_records(roles: dict[str, ResolvedModel]) -> dict[str, dict[str, Any]]:
    """Per role: the reference as given, its kind, revision and weights fingerprint (docs/methods.md §5.8)."""
    from safetypatch.models.fingerprint import fingerprint_folder

    return {role: {"ref": r.ref, "kind": r.kind, "revision": r.revision,
                   "fingerprint": fingerprint_folder(r.path, r.revision).sha256} for role, r in roles.items()}


def _provenance(models: dict[str, dict[str, Any]], patch: Patch | None, cache: ReferenceCache,
                seconds: float) -> dict[str, Any]:
    """Model fingerprints, patch hashes, versions, device, SVD cache use and the compute time."""
    from safetypatch.patch.artifact import ADAPTER_WEIGHTS, MANIFEST
    from safetypatch.utils.environment import environment, git_hash
    from safetypatch.utils.hashing import sha256_file

    record: dict[str, Any] = {"models": models, "environment": environment(), "git_hash": git_hash(),
                              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "seconds": seconds,
                              "svd_cache": {"folder": str(cache.folder) if cache.folder else None,
                                            "hits": cache.hits, "misses": cache.misses}}
    if patch is not None and patch.folder is not None:
        manifest = patch.folder / MANIFEST
        record["patch"] = {
            "path": str(patch.folder), "rank": patch.rank, "scaling": patch.scaling, "modules": len(patch.factors),
            "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "adapter_sha256": sha256_file(patch.folder / ADAPTER_WEIGHTS),
            "trained_on": ((patch.manifest or {}).get("base_model") or {}).get("fingerprint")}
    return record


def _write(rows: list[dict[str, Any]], settings: AnalyzeConfig, roles: dict[str, ResolvedModel],
           patch: Patch | None, hidden: dict[str, Any] | None,
           provenance: dict[str, Any]) -> tuple[AnalysisDocument, tuple[Path, ...]]:
    """Build the document and write it with its figures as one folder, atomically; return it and the PNG paths."""
    from safetypatch.analysis import ANALYSIS_FILE, AnalysisDocument
    from safetypatch.analysis.document import build_document
    from safetypatch.analysis.modules import BASE, MODEL, TARGET
    from safetypatch.report.analysis import analysis_figures
    from safetypatch.utils.io import atomic_path, atomic_write_json

    source = {"kind": "patch" if patch is not None else "checkpoints", "model": roles[MODEL].ref,
              "patch": str(settings.patch) if patch is not None else None,
              "target": roles[TARGET].ref if TARGET in roles else None,
              "base_model": roles[BASE].ref if BASE in roles else None}
    data = build_document(rows, source=source, config=settings.model_dump(mode="json"), provenance=provenance,
                          hidden_shift=hidden)
    figures = analysis_figures(AnalysisDocument(data))
    with atomic_path(settings.output_dir, settings.overwrite) as tmp:
        tmp.mkdir()
        atomic_write_json(tmp / ANALYSIS_FILE, data)
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
    paths = tuple(settings.output_dir / name for name in figures)
    return AnalysisDocument(data, settings.output_dir / ANALYSIS_FILE), paths
