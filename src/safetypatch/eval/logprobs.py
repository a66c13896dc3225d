"""Log-probabilities at selected positions only.

Scoring needs the next-token distribution at a few positions (continuation or response tokens), yet a plain
forward materialises fp32 logits for every position (batch x seq x vocab: most of the memory). Here the
decoder's hidden states are taken from the base model and the LM head is applied only where a caller asks, as TRL's
chunked loss does. Multiple-choice scoring and benign drift share these helpers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from safetypatch.errors import ModelError


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside ``model``, unwrapping a PEFT ``PeftModel`` (its LoRA layers stay active).

    Args:
        model: a transformers ``PreTrainedModel`` with an LM head, or a PEFT ``PeftModel`` around one.

    Returns:
        The ``PreTrainedModel`` whose ``base_model`` gives hidden states and whose output embeddings are the LM head.

    Raises:
        ModelError: a prompt-learning PEFT model (its virtual tokens live outside the decoder), or no LM head.
    """
    if callable(getattr(model, "get_base_model", None)):
        peft_config = getattr(model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ModelError(
                f"{type(model).__name__} uses prompt learning ({peft_config.peft_type}); its virtual tokens are added "
                "outside the decoder, so position-selected scoring would silently drop them. Score a LoRA-type "
                "adapter, or merge the model first."
            )
        model = model.get_base_model()
    if model.get_output_embeddings() is None:
        raise ModelError(
            f"{type(model).__name__} has no LM head (get_output_embeddings() is None); load the model with "
            "AutoModelForCausalLM."
        )
    return model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Disable dropout for the block and restore every submodule's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def decoder_forward(
    lm: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool = False,
) -> Any:
    """Run the decoder of ``lm`` (from :func:`causal_lm`) without its LM head, inputs moved to the model's device.

    Args:
        lm: the causal LM.
        input_ids: ``[batch, seq]`` token ids.
        attention_mask: ``[batch, past + seq]`` 0/1 padding mask.
        position_ids: ``[batch, seq]`` positions; required with left padding (the decoder's default is 0..seq-1).
        past_key_values: a cache from an earlier call on the same rows, or ``None``.
        use_cache: return the updated cache (read it with :func:`output_cache`).

    Returns:
        The decoder output; ``.last_hidden_state`` is ``[batch, seq, hidden]``.
    """
    decoder = lm.base_model
    return decoder(
        input_ids=input_ids.to(lm.device),
        attention_mask=attention_mask.to(lm.device),
        position_ids=None if position_ids is None else position_ids.to(lm.device),
        use_cache=use_cache,
        **{cache_argument(decoder): past_key_values},
    )


def output_cache(output: Any) -> Any:
    """The KV cache a decoder call returned (``.cache`` since transformers 5.24, ``.past_key_values`` before)."""
    return output.cache if "cache" in output else output.past_key_values


def cache_argument(decoder: Any) -> str:
    """The decoder's KV-cache keyword: ``cache`` since transformers 5.24 (``past_key_values`` is deprecated there
    and removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def head_log_softmax(lm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary from final hidden states, as the model's own forward computes logits.

    The LM head (LoRA-wrapped if the adapter targets it) is applied, then the final logit soft-capping of
    Gemma-2/3-style configs (``final_logit_softcapping``), then an fp32 log-softmax.

    Args:
        lm: the causal LM (from :func:`causal_lm`).
        hidden: ``[n, hidden]`` final hidden states at the selected positions.

    Returns:
        ``[n, vocab]`` fp32 log-probabilities.
    """
    logits = lm.get_output_embeddings()(hidden).float()
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)`` tensors of shape ``[len(rows), longest]``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)`` tensors of shape ``[len(rows), longest]``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask
