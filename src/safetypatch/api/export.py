"""``safetypatch export``: safety patches as GGUF files for llama.cpp and Ollama (docs/gguf.md).

One or more patch folders (several are combined exactly in ΔW, as ``apply`` combines them) become, next to the base
model's GGUF file, a LoRA adapter GGUF that llama.cpp loads with ``--lora`` onto the unchanged base, and/or the base
GGUF with the patch merged in at a chosen type. The base file must be the model the patch was trained on: its
sha256 or, failing that, the fingerprint of its dequantised weights must be the patch base's
(``--allow-other-base`` accepts a fine-tuned descendant, recorded).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from safetypatch.api.apply import PathList, check_weights, load_patch_folders
from safetypatch.config import StrictConfig
from safetypatch.errors import ConfigError, ModelError, ModelMismatchError
from safetypatch.utils.environment import package_versions
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import atomic_path, ensure_writable

if TYPE_CHECKING:
    from safetypatch.api.apply import LoadedPatches
    from safetypatch.models.gguf_layout import BaseGGUF
    from safetypatch.patch import Patch
    from safetypatch.patch.export import GGUFExport

logger = logging.getLogger(__name__)

EXPORT_RECORD = "safety_patch_export.json"
ADAPTER_FILE = "adapter.gguf"
MergedType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "base"]
_GGUF_SHA = re.compile(r"gguf-sha256=([0-9a-f]{16,64})")


def merged_file(qtype: str) -> str:
    """The name of the merged model file of type ``qtype`` in an export folder."""
    return f"model-{qtype}.gguf"


class ExportConfig(StrictConfig):
    """Options of ``safetypatch export``: which patches, against which base GGUF, as which files."""

    patches: PathList = Field(description="Patch folders; several are combined exactly in ΔW first (linear, "
                                          "independent of their order), as `apply` combines them.")
    weights: list[float] | None = Field(None, description="Weight w_i per patch (default 1 each; negative subtracts).")
    base: str | None = Field(None, description="The base model's GGUF file (or a catalog name); default: the patch's "
                                               "base when it is one.")
    format: Literal["adapter", "merged", "both"] = Field(
        "adapter", description="adapter: a LoRA GGUF for llama.cpp's --lora next to the unchanged base; merged: the "
                               "base GGUF with the patch merged in; both.")
    type: MergedType = Field("f16", description="Type of the merged model's weights (base: each adapted tensor at "
                                                "its own type in the base file).")
    adapter_type: Literal["f32", "f16"] = Field("f32", description="Type of the adapter's factors (f32: exact).")
    output: Path = Field(Path("runs/gguf"), description="Output folder: the GGUF file(s), Ollama Modelfiles and "
                                                         f"{EXPORT_RECORD}.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    allow_other_base: bool = Field(False, description="Accept a base GGUF that is not the patch's base (a fine-tuned "
                                                      "descendant of it); recorded and warned about.")

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        check_weights(self, self.patches, self.weights)
        unused = {"type": self.format == "adapter", "adapter_type": self.format == "merged"}
        ignored = sorted(name for name, off in unused.items() if off and name in self.model_fields_set)
        if ignored:
            raise ConfigError(f"ExportConfig: {', '.join(ignored)} set, but format is {self.format}, which does not "
                              "use it. Set format: both (or the format it belongs to), or drop it.")
        return self

    @property
    def files(self) -> tuple[str, ...]:
        """The GGUF files the export writes into ``output``."""
        return ((ADAPTER_FILE,) if self.format != "merged" else ()) + \
            ((merged_file(self.type),) if self.format != "adapter" else ())


@dataclass(frozen=True)
class ExportResult:
    """What ``safetypatch export`` wrote.

    Attributes:
        output: the folder.
        adapter: the LoRA adapter GGUF, or None.
        merged: the merged model GGUF, or None.
        base: the base GGUF file the export was made against (the one to load the adapter onto).
        base_check: how the base was matched to the patch base: ``gguf_sha256``, ``fingerprint``, ``other base``
            (accepted with ``allow_other_base``) or ``unchecked`` (the patch records no base).
        exports: each written file's account (types; a merged file's error relative to ΔW per module).
        record: what ``safety_patch_export.json`` holds.
        warnings: what the user should know (also logged).
        seconds: wall time.
    """

    output: Path
    adapter: Path | None
    merged: Path | None
    base: Path
    base_check: str
    exports: tuple[GGUFExport, ...]
    record: dict[str, Any]
    warnings: tuple[str, ...]
    seconds: float


def export(config: ExportConfig) -> ExportResult:
    """Export safety patches as GGUF files for llama.cpp and Ollama, written atomically into ``config.output``: the
    adapter and/or merged model GGUF, an Ollama Modelfile for each, and ``safety_patch_export.json`` (docs/gguf.md).

    Args:
        config: patch folders, weights, base GGUF, format and types, output.

    Returns:
        An :class:`ExportResult`.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false (checked first).
        ConfigError: the base is not given and the patch's base has no GGUF file, a weight count mismatch, or a
            type the base's tensors cannot be quantised to.
        ModelError: the base GGUF is missing, unreadable, an adapter, or of an architecture export does not support.
        ModelMismatchError: the base GGUF is not the patch base (without ``allow_other_base``), or the patch does not
            fit it (architecture, module, shape; named).
        PatchError: a patch folder is unreadable, or a written file does not read back as written.
    """
    from safetypatch.models.gguf_layout import read_base_gguf
    from safetypatch.patch.export import fit_patch, write_adapter, write_merged

    start = time.perf_counter()
    cfg = config
    ensure_writable(cfg.output, cfg.overwrite, folder=True)
    loaded = load_patch_folders(cfg.patches, cfg.weights)
    base_path = _base_file(cfg.base, loaded.patches[0])
    base = read_base_gguf(base_path)
    for patch in (*loaded.patches, loaded.patch):
        fit_patch(patch, base)
    base_record, warnings = _check_base(loaded.patches, base, cfg.allow_other_base)
    record: dict[str, Any] = {
        "schema_version": 1, "config": cfg.model_dump(mode="json"),
        "patches": [{"path": str(source.path), "manifest_sha256": source.manifest_sha256, "rank": source.rank,
                     "base_model": (patch.manifest or {}).get("base_model")}
                    for source, patch in zip(loaded.sources, loaded.patches, strict=True)],
        "weights": list(loaded.weights) if loaded.weights is not None else None,
        "combination": loaded.combination, "rank": loaded.patch.rank, "modules": len(loaded.patch.factors),
        "base": base_record, "library_versions": {**package_versions(), "gguf": _version("gguf")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metadata = _provenance(loaded, base_record)
    exports = []
    with atomic_path(cfg.output, cfg.overwrite) as tmp:
        tmp.mkdir()
        if cfg.format != "merged":
            exports.append(write_adapter(loaded.patch, base, tmp / ADAPTER_FILE, dtype=cfg.adapter_type,
                                         metadata=metadata))
            (tmp / "Modelfile.adapter").write_text(_modelfile(f"FROM {base_path.resolve()}\nADAPTER ./{ADAPTER_FILE}"))
        if cfg.format != "adapter":
            exports.append(write_merged(loaded.patch, base, tmp / merged_file(cfg.type), qtype=cfg.type,
                                        metadata=metadata))
            (tmp / "Modelfile.merged").write_text(_modelfile(f"FROM ./{merged_file(cfg.type)}"))
        warnings += [warning for item in exports for warning in item.warnings]
        record["files"] = {item.path.name: {**item.summary(), "sha256": sha256_file(item.path),
                                            "bytes": item.path.stat().st_size} for item in exports}
        record["warnings"] = warnings
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    files = {name: cfg.output / name for name in cfg.files}
    return ExportResult(cfg.output, files.get(ADAPTER_FILE), files.get(merged_file(cfg.type)), base_path,
                        base_record["check"], tuple(exports), record, tuple(warnings), time.perf_counter() - start)


def _base_file(base: str | None, patch: Patch) -> Path:
    """The base GGUF: the one given, or the patch base's when it is a catalog model or a ``.gguf`` file."""
    from safetypatch.models.resolve import gguf_file

    if base is not None:
        return gguf_file(base)
    recorded = ((patch.manifest or {}).get("base_model") or {}).get("model")
    if recorded is None:
        raise ConfigError(f"patch {patch.where} records no base model; give the base model's GGUF file (--base).")
    try:
        return gguf_file(recorded)
    except ModelError as exc:
        raise ConfigError(f"the base of patch {patch.where} is {recorded!r}, which has no GGUF file here ({exc}) Give "
                          "that model's GGUF file with --base (convert_hf_to_gguf.py makes one).") from exc


