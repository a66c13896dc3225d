"""The one interface of every post-hoc restoration method, and the ``METHODS`` registry (docs/methods.md §2,
§3.4–§3.7).

A method is math on in-memory tensors, driven one tensor at a time by the streaming engine (``weights.stream``):

    method = METHODS.get("lssf")(LSSFConfig(eta=0.8))
    context = method.prepare(RestoreContext(names=..., model=..., tokenizer=..., anchors=...))
    for name, tensors in aligned(readers, names):            # {role: tensor}, matched by name and shape
        new, report = method.restore_tensor(name, tensors, context)
        # new is None: the tensor is unchanged (write the input bytes); else cast ``new`` to the storage dtype

All arithmetic is fp32; identity cases (zero strength, zero delta, 1-D tensors a method does not touch) return
``None`` before any arithmetic or cast (§2.3). Registry names are the module file names.

An element-wise method (RESTA) also implements ``restore_chunked``: the same values from the tensors as stored, as
an :class:`~safetypatch.weights.elementwise.Elementwise` the writer computes chunk by chunk (no fp32 copy of a whole
tensor); the runner uses it when present and falls back to ``restore_tensor`` on fp32 copies otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, get_args

import torch
from pydantic import Field

from safetypatch.config import StrictConfig
from safetypatch.data.schema import Example
from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.registry import Registry
from safetypatch.weights.stream import Elementwise, ParamScope

Role = Literal["base_model", "aligned_model", "unsafe_model", "target_model"]
ROLES: tuple[str, ...] = get_args(Role)

# When the target is a PEFT LoRA adapter (Safe LoRA, §3.6) the engine passes the module's factors under these keys
# instead of ``target_model``; the method then returns the new ``lora_B``.
LORA_A = "lora_A"
LORA_B = "lora_B"

TensorStream = Callable[[], Iterable[tuple[str, Mapping[str, torch.Tensor]]]]


class RestoreConfig(StrictConfig):
    """Settings every restoration method has."""

    param_scope: ParamScope = Field(
        "linear", description="Which tensors are touched (docs/methods.md §2.3): `linear` = attention and MLP 2-D "
        "weights of every decoder block; `all_2d` = every tensor with ≥ 2 dimensions, embeddings and lm_head "
        "included.")


@dataclass(frozen=True)
class RestoreContext:
    """What a method may need beyond one tensor's inputs; :meth:`RestoreMethod.prepare` returns a filled copy.

    Attributes:
        names: the tensor names the engine will pass to ``restore_tensor`` (after scope selection).
        statistics: tensor name → what ``prepare`` computed for it (LSSF: the anchor second-moment matrix;
            Safe LoRA number mode: whether the module is projected). A caller may also pass precomputed values.
        model: the aligned model, loaded, for data-dependent statistics (LSSF); None otherwise.
        tokenizer: its tokenizer.
        anchors: the anchor examples (harmful prompt + the aligned model's refusal in ``response``; LSSF §3.4).
        tensors: a callable giving a fresh pass over ``(name, {role: tensor})`` for methods that must see every
            tensor before changing any (Safe LoRA number mode); the engine passes ``lambda: aligned(readers, names)``.
    """

    names: tuple[str, ...] = ()
    statistics: Mapping[str, Any] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    anchors: Sequence[Example] = ()
    tensors: TensorStream | None = None


class RestoredTensor(NamedTuple):
    """One tensor's result: the new fp32 value (None = unchanged; skip writing and casting) and its report row.

    From :meth:`RestoreMethod.restore_chunked` the value may be an
    :class:`~safetypatch.weights.elementwise.Elementwise`; its report row is complete once it has been consumed.
    """

    tensor: torch.Tensor | Elementwise | None
    report: dict[str, Any]


class RestoreMethod(ABC):
    """Base of every restoration method: a typed config, what it needs and can do, and per-tensor math.

    Callers ask what a method needs and can do (:attr:`roles`, :attr:`needs_anchors`, :attr:`repairs_adapters`),
    never which class it is.

    Class attributes:
        name: the registry name (= the module file name).
        paper: the reference URL.
        config_class: the method's :class:`RestoreConfig` subclass.
        needs_anchors: whether :meth:`prepare` needs the anchor set and the loaded aligned model in its context
            (LSSF's activation-aware SVD, docs/methods.md §3.4); the caller builds them.
        repairs_adapters: whether a ``target_model`` that is a PEFT LoRA adapter folder is repaired as an adapter
            (its ``lora_A``/``lora_B`` passed under :data:`LORA_A`/:data:`LORA_B`; Safe LoRA, §3.6); a method
            without it repairs full checkpoints only.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    config_class: ClassVar[type[RestoreConfig]]
    needs_anchors: ClassVar[bool] = False
    repairs_adapters: ClassVar[bool] = False

    def __init__(self, config: RestoreConfig | None = None) -> None:
        """Bind a config (the method's defaults when None).

        Raises:
            ConfigError: ``config`` is not this method's config class.
        """
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ConfigError(f"method {self.name!r} takes a {self.config_class.__name__}, got "
                              f"{type(config).__name__}; build it with {self.config_class.__name__}(...).")
        self.config = config

    @property
    @abstractmethod
    def roles(self) -> tuple[str, ...]:
        """The model roles ``restore_tensor`` reads (a subset of :data:`ROLES`), under the current config."""

    @property
    def scope(self) -> ParamScope:
        """The tensors this method touches by default (docs/methods.md §2.3)."""
        return self.config.param_scope

    def prepare(self, context: RestoreContext) -> RestoreContext:
        """Compute data-dependent statistics before the per-tensor pass; the default needs none.

        Args:
            context: names, loaded aligned model and anchors, or a tensor stream, as the method needs.

        Returns:
            The context with ``statistics`` filled (the input itself when nothing is needed).
        """
        return context

    @abstractmethod
    def restore_tensor(self, name: str, tensors: Mapping[str, torch.Tensor],
                       context: RestoreContext) -> RestoredTensor:
        """The new value of one target tensor.

        Args:
            name: the tensor name (``model.layers.3.mlp.up_proj.weight``).
            tensors: role → that tensor in each input checkpoint (any dtype; same shape).
            context: from :meth:`prepare`.

        Returns:
            A :class:`RestoredTensor`: fp32 tensor of the input shape, or None when unchanged, and a report dict of
            plain JSON values.
        """

    def restore_chunked(self, name: str, tensors: Mapping[str, torch.Tensor],
                        context: RestoreContext) -> RestoredTensor | None:
        """The result of :meth:`restore_tensor`, bit for bit, computed chunk by chunk while it is written.

        Only element-wise methods have this form; the default returns None, and the caller then runs
        :meth:`restore_tensor` on fp32 copies.

        Args:
            name: the tensor name.
            tensors: role → that tensor as stored (any dtype, CPU, e.g. memory-mapped; same shape).
            context: from :meth:`prepare`.

        Returns:
            None (no chunked form), or a :class:`RestoredTensor` whose tensor is None (unchanged) or an
            :class:`~safetypatch.weights.elementwise.Elementwise` of fp32 chunks. Its report row is filled while the
            chunks are computed: read it after the tensor has been consumed (written).
        """
        return None

    def inputs(self, name: str, tensors: Mapping[str, torch.Tensor],
               roles: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The fp32 tensors of ``roles`` (default :attr:`roles`), checked to be present and of one shape.

        Raises:
            ConfigError: a role is missing.
            ModelMismatchError: two roles' tensors differ in shape.
        """
        return {role: tensor.float() for role, tensor in self.stored_inputs(name, tensors, roles).items()}

    def stored_inputs(self, name: str, tensors: Mapping[str, torch.Tensor],
                      roles: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``roles`` (default :attr:`roles`) as given, checked as :meth:`inputs` does.

        Raises:
            ConfigError: a role is missing.
            ModelMismatchError: two roles' tensors differ in shape.
        """
        roles = self.roles if roles is None else roles
        missing = [role for role in roles if role not in tensors]
        if missing:
            raise ConfigError(f"{self.name}: tensor {name} lacks role(s) {', '.join(missing)} (got "
                              f"{', '.join(sorted(tensors)) or 'none'}); pass {', '.join(missing)} to restore.")
        shapes = {role: tuple(tensors[role].shape) for role in roles}
        if len(set(shapes.values())) > 1:
            raise ModelMismatchError(f"{self.name}: tensor {name} has different shapes across models "
                                     f"({', '.join(f'{r}: {s}' for r, s in shapes.items())}); the checkpoints are "
                                     "not of one architecture.")
        return {role: tensors[role] for role in roles}


def frobenius(M: torch.Tensor) -> float:
    """‖M‖_F as a float (any shape)."""
    return float(torch.linalg.vector_norm(M))


def ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
    """‖part‖_F / ‖whole‖_F, or 0 when the whole is zero."""
    denominator = frobenius(whole)
    return frobenius(part) / denominator if denominator > 0 else 0.0


METHODS: Registry[type[RestoreMethod]] = Registry("restoration method")
METHODS.register("lssf", "safetypatch.restoration.lssf:LSSF")
METHODS.register("resta", "safetypatch.restoration.resta:RESTA")
METHODS.register("safe_lora", "safetypatch.restoration.safe_lora:SafeLoRA")
METHODS.register("lox", "safetypatch.restoration.lox:LoX")
