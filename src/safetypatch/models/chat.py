"""Chat-format facts shared by training, evaluation and analysis: how a user turn is rendered, which tokens end an
assistant turn."""

from __future__ import annotations

from typing import Any

# Markers that close an assistant turn in the chat templates of Qwen/SmolLM (ChatML), Llama 3, Gemma,
# DeepSeek-R1 distills and Phi; a tokenizer's own EOS is added to whichever of these its vocabulary holds.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<｜end▁of▁sentence｜>", "<|end|>")


def end_of_turn_markers(tokenizer: Any) -> tuple[str, ...]:
    """The known end-of-turn markers in ``tokenizer``'s vocabulary, then its EOS; empty when it has none."""
    vocab = tokenizer.get_vocab()
    names = [tok for tok in END_OF_TURN_TOKENS if tok in vocab]
    if tokenizer.eos_token:
        names.append(tokenizer.eos_token)
    return tuple(dict.fromkeys(names))


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of :func:`end_of_turn_markers` (the unknown-token id excluded)."""
    ids = [tokenizer.convert_tokens_to_ids(name) for name in end_of_turn_markers(tokenizer)]
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id))


def render_user_turn(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The text a chat model sees for one user turn: its chat template with the assistant generation prompt.

    The caller checks that ``tokenizer`` has a chat template (the advice differs by caller).

    Args:
        tokenizer: the model's tokenizer.
        prompt: the user turn.
        system_prompt: a system turn placed before it, or None for none (the template may add its default).

    Returns:
        The templated prompt, ending with the assistant generation prompt.
    """
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
