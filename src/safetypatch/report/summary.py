"""Per-run headline numbers (docs/methods.md §4.1): mean refusal on harmful tasks, mean over-refusal, capability,
exact match, empty answers and benign drift, each with the tasks it averages and its delta against the first run.

A family's value is the unweighted mean over tasks (``tables.FAMILIES`` says which metric counts per task); a
task reported under several filters (judges) contributes the mean of those. A delta is given only when both runs
average the same tasks, so that a mean over other tasks is never read as a change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import fmean

from safetypatch.eval.metrics import MetricValue
from safetypatch.report.tables import (
    FAMILIES,
    FAMILY,
    PERCENT_METRICS,
    ComparisonTable,
    Family,
    Row,
    arrow,
    format_delta,
    format_value,
    improvement,
    markdown_cell,
    markdown_row,
)


@dataclass(frozen=True)
class SummaryValue:
    """One run's mean over the tasks of a family (each task weighs the same; its filters are averaged first).

    Attributes:
        value: the mean.
        n: samples behind it, summed over tasks (the largest count among a task's filters).
        sources: the ``(task, metric)`` pairs averaged.
        delta: value minus the first run's, only when both average the same sources; else ``None``.
        percent: whether the value is a fraction shown as a percentage.
        higher_is_better: the direction of the metrics.
    """

    value: float
    n: int
    sources: tuple[tuple[str, str], ...]
    delta: float | None
    percent: bool
    higher_is_better: bool

    @property
    def text(self) -> str:
        """``95.0% (n=400)``."""
        return f"{format_value(self.value, self.percent)} (n={self.n})"

    @property
    def delta_text(self) -> str | None:
        """The delta against the first run (``+90.0 pp``), or ``None``."""
        return None if self.delta is None else format_delta(self.delta, self.percent)

    @property
    def improved(self) -> bool | None:
        """Whether the delta is in the better direction (``None``: no delta or no change)."""
        return improvement(self.delta, self.higher_is_better)

    @property
    def described(self) -> str:
        """What was averaged: ``refusal_rate on harmbench, strongreject``, or per task when metrics differ
        (``arc-easy acc_norm, mmlu acc``)."""
        metrics = {metric for _, metric in self.sources}
        if len(metrics) == 1:
            return f"{metrics.pop()} on {', '.join(task for task, _ in self.sources)}"
        return ", ".join(f"{task} {metric}" for task, metric in self.sources)


@dataclass(frozen=True)
class RunSummary:
    """The headline numbers of one run; a field is ``None`` when the run has no metric of that family."""

    label: str
    harmful_refusal: SummaryValue | None
    over_refusal: SummaryValue | None
    harmful_refusal_out: SummaryValue | None
    over_refusal_out: SummaryValue | None
    harmful_refusal_dev: SummaryValue | None
    over_refusal_dev: SummaryValue | None
    capability: SummaryValue | None
    exact_match: SummaryValue | None
    empty: SummaryValue | None
    kl: SummaryValue | None
    nll_delta: SummaryValue | None

    def sentence(self) -> str:
        """One plain-text sentence: refusal, over-refusal, capability and, when present, exact match, empty answers
        and drift."""
        parts = [_phrase(self.harmful_refusal, "refuses {} of harmful prompts", "refusal of harmful prompts"),
                 _phrase(self.over_refusal, "over-refuses {} of benign ones", "over-refusal"),
                 _phrase(self.capability, "capability {}", "capability")]
        parts += [_phrase(value, f"{FAMILY[key].title} {{}} {FAMILY[key].unit}".rstrip(), "")
                  for key in ("harmful_refusal_out", "over_refusal_out", "harmful_refusal_dev", "over_refusal_dev",
                              "exact_match", "empty", "kl", "nll_delta") if (value := getattr(self, key)) is not None]
        return f"{self.label}: {', '.join(parts)}."


@dataclass(frozen=True)
class Summary:
    """One ``RunSummary`` per run, in input order."""

    runs: tuple[RunSummary, ...]

    def families(self) -> tuple[Family, ...]:
        """The families at least one run reports, in ``FAMILIES`` order."""
        return tuple(f for f in FAMILIES if any(getattr(run, f.key) is not None for run in self.runs))

    def arrow(self, family: Family) -> str:
        """``↑`` when higher is better for a family the runs report, else ``↓``."""
        return arrow(next(v.higher_is_better for run in self.runs if (v := getattr(run, family.key)) is not None))

    def to_markdown(self) -> str:
        """A Markdown table: one row per run, one column per reported family, deltas against the first run."""
        families = self.families()
        header = ["run", *(f"{f.heading} {self.arrow(f)}" for f in families)]
        lines = [markdown_row(header), markdown_row(["---"] * len(header))]
        for run in self.runs:
            values = [getattr(run, f.key) for f in families]
            lines.append(markdown_row([run.label, *(markdown_cell(value) for value in values)]))
        return "\n".join(lines) + "\n"


def summarize(table: ComparisonTable) -> Summary:
    """Reduce a ``ComparisonTable`` to each run's mean per family (see ``FAMILIES`` and ``SummaryValue``).

    Args:
        table: from ``compare``.

    Returns:
        The ``Summary``; deltas are against the first run.
    """
    means = {f.key: [_family_mean(table.family_rows(f.key), i) for i in range(len(table.labels))] for f in FAMILIES}
    runs = []
    for i, label in enumerate(table.labels):
        fields = {key: _with_delta(per_run[i], per_run[0]) for key, per_run in means.items()}
        runs.append(RunSummary(label=label, **fields))
    return Summary(tuple(runs))


def _family_mean(rows: Sequence[Row], run: int) -> SummaryValue | None:
    """Run ``run``'s mean over tasks of the given family rows (filters of a task averaged first)."""
    per_task: dict[tuple[str, str], list[MetricValue]] = {}
    for row in rows:
        if (cell := row.cells[run]) is not None:
            per_task.setdefault((row.task, row.metric), []).append(cell.value)
    if not per_task:
        return None
    value = fmean(fmean(v.value for v in found) for found in per_task.values())
    n = sum(max(v.n for v in found) for found in per_task.values())
    return SummaryValue(value, n, tuple(per_task), None, rows[0].metric in PERCENT_METRICS, rows[0].higher_is_better)


def _with_delta(value: SummaryValue | None, first: SummaryValue | None) -> SummaryValue | None:
    """``value`` with its delta against the first run's, when both average the same (task, metric) pairs."""
    if value is None or first is None or value is first or value.sources != first.sources:
        return value
    return replace(value, delta=value.value - first.value)


def _phrase(value: SummaryValue | None, template: str, missing: str) -> str:
    if value is None:
        return f"{missing} not measured"
    text = template.format(format_value(value.value, value.percent))
    return f"{text} (n={value.n}, mean of {value.described})"
