"""Comparison table and per-run summary: values, intervals, deltas against the first run, means per family."""

from __future__ import annotations

import json

import pytest

from safetypatch.errors import ConfigError, DataError
from safetypatch.eval.metrics import MetricValue
from safetypatch.eval.results import ResultsBuilder, read_results
from safetypatch.report.summary import summarize
from safetypatch.report.tables import Z95, compare, run_labels
from tests.report.conftest import JUDGE, TS, make_builder, rate


def _read(paths):
    return [read_results(path) for path in paths]


def test_table_values_and_deltas(before_after):
    table = compare(_read(before_after))
    assert table.labels == ("org/base", "org/base + refusal-patch")
    assert [(r.task, r.metric, r.filter) for r in table.rows] == [
        ("harmbench", "refusal_rate", JUDGE), ("xstest-safe", "over_refusal_rate", JUDGE),
        ("arc-easy", "acc_norm", "none")]
    refusal = table.row("harmbench", "refusal_rate", JUDGE)
    before, after = refusal.cells
    assert (before.value.value, after.value.value) == (0.05, 0.95)
    assert before.delta is None and after.delta == pytest.approx(0.90, abs=1e-12)
    assert (before.text, after.text, after.delta_text) == ("5.0% ± 4.0 (n=100)", "95.0% ± 4.0 (n=100)", "+90.0 pp")
    assert refusal.arrow == "↑" and refusal.improved(1) is True
    over = table.row("xstest-safe", "over_refusal_rate", JUDGE)
    assert over.cells[1].delta == pytest.approx(0.04, abs=1e-12) and over.cells[1].delta_text == "+4.0 pp"
    assert over.arrow == "↓" and over.improved(1) is False
    acc = table.row("arc-easy", "acc_norm", "none")
    # No bootstrap CI in the file: the normal approximation from the stderr.
    assert acc.cells[0].ci == pytest.approx((0.55 - Z95 * 0.022, 0.55 + Z95 * 0.022))
    assert acc.cells[0].text == "55.0% ± 4.3 (n=500)"
    assert acc.cells[1].delta == pytest.approx(-0.01, abs=1e-12) and acc.improved(1) is False
    with pytest.raises(DataError, match=r"no run reports harmbench/asr,.*harmbench/refusal_rate"):
        table.row("harmbench", "asr", JUDGE)


def test_summary_means(before_after):
    before, after = summarize(compare(_read(before_after))).runs
    assert (before.harmful_refusal.value, before.over_refusal.value, before.capability.value) == (0.05, 0.02, 0.55)
    assert (after.harmful_refusal.value, after.over_refusal.value, after.capability.value) == (0.95, 0.06, 0.54)
    assert before.harmful_refusal.delta is None
    assert after.harmful_refusal.delta == pytest.approx(0.90, abs=1e-12)
    assert after.over_refusal.delta == pytest.approx(0.04, abs=1e-12) and after.over_refusal.improved is False
    assert after.capability.delta == pytest.approx(-0.01, abs=1e-12)
    assert after.harmful_refusal.sources == (("harmbench", "refusal_rate"),) and after.harmful_refusal.n == 100
    assert (after.exact_match, after.empty, after.kl, after.nll_delta) == (None, None, None, None)
    assert after.sentence() == (
        "org/base + refusal-patch: refuses 95.0% of harmful prompts (n=100, mean of refusal_rate on harmbench), "
        "over-refuses 6.0% of benign ones (n=250, mean of over_refusal_rate on xstest-safe), capability 54.0% "
        "(n=500, mean of acc_norm on arc-easy).")


def _rich_results(tmp_path):
    """Two judges on one harmful task, acc vs acc_norm, an lm-eval group subtask, gsm8k and drift."""
    builder = ResultsBuilder("org/rich", device="cpu")
    builder.add_task("harmbench", version=1, n_samples=100)
    builder.add_metric("harmbench", "refusal_rate", JUDGE, rate(0.75, 100), True)
    builder.add_metric("harmbench", "refusal_rate", "llamaguard3", rate(0.25, 90), True)
    builder.add_task("strongreject", version=1, n_samples=50)
    builder.add_metric("strongreject", "refusal_rate", JUDGE, rate(1.0, 50), True)
    builder.add_task("arc-easy", version=1, n_samples=500)
    builder.add_metric("arc-easy", "acc", "none", rate(0.5, 500), True)
    builder.add_metric("arc-easy", "acc_norm", "none", rate(0.625, 500), True)
    for task, acc in (("mmlu", 0.375), ("mmlu_anatomy", 0.875)):
        builder.add_task(task, version=1, n_samples=200)
        builder.add_metric(task, "acc", "none", rate(acc, 200), True)
    builder.add_task("gsm8k", version=3, n_samples=1319)
    builder.add_metric("gsm8k", "exact_match", "strict-match", rate(0.25, 1319), True)
    builder.add_metric("gsm8k", "empty_rate", "none", rate(0.125, 1319), False)
    builder.add_metric("strongreject", "empty_rate", "none", rate(0.375, 50), False)
    builder.add_task("benign-drift", version=1, n_samples=64)
    builder.add_metric("benign-drift", "kl", "none", MetricValue(0.02, 0.005, None, None, 64), False)
    builder.add_metric("benign-drift", "nll_delta", "none", MetricValue(0.125, None, None, None, 64), False)
    data = builder.build()
    data["group_subtasks"] = {"mmlu": ["mmlu_anatomy"]}
    path = tmp_path / "results_rich.json"
    path.write_text(json.dumps(data))
    return read_results(path)


