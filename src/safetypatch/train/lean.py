"""Forwards of training that keep fewer activations for the backward pass (docs/performance.md, *Training*).

PEFT's ``lora.Linear`` computes ``base(x) + B(A(dropout(x))) · s``. Under bf16 (or fp16) autocast every matrix
product casts its inputs: the frozen ``W_0`` once per forward, kept for the backward pass until the step ends, and
``x`` once for the base product and once more for ``A``, the second copy kept for ``A``'s gradient. q, k and v
read the same ``x`` (so do gate and up), so a decoder block keeps six reduced-precision copies of three inputs
and a reduced-precision copy of every frozen weight: with SmolLM2-135M, batch 8 × 256 tokens, 456 of the 1,937 MiB
that one forward keeps for the backward pass.

:class:`LoRALinearFunction` computes the same products on the same reduced-precision values, in the same order,
and keeps only what its backward needs: ``x`` cast once per input (modules reading the same tensor share the
cast) and the rank-r ``A x``; ``W_0`` is cast again in the backward pass instead of being kept. The forward is bit
for bit PEFT's; the gradients of ``A`` and ``B`` are too, and the gradient of ``x`` sums the same terms in another
order (floating-point noise; ``tests/train/test_memory.py`` holds both to a stated tolerance).

It applies only where it is that same computation: LoRA without dropout (with dropout, PEFT's own forward draws
the masks), one active adapter, no variant (DoRA, …), unmerged, a plain ``nn.Linear`` base, under autocast.
Everywhere else the module's own forward runs.

A gated MLP ``down(act(gate(x)) · up(x))`` keeps ``gate(x)`` for the activation's backward and both factors of the
product for its own: :class:`SiLUMulFunction` keeps ``gate(x)`` and ``up(x)`` and computes ``silu(gate(x))`` again
in the backward pass (one element-wise pass), the same operations on the same values (180 MiB less in the example
above). It replaces the forward of MLP modules whose forward is exactly that line (Llama, Qwen2, Mistral, SmolLM2,
…) with SiLU as ``act``.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _CastCache:
    """The reduced-precision copy of the last input cast, reused while the same tensor (same version) comes back."""

    def __init__(self) -> None:
        self.source: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.dtype: torch.dtype | None = None
        self.cast: torch.Tensor | None = None

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if (self.cast is not None and self.source is not None and self.source() is x and self.dtype == dtype
                and self.version == x._version):
            return self.cast
        cast = x.detach().to(dtype)
        self.source, self.version, self.dtype, self.cast = weakref.ref(x), x._version, dtype, cast
        return cast

    def clear(self) -> None:
        self.source, self.cast, self.dtype = None, None, None


class LoRALinearFunction(torch.autograd.Function):
    """``base(x) + (x Aᵀ) Bᵀ · s`` in the reduced dtype ``dtype``, keeping ``x`` (cast) and ``x Aᵀ`` for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        base = F.linear(x_low, weight.to(dtype), bias.to(dtype) if bias is not None else None)
        hidden = F.linear(x_low, a)
        out = base + F.linear(hidden, b) * scaling
        ctx.save_for_backward(x_low, hidden, weight, lora_a, lora_b)
        ctx.scaling, ctx.dtype, ctx.x_dtype = scaling, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x_low, hidden, weight, lora_a, lora_b = ctx.saved_tensors
        dtype = ctx.dtype
        grad = grad.to(dtype)
        grad2d = grad.reshape(-1, grad.shape[-1])
        scaled = grad2d * ctx.scaling  # MulBackward of "· s"
        grad_b = grad_a = grad_x = None
        if ctx.needs_input_grad[5]:
            grad_b = scaled.t().mm(hidden.reshape(-1, hidden.shape[-1])).to(lora_b.dtype)
        grad_hidden = scaled.mm(lora_b.to(dtype))
        if ctx.needs_input_grad[4]:
            grad_a = grad_hidden.t().mm(x_low.reshape(-1, x_low.shape[-1])).to(lora_a.dtype)
        if ctx.needs_input_grad[0]:
            # Two terms, each rounded to the reduced dtype as autograd rounds them, summed in x's dtype.
            from_base = grad2d.mm(weight.to(dtype)).to(ctx.x_dtype)
            grad_x = (from_base + grad_hidden.mm(lora_a.to(dtype)).to(ctx.x_dtype)).reshape(
                *grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, grad_a, grad_b, None, None


class SiLUMulFunction(torch.autograd.Function):
    """``silu(gate) · up``, keeping ``gate`` and ``up`` (not ``silu(gate)``) for the backward pass."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


_GATED_MLP = ("def forward(self, x):\n"
              "    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n"
              "    return down_proj\n")


def _gated_mlp(module: nn.Module) -> bool:
    """An MLP whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU as ``act_fn``."""
    from transformers.activations import SiLUActivation

    if not isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)):
        return False
    try:
        source = textwrap.dedent(inspect.getsource(type(module).forward))
    except (OSError, TypeError):
        return False
    return source == _GATED_MLP


def _mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = module.gate_proj(x)
    return module.down_proj(SiLUMulFunction.apply(gate, module.up_proj(x)))


def _eligible(module: nn.Module) -> bool:
    """A PEFT ``lora.Linear`` whose forward is exactly base + B A x · s (no dropout, variant, merge, mixing)."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(module, Linear) or type(module.get_base_layer()) is not nn.Linear:
        return False
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or module.merged or getattr(module, "fan_in_fan_out", False):
        return False
    name = active[0]
    base = module.get_base_layer()
    return (isinstance(module.lora_dropout[name], nn.Identity) and name not in getattr(module, "lora_variant", {})
            and not getattr(module, "lora_bias", {}).get(name, False)
            and (base.bias is None or not base.bias.requires_grad) and not base.weight.requires_grad)


def _forward(module: nn.Module, cache: _CastCache, original: Any, x: torch.Tensor, *args: Any,
             **kwargs: Any) -> torch.Tensor:
    device = x.device.type
    if (args or kwargs or module.disable_adapters or module.merged or not torch.is_autocast_enabled(device)
            or not x.is_floating_point()):
        return original(x, *args, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    name = next(name for name in module.active_adapters if name in module.lora_A)
    base = module.get_base_layer()
    with torch.autocast(device, enabled=False):
        return LoRALinearFunction.apply(x, cache.get(x, dtype), base.weight, base.bias,
                                        module.lora_A[name].weight, module.lora_B[name].weight,
                                        float(module.scaling[name]), dtype)


@contextlib.contextmanager
def lean_forward(model: nn.Module) -> Iterator[int]:
    """Run every eligible LoRA module of ``model`` through :class:`LoRALinearFunction`, and every gated SiLU MLP
    through :class:`SiLUMulFunction`, inside the block.

    Yields:
        The number of LoRA modules that take the lean path (0: none).
    """
    cache = _CastCache()
    patched, lora = [], 0
    for module in model.modules():
        if "forward" in vars(module):
            continue
        if _eligible(module):
            original = module.forward
            module.forward = types.MethodType(
                lambda self, x, *a, _o=original, **k: _forward(self, cache, _o, x, *a, **k), module)
            patched.append(module)
            lora += 1
        elif _gated_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            patched.append(module)
    try:
        yield lora
    finally:
        for module in patched:
            del module.forward
        cache.clear()
