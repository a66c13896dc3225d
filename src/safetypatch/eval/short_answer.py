"""Short answers in chat (SciQ): the reply's first line against the gold answer, by SQuAD's normalised exact match.

The prompt already asks for a short phrase (the dataset's mapper writes it), so it is sent as it is: a fine-tune on
the same set trains on the very prompts the task evaluates (on the other half of the split).
"""

from __future__ import annotations

import re

from safetypatch.data.splits import normalize_prompt

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def chat_prompt(prompt: str) -> str:
    """The user turn sent for ``prompt``: the prompt itself."""
    return prompt


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: case-folded, punctuation removed, the articles a / an / the dropped, whitespace
    collapsed (punctuation and case as in :func:`~safetypatch.data.splits.normalize_prompt`: Unicode-aware, NFKC)."""
    return " ".join(_ARTICLES.sub(" ", normalize_prompt(text)).split())


def first_line(response: str) -> str:
    """The first non-blank line of ``response`` (``""`` when there is none)."""
    return next((line for line in response.splitlines() if line.strip()), "")


def is_correct(response: str, gold: str) -> bool:
    """Exact match of the normalised first line of ``response`` with the normalised gold answer (never on an empty
    normalised answer)."""
    predicted = normalize_answer(first_line(response))
    return bool(predicted) and predicted == normalize_answer(gold)
