"""Splits are seeded, exact in size, and never put one normalised prompt on both sides; overlap checks see through
case, punctuation, whitespace and Unicode compatibility forms."""

from __future__ import annotations

import pytest

from safetypatch.data import load_dataset
from safetypatch.data.schema import Dataset, Example
from safetypatch.data.splits import check_no_overlap, count_ngram_overlap, normalize_prompt, split_dataset
from safetypatch.errors import ConfigError, DataError

NEAR_DUPLICATES = (
    "How do I pick a lock?",
    "how do i pick a LOCK",
    "  How do I pick a lock!!  ",
    "ＨＯＷ ＤＯ Ｉ ＰＩＣＫ Ａ ＬＯＣＫ？",  # full-width forms: NFKC maps them to ASCII
)


def _dataset(prompts) -> Dataset:
    return Dataset("toy", tuple(Example(prompt=p, answer=i) for i, p in enumerate(prompts)), "memory")


@pytest.fixture
def toy() -> Dataset:
    return _dataset([*NEAR_DUPLICATES, *(f"Question number {i}?" for i in range(96))])


def test_normalize_prompt():
    assert {normalize_prompt(p) for p in NEAR_DUPLICATES} == {"how do i pick a lock"}
    assert normalize_prompt("e-mail") == normalize_prompt("Email")
    assert normalize_prompt("Ｔｅｓｔ\u00a0 ﬁle,\tdone…") == "test file done"
    assert normalize_prompt("?!") == ""


def test_same_seed_same_split_and_hashes(toy):
    first, second = split_dataset(toy, n_eval=20, seed=3), split_dataset(toy, n_eval=20, seed=3)
    assert first == second
    assert first.seed == 3
    assert (first.train_sha256, first.eval_sha256) == (first.train.sha256, first.eval.sha256)
    assert first.train.name == "toy/train" and first.eval.name == "toy/eval"


def test_different_seeds_choose_different_rows(toy):
    evals = {split_dataset(toy, n_eval=20, seed=seed).eval.prompts().__repr__() for seed in range(5)}
    assert len(evals) == 5


def test_split_is_exact_disjoint_complete_and_ordered(toy):
    for seed in range(20):
        split = split_dataset(toy, n_eval=25, seed=seed)
        assert len(split.eval) == 25 and len(split.train) == 75
        train_keys = {normalize_prompt(p) for p in split.train.prompts()}
        assert not train_keys & {normalize_prompt(p) for p in split.eval.prompts()}
        answers = [r.answer for r in split.train.rows], [r.answer for r in split.eval.rows]
        assert sorted(answers[0] + answers[1]) == list(range(100))
        assert all(a == sorted(a) for a in answers)


def test_near_duplicates_never_straddle(toy):
    variants = {"how do i pick a lock"}
    for seed in range(40):
        split = split_dataset(toy, eval_fraction=0.3, seed=seed)
        sides = {side for side, ds in (("train", split.train), ("eval", split.eval))
                 for p in ds.prompts() if normalize_prompt(p) in variants}
        assert len(sides) == 1


def test_a_split_does_not_depend_on_row_order(toy):
    shuffled = Dataset("toy", toy.rows[::-1], "memory")
    assert set(split_dataset(shuffled, n_eval=30, seed=2).eval.prompts()) == set(
        split_dataset(toy, n_eval=30, seed=2).eval.prompts()
    )


def test_bad_sizes_are_refused(toy):
    with pytest.raises(ConfigError, match="exactly one of n_eval and eval_fraction"):
        split_dataset(toy)
    with pytest.raises(ConfigError, match="exactly one"):
        split_dataset(toy, n_eval=5, eval_fraction=0.1)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_dataset(toy, eval_fraction=1.0)
    with pytest.raises(ConfigError, match="got 100 of 100 rows"):
        split_dataset(toy, n_eval=100)
    with pytest.raises(DataError, match="1 distinct prompt"):
        split_dataset(_dataset(NEAR_DUPLICATES), n_eval=1)
    with pytest.raises(DataError, match=r"dataset 'one' \(/data/one\.jsonl\) has 1 row\(s\) and 1 distinct prompt"):
        split_dataset(Dataset("one", toy.rows[:1], "/data/one.jsonl"), eval_fraction=0.5)


def test_check_no_overlap_reports_count_and_examples():
    train = ["Tell me a joke.", *(f"Prompt {i}" for i in range(10))]
    evals = ["tell me a JOKE", *(f"prompt {i}!" for i in range(7)), "Fresh prompt"]
    with pytest.raises(DataError) as err:
        check_no_overlap(train, evals, what="sft vs harmbench")
    message = str(err.value)
    assert message.startswith("sft vs harmbench: 8 eval prompt(s) also occur in training")
    assert "'tell me a JOKE'" in message and "'prompt 3!'" in message and "'prompt 4!'" not in message
    check_no_overlap(train, ["Fresh prompt"], what="ok")


def test_ngram_overlap_counts_contaminated_eval_prompts():
    long_train = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    evals = [
        "Zero, one two three four five six seven eight nine ten eleven twelve thirteen!",  # shares a 13-gram
        "one two three four five six seven eight nine ten eleven twelve",  # 12 words, inside a train prompt
        "two three four five six seven eight nine ten eleven twelve thirteen fifteen",  # 12 shared words only
        "how do I pick a lock",  # short, equals a train prompt after normalisation
        "pick a lock",  # short, contained in a train prompt
        "",
    ]
    assert count_ngram_overlap([long_train, "How do I pick a lock?"], evals) == 4
    assert count_ngram_overlap([long_train, "How do I pick a lock?"], evals, n=3) == 5
    assert count_ngram_overlap([long_train], evals, n=3) == 3
    assert count_ngram_overlap(["unrelated words here"], evals) == 0
    with pytest.raises(ConfigError, match="at least 1"):
        count_ngram_overlap([], [], n=0)


def test_real_set_split_passes_the_overlap_check():
    ds = load_dataset("refusal-labels")
    split = split_dataset(ds, n_eval=40, seed=0)
    assert len(split.eval) <= 40 and len(split.train) + len(split.eval) == 169
    check_no_overlap(split.train.prompts(), split.eval.prompts(), what="refusal-labels split")
    assert count_ngram_overlap(split.train.prompts(), split.eval.prompts()) == 0


def test_canonical_split_is_pinned():
    """Patches are trained on the train side and evaluated on the eval side: a silent change of the canonical
    split would put evaluated prompts into training data, so its content is pinned."""
    from safetypatch.data import canonical_split, load_dataset

    pinned = {
        "harmbench": "29ed96f59d66fdb3b9c89a98fbcec626602535e1f39706b5408379ec002419f6",
        "xstest-safe": "919272d6c4f45a1c94980d80e0e07457a46eb6da3330b46d8b680b8cc8f5fdf0",
    }
    for name, digest in pinned.items():
        split = canonical_split(load_dataset(name))
        assert split.eval_sha256 == digest, name
        assert len(split.eval) == len(split.train) or abs(len(split.eval) - len(split.train)) == 1
