"""The ``sciq`` task: SciQ passages and questions through the evaluator, scored by a short answer's exact match."""

from __future__ import annotations

import pytest

import safetypatch
from safetypatch.api.finetune import _refuse_fully_evaluated
from safetypatch.eval.task import TASKS, task_rows
from tests.eval.helpers import run_task, run_task_with_replies
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)


def test_sciq_task_runs_on_a_tiny_model_through_the_evaluator(tmp_path):
    spec = TASKS.get("sciq")
    assert (spec.dataset, spec.kind, spec.split, spec.max_new_tokens) == ("sciq", "short_answer", "eval", 16)
    results, samples = run_task(tmp_path, "sciq", 3)
    exact = results.metric("sciq", "exact_match", "first-line")
    assert exact.n == 3 and exact.value == pytest.approx(sum(s["exact_match"] for s in samples) / 3)
    rows = task_rows(spec, 3).rows
    assert [s["answer"] for s in samples] == [row.answer for row in rows]
    assert [s["prompt"] for s in samples] == [row.prompt for row in rows]
    assert results.data["n-samples"]["sciq"] == {"original": 444, "effective": 3}
    assert results.data["configs"]["sciq"]["generation_kwargs"]["max_new_tokens"] == 16


def test_sciq_task_scores_the_normalised_first_line(tmp_path, monkeypatch):
    """The answer with case, punctuation and an article, or followed by a second line, counts; a sentence around
    it, or another word, does not."""
    replies = [lambda a: f"The {a.upper()}.", lambda a: f"{a}\nThe passage says so.", lambda a: f"It is {a}.",
               lambda a: "I do not know."]
    results, samples = run_task_with_replies(tmp_path, monkeypatch, "sciq", replies)
    assert [s["exact_match"] for s in samples] == [1, 1, 0, 0]
    assert results.metric("sciq", "exact_match", "first-line").value == pytest.approx(0.5)


def test_finetune_accepts_sciq_since_its_task_reads_only_the_eval_half():
    _refuse_fully_evaluated("sciq")
    assert safetypatch.FinetuneConfig(dataset="sciq").dataset == "sciq"
