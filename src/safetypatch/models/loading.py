"""Load a resolved model and its tokenizer with the dtype, device and attention kernel the machine suits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from safetypatch.errors import ModelError

from .fingerprint import Fingerprint, fingerprint_folder
from .resolve import ResolvedModel, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run, with what every output made from it must record.

    Attributes:
        model: the transformers causal LM, in eval mode.
        tokenizer: its tokenizer (a pad token is set to EOS when the checkpoint has none).
        resolved: where it came from.
        fingerprint: the weights' identity.
        dtype: the compute dtype name.
        device: the device name.
        attn_implementation: the attention kernel transformers loaded (``sdpa``, ``flash_attention_2``, ``eager``…).
    """

    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    fingerprint: Fingerprint
    dtype: str
    device: str
    attn_implementation: str = "eager"

    def provenance(self) -> dict:
        """The model block of a results file or manifest."""
        return {
            "model": self.resolved.ref,
            "kind": self.resolved.kind,
            "revision": self.resolved.revision,
            "fingerprint": self.fingerprint.sha256,
            "dtype": self.dtype,
            "device": self.device,
            "attn_implementation": self.attn_implementation,
        }


def pick_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> str:
    """``auto`` → bfloat16 on a GPU with bf16 support, float32 elsewhere (CPUs here lack native bf16)."""
    import torch

    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def pick_attention(requested: str, device: str, dtype: str) -> str | None:
    """``auto`` → ``flash_attention_2`` on a GPU in bf16 or fp16 when flash-attn is installed, else None:
    transformers' own choice (SDPA where the architecture has it, eager otherwise). Other values are passed on."""
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    if device.startswith("cuda") and dtype in ("bfloat16", "float16") and is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def load_model(
    ref: str, *, revision: str | None = None, dtype: str = "auto", device: str = "auto",
    attn_implementation: str = "auto",
) -> LoadedModel:
    """Resolve ``ref`` (see ``resolve_model``) and load model and tokenizer.

    Args:
        ref: catalog name, local folder, .gguf file, or Hub id.
        revision: Hub revision (Hub ids only).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        attn_implementation: ``auto`` (see :func:`pick_attention`; an architecture without FlashAttention-2 falls
            back to transformers' choice), or a transformers name: ``sdpa``, ``flash_attention_2``, ``eager``.

    Raises:
        ModelError: the reference cannot be resolved, the folder has no loadable tokenizer or is not a causal LM,
            or the architecture (or this install) lacks an explicitly requested attention kernel.
    """
    import torch
    from transformers import AutoTokenizer

    resolved = resolve_model(ref, revision)
    fingerprint = fingerprint_folder(resolved.path, resolved.revision)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ModelError(f"{resolved.path} has no tokenizer transformers can load ({reason}). Copy "
                         "the tokenizer files of the model it was made from (tokenizer.json, tokenizer_config.json, "
                         "special_tokens_map.json) into it.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _from_pretrained(resolved, getattr(torch, dtype), attn_implementation,
                             pick_attention(attn_implementation, device, dtype))
    model.to(device).eval()
    return LoadedModel(model, tokenizer, resolved, fingerprint, dtype, device,
                       attn_implementation=str(model.config._attn_implementation))


def _from_pretrained(resolved: ResolvedModel, dtype: Any, requested: str, attention: str | None) -> Any:
    """The causal LM with the chosen attention kernel; ``auto``'s FlashAttention-2 pick falls back to transformers'
    default on architectures (or installs) without it."""
    from transformers import AutoModelForCausalLM

    if attention is None:
        return AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, attn_implementation=attention)
    except (ValueError, ImportError) as exc:
        if requested != "auto":
            raise ModelError(f"{resolved.path} cannot load with attn_implementation={attention!r} ({exc}); use "
                             "'sdpa', 'eager' or 'auto' (FlashAttention-2 needs pip install flash-attn and a GPU).") \
                from exc
        logger.info("%s: %s unavailable (%s); transformers' default attention instead", resolved.ref, attention, exc)
        return AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
