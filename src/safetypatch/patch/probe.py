"""Probe batches and temporary PEFT attachment, for the logit checks of saved and applied patches
(docs/methods.md §5.4, §5.8): a saved adapter must reproduce the in-memory model's logits, and an applied patch must
change them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from safetypatch.errors import PatchError
from safetypatch.patch.factors import Patch

PROBE_BATCH, PROBE_LENGTH = 2, 16


def probe_input_ids(model: Any, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids (2 × 16, drawn uniformly from the vocabulary with ``seed``) on the model's device."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (PROBE_BATCH, PROBE_LENGTH), generator=generator)
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def probe_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's fp32 logits on ``input_ids`` in eval mode (the training flag is restored), on the CPU."""
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=input_ids, use_cache=False).logits.float().cpu()
    finally:
        model.train(was_training)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def attach_peft(model: Any, patch: Patch, adapter_name: str = "safetypatch") -> Any:
    """Wrap a plain model in a PEFT model carrying ``patch`` (unmerged, loaded from memory, inference mode)."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, patch.peft_config(), adapter_name=adapter_name)
    try:
        weight = next(model.parameters())
        state = {k: v.to(weight.device) for k, v in patch.state_dict().items()}
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing or result.unexpected_keys:
            raise PatchError(f"PEFT did not load every factor of patch {patch.where}: missing {missing[:3]}, "
                             f"unexpected {list(result.unexpected_keys)[:3]}.")
    except Exception:
        detach_peft(peft_model)
        raise
    peft_model.requires_grad_(False)
    return peft_model


def detach_peft(peft_model: Any) -> Any:
    """Remove the adapter layers (without merging) and return the plain model as it was."""
    model = peft_model.unload()
    _forget_peft(model)
    return model


@contextlib.contextmanager
def peft_attached(model: Any, patch: Patch, adapter_name: str = "safetypatch") -> Iterator[Any]:
    """Attach ``patch`` to a plain model as an unmerged PEFT adapter for the duration of the block.

    The factors are loaded from memory; on exit the adapter layers are removed and ``model`` is as before.
    """
    peft_model = attach_peft(model, patch, adapter_name)
    try:
        yield peft_model
    finally:
        detach_peft(peft_model)


@contextlib.contextmanager
def reloaded(model: Any, folder: Path) -> Iterator[Any]:
    """The adapter in ``folder`` loaded onto ``model`` as PEFT does for users, active for the block.

    A plain model is wrapped with ``PeftModel.from_pretrained`` and unwrapped on exit; a PEFT model gets the
    adapter under a temporary name next to its own (so no second copy of the base is needed), and its previous
    active adapter and trainability are restored on exit.
    """
    from peft import PeftModel

    if not is_peft_model(model):
        peft_model = PeftModel.from_pretrained(model, str(folder))
        try:
            yield peft_model
        finally:
            detach_peft(peft_model)
        return
    previous = model.active_adapter
    trainable = any(p.requires_grad for n, p in model.named_parameters() if f".{previous}." in n)
    model.load_adapter(str(folder), adapter_name="_safetypatch_reload")
    try:
        model.set_adapter("_safetypatch_reload")
        yield model
    finally:
        model.set_adapter(previous, inference_mode=not trainable)
        model.delete_adapter("_safetypatch_reload")


def _forget_peft(model: Any) -> None:
    # PEFT leaves its config on a model it wrapped; a stale one makes the next get_peft_model warn about it.
    if hasattr(model, "peft_config"):
        del model.peft_config
