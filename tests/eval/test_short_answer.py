"""Short-answer scoring: SQuAD's normalised exact match of the reply's first line."""

from __future__ import annotations

import pytest

from safetypatch.eval.short_answer import chat_prompt, first_line, is_correct, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Mitochondria.", "mitochondria"), ("  an   ATOM , the nucleus!", "atom nucleus"),
     ("Theory of a cell", "theory of cell"), ("ＦＵＮＧＩ", "fungi"), ("hydrogen (h)", "hydrogen h"),
     ("the", "")],
)
def test_normalize_answer_is_squad_style(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [("The Mitochondria.", "mitochondria", True), ("mitochondrion", "mitochondria", False),
     ("\n  Nucleotides\nbecause the passage says so", "nucleotides", True),
     ("The answer is mitochondria.", "mitochondria", False), ("mitochondria and ribosomes", "mitochondria", False),
     ("", "mitochondria", False), ("The.", "the", False)],
)
def test_is_correct_matches_the_first_line_only(response, gold, correct):
    assert is_correct(response, gold) is correct


def test_first_line_skips_blank_lines_and_prompt_is_sent_as_written():
    assert first_line("\n\n  x y \nz") == "  x y " and first_line(" \n") == ""
    assert chat_prompt("Passage: p\n\nQuestion: q") == "Passage: p\n\nQuestion: q"