def _check_base(patches: tuple[Patch, ...], base: BaseGGUF, allow_other_base: bool) -> tuple[dict[str, Any],
                                                                                            list[str]]:
    """Match the base file to every patch's base: by the GGUF sha256 the patch's revision records (the file it was
    trained from), else by the fingerprint of the file's dequantised weights (converted once into the cache).

    Returns:
        The ``base`` block of the record (file, sha256, architecture, fingerprint when computed, check) and
        warnings.

    Raises:
        ModelMismatchError: the base is not a patch's base and ``allow_other_base`` is false.
    """
    digest = sha256_file(base.path)
    record: dict[str, Any] = {"gguf": str(base.path.resolve()), "sha256": digest,
                              "architecture": base.architecture.name, "fingerprint": None}
    checks, warnings = [], []
    for patch in patches:
        recorded = (patch.manifest or {}).get("base_model") or {}
        expected, match = recorded.get("fingerprint"), _GGUF_SHA.search(str(recorded.get("revision") or ""))
        if match is not None and digest.startswith(match[1]):
            checks.append("gguf_sha256")
            continue
        if expected is None:
            checks.append("unchecked")
            warnings.append(f"patch {patch.where} records no base fingerprint, so {base.path.name} could not be "
                            "checked against it.")
            continue
        if record["fingerprint"] is None:
            record["fingerprint"] = _fingerprint(base.path)
        if record["fingerprint"] == expected:
            checks.append("fingerprint")
            continue
        message = (f"{base.path} is not the model patch {patch.where} was trained on: its weights' fingerprint is "
                   f"{record['fingerprint'][:12]}…, the patch base's ({recorded.get('model')}) {expected[:12]}….")
        if not allow_other_base:
            raise ModelMismatchError(f"{message} Export against the GGUF file of the patch's base, or pass "
                                     "--allow-other-base if this file is a fine-tuned descendant of it (the patch "
                                     "then goes onto it as `safetypatch apply` puts it onto a descendant).")
        checks.append("other base")
        warnings.append(f"{message} Accepted (--allow-other-base).")
    for warning in warnings:
        logger.warning(warning)
    order = ("other base", "unchecked", "fingerprint", "gguf_sha256")
    record["check"] = min(checks, key=order.index)
    record["checks"] = checks
    return record, warnings


