"""A patch as GGUF files for llama.cpp (and Ollama, which runs it): a LoRA adapter loaded next to the unchanged base
GGUF, or the base GGUF with the patch merged in (docs/gguf.md).

Adapter (the format of llama.cpp's ``convert_lora_to_gguf.py``, read by ``llama_adapter_lora_init``):
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, and per adapted weight two tensors
named after the base tensor, ``<name>.lora_a`` of PyTorch shape [r, d_in] and ``<name>.lora_b`` of [d_out, r]
(GGUF ne [d_in, r] and [r, d_out]; llama.cpp checks a.ne[0] = w.ne[0], b.ne[1] = w.ne[1], a.ne[1] = b.ne[0]) and
adds ``scale · alpha / r · lora_b · (lora_a · x)`` to the base layer's output. The patch's scale s (alpha / r, or
alpha / √r with rsLoRA, or the 1 of a combination) is folded into lora_b and ``alpha`` is written as r, so llama.cpp's
alpha / r is 1 and ``--lora`` (scale 1) gives exactly ΔW = s·B·A whatever the patch's config. lora_b's rows follow
the base tensor's row order (:meth:`~safetypatch.models.gguf_layout.BaseGGUF.to_file_rows`: permuted for llama's
q and k, as ``convert_lora_to_gguf.py`` permutes the B factor through ``LoraTorchTensor``); lora_a is never permuted
(the permutation acts on output rows only).

Merged model: every tensor of the base file in its order, the adapted ones replaced by W0 + ΔW in fp32 (W0 the base
tensor dequantised, ΔW in the file's row order) stored at the chosen type; metadata (tokenizer, chat template,
hyper-parameters) copied, ``general.file_type`` set, provenance added under ``safetypatch.*``. A quantised type
keeps only what its grid can hold of ΔW: each module reports the error of what is stored relative to the update,
‖stored − W0 − ΔW‖ / ‖ΔW‖ (about 1 or more: the rounding is as large as the update itself).

Every file is read back (names, types, shapes and the sha256 of each tensor's bytes) before it is returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safetypatch.errors import ConfigError, ModelMismatchError, PatchError
from safetypatch.models.gguf_layout import BaseGGUF
from safetypatch.patch.factors import Patch
from safetypatch.weights.linalg import lora_delta

logger = logging.getLogger(__name__)

MERGED_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "base")
"""Types of a merged model: each one the ``gguf`` package can quantise to, or ``base``: every adapted tensor at its
own type in the base file (where ``gguf`` can quantise it) and every other tensor copied as it is."""
ADAPTER_TYPES = ("f32", "f16")
UPDATE_ERROR_WARN = 0.25  # a merged file whose error relative to ΔW (overall) exceeds this is warned about
PROVENANCE_PREFIX = "safetypatch."
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q5_1": "MOSTLY_Q5_1", "Q5_0": "MOSTLY_Q5_0", "Q4_1": "MOSTLY_Q4_1", "Q4_0": "MOSTLY_Q4_0"}
_COPIED_APART = ("general.architecture", "general.file_type", "general.alignment")


@dataclass(frozen=True)
class ExportedModule:
    """One adapted weight in an exported file.

    Attributes:
        module: the HF module (``model.layers.0.self_attn.q_proj``).
        tensor: its GGUF tensor (``blk.0.attn_q.weight``).
        type: the GGML type written (of the two factors, or of the merged weight).
        delta_norm: ‖ΔW‖_F.
        update_error: merged only: ‖stored − W0 − ΔW‖_F / ‖ΔW‖_F, the type's error relative to the update (0: kept
            exactly; about 1 or more: the type's rounding is as large as the update itself).
    """

    module: str
    tensor: str
    type: str
    delta_norm: float
    update_error: float | None = None


@dataclass(frozen=True)
class GGUFExport:
    """A written GGUF file.

    Attributes:
        path: the file.
        kind: ``adapter`` or ``merged``.
        file_type: its ``general.file_type`` name (``MOSTLY_F16``, ...).
        tensors: how many tensors it holds.
        modules: the adapted weights, in the base file's order.
        warnings: what the user should know (also logged).
    """

    path: Path
    kind: str
    file_type: str
    tensors: int
    modules: tuple[ExportedModule, ...]
    warnings: tuple[str, ...] = ()

    @property
    def update_error(self) -> float | None:
        """Merged only: √(Σ e_i² ‖ΔW_i‖²) / √(Σ ‖ΔW_i‖²) of the modules' errors e_i: the type's error relative to the
        whole update."""
        if self.kind != "merged":
            return None
        total = sum(m.delta_norm ** 2 for m in self.modules)
        error = sum((m.update_error or 0.0) ** 2 * m.delta_norm ** 2 for m in self.modules)
        return math.sqrt(error / total) if total > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account (without the per-module rows' names when there are many)."""
        worst = max(self.modules, key=lambda m: m.update_error or 0.0) if self.kind == "merged" else None
        return {"file": self.path.name, "kind": self.kind, "file_type": self.file_type, "tensors": self.tensors,
                "modules": len(self.modules), "types": sorted({m.type for m in self.modules}),
                "update_error": self.update_error, "worst_module": None if worst is None else
                {"tensor": worst.tensor, "update_error": worst.update_error},
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class _Planned:
    """One tensor of a file being written: how it is declared, and how its data is made (when it is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    nbytes: int
    qtype: Any
    make: Callable[[], np.ndarray]
    endian: Any = None


def fit_patch(patch: Patch, base: BaseGGUF) -> dict[str, str]:
    """The GGUF tensor of every module of ``patch`` in ``base``, after checking that the patch fits the file.

    Raises:
        ModelMismatchError: the patch was trained for another architecture than the file's, a module has no tensor
            in the file (or in llama.cpp's layout), or a tensor's shape differs from the module's ΔW (each named).
    """
    arch = ((patch.manifest or {}).get("base_model") or {}).get("arch") or {}
    model_type = arch.get("model_type")
    if model_type is not None and model_type not in base.architecture.model_types:
        raise ModelMismatchError(
            f"patch {patch.where} was trained on a {model_type} model, but {base.path} is a "
            f"{base.architecture.name} GGUF (from {', '.join(base.architecture.model_types)} models). Export against "
            "the GGUF of the patch's base model.")
    names = {}
    for module, factors in patch.factors.items():
        name = base.tensor_name(module)
        if base.shape(name) != factors.shape:
            raise ModelMismatchError(
                f"patch {patch.where}, module {module}: ΔW is {factors.shape} (d_out, d_in), but tensor {name} of "
                f"{base.path} is {base.shape(name)}. The file is another model (or another size) than the patch's "
                "base; export against the base the patch was trained on.")
        names[module] = name
    return names


def adapter_factors(patch: Patch, base: BaseGGUF, module: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) of ``module`` in llama.cpp's layout, fp32 PyTorch order: A as it is ([r, d_in]) and s·B
    ([d_out, r]) with its rows in tensor ``name``'s order in ``base``."""
    factors = patch.factors[module]
    b = base.to_file_rows(name, patch.scaling * factors.B.detach().float().cpu())
    return factors.A.detach().float().cpu().numpy(), b.contiguous().numpy()


def write_adapter(patch: Patch, base: BaseGGUF, path: Path, *, dtype: str = "f32",
                  metadata: Mapping[str, Any] | None = None) -> GGUFExport:
    """Write ``patch`` as a llama.cpp LoRA adapter GGUF for ``base`` (see the module docstring) and read it back.

    Args:
        patch: the patch (or the exact combination of several).
        base: the base GGUF the adapter is loaded next to.
        path: the file to write (a temporary path of the caller's atomic output).
        dtype: ``f32`` (exact) or ``f16``.
        metadata: extra keys (``safetypatch.*`` provenance), written after the adapter's own.

    Raises:
        ConfigError: an unknown ``dtype``.
        ModelMismatchError: see :func:`fit_patch`.
        PatchError: the written file does not read back as written.
    """
    import gguf

    if dtype not in ADAPTER_TYPES:
        raise ConfigError(f"adapter type {dtype!r}: use one of {', '.join(ADAPTER_TYPES)}.")
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    names = fit_patch(patch, base)
    planned, modules = [], []
    for module, name in names.items():
        lora_a, lora_b = adapter_factors(patch, base, module, name)
        delta = float(np.linalg.norm(lora_b.astype(np.float64) @ lora_a.astype(np.float64)))
        modules.append(ExportedModule(module, name, qtype.name, delta))
        for suffix, factor in (("lora_a", lora_a), ("lora_b", lora_b)):
            planned.append(_plan_array(f"{name}.{suffix}", factor, qtype))
    values: list[tuple[str, Any]] = [
        ("general.type", gguf.GGUFType.ADAPTER), (gguf.Keys.Adapter.TYPE, "lora"),
        (gguf.Keys.Adapter.LORA_ALPHA, float(patch.rank)),
        ("general.file_type", int(gguf.LlamaFileType[_FILE_TYPES[qtype.name]])),
        *(metadata or {}).items(),
    ]
    _write(path, base, planned, [_typed(key, value) for key, value in values])
    return GGUFExport(path, "adapter", _FILE_TYPES[qtype.name], len(planned), tuple(modules))


def write_merged(patch: Patch, base: BaseGGUF, path: Path, *, qtype: str = "f16",
                 metadata: Mapping[str, Any] | None = None) -> GGUFExport:
    """Write ``base`` with ``patch`` merged (W0 + ΔW, fp32, then stored at ``qtype``) and read it back.

    Types: an adapted tensor goes to ``qtype`` (``base``: its own type); a tensor whose rows do not fill whole blocks
    of that type goes to F16 (warned). Other 2-D tensors go to ``qtype`` too, unless they already are of it or
    ``qtype`` is ``base`` (then they are copied byte for byte); 1-D tensors (norms, biases) are always copied.

    Args:
        patch: the patch (or the exact combination of several).
        base: the base GGUF file.
        path: the file to write (a temporary path of the caller's atomic output).
        qtype: one of :data:`MERGED_TYPES`.
        metadata: ``safetypatch.*`` provenance keys, added to the base's metadata.

    Returns:
        The export with each module's error relative to ΔW.

    Raises:
        ConfigError: an unknown ``qtype``, or ``base`` where an adapted tensor's type is one ``gguf`` cannot quantise
            (named, with the types to use instead).
        ModelMismatchError: see :func:`fit_patch`.
        PatchError: the written file does not read back as written.
    """
    import gguf

    if qtype not in MERGED_TYPES:
        raise ConfigError(f"merged type {qtype!r}: use one of {', '.join(MERGED_TYPES)}.")
    by_tensor = {name: module for module, name in fit_patch(patch, base).items()}
    target = None if qtype == "base" else gguf.GGMLQuantizationType[qtype.upper()]
    modules: list[ExportedModule] = []
    warnings: list[str] = []
    planned = [_plan_merged(patch, base, by_tensor[name], name, target, modules, warnings) if name in by_tensor
               else _plan_copy(base, name, target, warnings) for name in base.tensors]
    file_type = _FILE_TYPES[target.name] if target is not None else _base_file_type(base)
    values = [*_base_metadata(base), _typed("general.file_type", int(gguf.LlamaFileType[file_type])),
              *(_typed(key, value) for key, value in (metadata or {}).items())]
    _write(path, base, planned, values)
    error = GGUFExport(path, "merged", file_type, len(planned), tuple(modules)).update_error or 0.0
    if error > UPDATE_ERROR_WARN:
        worst = max(modules, key=lambda m: m.update_error or 0.0)
        types = "/".join(sorted({m.type for m in modules}))
        warnings.append(f"the merged weights differ from W0 + ΔW by {error:.0%} of ΔW's norm ({types} rounding; worst "
                        f"tensor {worst.tensor}, {worst.update_error:.0%}): rounding of this size can change what the "
                        "patch does. The adapter next to the base keeps ΔW exactly; bench/llama_cpp_check.py "
                        "measures a merged file's answers.")
        logger.warning(warnings[-1])
    return GGUFExport(path, "merged", file_type, len(planned), tuple(modules), tuple(warnings))


def _plan_merged(patch: Patch, base: BaseGGUF, module: str, name: str, target: Any,
                 modules: list[ExportedModule], warnings: list[str]) -> _Planned:
    import gguf

    tensor = base.tensors[name]
    qtype = tensor.tensor_type if target is None else target
    if qtype.name not in _FILE_TYPES:
        raise ConfigError(f"tensor {name} of {base.path} is {qtype.name}, which the gguf package cannot quantise, so "
                          f"--type base cannot merge into it. Merge at --type q8_0 or f16, or export the adapter "
                          "(--format adapter), which leaves the base file as it is.")
    qtype = _fitting(name, base.shape(name), qtype, warnings)

    def make() -> np.ndarray:
        import torch

        lora_a, lora_b = adapter_factors(patch, base, module, name)
        delta = lora_delta(torch.from_numpy(lora_b), torch.from_numpy(lora_a), 1.0).numpy()
        original = base.weight(name)
        data = gguf.quants.quantize(original + delta, qtype)
        stored = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(original.shape)
        norm = float(np.linalg.norm(delta))
        error = float(np.linalg.norm(stored - original - delta)) / norm if norm > 0 else 0.0
        modules.append(ExportedModule(module, name, qtype.name, norm, error))
        return data

    return _planned(name, base.shape(name), qtype, make)


def _plan_copy(base: BaseGGUF, name: str, target: Any, warnings: list[str]) -> _Planned:
    import gguf

    tensor = base.tensors[name]
    shape = base.shape(name)
    if target is None or tensor.tensor_type == target or len(shape) < 2:
        return _Planned(name, tuple(tensor.data.shape), tensor.data.dtype, int(tensor.data.nbytes),
                        tensor.tensor_type, lambda: tensor.data, base.reader.endianess)
    qtype = _fitting(name, shape, target, warnings)
    return _planned(name, shape, qtype, lambda: gguf.quants.quantize(base.weight(name), qtype))


def _fitting(name: str, shape: tuple[int, ...], qtype: Any, warnings: list[str]) -> Any:
    """``qtype``, or F16 when the rows of ``name`` do not fill whole blocks of it (warned)."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block == 0:
        return qtype
    warnings.append(f"tensor {name} has rows of {shape[-1]} values, not a multiple of {qtype.name}'s block of "
                    f"{block}; it is stored as F16.")
    logger.warning(warnings[-1])
    return gguf.GGMLQuantizationType.F16


def _planned(name: str, shape: tuple[int, ...], qtype: Any, make: Callable[[], np.ndarray]) -> _Planned:
    """A tensor of PyTorch ``shape`` written at ``qtype``: declared as ``GGUFWriter.add_tensor_info`` wants it
    (elements for F32/F16, bytes for the quantised types)."""
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        return _Planned(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize, qtype, make)
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return _Planned(name, tuple(byte_shape), np.dtype(np.uint8), int(np.prod(byte_shape)), qtype, make)


def _plan_array(name: str, array: np.ndarray, qtype: Any) -> _Planned:
    import gguf

    return _planned(name, tuple(array.shape), qtype, lambda: gguf.quants.quantize(array, qtype))


def _base_file_type(base: BaseGGUF) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(base.file_type).name if base.file_type is not None else "GUESSED"
    except ValueError:
        return "GUESSED"


def _base_metadata(base: BaseGGUF) -> list[tuple[str, Any, Any, Any]]:
    """The base file's metadata as (key, value, type, sub_type), less what the writer or export sets itself and
    earlier ``safetypatch.*`` provenance; an empty array (which GGUFWriter cannot write) is left out and logged."""
    import gguf

    values = []
    for key, field in base.reader.fields.items():
        if key.startswith(("GGUF.", PROVENANCE_PREFIX)) or key in _COPIED_APART:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY and len(value) == 0:
            logger.info("metadata %s of %s is an empty array; left out of the merged file", key, base.path.name)
            continue
        values.append((key, value, kind, sub))
    return values


def _typed(key: str, value: Any) -> tuple[str, Any, Any, Any]:
    """(key, value, GGUF type, array item type) of a Python value: a str, bool, int (uint32, or int64 when negative
    or large) or float (float32), or a non-empty list of strings or of numbers (float32); a dict or any other list is
    written as a JSON string."""
    import gguf

    kind = gguf.GGUFValueType
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) for item in value):
        return key, list(value), kind.ARRAY, kind.STRING
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, (int, float)) and not isinstance(item, bool)
                                                          for item in value):
        return key, [float(item) for item in value], kind.ARRAY, kind.FLOAT32
    if isinstance(value, (dict, list, tuple)):
        return key, json.dumps(value, sort_keys=True, default=str), kind.STRING, None
    if isinstance(value, bool):
        return key, value, kind.BOOL, None
    if isinstance(value, int):
        return key, value, kind.UINT32 if 0 <= value < 2 ** 32 else kind.INT64, None
    if isinstance(value, float):
        return key, value, kind.FLOAT32, None
    return key, str(value), kind.STRING, None


def _write(path: Path, base: BaseGGUF, planned: list[_Planned], values: list[tuple[str, Any, Any, Any]]) -> None:
    """Write the file tensor by tensor (memory follows the largest tensor), then read it back."""
    import gguf

    writer = gguf.GGUFWriter(path, base.architecture.name)
    alignment = base.value("general.alignment")
    if alignment is not None:
        writer.add_custom_alignment(int(alignment))
    for key, value, kind, sub in values:
        writer.add_key_value(key, value, kind, sub_type=sub)
    for tensor in planned:
        writer.add_tensor_info(tensor.name, tensor.shape, tensor.dtype, tensor.nbytes, raw_dtype=tensor.qtype)
    digests = {}
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in planned:
            data = np.ascontiguousarray(tensor.make())
            if data.nbytes != tensor.nbytes:
                raise PatchError(f"tensor {tensor.name} came out as {data.nbytes} bytes, {tensor.nbytes} were "
                                 "declared. This is a bug; please report it.")
            digests[tensor.name] = hashlib.sha256(memoryview(data.reshape(-1).view(np.uint8))).hexdigest()
            writer.write_tensor_data(data, tensor_endianess=tensor.endian)
    finally:
        writer.close()
    _read_back(path, planned, digests)


def _read_back(path: Path, planned: list[_Planned], digests: dict[str, str]) -> None:
    """Check that ``path`` holds exactly the planned tensors, with their types and bytes."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise PatchError(f"the written file {path.name} cannot be read back as GGUF ({type(exc).__name__}: {exc}); "
                         "nothing was kept. Check the disk and write it again.") from exc
    found = {tensor.name: tensor for tensor in reader.tensors}
    if list(found) != [tensor.name for tensor in planned]:
        raise PatchError(f"the written file {path.name} holds {len(found)} tensors, not the {len(planned)} written; "
                         "nothing was kept. Write it again.")
    for tensor in planned:
        read = found[tensor.name]
        data = np.ascontiguousarray(read.data)
        digest = hashlib.sha256(memoryview(data.reshape(-1).view(np.uint8))).hexdigest()
        if read.tensor_type != tensor.qtype or digest != digests[tensor.name]:
            raise PatchError(f"tensor {tensor.name} of the written file {path.name} does not read back as written "
                             f"({read.tensor_type.name}, expected {tensor.qtype.name}, or other bytes); nothing was "
                             "kept. Write it again.")
