"""Safety patches on disk: a PEFT adapter folder plus the ``safety_patch.json`` manifest, written atomically and
verified by reloading (docs/methods.md §3.1 *Outputs*, §5.4, §5.7).

Folder layout: ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` (model card with ``base_model``,
``library_name: peft``, ``tags: [safetypatch, safety]``) and ``safety_patch.json``. After writing, and before the
folder is moved into place, the adapter is reloaded onto the same base and must reproduce the in-memory logits.

A full-parameter patch (recipe mode ``full``, the Refusal-SFT baseline) is the complete trained model folder
(:func:`~safetypatch.models.saving.save_model_folder`, read back tensor by tensor) with the same
``safety_patch.json``, less the adapter block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from safetypatch.config import StrictConfig
from safetypatch.errors import PatchError
from safetypatch.models.fingerprint import Fingerprint
from safetypatch.models.saving import save_model_folder
from safetypatch.patch.factors import LoraFactors, Patch, factor_key, patch_from_peft
from safetypatch.patch.probe import is_peft_model, max_abs_diff, peft_attached, probe_input_ids, probe_logits, reloaded
from safetypatch.utils.environment import package_versions
from safetypatch.utils.io import atomic_path, read_json

logger = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD, MANIFEST = (
    "adapter_config.json", "adapter_model.safetensors", "README.md", "safety_patch.json")
RELOAD_ATOL = 1e-5  # §5.4: identical logits on the probe batch, fp32
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_ARCH_FIELDS = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size")


class PatchManifest(StrictConfig):
    """The sidecar ``safety_patch.json``: what a patch is and how it was made (docs/methods.md §3.1 *Outputs*, §5.7).

    ``save_patch`` adds the adapter block (r, alpha, scaling, targets, layers), the base architecture, library
    versions and a timestamp.
    """

    schema_version: int = Field(1, description="Manifest format version.")
    method: str = Field(description="How the patch was made, e.g. refusal_sft, combine:linear, reduce:column.")
    recipe: dict[str, Any] = Field(default_factory=dict, description="The recipe, verbatim (PatchRecipe dump).")
    base_model: dict[str, Any] = Field(
        default_factory=dict, description="Patch base: model ref, revision, fingerprint (LoadedModel.provenance()).")
    data: list[dict[str, Any]] = Field(default_factory=list, description="Data sets: name, source, sha256, rows.")
    template_sha256: str | None = Field(None, description="sha256 of the chat template used to render examples.")
    seed: int | None = Field(None, description="Training seed.")
    contamination: dict[str, int] = Field(
        default_factory=dict, description="13-gram overlap count of training prompts with each evaluation set.")
    training: dict[str, Any] = Field(default_factory=dict, description="TrainResult.to_dict(): losses, speed, R.")
    eval_summary: dict[str, Any] | None = Field(None, description="Filled in after evaluation.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Method-specific fields (sources, weights…).")


class _AdapterConfigFields(BaseModel):
    """What ``load_patch`` reads of an ``adapter_config.json`` (other keys pass through unchecked)."""

    model_config = ConfigDict(extra="allow")
    r: StrictInt = Field(gt=0)
    lora_alpha: StrictInt | StrictFloat


class _PatchBaseFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    fingerprint: StrictStr | None = None
    arch: dict[str, Any] | None = None


class _ManifestFields(BaseModel):
    """What applying a patch reads of its ``safety_patch.json``: the patch base's fingerprint (the check that the
    patch fits the model) and architecture (other keys pass through unchecked)."""

    model_config = ConfigDict(extra="allow")
    base_model: _PatchBaseFields | None = None


def chat_template_sha256(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template text (None when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) else None


def save_patch(
    source: Any, folder: Path, manifest: PatchManifest, *, model: Any | None = None, overwrite: bool = False,
    probe_seed: int = 0,
) -> Patch:
    """Write a patch folder atomically and verify it by reloading (docs/methods.md §5.4).

    Args:
        source: a PEFT LoRA model (its active adapter is saved), or a :class:`Patch` built in memory.
        folder: the output folder; refused if it exists unless ``overwrite``.
        manifest: the sidecar manifest.
        model: the plain base model a :class:`Patch` source is checked on (unused for a PEFT source).
        overwrite: replace an existing folder.
        probe_seed: seed of the probe batch.

    Returns:
        The patch as reloaded from ``folder``.

    Raises:
        PatchError: the written adapter fails a §5.4 check (nothing is left at ``folder`` then), or a Patch source
            comes without ``model``.
        OutputExistsError: ``folder`` exists and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    is_peft = is_peft_model(source)
    if not is_peft and not isinstance(source, Patch):
        raise PatchError(f"save_patch saves LoRA patches (a PEFT model or a Patch), not a {type(source).__name__}; "
                         "save a full-parameter model with save_full_model_patch.")
    if not is_peft and model is None:
        raise PatchError("save_patch: a Patch built in memory is verified on its base model; pass model=<base>.")
    check_model = source if is_peft else model
    patch = patch_from_peft(source, source.active_adapter) if is_peft else source
    document = _patch_document(manifest, patch, check_model)
    config = {**patch.config, "base_model_name_or_path": document["base_model"].get("model"),
              "inference_mode": True}
    folder = Path(folder)
    with atomic_path(folder, overwrite) as tmp:
        tmp.mkdir()
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        save_file(patch.state_dict(), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / CARD).write_text(_model_card(document), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        diff = verify_patch_folder(tmp, check_model, patch, probe_seed=probe_seed)
    logger.info("saved patch to %s (%d modules, r=%d; reload max |Δlogit| = %.2e)",
                folder, len(patch.factors), patch.rank, diff)
    return load_patch(folder)


def load_patch(folder: Path) -> Patch:
    """Read a patch folder (or any plain PEFT LoRA adapter folder) into a :class:`Patch`.

    Raises:
        PatchError: ``folder`` is missing, not a folder or a model folder; a file is missing or empty; the config or
            the manifest is not JSON, not an object or has a field of the wrong type (file and field named); a tensor
            key is not a LoRA factor, a module lacks A or B, shapes disagree with the config, or the adapter is DoRA
            / lora_bias / another unsupported variant.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists():
        raise PatchError(f"patch folder {folder} does not exist; give the folder `safetypatch train` wrote (a PEFT "
                         f"adapter with {ADAPTER_CONFIG}).")
    if not folder.is_dir():
        raise PatchError(f"patch {folder} is not a folder; give the patch folder that holds {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS}.")
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / "config.json").is_file():
        raise PatchError(f"{folder} is a model folder, not a LoRA adapter (a full-parameter patch or a merged "
                         "model?): give it where a model goes (--model, or analyze's --target <folder> --model "
                         "<its base>), and give a LoRA patch folder here.")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            raise PatchError(f"{path} is missing or empty: the adapter was not saved completely (a ZeRO-3 / FSDP "
                             "save without gathering the weights? docs/methods.md §5.4). Save it again.")
    config = read_json(folder / ADAPTER_CONFIG, PatchError, what="PEFT adapter config", schema=_AdapterConfigFields,
                       advice="Save the patch again, or restore the file from its source.")
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise PatchError(f"{folder / ADAPTER_WEIGHTS} cannot be read ({exc}); the file is truncated or corrupt.") \
            from exc
    manifest_path = folder / MANIFEST
    manifest = read_json(manifest_path, PatchError, what="patch manifest", schema=_ManifestFields,
                         advice="Save the patch again, or restore the file from its source.") \
        if manifest_path.is_file() else None
    return Patch(config=config, factors=_group_factors(tensors, folder), manifest=manifest, folder=folder)


def _group_factors(tensors: dict[str, Any], folder: Path) -> dict[str, LoraFactors]:
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise PatchError(f"{folder / ADAPTER_WEIGHTS} holds tensor {key!r}, which is not a LoRA A/B factor "
                             "(DoRA magnitudes, biases or saved full modules are not supported).")
        parts.setdefault(match["module"], {})[match["which"]] = tensor.float()
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise PatchError(f"{folder / ADAPTER_WEIGHTS}: module {module} has only lora_{''.join(pair)}; the "
                             "adapter file is partial. Save it again.")
    return {m: LoraFactors(parts[m]["A"], parts[m]["B"]) for m in sorted(parts)}


def verify_patch_folder(folder: Path, model: Any, patch: Patch, *, probe_seed: int = 0) -> float:
    """The §5.4 post-save checks: file non-empty, every expected key present with the configured shapes, some
    ‖B‖_F > 0, and the reloaded adapter's logits equal the in-memory ones (max |Δ| ≤ 1e-5, fp32).

    Args:
        folder: the written adapter folder.
        model: a PEFT model carrying the patch as its active adapter, or the plain base the patch belongs to.
        patch: the in-memory patch that was written.
        probe_seed: seed of the probe batch.

    Returns:
        The max |Δlogit| between in-memory and reloaded model.

    Raises:
        PatchError: naming the failed check and the folder.
    """
    saved = load_patch(folder)
    missing = sorted(set(patch.factors) - set(saved.factors))
    unexpected = sorted(set(saved.factors) - set(patch.factors))
    if missing or unexpected:
        raise PatchError(f"{folder}: saved adapter lacks {[factor_key(m, 'A') for m in missing[:3]]} and has "
                         f"unexpected modules {unexpected[:3]} ({len(missing)} missing, {len(unexpected)} extra).")
    for name, f in patch.factors.items():
        if saved.factors[name].shape != f.shape:
            raise PatchError(f"{folder}: module {name} is saved as {saved.factors[name].shape}, expected {f.shape}.")
    if not any(float(f.B.norm()) > 0 for f in saved.factors.values()):
        raise PatchError(f"{folder}: every lora_B is zero, so the patch does nothing (an untrained adapter or an "
                         "empty save, docs/methods.md §5.4).")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = probe_input_ids(base, probe_seed)
    if is_peft_model(model):
        expected = probe_logits(model, ids)
    else:
        with peft_attached(model, patch) as attached:
            expected = probe_logits(attached, ids)
    with reloaded(model, folder) as loaded:
        diff = max_abs_diff(probe_logits(loaded, ids), expected)
    if diff > RELOAD_ATOL:
        raise PatchError(f"{folder}: the reloaded adapter's logits differ from the in-memory model's by up to "
                         f"{diff:.3g} (tolerance {RELOAD_ATOL}); the saved weights do not match what was trained.")
    return diff


def _manifest_document(manifest: PatchManifest, model: Any) -> dict[str, Any]:
    """``manifest`` plus ``model``'s architecture, library versions and a timestamp: what every patch records."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    arch = {key: getattr(config, key, None) for key in _ARCH_FIELDS}
    arch["architectures"] = getattr(base.config, "architectures", None) or [type(base).__name__]
    document = manifest.model_dump(mode="json")
    document["base_model"] = {**document["base_model"], "arch": arch}
    document["library_versions"] = package_versions()
    document["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return document


def save_full_model_patch(
    model: Any, tokenizer: Any, folder: Path, manifest: PatchManifest, *, overwrite: bool = False,
) -> Fingerprint:
    """Write a full-parameter patch (the Refusal-SFT baseline, recipe mode ``full``): the complete trained model
    folder with its ``safety_patch.json``, verified tensor by tensor and moved into place atomically (§3.1, §5.4).

    Args:
        model: the trained model (plain transformers, not PEFT).
        tokenizer: its tokenizer.
        folder: the output folder; loadable with ``safetypatch.load_model``.
        manifest: the sidecar manifest (the same document LoRA patches carry, without the ``adapter`` block).
        overwrite: replace an existing folder.

    Returns:
        The fingerprint of the written weights.

    Raises:
        PatchError: ``model`` is a PEFT model (save its LoRA patch with :func:`save_patch`).
        OutputExistsError: ``folder`` exists and ``overwrite`` is false.
        ModelError: a written tensor does not read back as in memory (nothing is left at ``folder``).
    """
    if is_peft_model(model):
        raise PatchError(f"save_full_model_patch({folder}): the model carries a LoRA adapter; save LoRA patches "
                         "with save_patch, or merge the adapter first.")
    document = _manifest_document(manifest, model)
    return save_model_folder(model, tokenizer, folder, overwrite=overwrite, sidecars={
        MANIFEST: json.dumps(document, indent=2, default=str) + "\n"})


def _patch_document(manifest: PatchManifest, patch: Patch, model: Any) -> dict[str, Any]:
    document = _manifest_document(manifest, model)
    document["adapter"] = {
        "r": patch.rank, "lora_alpha": patch.config.get("lora_alpha"), "scaling": patch.scaling,
        "use_rslora": bool(patch.config.get("use_rslora")), "target_modules": patch.config.get("target_modules"),
        "layers_to_transform": patch.config.get("layers_to_transform"), "modules": len(patch.factors),
    }
    return document


def _model_card(document: dict[str, Any]) -> str:
    front = {"base_model": document["base_model"].get("model"), "library_name": "peft",
             "tags": ["safetypatch", "safety"]}
    adapter = document["adapter"]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Safety patch ({document['method']})", "",
        f"A LoRA safety patch made with safetypatch: rank {adapter['r']}, alpha {adapter['lora_alpha']}, "
        f"{adapter['modules']} modules ({adapter['target_modules']}).", "",
        "Load it with `PeftModel.from_pretrained(base_model, <this folder>)` or `safetypatch apply`.",
        "Recipe, data hashes, base-model fingerprint and training statistics are in `safety_patch.json`.", "",
    ]
    return "\n".join(lines)
