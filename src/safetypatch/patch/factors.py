"""A safety patch in memory: its PEFT LoRA config, its (B, A) factors per module, and its manifest
(docs/methods.md §2.2, §3.3). ΔW per module comes from :func:`safetypatch.weights.linalg.lora_delta` with s read from
the config.

Module names are those of the base model (``model.layers.3.mlp.up_proj``); the PEFT file keys are
``base_model.model.<module>.lora_{A,B}.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from safetypatch.errors import ModelMismatchError, PatchError
from safetypatch.weights.linalg import lora_delta, lora_scaling

PEFT_PREFIX = "base_model.model."
# Config keys that describe one saved adapter file rather than the adapter itself.
_VOLATILE_KEYS = ("peft_version", "inference_mode", "revision")
_WRAPPER_LEVELS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def factor_key(module: str, which: str) -> str:
    """The PEFT state-dict key of ``module``'s ``A`` or ``B`` factor."""
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


@dataclass(frozen=True)
class LoraFactors:
    """The two factors of one module's update ΔW = s·B·A (fp32, CPU).

    Attributes:
        A: r × d_in (PEFT ``lora_A.weight``).
        B: d_out × r (PEFT ``lora_B.weight``).
    """

    A: torch.Tensor
    B: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the adapted weight."""
        return self.B.shape[0], self.A.shape[1]


@dataclass(frozen=True)
class Patch:
    """A LoRA safety patch: PEFT config, factors per module, manifest, and where it was read from.

    Attributes:
        config: the ``adapter_config.json`` contents (plain LoRA; DoRA and other variants are refused).
        factors: module name → :class:`LoraFactors`, sorted by name.
        manifest: the ``safety_patch.json`` contents, or None for a foreign adapter.
        folder: the folder it was loaded from, or None for a patch built in memory.
    """

    config: dict[str, Any]
    factors: Mapping[str, LoraFactors]
    manifest: dict[str, Any] | None = None
    folder: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        lora_scaling(self.config)  # refuses unsupported variants before anything uses the patch
        if not self.factors:
            raise PatchError(f"patch {self.where} has no LoRA modules; it would change nothing.")
        r = self.config["r"]
        for name, f in self.factors.items():
            if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != r or f.B.shape[1] != r:
                raise PatchError(f"patch {self.where}, module {name}: A is {tuple(f.A.shape)} and B is "
                                 f"{tuple(f.B.shape)}, but the config says r={r}; the adapter file is partial or "
                                 "was saved from a sharded model. Save it again from a gathered model.")

    @property
    def where(self) -> str:
        return str(self.folder) if self.folder is not None else "<in memory>"

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r (or / √r with rsLoRA), read from the config."""
        return lora_scaling(self.config)

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def modules(self) -> list[str]:
        return list(self.factors)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = s·B·A of ``module`` in fp32."""
        f = self.factors[module]
        return lora_delta(f.B, f.A, self.scaling)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's file keys, contiguous fp32."""
        out = {}
        for name, f in self.factors.items():
            out[factor_key(name, "A")] = f.A.contiguous()
            out[factor_key(name, "B")] = f.B.contiguous()
        return out

    def peft_config(self) -> Any:
        """A PEFT ``LoraConfig`` that places adapters exactly on this patch's modules (no dropout)."""
        from peft import LoraConfig

        config = {k: v for k, v in self.config.items() if k not in _VOLATILE_KEYS}
        config.update(target_modules=sorted(self.factors), layers_to_transform=None, layers_pattern=None,
                      lora_dropout=0.0)
        return LoraConfig.from_peft_type(**config)

    def with_factors(self, factors: Mapping[str, LoraFactors], *, manifest: dict[str, Any] | None = None,
                     **config: Any) -> Patch:
        """A copy with new factors (and config fields, and a new manifest if given), not tied to a folder."""
        return replace(self, factors=dict(sorted(factors.items())), config={**self.config, **config},
                       manifest=self.manifest if manifest is None else manifest, folder=None)


def patch_from_peft(peft_model: Any, adapter_name: str = "default", manifest: dict[str, Any] | None = None) -> Patch:
    """Read a PEFT model's adapter into a :class:`Patch` (factors copied to fp32 CPU tensors).

    Raises:
        PatchError: the adapter does not exist or is not plain LoRA.
    """
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise PatchError(f"the model has no adapter named {adapter_name!r}; adapters: "
                         f"{sorted(getattr(peft_model, 'peft_config', {}))}.")
    config = peft_model.peft_config[adapter_name].to_dict()
    factors = {}
    for name, module in lora_modules(peft_model, adapter_name).items():
        A = module.lora_A[adapter_name].weight.detach().float().cpu().clone()
        B = module.lora_B[adapter_name].weight.detach().float().cpu().clone()
        factors[name] = LoraFactors(A, B)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return Patch(config=config, factors=dict(sorted(factors.items())), manifest=manifest)


def lora_modules(peft_model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """The LoRA layers of ``adapter_name`` in a PEFT model, by base-model module name (``model.layers.0.mlp.up_proj``).

    Wrapper levels that FSDP and activation checkpointing insert into module names are left out, so a wrapped model
    gives the names of the patch it trains.
    """
    out = {}
    for name, module in peft_model.named_modules():
        if adapter_name in getattr(module, "lora_A", {}):
            for level in _WRAPPER_LEVELS:
                name = name.replace(level, "")
            out[name.removeprefix(PEFT_PREFIX)] = module
    return out


def check_compatible(model: Any, patch: Patch) -> None:
    """Refuse a patch whose architecture, module names or shapes do not fit ``model`` (docs/methods.md §5.8).

    Raises:
        ModelMismatchError: naming the architecture, or the first module that is missing or has another shape.
    """
    trained_for = ((patch.manifest or {}).get("base_model") or {}).get("arch") or {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if trained_for.get("model_type") not in (None, model_type):
        raise ModelMismatchError(
            f"patch {patch.where} was trained for a {trained_for['model_type']} model "
            f"({trained_for.get('architectures')}), but the model is {model_type} ({type(base).__name__}). A patch "
            "only fits the architecture it was trained on; train one for this model."
        )
    for name, f in patch.factors.items():
        try:
            weight = module_weight(model, name)
        except ModelMismatchError as exc:
            raise ModelMismatchError(f"patch {patch.where} adapts module {name!r}, which {type(model).__name__} "
                                     "does not have (another architecture or layer count?).") from exc
        if tuple(weight.shape) != f.shape:
            raise ModelMismatchError(f"patch {patch.where}, module {name!r}: the patch's ΔW is {f.shape} but the "
                                     f"model's weight is {tuple(weight.shape)} (another model size?).")


def module_weight(model: Any, name: str) -> torch.Tensor:
    """The frozen weight of module ``name`` (base-model naming) of a plain or PEFT-wrapped model.

    Raises:
        ModelMismatchError: the model has no such module with a weight.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = dict(base.named_modules()).get(name)
    if module is not None and hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ModelMismatchError(f"{type(base).__name__} has no module {name!r} with a weight.")
    return weight
