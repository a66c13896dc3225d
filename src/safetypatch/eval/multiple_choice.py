"""Log-likelihood multiple-choice scoring as lm-eval does it (docs/methods.md §4.1 capability; §4.5 lm-eval-shaped).

Each item is a context plus one continuation per choice. The score of a choice is the summed log-probability of its
continuation tokens given the context; ``acc`` takes the argmax of the sums and ``acc_norm`` the argmax of the sums
divided by the choice's character length (lm-eval's ``completion_len``). Tokenisation follows lm-eval's
``_encode_pair``: trailing context spaces move to the continuation, and the continuation tokens are the tail of the
encoded ``context + continuation`` after the encoded context, so a merge across the boundary is scored as lm-eval
scores it. The context of an item is run once; its KV cache is shared by all choices, and the LM head is applied only
at continuation positions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from safetypatch.data.schema import Example
from safetypatch.errors import DataError
from safetypatch.eval.cores import cpu_workers, map_on_cores
from safetypatch.eval.logprobs import (
    causal_lm,
    decoder_forward,
    eval_mode,
    head_log_softmax,
    output_cache,
    pad_left,
    pad_right,
)
from safetypatch.registry import Registry

TARGET_DELIMITER = " "


class FormattedItem(NamedTuple):
    """A multiple-choice item as the model scores it: one context and one continuation per choice."""

    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class ItemScore:
    """Scores of one item's choices.

    Attributes:
        loglikelihoods: summed continuation log-probabilities, one per choice.
        n_tokens: continuation tokens per choice.
        n_bytes: UTF-8 bytes per continuation (delimiter included; for bits-per-byte).
        norm_lengths: characters per choice without the target delimiter, lm-eval's ``acc_norm`` divisor.
    """

    loglikelihoods: tuple[float, ...]
    n_tokens: tuple[int, ...]
    n_bytes: tuple[int, ...]
    norm_lengths: tuple[int, ...]


@dataclass(frozen=True)
class _Encoded:
    context: list[int]
    continuations: list[list[int]]


def _choices(task: str, example: Example) -> tuple[str, ...]:
    if not example.choices or len(example.choices) < 2:
        raise DataError(f"{task}: item {example.prompt[:60]!r} has choices={example.choices!r}; need at least two.")
    return tuple(example.choices)


def _format_arc(example: Example) -> FormattedItem:
    return _plain_question("arc", example)


def _format_piqa(example: Example) -> FormattedItem:
    return _plain_question("piqa", example)


def _plain_question(task: str, example: Example) -> FormattedItem:
    """lm-eval's ``Question: {q}\\nAnswer:`` prompt with the choice texts as continuations (ARC, PIQA)."""
    choices = _choices(task, example)
    return FormattedItem(f"Question: {example.prompt}\nAnswer:", tuple(TARGET_DELIMITER + c for c in choices))


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: strip, WikiHow ``[title]`` and bracket artefacts removed, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _format_hellaswag(example: Example) -> FormattedItem:
    """lm-eval's hellaswag query ``activity_label: ctx_a Ctx_b`` from ``meta``, else ``prompt`` as that raw query."""
    meta = example.meta
    if {"activity_label", "ctx_a", "ctx_b"} <= meta.keys():
        raw = f"{meta['activity_label']}: {meta['ctx_a']} {meta['ctx_b'].capitalize()}"
    else:
        raw = example.prompt
    choices = _choices("hellaswag", example)
    return FormattedItem(
        _hellaswag_preprocess(raw), tuple(TARGET_DELIMITER + _hellaswag_preprocess(c) for c in choices)
    )


