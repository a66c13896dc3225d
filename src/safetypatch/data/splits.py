"""Seeded train/eval splits that never share a prompt, and contamination checks between prompt lists.

Prompts are compared after :func:`normalize_prompt` (Unicode NFKC, case-folded, punctuation removed, whitespace
collapsed), so near-duplicates that differ only in case or punctuation always land on the same side of a split
and count as overlap in the checks. docs/methods.md §3.1 asks for the 13-gram overlap count in every manifest.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from safetypatch.data.schema import Dataset, Example
from safetypatch.errors import ConfigError, DataError

_SHOWN = 5


class _PunctuationTable(dict):
    """``str.translate`` table deleting Unicode punctuation (categories P*), filled per code point on first sight."""

    def __missing__(self, code: int) -> int | None:
        value = None if unicodedata.category(chr(code)).startswith("P") else code
        self[code] = value
        return value


_PUNCTUATION = _PunctuationTable()


@dataclass(frozen=True)
class Split:
    """A disjoint train/eval split of one dataset.

    Attributes:
        train: the training rows, in source order.
        eval: the evaluation rows, in source order.
        seed: the seed that chose the evaluation rows.
        train_sha256: content hash of ``train`` (``Dataset.sha256``).
        eval_sha256: content hash of ``eval``.
    """

    train: Dataset
    eval: Dataset
    seed: int
    train_sha256: str
    eval_sha256: str


def normalize_prompt(text: str) -> str:
    """The comparison key of a prompt: NFKC, case-folded, Unicode punctuation removed, whitespace collapsed.

    Args:
        text: a prompt.

    Returns:
        The normalised text (``""`` for a prompt made only of punctuation and spaces).
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION)
    return " ".join(text.split())


def split_dataset(
    ds: Dataset, *, n_eval: int | None = None, eval_fraction: float | None = None, seed: int = 0
) -> Split:
    """Split ``ds`` into train and eval deterministically, keeping every normalised prompt on one side.

    Rows are grouped by normalised prompt; groups are ordered by ``sha256(seed, prompt key)`` and taken into eval
    while they fit in ``n_eval`` rows. The choice of a group depends only on its text and the seed, not on row
    order or on the other rows.

    Args:
        ds: the dataset.
        n_eval: number of eval rows; exactly one of ``n_eval`` and ``eval_fraction`` is required.
        eval_fraction: share of rows for eval (0 < f < 1), rounded to a row count.
        seed: the split seed (recorded in the result).

    Returns:
        A :class:`Split` whose two sides share no normalised prompt.

    Raises:
        ConfigError: both or neither size given, or a size that leaves a side empty.
        DataError: the dataset has fewer than two distinct prompts.
    """
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(ds.rows):
        groups.setdefault(normalize_prompt(row.prompt), []).append(index)
    if len(groups) < 2:
        raise DataError(f"dataset {ds.name!r} ({ds.source}) has {len(ds)} row(s) and {len(groups)} distinct "
                        "prompt(s); a disjoint train/eval split needs two distinct prompts. Add rows to it.")
    try:
        target = _eval_size(len(ds), n_eval, eval_fraction)
    except ConfigError as exc:
        raise ConfigError(f"dataset {ds.name!r} ({ds.source}): {exc}") from exc
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest())
    chosen: set[int] = set()
    for key in order:
        if len(chosen) + len(groups[key]) <= target:
            chosen.update(groups[key])
        if len(chosen) == target:
            break
    if not chosen or len(chosen) == len(ds):
        raise DataError(f"dataset {ds.name!r}: no eval set of about {target} rows fits its duplicate groups.")
    train = _subset(ds, "train", (r for i, r in enumerate(ds.rows) if i not in chosen))
    held = _subset(ds, "eval", (r for i, r in enumerate(ds.rows) if i in chosen))
    return Split(train=train, eval=held, seed=seed, train_sha256=train.sha256, eval_sha256=held.sha256)


CANONICAL_EVAL_FRACTION = 0.5
CANONICAL_SEED = 0


def canonical_split(ds: Dataset) -> Split:
    """The one split every safety set is used with: evaluation tasks read ``eval``, patch training reads ``train``.

    Half the rows (by distinct normalised prompt) are held out with seed 0, so no evaluated prompt is ever trained on.

    Args:
        ds: a catalog dataset.

    Returns:
        ``split_dataset(ds, eval_fraction=0.5, seed=0)``.
    """
    return split_dataset(ds, eval_fraction=CANONICAL_EVAL_FRACTION, seed=CANONICAL_SEED)