def _fingerprint(path: Path) -> str:
    from safetypatch.models.fingerprint import fingerprint_folder
    from safetypatch.models.resolve import resolve_model

    resolved = resolve_model(path)
    return fingerprint_folder(resolved.path, resolved.revision).sha256


def _provenance(loaded: LoadedPatches, base: dict[str, Any]) -> dict[str, Any]:
    """The ``safetypatch.*`` keys of every exported file: the patches (their manifests' sha256, the patch id), the
    weights, the patch base's fingerprint and the base file's sha256."""
    bases = [((patch.manifest or {}).get("base_model") or {}).get("fingerprint") for patch in loaded.patches]
    return {
        "safetypatch.version": _version("safetypatch"),
        "safetypatch.patches": [source.path.name for source in loaded.sources],
        "safetypatch.patch_sha256": [source.manifest_sha256 or "none" for source in loaded.sources],
        "safetypatch.weights": list(loaded.weights or [1.0] * len(loaded.sources)),
        "safetypatch.base_fingerprint": [fingerprint or "none" for fingerprint in bases],
        "safetypatch.base_gguf_sha256": base["sha256"],
        "safetypatch.base_check": base["check"],
    }


def _modelfile(body: str) -> str:
    return (f"# Ollama: `ollama create NAME -f THIS_FILE` from this folder, then `ollama run NAME`.\n{body}\n")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
