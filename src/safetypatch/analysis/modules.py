"""Stream the modules of one analysis and turn each into a report row (docs/methods.md §3.8, §5.2).

W_0 is read tensor by tensor from the model's checkpoint (``weights.stream``); ΔW comes from a patch's LoRA factors
(decomposed exactly from them) or from a second checkpoint (ΔW = target − model, one module in memory at a time);
an optional unaligned ``base_model`` checkpoint gives LoX's ΔW_align = W_0 − W_base. W_0's SVD goes through the
:class:`~safetypatch.analysis.cache.ReferenceCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safetypatch.analysis.baseline import module_generator, random_baseline
from safetypatch.analysis.cache import ReferenceCache
from safetypatch.analysis.metrics import Delta, Reference, depths, lox_metrics, spectral_metrics, subspace_metrics
from safetypatch.analysis.settings import SubspaceSettings
from safetypatch.errors import ModelMismatchError
from safetypatch.patch.artifact import ADAPTER_WEIGHTS
from safetypatch.patch.factors import Patch
from safetypatch.weights.linalg import lora_delta
from safetypatch.weights.stream import CheckpointReader, aligned, compute_device, locate, select_names

MODEL, TARGET, BASE = "model", "target", "base_model"
"""Reader roles: W_0, the checkpoint whose difference from W_0 is ΔW, and LoX's unaligned base."""
_WEIGHT = ".weight"


@dataclass(frozen=True)
class ModuleInput:
    """One module, ready for the metrics.

    Attributes:
        name: the tensor name (``model.layers.3.mlp.up_proj.weight``).
        weight: W_0 (fp32, on the compute device).
        delta: ΔW.
        align: LoX's ΔW_align = W_0 − W_base, when a base model is given.
        update: the dense ΔW, formed only when ``align`` is (R_ft needs ΔW + ΔW_align).
    """

    name: str
    weight: torch.Tensor
    delta: Delta
    align: torch.Tensor | None = None
    update: torch.Tensor | None = None


def patch_tensor_names(patch: Patch, model: CheckpointReader) -> list[str]:
    """The tensors of ``model`` that ``patch`` adapts, after checking that the patch fits (docs/methods.md §5.8).

    Raises:
        ModelMismatchError: the patch's manifest names another architecture, or a module is missing from the model
            or has another shape; the patch file, the tensor and the fix are named.
    """
    trained_for = ((patch.manifest or {}).get("base_model") or {}).get("arch") or {}
    model_type = model.config.get("model_type")
    if trained_for.get("model_type") not in (None, model_type):
        raise ModelMismatchError(f"patch {patch.where} was trained for a {trained_for['model_type']} model, but "
                                 f"{model.folder} is a {model_type} model. Analyse a patch against the model it was "
                                 "trained on (--model).")
    names = []
    for module, factors in patch.factors.items():
        name = module + _WEIGHT
        if name not in model:
            raise ModelMismatchError(f"patch {patch.where} adapts {module}, but {model.folder} has no tensor {name} "
                                     "(another architecture or layer count?). Give the model the patch was trained "
                                     "on (--model).")
        if model.shape(name) != factors.shape:
            raise ModelMismatchError(f"{patch.where}/{ADAPTER_WEIGHTS}, module {module}: the patch's ΔW is "
                                     f"{factors.shape} but {model.folder} stores {name} as {model.shape(name)}; the "
                                     "patch belongs to another model size. Give the model it was trained on "
                                     "(--model).")
        names.append(name)
    return names