def _format_mmlu(example: Example) -> FormattedItem:
    """lm-eval's default MMLU prompt: subject line, question, lettered choices, ``Answer:``; `` A``.. targets."""
    choices = _choices("mmlu", example)
    letters = "ABCDEFGHIJ"[: len(choices)]
    subject = example.meta.get("subject") or example.category
    header = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if subject
        else ""
    )
    listed = "".join(f"\n{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    return FormattedItem(f"{header}{example.prompt.strip()}{listed}\nAnswer:", tuple(f" {x}" for x in letters))


FORMATS: Registry[Callable[[Example], FormattedItem]] = Registry("multiple-choice format")
FORMATS.register("arc-easy", _format_arc)
FORMATS.register("arc-challenge", _format_arc)
FORMATS.register("piqa", _format_piqa)
FORMATS.register("hellaswag", _format_hellaswag)
FORMATS.register("mmlu", _format_mmlu)


def format_item(task: str, example: Example) -> FormattedItem:
    """Context and continuations of ``example`` as lm-eval formats ``task`` zero-shot.

    Args:
        task: ``arc-easy``, ``arc-challenge``, ``piqa``, ``hellaswag`` or ``mmlu``.
        example: the row; ``prompt`` is the question / goal (hellaswag: ``meta`` with ``activity_label``, ``ctx_a``,
            ``ctx_b``, or the raw query in ``prompt``; mmlu: ``meta['subject']`` or ``category`` names the subject).

    Returns:
        ``(context, continuations)``, continuations being the choices behind lm-eval's one-space target delimiter.

    Raises:
        ConfigError: unknown task (close names suggested). DataError: fewer than two choices.
    """
    return FORMATS.get(task)(example)


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations_list: Sequence[Sequence[str]],
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    add_bos: bool | None = None,
) -> list[ItemScore]:
    """Summed log-likelihood of every continuation given its context (lm-eval ``loglikelihood``, docs/methods.md §4.1).

    Items are sorted by length into batches of ``batch_size`` items; each batch runs the left-padded contexts once
    with a KV cache, then all choices' continuations against the cache rows of their item. Results do not depend on
    the batch size beyond fp32 rounding. On a CPU, batches run side by side, one per torch thread
    (:func:`~safetypatch.eval.cores.map_on_cores`; the same numbers).

    Args:
        model: a transformers causal LM or a PEFT ``PeftModel``.
        tokenizer: its tokenizer.
        contexts: one context per item.
        continuations_list: the continuations of each item.
        batch_size: items per forward.
        progress: called as ``progress(done, total)`` after each batch.
        add_bos: prepend the BOS token to contexts; ``None`` follows lm-eval (only for Gemma models).

    Returns:
        One :class:`ItemScore` per item, in input order.

    Raises:
        DataError: mismatched lengths, an empty continuation, or an item longer than the model's context window.
    """
    if len(contexts) != len(continuations_list):
        raise DataError(f"{len(contexts)} contexts but {len(continuations_list)} continuation lists; pass one each.")
    lm = causal_lm(model)
    if add_bos is None:
        add_bos = "gemma" in lm.config.model_type
    pairs = zip(contexts, continuations_list, strict=True)
    encoded = [_encode_item(tokenizer, lm, ctx, conts, add_bos) for ctx, conts in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i].context) + _longest(encoded[i])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: dict[int, list[float]] = {}
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def score(batch: list[int]) -> list[list[float]]:
        with torch.inference_mode():
            return _score_batch(lm, [encoded[i] for i in batch], pad_id)

    with eval_mode(lm):
        costs = [sum(len(encoded[i].context) + sum(map(len, encoded[i].continuations)) for i in batch)
                 for batch in batches]
        for batch, scored in zip(batches, map_on_cores(score, batches, cpu_workers(lm.device), costs), strict=True):
            sums.update(zip(batch, scored, strict=True))
            if progress is not None:
                progress(len(sums), len(order))
    return [
        ItemScore(
            loglikelihoods=tuple(sums[i]),
            n_tokens=tuple(len(c) for c in encoded[i].continuations),
            n_bytes=tuple(len(c.encode("utf-8")) for c in continuations_list[i]),
            norm_lengths=tuple(len(c.removeprefix(TARGET_DELIMITER)) for c in continuations_list[i]),
        )
        for i in range(len(encoded))
    ]


def _longest(item: _Encoded) -> int:
    return max(len(c) for c in item.continuations)


