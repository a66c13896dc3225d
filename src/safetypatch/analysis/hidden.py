"""Hidden-state shift per layer (docs/methods.md §3.8): Δh^(l)(x) = ‖h^(l)_patched(x) − h^(l)_0(x)‖_2, h^(l) the
residual stream after decoder block l, at the last prompt token (or averaged over the prompt's tokens), averaged
separately over benign and harmful prompts, and also relative to ‖h^(l)_0(x)‖.

Prompts are rendered with the model's chat template and run one at a time by default, so no padding or position
bookkeeping can move a state: a patch whose ΔW is zero, or a target equal to the model, shifts nothing, exactly.
Batches (``batch_size`` > 1, the linear probe's extraction) pad on the right, after every prompt token, where a causal
model's prompt tokens never look.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from safetypatch.data import canonical_split, load_dataset, normalize_prompt
from safetypatch.errors import ConfigError
from safetypatch.models.blocks import decoder_layers
from safetypatch.models.chat import render_user_turn
from safetypatch.utils.hashing import sha256_json

Position = Literal["last", "mean"]


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one kind (benign or harmful) and where they came from.

    Attributes:
        kind: ``benign`` or ``harmful``.
        prompts: the prompts, in evaluation-half order.
        record: dataset, split, its sha256, seed, count and the prompts' sha256, for the provenance.
    """

    kind: str
    prompts: tuple[str, ...]
    record: dict[str, Any]


def select_prompts(kind: str, dataset: str, n: int, seed: int) -> PromptSet:
    """Up to ``n`` distinct prompts from the evaluation half of ``dataset``'s canonical split, sampled with ``seed``.

    Args:
        kind: ``benign`` or ``harmful`` (a label).
        dataset: a catalog set or a local file.
        n: how many prompts (fewer when the half holds fewer distinct ones).
        seed: seed of the sample.

    Raises:
        DataError: the set cannot be loaded.
    """
    split = canonical_split(load_dataset(dataset))
    distinct = list({normalize_prompt(row.prompt): row.prompt for row in split.eval.rows}.values())
    picked = [distinct[i] for i in sorted(random.Random(seed).sample(range(len(distinct)), min(n, len(distinct))))]
    record = {"dataset": dataset, "split": "eval", "eval_sha256": split.eval_sha256, "seed": seed,
              "n": len(picked), "sha256": sha256_json(picked)}
    return PromptSet(kind, tuple(picked), record)


@torch.no_grad()
def residual_states(model: Any, tokenizer: Any, prompts: Sequence[str], position: Position = "last",
                    progress: Callable[[int], None] | None = None, batch_size: int = 1) -> torch.Tensor:
    """The residual stream after every decoder block at the last prompt token (or the prompt's mean).

    Args:
        model: a causal LM or a PEFT model (its adapter active).
        tokenizer: its tokenizer, with a chat template.
        prompts: user turns.
        position: ``last`` (the default of §3.8) or ``mean`` over the prompt's tokens.
        progress: called with the number of prompts after each forward.
        batch_size: prompts per forward, taken in order of length and padded on the right: causal attention keeps
            the padding out of every prompt token's state, so only the rounding of batched kernels can differ from
            one prompt at a time (the default, exact).

    Returns:
        ``[len(prompts), layers, hidden]`` fp32 on the CPU, in the order of ``prompts``.

    Raises:
        ConfigError: the tokenizer has no chat template, or ``batch_size`` is below 1.
        ModelError: see :func:`decoder_layers`.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "")
        raise ConfigError(f"tokenizer {name!r} has no chat template; the hidden-state shift renders prompts with it. "
                          "Analyse an instruct model, or set hidden_shift: false.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    layers = decoder_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoded = [tokenizer(render_user_turn(tokenizer, prompt), add_special_tokens=False)["input_ids"]
               for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    lengths: list[int] = []
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(torch.stack([hidden[row, n - 1].float() if position == "last" else
                                     hidden[row, :n].float().mean(0) for row, n in enumerate(lengths)]))

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    was_training = model.training
    model.eval()
    states: dict[int, torch.Tensor] = {}
    pad = tokenizer.pad_token_id or 0
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            lengths[:] = [len(encoded[i]) for i in chunk]
            ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(encoded[i]) for i in chunk], batch_first=True,
                                                  padding_value=pad)
            base.get_decoder()(input_ids=ids.to(base.device), use_cache=False)
            states.update(zip(chunk, torch.stack(captured, 1).cpu(), strict=True))
            captured.clear()
            if progress is not None:
                progress(len(chunk))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return torch.stack([states[i] for i in range(len(prompts))])


def layer_shift(before: torch.Tensor, after: torch.Tensor) -> dict[str, list[float]]:
    """Mean over prompts of ‖h_after − h_before‖ and of ‖h_after − h_before‖ / ‖h_before‖, per layer.

    Args:
        before: ``[prompts, layers, hidden]`` of the unchanged model.
        after: the same of the patched model.

    Returns:
        ``shift`` and ``relative``, one value per layer.
    """
    shift = torch.linalg.vector_norm(after - before, dim=-1)
    scale = torch.linalg.vector_norm(before, dim=-1)
    relative = torch.where(scale > 0, shift / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)
    return {"shift": shift.mean(0).tolist(), "relative": relative.mean(0).tolist()}
