"""Run one restoration method over checkpoints on disk (docs/methods.md §2.1, §2.3, §3.4–§3.7, §5.2).

Role: the driver between the per-tensor methods (``restoration.<method>``) and the streaming engine
(``weights.stream``). :func:`run_restore` opens one :class:`~safetypatch.weights.stream.CheckpointReader` per model
role, selects the tensors in scope, lets the method prepare (LSSF anchor moments; Safe LoRA number mode ranks every
module over a fresh pass of the same stream), then streams the roles tensor by tensor to the compute device and
writes each changed tensor into a copy of the template checkpoint (``target_model``, or ``aligned_model`` for a
method without a target, LoX); untouched tensors are copied byte for byte. The per-layer report
(``restore_report.json``) and the provenance (``restore.json``) are written into the same folder, which appears
atomically or not at all.

A ``target_model`` that is a PEFT LoRA adapter folder (Safe LoRA, §3.6) is repaired as an adapter: each module's
``lora_B`` is projected and the adapter is written with :func:`~safetypatch.patch.artifact.save_patch` (reloaded and
checked on the aligned model), with the two JSON files next to it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from safetypatch.errors import ConfigError, ModelError
from safetypatch.models.fingerprint import fingerprint_folder
from safetypatch.patch.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PatchManifest, load_patch, save_patch
from safetypatch.patch.factors import LoraFactors, Patch
from safetypatch.restoration.base import LORA_A, LORA_B, ROLES, RestoreContext, RestoreMethod
from safetypatch.restoration.report import RestoreReport
from safetypatch.utils.environment import package_versions
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import atomic_path, ensure_writable
from safetypatch.weights.stream import (
    CheckpointReader,
    CheckpointWriter,
    Elementwise,
    ParamScope,
    StreamPlan,
    aligned,
    compute_device,
    plan,
    select_names,
)

logger = logging.getLogger(__name__)

REPORT_FILE = "restore_report.json"
PROVENANCE_FILE = "restore.json"
_WEIGHT = ".weight"

RunProgress = Callable[[str, int, int], None]
"""Called as ``("restore", tensors done, tensors in scope)``."""
Stream = Callable[[], Iterator[tuple[str, dict[str, torch.Tensor]]]]


@dataclass(frozen=True)
class RestoreRun:
    """What one run did, or (dry run) would do.

    Attributes:
        method: the registry name of the method.
        output: the written folder; None for a dry run.
        kind: ``model`` (a repaired checkpoint folder) or ``adapter`` (a repaired PEFT adapter folder).
        plan: tensors, bytes read per role and expected peak memory (:func:`~safetypatch.weights.stream.plan`).
        report: the per-layer report; None for a dry run.
        provenance: the ``restore.json`` document; empty for a dry run.
        seconds: wall time.
    """

    method: str
    output: Path | None
    kind: Literal["model", "adapter"]
    plan: StreamPlan
    report: RestoreReport | None
    provenance: dict[str, Any]
    seconds: float

    @property
    def dry_run(self) -> bool:
        """Whether nothing was computed or written."""
        return self.report is None

    def describe(self) -> str:
        """The run plan as a few human-readable lines (``--dry-run``)."""
        what = ("a repaired PEFT adapter (each module's lora_B projected)" if self.kind == "adapter"
                else "a repaired checkpoint (changed tensors written, the rest copied from the template)")
        return f"method: {self.method}\noutput: {what}\n{self.plan.describe()}"


def check_roles(method: RestoreMethod, given: Collection[str]) -> None:
    """Refuse a set of roles that is not exactly what ``method`` reads under its config (docs/methods.md §2.1).

    Args:
        method: the configured method.
        given: the role names supplied.

    Raises:
        ConfigError: an unknown role, a role the method needs but was not given, or one it would ignore.
    """
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown model role(s) {', '.join(unknown)}; the roles are {', '.join(ROLES)}.")
    missing = [role for role in method.roles if role not in given]
    if missing:
        flags = ", ".join(f"--{role.replace('_', '-')}" for role in missing)
        raise ConfigError(f"method {method.name!r} reads {', '.join(method.roles)} under its config; "
                          f"{', '.join(missing)} is missing. Pass it ({flags}; YAML key {missing[0]}).")
    unused = [role for role in given if role not in method.roles]
    if unused:
        raise ConfigError(f"method {method.name!r} does not read {', '.join(unused)} under its config (it reads "
                          f"{', '.join(method.roles)}); drop {', '.join(unused)} so the record says what was used.")


def run_restore(
    method: RestoreMethod, roles: Mapping[str, Path], output: Path, *, scope: ParamScope | None = None,
    module_map: Mapping[str, str] | None = None, context: RestoreContext | None = None,
    meta: Mapping[str, Any] | None = None, dry_run: bool = False, overwrite: bool = False,
    progress: RunProgress | None = None,
) -> RestoreRun:
    """Restore a checkpoint (or a Safe LoRA adapter) with ``method``, streaming tensor by tensor.

    The method's math runs in fp32 on :func:`~safetypatch.weights.stream.compute_device`; results are cast to
    the template's storage dtype only when written, and tensors the method leaves unchanged are copied as stored
    (bitwise). The plan's memory estimate assumes an SVD per tensor (an upper bound for element-wise methods).

    Args:
        method: a configured :class:`~safetypatch.restoration.base.RestoreMethod`.
        roles: role (``base_model``, ``aligned_model``, ``unsafe_model``, ``target_model``) → local folder;
            exactly the roles ``method.roles`` names. ``target_model`` may be a PEFT LoRA adapter folder for
            Safe LoRA.
        output: the folder to write.
        scope: ``linear`` or ``all_2d``; default the method's ``param_scope``. Not allowed with an adapter target,
            whose modules are the adapter's.
        module_map: ``model_type`` → regex for the ``linear`` scope of unshipped architectures.
        context: what the method's ``prepare`` needs beyond the tensors (LSSF: the loaded aligned model, its
            tokenizer and the anchors); the runner fills ``names`` and ``tensors``. An adapter target is verified
            on ``context.model`` when given, else on the aligned model loaded here.
        meta: recorded as given in both JSON files (model references, anchor ids and hash).
        dry_run: size the run and return its plan; nothing is computed or written.
        overwrite: replace an existing ``output``.
        progress: optional callback, see :data:`RunProgress`.

    Returns:
        A :class:`RestoreRun`.

    Raises:
        ConfigError: roles that do not fit the method, an adapter target for another method, a scope with an
            adapter target, or a scope that selects nothing.
        ModelError: a role's folder is not a readable checkpoint (the message names the role and folder).
        ModelMismatchError: a tensor is missing from a role or has another shape there (tensor and roles named).
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        PatchError: the adapter target is unreadable, or the repaired adapter fails its reload check.
    """
    start = time.perf_counter()
    check_roles(method, roles)
    folders = {role: Path(roles[role]) for role in method.roles}
    adapter = _adapter_target(method, folders, scope)
    readers = {role: _reader(role, folder) for role, folder in folders.items()
               if adapter is None or role != "target_model"}
    template = "target_model" if "target_model" in folders else "aligned_model"
    if adapter is not None:
        names = [f"{module}{_WEIGHT}" for module in adapter.modules]
    else:
        names = select_names(readers[template], scope or method.scope, module_map)
    kind: Literal["model", "adapter"] = "model" if adapter is None else "adapter"
    stream_plan = plan(readers, names, svd=True)
    if dry_run:
        return RestoreRun(method.name, None, kind, stream_plan, None, {}, time.perf_counter() - start)
    ensure_writable(output, overwrite)
    device = compute_device()

    def stream() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        return _stream(readers, names, adapter, device)

    def stored() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        return _stream(readers, names, adapter, torch.device("cpu"), dtype=None)

    prepared = method.prepare(replace(context or RestoreContext(), names=tuple(names), tensors=stream))
    report = RestoreReport.for_method(method, **dict(meta or {}))
    identities = {role: _identity(role, folder, adapter is not None and role == "target_model")
                  for role, folder in folders.items()}

    def provenance() -> dict[str, Any]:
        return {"schema_version": 1, "method": method.name, "paper": method.paper,
                "config": method.config.model_dump(mode="json"),
                "scope": "adapter modules" if adapter is not None else scope or method.scope,
                "roles": identities, "output_kind": kind, "summary": report.summary(), "meta": dict(meta or {}),
                "library_versions": package_versions(), "device": str(device),
                "seconds": round(time.perf_counter() - start, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    steps = _Steps(method, stored, device, len(names), prepared, report, progress)
    if adapter is None:
        record = _write_model(steps, folders[template], output, overwrite, provenance)
    else:
        model = prepared.model if prepared.model is not None else _load_plain(folders["aligned_model"])
        record = _write_adapter(steps, adapter, model, output, overwrite, provenance)
    logger.info("restore %s: %d of %d tensors changed -> %s", method.name, report.summary()["changed"],
                len(names), output)
    return RestoreRun(method.name, Path(output), kind, stream_plan, report, record, time.perf_counter() - start)


@dataclass(frozen=True)
class _Steps:
    """The per-tensor pass: run the method on every streamed tensor, hand each changed tensor to ``keep``, add each
    row to the report.

    ``stored`` streams the tensors as stored (CPU, memory-mapped). An element-wise method's
    :meth:`~safetypatch.restoration.base.RestoreMethod.restore_chunked` takes them as they are and returns an
    :class:`~safetypatch.weights.elementwise.Elementwise` that ``keep`` (the writer) computes chunk by chunk; any
    other method gets fp32 copies on ``device`` for ``restore_tensor``, as before."""

    method: RestoreMethod
    stored: Stream
    device: torch.device
    total: int
    context: RestoreContext
    report: RestoreReport
    progress: RunProgress | None

    def run(self, keep: Callable[[str, torch.Tensor | Elementwise], None]) -> None:
        for done, (name, tensors) in enumerate(self.stored(), start=1):
            result = self.method.restore_chunked(name, tensors, self.context)
            if result is None:
                result = self.method.restore_tensor(name, _compute_inputs(tensors, self.device), self.context)
            if result.tensor is not None:
                keep(name, result.tensor)
            self.report.add(name, result)  # after keep: a chunked result fills its row while it is written
            if self.progress is not None:
                self.progress("restore", done, self.total)


def _write_model(steps: _Steps, template: Path, output: Path, overwrite: bool,
                 provenance: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Stream into a copy of ``template``; returns the provenance written with it."""
    with CheckpointWriter(output, template=template, overwrite=overwrite) as writer:
        steps.run(writer.add)
        record = provenance()
        writer.finish({REPORT_FILE: _json(steps.report.to_dict()), PROVENANCE_FILE: _json(record)})
    return record


def _write_adapter(steps: _Steps, adapter: Patch, model: Any, output: Path, overwrite: bool,
                   provenance: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Project the adapter's lora_B factors, save it verified on ``model``, and add the two JSON files, all in one
    atomic move; returns the provenance."""
    projected: dict[str, torch.Tensor] = {}
    def keep(name: str, B: torch.Tensor | Elementwise) -> None:
        projected[name.removesuffix(_WEIGHT)] = B.materialize() if isinstance(B, Elementwise) else B.cpu()

    steps.run(keep)
    factors = {module: LoraFactors(A=f.A, B=projected.get(module, f.B)) for module, f in adapter.factors.items()}
    record = provenance()
    manifest = PatchManifest(method=f"restore:{steps.method.name}",
                             base_model=(adapter.manifest or {}).get("base_model") or {},
                             extra={"restore": record, "source_adapter": str(adapter.folder)})
    with atomic_path(Path(output), overwrite) as tmp:
        save_patch(adapter.with_factors(factors), tmp, manifest, model=model)
        (tmp / REPORT_FILE).write_text(_json(steps.report.to_dict()), encoding="utf-8")
        (tmp / PROVENANCE_FILE).write_text(_json(record), encoding="utf-8")
    return record


def _stream(readers: Mapping[str, CheckpointReader], names: list[str], adapter: Patch | None,
            device: torch.device, dtype: torch.dtype | None = torch.float32,
            ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Each name with every role's fp32 tensor (``dtype`` None: as stored) plus the adapter's factors, on
    ``device``."""
    for name, tensors in aligned(readers, names, dtype=dtype):
        if adapter is not None:
            factors = adapter.factors[name.removesuffix(_WEIGHT)]
            tensors = {**tensors, LORA_A: factors.A, LORA_B: factors.B}
        yield name, {role: tensor.to(device) for role, tensor in tensors.items()}


def _compute_inputs(stored: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The roles' tensors as fp32 on ``device`` (the adapter's factors moved as they are), what ``_stream`` yields
    with its default dtype."""
    return {role: (t if role in (LORA_A, LORA_B) else t.float()).to(device) for role, t in stored.items()}


def _adapter_target(method: RestoreMethod, folders: Mapping[str, Path], scope: ParamScope | None) -> Patch | None:
    """The target as a LoRA patch when ``target_model`` is a PEFT adapter folder, else None."""
    target = folders.get("target_model")
    if target is None or not (target / ADAPTER_CONFIG).is_file():
        return None
    if not method.repairs_adapters:
        raise ConfigError(f"target_model {target} is a PEFT adapter, but {method.name!r} repairs full checkpoints. "
                          "Merge the adapter first (safetypatch apply --mode merge -o <folder>) and pass that folder, "
                          "or use safe_lora, which projects adapters.")
    if scope is not None:
        raise ConfigError(f"scope {scope!r} was given, but target_model {target} is a LoRA adapter, whose own "
                          "modules are projected; drop scope.")
    return load_patch(target)


def _reader(role: str, folder: Path) -> CheckpointReader:
    try:
        return CheckpointReader(folder)
    except ModelError as exc:
        raise type(exc)(f"{role} ({folder}): {exc}") from exc


def _identity(role: str, folder: Path, is_adapter: bool) -> dict[str, Any]:
    """What ``restore.json`` records of one role: its folder and fingerprint (an adapter: its weights' sha256)."""
    if is_adapter:
        return {"path": str(folder), "kind": "peft_adapter", "adapter_sha256": sha256_file(folder / ADAPTER_WEIGHTS)}
    try:
        return {"path": str(folder), **fingerprint_folder(folder).to_dict()}
    except ModelError as exc:
        raise ModelError(f"{role} ({folder}): {exc}") from exc


def _load_plain(folder: Path) -> Any:
    """The aligned model a repaired adapter is reloaded and checked on (docs/methods.md §5.4)."""
    from safetypatch.models.loading import load_model

    return load_model(str(folder)).model


def _json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, default=str) + "\n"