def _encode_item(tokenizer: Any, lm: Any, context: str, continuations: Sequence[str], add_bos: bool) -> _Encoded:
    """lm-eval's ``_encode_pair`` for every choice; the context ids are the same for all of them."""
    n_spaces = len(context) - len(context.rstrip())
    stem = context[: len(context) - n_spaces]
    prefix = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    if not stem and not prefix:
        # lm-eval conditions an empty context on a single prefix token (BOS, else EOS).
        prefix = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    ctx = tokenizer(stem, add_special_tokens=False)["input_ids"] if stem else []
    conts = []
    for continuation in continuations:
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        tail = whole[len(ctx) :]
        if not tail:
            raise DataError(f"continuation {continuation!r} of context {context[-60:]!r} encodes to no tokens.")
        conts.append(tail)
    item = _Encoded(prefix + ctx, conts)
    limit = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and len(item.context) + _longest(item) - 1 > limit:
        raise DataError(
            f"item of {len(item.context)} context + {_longest(item)} continuation tokens exceeds the model's "
            f"{limit} positions (context ends {context[-60:]!r}); shorten the context or use fewer shots."
        )
    return item


def _score_batch(lm: Any, items: list[_Encoded], pad_id: int) -> list[list[float]]:
    """Context pass with a KV cache, then every continuation (but its last token) against its item's cache rows."""
    ctx_ids, ctx_mask = pad_left([item.context for item in items], pad_id)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder_forward(lm, ctx_ids, ctx_mask, ctx_pos, use_cache=True)
    first = head_log_softmax(lm, out.last_hidden_state[:, -1]).cpu()
    owner = torch.tensor([i for i, item in enumerate(items) for _ in item.continuations])
    conts = [cont for item in items for cont in item.continuations]
    lls = [float(first[owner[c], cont[0]]) for c, cont in enumerate(conts)]
    if max(len(cont) for cont in conts) > 1:
        cache = output_cache(out)
        cache.batch_select_indices(owner)
        ids, mask = pad_right([cont[:-1] for cont in conts], pad_id)
        pos = ctx_pos[owner, -1:] + 1 + torch.arange(ids.shape[1])
        hidden = decoder_forward(lm, ids, torch.cat([ctx_mask[owner], mask], 1), pos, cache).last_hidden_state
        rows, cols = mask.nonzero(as_tuple=True)
        targets = torch.tensor([conts[r][c + 1] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)])
        logp = head_log_softmax(lm, hidden[rows, cols])
        picked = logp.gather(1, targets[:, None].to(logp.device)).squeeze(1).cpu()
        tails = torch.zeros(len(conts), dtype=torch.float64).index_add_(0, rows, picked.double())
        lls = [head + float(tail) for head, tail in zip(lls, tails, strict=True)]
    per_item, k = [], 0
    for item in items:
        per_item.append(lls[k : k + len(item.continuations)])
        k += len(item.continuations)
    return per_item


def accuracy(scores: Sequence[ItemScore], answers: Sequence[int]) -> tuple[list[int], list[int]]:
    """Per-item 0/1 ``acc`` and ``acc_norm`` (lm-eval's definitions), ready for bootstrapping elsewhere.

    Args:
        scores: from :func:`score_multiple_choice`.
        answers: gold choice index per item.

    Returns:
        ``(acc, acc_norm)``: ``acc`` is 1 where the argmax of the log-likelihoods is the gold index; ``acc_norm``
        uses log-likelihood divided by :attr:`ItemScore.norm_lengths`. Ties go to the first choice, as
        ``np.argmax`` does.

    Raises:
        DataError: lengths differ, or a gold index is out of range.
    """
    if len(scores) != len(answers):
        raise DataError(f"{len(scores)} scores but {len(answers)} answers; pass one gold index per item.")
    acc, acc_norm = [], []
    for k, (score, gold) in enumerate(zip(scores, answers, strict=True)):
        if not 0 <= gold < len(score.loglikelihoods):
            raise DataError(f"item {k}: gold index {gold} outside its {len(score.loglikelihoods)} choices.")
        normed = [ll / max(n, 1) for ll, n in zip(score.loglikelihoods, score.norm_lengths, strict=True)]
        acc.append(int(_argmax(score.loglikelihoods) == gold))
        acc_norm.append(int(_argmax(normed) == gold))
    return acc, acc_norm


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
