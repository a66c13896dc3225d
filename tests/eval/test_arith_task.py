"""The ``arith`` task: apolien's arithmetic problems through the evaluator, scored by the GSM8K final-number match."""

from __future__ import annotations

import pytest

from safetypatch.eval.gsm8k import INSTRUCTION, is_correct
from safetypatch.eval.task import TASKS, task_rows
from tests.eval.helpers import run_task, run_task_with_replies
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)


def test_arith_task_runs_on_a_tiny_model_through_the_evaluator(tmp_path):
    spec = TASKS.get("arith")
    assert (spec.dataset, spec.kind, spec.split) == ("arith", "gsm8k", "eval")
    results, samples = run_task(tmp_path, "arith", 3)
    exact = results.metric("arith", "exact_match", "flexible-extract")
    assert exact.n == 3 and exact.value == pytest.approx(sum(s["exact_match"] for s in samples) / 3)
    rows = task_rows(spec, 3).rows
    assert [s["answer"] for s in samples] == [row.answer for row in rows]
    assert all(s["prompt"] == INSTRUCTION + row.prompt for s, row in zip(samples, rows, strict=True))
    assert results.data["n-samples"]["arith"] == {"original": 499, "effective": 3}


def test_arith_task_scores_the_final_number_at_two_decimals(tmp_path, monkeypatch):
    """Right answers (strict '####', or the last number, with separators and trailing zeros) count; an unrounded
    value does not."""
    replies = [lambda a: f"So:\n#### {a}", lambda a: f"The answer is {float(a):,.2f}.", lambda a: f"#### {a}7",
               lambda a: "I cannot say."]
    results, samples = run_task_with_replies(tmp_path, monkeypatch, "arith", replies, INSTRUCTION)
    assert [s["exact_match"] for s in samples] == [1, 1, 0, 0]
    assert results.metric("arith", "exact_match", "flexible-extract").value == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [("#### -1,800.780", "-1800.78", True), ("= 52.89226", "52.89", False), ("about 33.38", "33.38", True),
     ("#### 0.00", "0", True)],
)
def test_rounded_arith_answers_match_as_canonical_numbers(response, gold, correct):
    assert is_correct(response, gold) is correct