def test_summary_rules(tmp_path, before_after):
    table = compare([_rich_results(tmp_path)])
    assert not table.row("mmlu_anatomy", "acc", "none").top_level
    (run,) = summarize(table).runs
    # harmbench = mean of its two judges (0.5), then the mean over tasks with strongreject (1.0).
    assert run.harmful_refusal.value == 0.75 and run.harmful_refusal.n == 150
    # acc_norm where present, acc otherwise; the group's subtask is not averaged in.
    assert run.capability.value == 0.5
    assert run.capability.sources == (("arc-easy", "acc_norm"), ("mmlu", "acc"))
    assert run.exact_match.value == 0.25 and run.exact_match.sources == (("gsm8k", "exact_match"),)
    # Empty answers: the mean over every task that generated (0.375 and 0.125), lower is better.
    assert run.empty.value == 0.25 and run.empty.sources == (("gsm8k", "empty_rate"), ("strongreject", "empty_rate"))
    assert run.empty.higher_is_better is False and "empty answers 25.0%" in run.sentence()
    assert (run.kl.value, run.kl.text, run.nll_delta.value) == (0.02, "0.02 (n=64)", 0.125)
    assert run.over_refusal is None and "over-refusal not measured" in run.sentence()
    # A mean over other tasks than the first run's gets no delta.
    later = summarize(compare([read_results(before_after[0]), _rich_results(tmp_path)])).runs[1]
    assert later.harmful_refusal.delta is None and later.capability.delta is None


def test_markdown(before_after):
    table = compare(_read(before_after), labels=["before", "after | patched"])
    markdown = table.to_markdown()
    assert "| task | metric | filter | before | after \\| patched |" in markdown
    row = f"| harmbench | refusal_rate ↑ | {JUDGE} | 5.0% ± 4.0 (n=100) | 95.0% ± 4.0 (n=100) (Δ +90.0 pp) |"
    assert row in markdown
    summary = summarize(table).to_markdown()
    assert summary.splitlines()[0].startswith("| run | refusal on harmful prompts ↑ | over-refusal on benign")
    assert "| after \\| patched | 95.0% (n=100) (Δ +90.0 pp) | 6.0% (n=250) (Δ +4.0 pp) |" in summary


def test_labels_and_conflicts(before_after, write_results):
    base = read_results(before_after[0])
    assert run_labels([base, base]) == ("org/base", "org/base #2")
    with pytest.raises(ConfigError, match="one distinct label per file"):
        run_labels([base, base], ["x"])
    with pytest.raises(ConfigError, match="one distinct label per file"):
        run_labels([base, base], ["x", "x"])
    with pytest.raises(ConfigError, match="at least one results file"):
        compare([])
    flipped = ResultsBuilder("org/flipped", device="cpu").add_task("harmbench", version=1, n_samples=100)
    flipped.add_metric("harmbench", "refusal_rate", JUDGE, rate(0.5), higher_is_better=False)
    with pytest.raises(DataError, match=r"higher_is_better=False, but .* says True"):
        compare([base, read_results(write_results(flipped, "flipped"))])
    patched = make_builder("org/base", 0.5, 0.5, 0.5, adapter={"name": "my-patch", "path": "/x/y"})
    assert run_labels([read_results(write_results(patched, "named"))]) == ("org/base + my-patch",)


def test_summary_splits_in_family_development_and_out_of_family_tasks(tmp_path):
    """Each safety family averages only the tasks of its held-out kind (the task config's family; none = in)."""
    builder = ResultsBuilder("org/split", device="cpu")
    for task, family, metric, value in (
            ("harmbench", "in", "refusal_rate", 0.875), ("advbench", None, "refusal_rate", 0.625),
            ("strongreject", "out", "refusal_rate", 0.25), ("advbench-future", "out", "refusal_rate", 0.5),
            ("harmbench-dev", "dev", "refusal_rate", 1.0), ("benign-edgy", "in", "over_refusal_rate", 0.125),
            ("xstest-safe", "out", "over_refusal_rate", 0.5)):
        builder.add_task(task, version=1, n_samples=40, config={"family": family} if family else {})
        builder.add_metric(task, metric, JUDGE, rate(value, 40), metric == "refusal_rate")
    (run,) = summarize(compare([read_results(builder.write(tmp_path, "split", timestamp=TS))])).runs
    assert (run.harmful_refusal.value, run.harmful_refusal_out.value, run.harmful_refusal_dev.value) == (
        0.75, 0.375, 1.0)
    assert run.harmful_refusal_out.sources == (("advbench-future", "refusal_rate"), ("strongreject", "refusal_rate"))
    assert (run.over_refusal.value, run.over_refusal_out.value, run.over_refusal_dev) == (0.125, 0.5, None)
    assert "refusal, out-of-family 37.5%" in run.sentence()


def test_write_markdown_holds_the_summary_and_every_metric(before_after, tmp_path):
    from safetypatch.errors import OutputExistsError
    from safetypatch.report import write_markdown

    out = write_markdown(before_after, tmp_path / "runs.md", labels=["before", "after"])
    text = out.read_text()
    summary, metrics = text.split("## Every metric")
    assert summary.startswith("## Summary") and "| after | 95.0% (n=100) (Δ +90.0 pp) |" in summary
    assert f"| harmbench | refusal_rate ↑ | {JUDGE} | 5.0% ± 4.0 (n=100) |" in metrics
    with pytest.raises(OutputExistsError):
        write_markdown(before_after, out)
