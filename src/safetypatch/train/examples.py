"""Refusal-SFT training data: (prompt, completion) pairs rendered with the model's chat template, tokenised with a
completion-only mask, and checked before step 0 (docs/methods.md §3.1 steps 1-4, §5.5).

No model runs here. Retain examples (benign prompts answered by the model itself) take the answers as plain strings:
the caller generates them with ``safetypatch.eval.generate`` (train and eval are siblings and do not import each
other).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from safetypatch.data.schema import Example
from safetypatch.errors import DataError
from safetypatch.models.chat import end_of_turn_ids as chat_end_of_turn_ids
from safetypatch.models.chat import end_of_turn_markers
from safetypatch.train.refusals import refusal_for, thinking_for

logger = logging.getLogger(__name__)

# End-of-turn markers of the common chat formats (ChatML, Llama-3, Gemma, DeepSeek-R1, Phi-3); the template's own
# marker is found among these, else the tokenizer's EOS is used.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTExample:
    """One (user prompt → assistant completion) pair before templating.

    Attributes:
        prompt: the user turn.
        completion: the assistant text (a refusal, or the model's own answer to a benign prompt).
        kind: ``refusal`` or ``retain``.
        weight: loss weight of the completion's tokens.
        category: the prompt's category label (refusals).
        thinking: body of the short thinking segment put before the completion when ``think`` is on (refusals).
        ends_turn: False for a completion cut at a generation limit: it is trained without the end-of-turn token,
            so the patch does not learn to stop where the cut fell.
    """

    prompt: str
    completion: str
    kind: Literal["refusal", "retain"]
    weight: float = 1.0
    category: str | None = None
    thinking: str | None = None
    ends_turn: bool = True


@dataclass(frozen=True)
class TokenizedExample:
    """A templated, tokenised example: prompt ids then completion ids, and which positions are supervised.

    Attributes:
        input_ids: prompt ids (possibly left-truncated) followed by completion ids.
        completion_mask: 1 on completion positions (the end-of-turn token included), 0 on prompt positions.
        weight: loss weight of the completion's tokens.
        kind: ``refusal`` or ``retain``.
        prompt_tokens_dropped: how many prompt tokens left truncation removed.
        ends_turn: the completion ends with the end-of-turn token (False: cut at a generation limit).
    """

    input_ids: tuple[int, ...]
    completion_mask: tuple[int, ...]
    weight: float
    kind: str
    prompt_tokens_dropped: int = 0
    ends_turn: bool = True

    @property
    def first_completion_id(self) -> int:
        """The id of the completion's first token (the refuse-or-answer decision)."""
        return self.input_ids[len(self.input_ids) - sum(self.completion_mask)]

    @property
    def labels(self) -> list[int]:
        """Token ids on completion positions, −100 on prompt positions (docs/methods.md §3.1 step 3)."""
        return [tok if keep else IGNORE_INDEX for tok, keep in zip(self.input_ids, self.completion_mask, strict=True)]


def build_refusal_examples(examples: Iterable[Example], *, seed: int = 0) -> list[SFTExample]:
    """Pair each harmful request with a refusal written for its category (docs/methods.md §3.1 *Data*; ``ours``).

    Args:
        examples: harmful rows (``prompt`` and optionally ``category``; any ``response`` is ignored, since harmful
            sets may carry compliant answers).
        seed: seed of the refusal choice (:func:`safetypatch.train.refusals.refusal_for`).

    Returns:
        One ``refusal`` example per row, in order, each with a category-specific thinking sentence.
    """
    return [
        SFTExample(prompt=ex.prompt, completion=refusal_for(ex.prompt, ex.category, seed), kind="refusal",
                   category=ex.category, thinking=thinking_for(ex.category))
        for ex in examples
    ]


def build_retain_examples(
    prompts: Sequence[str], responses: Sequence[str], *, weight: float = 1.0, ends_turn: Sequence[bool] | None = None
) -> list[SFTExample]:
    """Benign prompts answered by the model itself, trained on so the patch keeps answering them (docs/patches.md).

    Args:
        prompts: benign user turns.
        responses: the model's own answers, one per prompt (e.g. ``Generation.response`` from eval.generate).
        weight: loss weight of these completions.
        ends_turn: per response, whether it ended by itself (``Generation.finish_reason == "eos"``); a response
            cut at ``max_new_tokens`` is trained without the end-of-turn token. None: every response ended.

    Returns:
        One ``retain`` example per pair.

    Raises:
        DataError: the lists differ in length, or a response is empty (named by index).
    """
    ends = [True] * len(responses) if ends_turn is None else list(ends_turn)
    if not len(prompts) == len(responses) == len(ends):
        raise DataError(f"build_retain_examples: {len(prompts)} prompts, {len(responses)} responses and {len(ends)} "
                        "ends_turn flags; pass one response and one flag per prompt.")
    for i, response in enumerate(responses):
        if not response.strip():
            raise DataError(f"build_retain_examples: response {i} (prompt {prompts[i][:60]!r}) is empty; drop the "
                            "pair or regenerate it with more max_new_tokens.")
    rows = zip(prompts, responses, ends, strict=True)
    return [SFTExample(prompt=p, completion=r, kind="retain", weight=weight, ends_turn=e) for p, r, e in rows]


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the tokenizer's end-of-turn markers (known chat markers in its vocab, and its EOS).

    Raises:
        DataError: the tokenizer has neither.
    """
    ids = chat_end_of_turn_ids(tokenizer)
    if not ids:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no end-of-turn token and no EOS; "
                        "set tokenizer.eos_token to the marker that ends an assistant turn.")
    return ids


def template_has_thinking(tokenizer: Any) -> bool:
    """Whether the chat template mentions ``</think>`` (a reasoning template)."""
    return THINK_CLOSE in (getattr(tokenizer, "chat_template", None) or "")


def render_example(
    tokenizer: Any, example: SFTExample, *, think: bool | None = None, index: int = 0
) -> tuple[str, str]:
    """Template one example into (prompt text, completion text) (docs/methods.md §3.1 step 1).

    prompt = template([user], add_generation_prompt=True); full = template([user, assistant]); the completion is
    full[len(prompt):], cut just after its last end-of-turn marker (the newline some templates add after it is not
    trained), or with the marker appended when the template omits it. With ``think``, a refusal's completion opens
    with "<think>\\n{thinking}\\n</think>\\n\\n" (only the part after "<think>" when the generation prompt already
    opens the thinking block, as DeepSeek-R1 templates do).

    Args:
        tokenizer: the patch base's tokenizer, with a chat template.
        example: the pair.
        think: add the thinking segment; None adds it when the template has thinking.
        index: the example's position, named in errors.

    Returns:
        (prompt text, completion text).

    Raises:
        DataError: no chat template, or the template does not render the prompt as a prefix of the full chat.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; refusal SFT "
                        "renders examples with it. Use an instruct model or set tokenizer.chat_template.")
    think = template_has_thinking(tokenizer) if think is None else think
    user = [{"role": "user", "content": example.prompt}]
    assistant = {"role": "assistant", "content": example.completion}
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, assistant], tokenize=False)
    opens_think = prompt.rstrip().endswith(THINK_OPEN)
    head = prompt[: prompt.rstrip().rfind(THINK_OPEN)] if opens_think else prompt
    if not full.startswith(head):
        raise DataError(
            f"example {index}: the chat template renders the prompt alone differently from the start of the full "
            f"chat, so the completion cannot be split off (prompt ends {prompt[-40:]!r}, full chat has "
            f"{full[len(head) - 40 : len(head)]!r} there). Fix the template or use a template without per-turn "
            "rewriting."
        )
    completion = _end_at_eot(full[len(prompt):] if full.startswith(prompt) else full[len(head):], tokenizer)
    if think and example.thinking and THINK_CLOSE not in completion:
        segment = f"{example.thinking}\n{THINK_CLOSE}\n\n"
        completion = (segment if opens_think else f"{THINK_OPEN}\n{segment}") + completion.lstrip()
    return prompt, completion


