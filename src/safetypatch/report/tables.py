"""Comparison tables over evaluated runs (docs/methods.md §4.1: safety, over-refusal and capability always together).

``compare`` puts every ``(task, metric, filter)`` of a list of results files side by side: value, 95% interval,
sample count and, from the second run on, the delta against the first run (the "before"). ``FAMILIES`` groups
metrics into the headline numbers that ``report.summary`` averages per run.

A cell's interval is the file's 95% bootstrap CI when it has one (n >= 30), otherwise the normal approximation
value ± 1.96·stderr (lm-eval capability numbers), otherwise none. Rates and accuracies print as percentages and
their deltas as percentage points (pp).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from safetypatch.errors import ConfigError, DataError
from safetypatch.eval.metrics import MetricValue
from safetypatch.eval.results import Results

Z95 = 1.959963984540054
# Metrics that are fractions in [0, 1] and print as percentages.
PERCENT_METRICS = frozenset({"refusal_rate", "over_refusal_rate", "asr", "harmful_rate", "safety_score",
                             "contrast_compliance", "acc", "acc_norm", "exact_match", "empty_rate"})


@dataclass(frozen=True)
class Family:
    """A group of metrics averaged into one summary number.

    Attributes:
        key: the ``summary.RunSummary`` field it fills.
        title: column heading.
        metrics: metric keys in order of preference; per task the first one present is used.
        unit: unit of a value that is not a percentage.
        held_out: which tasks count, by the held-out data they read (the task config's ``family``: ``in`` for
            evaluation halves of sets recipes train on, ``dev`` for development rows, ``out`` for out-of-family
            data; a task without one counts as ``in``); None: every task.
    """

    key: str
    title: str
    metrics: tuple[str, ...]
    unit: str = ""
    held_out: str | None = None

    @property
    def heading(self) -> str:
        """The title with its unit: ``KL drift (nats/token)``."""
        return f"{self.title} ({self.unit})" if self.unit else self.title


FAMILIES = (
    Family("harmful_refusal", "refusal on harmful prompts", ("refusal_rate",), held_out="in"),
    Family("over_refusal", "over-refusal on benign prompts", ("over_refusal_rate",), held_out="in"),
    Family("harmful_refusal_out", "refusal, out-of-family", ("refusal_rate",), held_out="out"),
    Family("over_refusal_out", "over-refusal, out-of-family", ("over_refusal_rate",), held_out="out"),
    Family("harmful_refusal_dev", "refusal, development rows", ("refusal_rate",), held_out="dev"),
    Family("over_refusal_dev", "over-refusal, development rows", ("over_refusal_rate",), held_out="dev"),
    Family("capability", "capability (multiple choice)", ("acc_norm", "acc")),
    Family("exact_match", "exact match", ("exact_match",)),
    Family("empty", "empty answers", ("empty_rate",)),
    Family("kl", "benign KL drift", ("kl",), "nats/token"),
    Family("nll_delta", "benign NLL drift", ("nll_delta",), "nats/token"),
)
FAMILY = {family.key: family for family in FAMILIES}


def format_value(value: float, percent: bool) -> str:
    """``95.0%`` for a fraction shown as a percentage, ``0.0123`` otherwise."""
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def format_delta(delta: float, percent: bool) -> str:
    """``+90.0 pp`` for a fraction, ``+0.0123`` otherwise."""
    return f"{100 * delta:+.1f} pp" if percent else f"{delta:+.4g}"


def arrow(higher_is_better: bool) -> str:
    """``↑`` when higher is better, else ``↓``."""
    return "↑" if higher_is_better else "↓"


def improvement(delta: float | None, higher_is_better: bool) -> bool | None:
    """Whether a delta moved in the better direction; ``None`` when there is no delta or no change."""
    return None if not delta else (delta > 0) == higher_is_better


class Shown(Protocol):
    """A value with a display text and an optional delta text (a ``Cell`` or a ``summary.SummaryValue``)."""

    @property
    def text(self) -> str: ...

    @property
    def delta_text(self) -> str | None: ...


@dataclass(frozen=True)
class Cell:
    """One run's value of one row.

    Attributes:
        value: the metric with its uncertainty, as read from the file.
        ci: the 95% interval (see the module docstring), or ``None``.
        delta: value minus the first run's value; ``None`` for the first run or when it lacks the row.
        percent: whether the metric is a fraction shown as a percentage.
    """

    value: MetricValue
    ci: tuple[float, float] | None
    delta: float | None
    percent: bool

    @property
    def text(self) -> str:
        """``95.0% ± 2.1 (n=400)``: value, half-width of the 95% interval in the same unit, sample count."""
        spread = ""
        if self.ci is not None:
            half = (self.ci[1] - self.ci[0]) / 2
            spread = f" ± {100 * half:.1f}" if self.percent else f" ± {half:.2g}"
        return f"{format_value(self.value.value, self.percent)}{spread} (n={self.value.n})"

    @property
    def delta_text(self) -> str | None:
        """The delta against the first run (``+90.0 pp``), or ``None``."""
        return None if self.delta is None else format_delta(self.delta, self.percent)


@dataclass(frozen=True)
class Row:
    """One ``(task, metric, filter)`` across runs.

    Attributes:
        task: task name.
        metric: metric key.
        filter: judge id or lm-eval filter.
        higher_is_better: the metric's direction.
        cells: one per run, ``None`` where the run lacks the metric.
        top_level: false for an lm-eval group's subtask (left out of summaries and plots).
        held_out: the held-out data the task reads (``in``, ``dev`` or ``out``; see ``Family.held_out``).
    """

    task: str
    metric: str
    filter: str
    higher_is_better: bool
    cells: tuple[Cell | None, ...]
    top_level: bool = True
    held_out: str = "in"

    @property
    def arrow(self) -> str:
        """``↑`` when higher is better, else ``↓``."""
        return arrow(self.higher_is_better)

    def improved(self, run: int) -> bool | None:
        """Whether run ``run`` moved in the better direction against the first run (``None``: no change or no
        delta)."""
        cell = self.cells[run]
        return None if cell is None else improvement(cell.delta, self.higher_is_better)


@dataclass(frozen=True)
class ComparisonTable:
    """Every metric of every run side by side; rows sorted by family, then task, metric and filter.

    Attributes:
        labels: display label of each run, in input order; the first is the "before".
        rows: the rows.
    """

    labels: tuple[str, ...]
    rows: tuple[Row, ...]

    def row(self, task: str, metric: str, filter: str) -> Row:
        """The row of ``(task, metric, filter)``.

        Raises:
            DataError: no run has that metric; the message lists the rows.
        """
        for row in self.rows:
            if (row.task, row.metric, row.filter) == (task, metric, filter):
                return row
        have = ", ".join(f"{r.task}/{r.metric},{r.filter}" for r in self.rows)
        raise DataError(f"no run reports {task}/{metric},{filter}; the table has {have}.")

    def family_rows(self, family: str) -> tuple[Row, ...]:
        """Top-level rows of a ``FAMILIES`` key: per task, every filter of the first preferred metric present."""
        preference, held_out = FAMILY[family].metrics, FAMILY[family].held_out
        chosen: dict[str, str] = {}
        for row in self.rows:
            if row.top_level and row.metric in preference and held_out in (None, row.held_out):
                best = chosen.get(row.task, row.metric)
                chosen[row.task] = min(best, row.metric, key=preference.index)
        return tuple(row for row in self.rows if chosen.get(row.task) == row.metric and row.top_level)

    def to_markdown(self) -> str:
        """A Markdown table: task, metric with its direction arrow, filter, then one column per run."""
        header = ["task", "metric", "filter", *self.labels]
        lines = [markdown_row(header), markdown_row(["---"] * len(header))]
        for row in self.rows:
            cells = [markdown_cell(cell) for cell in row.cells]
            lines.append(markdown_row([row.task, f"{row.metric} {row.arrow}", row.filter, *cells]))
        return "\n".join(lines) + "\n"


def run_label(results: Results) -> str:
    """``config.model``, plus `` + <adapter name>`` when an adapter (patch) was evaluated; the adapter name is its
    ``name`` field, else the last component of its ``path``."""
    config = results.data["config"]
    model = str(config.get("model") or results.path.stem)
    adapter = config.get("adapter")
    if not adapter:
        return model
    if isinstance(adapter, dict):
        adapter = adapter.get("name") or Path(str(adapter.get("path") or "")).name
    return f"{model} + {adapter or 'adapter'}"


def run_labels(results: Sequence[Results], labels: Sequence[str] | None = None) -> tuple[str, ...]:
    """Display labels: the caller's, else ``run_label`` of each run with ``#2``, ``#3`` … added to repeats.

    Raises:
        ConfigError: no results, or caller labels of the wrong count or with repeats.
    """
    if not results:
        raise ConfigError("nothing to report: pass at least one results file.")
    if labels is not None:
        if len(labels) != len(results) or len(set(labels)) != len(labels):
            raise ConfigError(f"got {len(labels)} labels {list(labels)} for {len(results)} results files; pass one "
                              "distinct label per file, in the same order.")
        return tuple(labels)
    seen: dict[str, int] = {}
    out = []
    for run in results:
        base = run_label(run)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base} #{seen[base]}")
    return tuple(out)


def compare(results: Sequence[Results], labels: Sequence[str] | None = None) -> ComparisonTable:
    """Put every ``(task, metric, filter)`` of ``results`` side by side, with deltas against the first run.

    Args:
        results: one read results file per evaluated model or patch; the first is the baseline ("before").
        labels: display labels, one per file; default ``run_label`` of each.

    Returns:
        The ``ComparisonTable``.

    Raises:
        ConfigError: no results or bad labels (see ``run_labels``).
        DataError: two files disagree on a metric's ``higher_is_better``.
    """
    names = run_labels(results, labels)
    directions: dict[tuple[str, str], tuple[bool, Path]] = {}
    values: dict[tuple[str, str, str], dict[int, MetricValue]] = {}
    held_out: dict[str, str] = {}
    for i, run in enumerate(results):
        for task in run.tasks():
            held_out.setdefault(task, str(run.data["configs"].get(task, {}).get("family") or "in"))
            hib = run.data["higher_is_better"][task]
            for key in run.data["results"][task]:
                metric, _, filt = key.partition(",")
                if metric not in hib or not _is_number(run.data["results"][task][key]):
                    continue
                known, where = directions.setdefault((task, metric), (hib[metric], run.path))
                if known != hib[metric]:
                    raise DataError(f"{run.path}: {task}/{metric} has higher_is_better={hib[metric]}, but {where} "
                                    f"says {known}; compare results of the same task version.")
                values.setdefault((task, metric, filt), {})[i] = run.metric(task, metric, filt)
    subtasks = set().union(*(_subtasks(run) for run in results))
    rows = [_row(key, directions[key[:2]][0], found, len(results), key[0] not in subtasks, held_out[key[0]])
            for key, found in values.items()]
    return ComparisonTable(names, tuple(sorted(rows, key=_row_order)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _subtasks(results: Results) -> set[str]:
    """Tasks listed under an lm-eval group (``group_subtasks``): reported in the table, not averaged twice."""
    groups = results.data.get("group_subtasks")
    if not isinstance(groups, dict):
        return set()
    return {task for children in groups.values() if isinstance(children, list) for task in children}


def _interval(value: MetricValue) -> tuple[float, float] | None:
    if value.ci_low is not None and value.ci_high is not None:
        return value.ci_low, value.ci_high
    if value.stderr is not None:
        return value.value - Z95 * value.stderr, value.value + Z95 * value.stderr
    return None


def _row(key: tuple[str, str, str], higher: bool, found: dict[int, MetricValue], n_runs: int, top: bool,
         held_out: str) -> Row:
    task, metric, filt = key
    percent = metric in PERCENT_METRICS
    first = found.get(0)
    cells = tuple(
        None if (v := found.get(i)) is None
        else Cell(v, _interval(v), None if i == 0 or first is None else v.value - first.value, percent)
        for i in range(n_runs)
    )
    return Row(task, metric, filt, higher, cells, top, held_out)


def _row_order(row: Row) -> tuple[int, str, str, str]:
    family = next((i for i, f in enumerate(FAMILIES) if row.metric in f.metrics), len(FAMILIES))
    return family, row.task, row.metric, row.filter


def markdown_cell(cell: Shown | None) -> str:
    """A cell's text for Markdown, with its delta in parentheses; ``–`` for a missing value."""
    if cell is None:
        return "–"
    return cell.text if cell.delta_text is None else f"{cell.text} (Δ {cell.delta_text})"


def markdown_row(cells: Sequence[str]) -> str:
    """One Markdown table row; ``|`` and newlines in the cells are escaped."""
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