DEVELOPMENT_SEED = 1


def training_split(ds: Dataset, n_dev: int = 0) -> Split:
    """The canonical split with ``n_dev`` development rows carved out of its train half: what patch training reads.

    Recipes are chosen on development rows (``split: dev`` tasks), never on evaluation halves; training never sees
    them either. The dev rows are ``split_dataset(train half, n_eval=n_dev, seed=1)``'s eval side.

    Args:
        ds: a catalog dataset.
        n_dev: development rows to hold back (the catalog's ``dev_rows``; 0 keeps the whole train half).

    Returns:
        A :class:`Split` whose ``train`` is the train half less the development rows and whose ``eval`` is the
        canonical evaluation half.
    """
    canonical = canonical_split(ds)
    if n_dev == 0:
        return canonical
    train = _subset(ds, "train", development_split(ds, n_dev).train.rows)
    return Split(train=train, eval=canonical.eval, seed=canonical.seed, train_sha256=train.sha256,
                 eval_sha256=canonical.eval_sha256)


def development_split(ds: Dataset, n_dev: int) -> Split:
    """The canonical train half split again: ``eval`` = its ``n_dev`` development rows, ``train`` = the rest.

    Raises:
        ConfigError: ``n_dev`` leaves a side of the train half empty.
    """
    return split_dataset(canonical_split(ds).train, n_eval=n_dev, seed=DEVELOPMENT_SEED)


def _eval_size(total: int, n_eval: int | None, eval_fraction: float | None) -> int:
    if (n_eval is None) == (eval_fraction is None):
        raise ConfigError("give exactly one of n_eval and eval_fraction.")
    if eval_fraction is not None and not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}.")
    size = n_eval if n_eval is not None else round(eval_fraction * total)
    if not 0 < size < total:
        raise ConfigError(f"the eval size must leave both sides non-empty: got {size} of {total} rows.")
    return size


def _subset(ds: Dataset, side: str, rows: Iterable[Example]) -> Dataset:
    return Dataset(f"{ds.name}/{side}", tuple(rows), ds.source, ds.licence, ds.citation)


def check_no_overlap(train_prompts: Iterable[str], eval_prompts: Iterable[str], *, what: str) -> None:
    """Raise if any eval prompt equals a training prompt after :func:`normalize_prompt`.

    Args:
        train_prompts: the training prompts.
        eval_prompts: the evaluation prompts.
        what: names the pair in the message (e.g. ``"refusal-sft train vs harmbench"``).

    Raises:
        DataError: listing the overlap count and up to five overlapping eval prompts.
    """
    seen = {normalize_prompt(p) for p in train_prompts}
    overlap = [p for p in eval_prompts if normalize_prompt(p) in seen]
    if overlap:
        shown = "; ".join(repr(p[:80]) for p in overlap[:_SHOWN])
        raise DataError(
            f"{what}: {len(overlap)} eval prompt(s) also occur in training after normalisation (case, punctuation, "
            f"whitespace, NFKC), e.g. {shown}. Drop them from one side, or split with split_dataset."
        )


def count_ngram_overlap(train_prompts: Iterable[str], eval_prompts: Sequence[str], n: int = 13) -> int:
    """Count eval prompts sharing a word ``n``-gram with any training prompt (contamination, docs/methods.md §3.1).

    Words are those of :func:`normalize_prompt`. An eval prompt shorter than ``n`` words counts when its whole text
    occurs as a contiguous word sequence in a training prompt, so short exact duplicates are not missed.

    Args:
        train_prompts: the training prompts.
        eval_prompts: the evaluation prompts.
        n: the n-gram length in words.

    Returns:
        The number of contaminated eval prompts (0 to ``len(eval_prompts)``).

    Raises:
        ConfigError: ``n`` is below 1.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}.")
    train = [normalize_prompt(p) for p in train_prompts]
    grams: set[tuple[str, ...]] = set()
    for text in train:
        grams.update(_ngrams(text.split(), n))
    # Padded with spaces and split by newlines, a short prompt matches whole words inside one training prompt only.
    haystack = "\n".join(f" {text} " for text in train)
    hits = 0
    for text in map(normalize_prompt, eval_prompts):
        words = text.split()
        if len(words) >= n:
            hits += not grams.isdisjoint(_ngrams(words, n))
        elif words:
            hits += f" {text} " in haystack
    return hits


def _ngrams(words: list[str], size: int) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i : i + size]) for i in range(len(words) - size + 1))