def _end_at_eot(completion: str, tokenizer: Any) -> str:
    markers = end_of_turn_markers(tokenizer)
    ends = [(completion.rfind(m) + len(m), m) for m in markers if m in completion]
    if ends:
        return completion[: max(ends)[0]]
    if not markers:
        raise DataError("the tokenizer has no end-of-turn token and no EOS to end completions with; set "
                        "tokenizer.eos_token.")
    return completion + markers[0]


def _without_eot(completion: str, tokenizer: Any) -> str:
    """``completion`` (as :func:`render_example` ends it) without its final end-of-turn marker."""
    marker = max((m for m in end_of_turn_markers(tokenizer) if completion.endswith(m)), key=len, default="")
    return completion[: len(completion) - len(marker)]


def tokenize_examples(
    tokenizer: Any, examples: Sequence[SFTExample], *, max_length: int, think: bool | None = None
) -> list[TokenizedExample]:
    """Render, tokenise prompt and completion separately, concatenate, and left-truncate the prompt (§3.1 step 2).

    Args:
        tokenizer: the patch base's tokenizer.
        examples: the pairs.
        max_length: most tokens per example; the prompt is cut from the left, the completion never.
        think: see :func:`render_example`.

    Returns:
        The tokenised examples, in order, already checked by :func:`check_supervision`.

    Raises:
        DataError: an example's completion does not fit in ``max_length`` with at least one prompt token (named by
            index), or a §3.1 runtime assertion fails.
    """
    out = []
    for i, example in enumerate(examples):
        prompt, completion = render_example(tokenizer, example, think=think, index=i)
        if not example.ends_turn:
            completion = _without_eot(completion, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        keep = max_length - len(completion_ids)
        if keep < 1:
            raise DataError(
                f"example {i} ({example.kind}, prompt {example.prompt[:60]!r}): its completion alone is "
                f"{len(completion_ids)} tokens, so with max_length={max_length} it would be truncated and lose its "
                "end-of-turn token. Raise the recipe's max_length (`--set max_length=N`, YAML recipe_overrides) or "
                "shorten the completion."
            )
        dropped = max(0, len(prompt_ids) - keep)
        prompt_ids = prompt_ids[dropped:]
        out.append(TokenizedExample(
            input_ids=tuple(prompt_ids + completion_ids),
            completion_mask=tuple([0] * len(prompt_ids) + [1] * len(completion_ids)),
            weight=example.weight, kind=example.kind, prompt_tokens_dropped=dropped, ends_turn=example.ends_turn,
        ))
    if dropped_total := sum(ex.prompt_tokens_dropped > 0 for ex in out):
        logger.warning("%d of %d examples had their prompt cut from the left to fit max_length=%d",
                       dropped_total, len(out), max_length)
    if cut := sum(not ex.ends_turn for ex in out):
        logger.info("%d of %d examples were cut at a generation limit and are trained without an end-of-turn token",
                    cut, len(out))
    check_supervision([ex.labels for ex in out], end_of_turn_ids(tokenizer), [ex.ends_turn for ex in out])
    return out


def refusal_openings(examples: Iterable[TokenizedExample]) -> tuple[int, ...]:
    """The sorted ids that open the refusal examples' completions ("I", "Sorry" for the default refusal texts)."""
    return tuple(sorted({ex.first_completion_id for ex in examples if ex.kind == "refusal"}))


def check_supervision(
    labels: Sequence[Sequence[int]], eot_ids: Iterable[int], ends_turn: Sequence[bool] | None = None
) -> float:
    """The §3.1 step 4 assertions, run before step 0 on the labels the trainer will use (docs/methods.md §5.5).

    Every example has at least one supervised token that some position predicts (position 0 never is), and its
    last supervised token is an end-of-turn id, or, for an example cut at a generation limit, is not one. The
    supervised fraction is logged.

    Args:
        labels: per example, token ids on supervised positions and −100 elsewhere (unpadded).
        eot_ids: the end-of-turn ids (:func:`end_of_turn_ids`).
        ends_turn: per example, whether its completion ends the turn (``TokenizedExample.ends_turn``); None: all.

    Returns:
        The fraction of tokens that are supervised, over all examples.

    Raises:
        DataError: naming the first example that violates an assertion, what was seen and how to fix it.
    """
    eot = set(eot_ids)
    ends = [True] * len(labels) if ends_turn is None else list(ends_turn)
    supervised = total = 0
    for i, (row, ends_here) in enumerate(zip(labels, ends, strict=True)):
        kept = [tok for tok in list(row)[1:] if tok != IGNORE_INDEX]
        if not kept:
            raise DataError(f"example {i} has no supervised token (all {len(row)} labels are -100), so it would "
                            "train nothing; check the completion mask and max_length.")
        if ends_here and kept[-1] not in eot:
            raise DataError(f"example {i}: the last supervised token is id {kept[-1]}, not an end-of-turn id "
                            f"{sorted(eot)}, so the model would not learn to stop. The completion must end with "
                            "the template's end-of-turn token (see render_example).")
        if not ends_here and kept[-1] in eot:
            raise DataError(f"example {i} was cut at a generation limit but its last supervised token is the "
                            f"end-of-turn id {kept[-1]}, so the model would learn to stop where the cut fell; "
                            "tokenise it with ends_turn=False (see tokenize_examples).")
        supervised += len(kept)
        total += len(row)
    if not total:
        raise DataError("no training examples: pass at least one refusal example.")
    fraction = supervised / total
    logger.info("refusal SFT: %d examples, %d of %d tokens supervised (%.1f%%)",
                len(labels), supervised, total, 100 * fraction)
    return fraction
