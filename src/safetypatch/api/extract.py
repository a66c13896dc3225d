"""``safetypatch extract``: the turning of any weight delta ΔW = target − reference into a LoRA patch
(docs/methods.md §3.3 ``svd``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from safetypatch.config import Dtype, StrictConfig
from safetypatch.models.loading import load_model
from safetypatch.models.resolve import resolve_model


class ExtractJob(StrictConfig):
    """Options of ``safetypatch extract``: ΔW = target − reference of every linear module as a LoRA patch."""

    target: str = Field(description="Model whose difference from the reference is extracted (e.g. a repaired or "
                                    "fully fine-tuned model): catalog name, folder, .gguf or Hub id.")
    reference: str = Field(description="Model the patch applies to (e.g. the aligned model).")
    rank: int = Field(16, ge=1, description="LoRA rank r of every module (truncated SVD).")
    module_map: dict[str, str] = Field(
        default_factory=dict, description="model_type → regex of the linear-scope weight names, for architectures "
        "without a shipped pattern.")
    output: Path = Field(Path("runs/extract"), description="Patch folder (PEFT adapter + safety_patch.json).")
    overwrite: bool = Field(False, description="Replace an existing patch folder.")
    dtype: Dtype = Field("auto", description="Dtype of the reference model the saved patch is checked on.")


@dataclass(frozen=True)
class ExtractResult:
    """The extracted patch and its truncation errors.

    Attributes:
        path: the patch folder.
        rank: its rank.
        error: overall relative Frobenius error √(Σ‖ΔW − BA‖²) / √(Σ‖ΔW‖²).
        errors: module → its relative error.
        unchanged: modules whose ΔW is exactly zero (left out of the patch).
        seconds: wall time.
    """

    path: Path
    rank: int
    error: float
    errors: dict[str, float]
    unchanged: tuple[str, ...]
    seconds: float


def extract(job: ExtractJob) -> ExtractResult:
    """Extract ΔW = target − reference (fp32, streamed per module) as a rank-``rank`` LoRA patch by SVD and save it
    as a patch folder verified on the reference model (docs/methods.md §3.3 ``svd``, §5.4).

    The manifest (``safety_patch.json``) records both models' fingerprints, the rank and the relative Frobenius
    error per module and overall.

    Args:
        job: target, reference, rank and output.

    Returns:
        An :class:`ExtractResult`.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false (checked first).
        ModelError: a model cannot be resolved or read. ModelMismatchError: the two differ in names or shapes.
        PatchError: ΔW is zero everywhere, or the saved patch fails its reload check.
    """
    from safetypatch.models.fingerprint import fingerprint_folder
    from safetypatch.patch.artifact import PatchManifest, save_patch
    from safetypatch.patch.extract import extract_from_checkpoints
    from safetypatch.utils.io import ensure_writable

    start = time.perf_counter()
    ensure_writable(job.output, job.overwrite, folder=True)
    target = resolve_model(job.target)
    target_fingerprint = fingerprint_folder(target.path, target.revision).sha256  # a bad target fails before loading
    reference = load_model(job.reference, dtype=job.dtype)
    extracted = extract_from_checkpoints(target.path, reference.resolved.path, job.rank,
                                         module_map=job.module_map or None)
    details = {key: value for key, value in (extracted.patch.manifest or {}).items() if key != "method"}
    manifest = PatchManifest(method="extract:svd", base_model=reference.provenance(), extra={
        **details, "target": {"model": job.target, "revision": target.revision,
                              "fingerprint": target_fingerprint},
        "extract_config": job.model_dump(mode="json")})
    save_patch(extracted.patch, job.output, manifest, model=reference.model, overwrite=job.overwrite)
    return ExtractResult(job.output, job.rank, extracted.error, extracted.errors, extracted.unchanged,
                         time.perf_counter() - start)