def patch_inputs(patch: Patch, readers: Mapping[str, CheckpointReader], names: Sequence[str]) -> Iterator[ModuleInput]:
    """W_0 (and W_base) streamed per tensor, ΔW from the patch's factors.

    Args:
        patch: the patch.
        readers: ``model`` (and ``base_model``).
        names: from :func:`patch_tensor_names`.
    """
    device = compute_device()
    for name, tensors in aligned(readers, names):
        factors = patch.factors[name.removesuffix(_WEIGHT)]
        B, A = factors.B.to(device), factors.A.to(device)
        weight = tensors[MODEL].to(device)
        align = weight - tensors[BASE].to(device) if BASE in tensors else None
        update = lora_delta(B, A, patch.scaling) if align is not None else None
        yield ModuleInput(name, weight, Delta.from_factors(B, A, patch.scaling), align, update)


def checkpoint_tensor_names(readers: Mapping[str, CheckpointReader],
                            module_map: Mapping[str, str] | None = None) -> list[str]:
    """The ``linear``-scope tensors of the model (docs/methods.md §2.3), e.g. q/k/v/o/gate/up/down of every block."""
    return select_names(readers[MODEL], "linear", module_map)


def checkpoint_inputs(readers: Mapping[str, CheckpointReader], names: Sequence[str],
                      settings: SubspaceSettings) -> Iterator[ModuleInput]:
    """ΔW = target − model streamed per tensor (and W_base), each dense ΔW decomposed as ``settings`` says.

    Raises:
        ModelMismatchError: a tensor is missing from a checkpoint or has another shape there (the tensor and the
            roles' folders are named), before any tensor is read.
    """
    device = compute_device()
    depth = max(settings.r, settings.k)
    for name, tensors in aligned(readers, names):
        weight = tensors[MODEL].to(device)
        matrix = tensors[TARGET].to(device) - weight
        align = weight - tensors[BASE].to(device) if BASE in tensors else None
        delta = Delta.from_matrix(matrix, depth, settings.svd_method, settings.seed)
        yield ModuleInput(name, weight, delta, align, matrix if align is not None else None)


def module_row(item: ModuleInput, ref: Reference, settings: SubspaceSettings) -> dict[str, Any]:
    """Every metric of one module and its random baseline (docs/methods.md §3.8).

    Args:
        item: the module.
        ref: W_0's triplets and norm.
        settings: the resolved settings (``rank`` set).

    Returns:
        ``tensor``, ``layer``, ``module``, ``d_out``, ``d_in``, ``zero`` (ΔW = 0: only the norms are defined),
        then the metrics of ``spectral_metrics``, ``subspace_metrics`` and (with a base model) ``lox_metrics``, the
        depths ``r`` and ``k``, and ``baseline`` (metric → mean, quantile, rms, analytic_rms).
    """
    layer, module = locate(item.name)
    d_out, d_in = item.delta.shape
    row: dict[str, Any] = {"tensor": item.name, "layer": layer, "module": module, "d_out": d_out, "d_in": d_in,
                           "zero": item.delta.frobenius == 0.0}
    if item.align is not None:
        row.update(lox_metrics(item.align, item.update, settings.lox_k, settings.svd_method, settings.seed))
    if row["zero"]:
        row.update(norm=0.0, relative_norm=0.0)
        return row
    row.update(spectral_metrics(ref, item.delta, settings.eta))
    row.update(subspace_metrics(ref, item.delta, settings))
    row["r"], row["k"] = depths(ref, item.delta, settings)
    row["baseline"] = random_baseline(ref, item.delta, settings, module_generator(settings.seed, item.name))
    return row


def analyze_modules(items: Iterable[ModuleInput], total: int, cache: ReferenceCache, settings: SubspaceSettings,
                    progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
    """The rows of every streamed module, in stream order.

    Args:
        items: from :func:`patch_inputs` or :func:`checkpoint_inputs`.
        total: how many there are (for progress).
        cache: W_0's SVDs.
        settings: the resolved settings.
        progress: called as ``("weights", done, total)`` after each module.
    """
    rows = []
    for done, item in enumerate(items, 1):
        rows.append(module_row(item, cache.get(item.name, item.weight), settings))
        if progress is not None:
            progress("weights", done, total)
    return rows
