"""PNG figures of a comparison: grouped bars per metric family and a safety-versus-capability scatter.

matplotlib is imported inside each function (ARCHITECTURE.md *Layering*) and drawn through its Agg canvas on a
standalone ``Figure``, so no pyplot state or global backend is touched. Runs are colours, the first run (the
"before") grey.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetypatch.errors import DataError
from safetypatch.report.summary import RunSummary, Summary
from safetypatch.report.tables import Cell, ComparisonTable, Row
from safetypatch.utils.io import atomic_path

DPI = 110
# First run grey (the "before"), then matplotlib's tab10 without its grey.
COLOURS = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22")
# (families drawn together, panel title, y-axis label)
PANELS = (
    (("harmful_refusal", "harmful_refusal_dev"), "Safety: refusal of harmful prompts (higher is better)",
     "refused (%)"),
    (("over_refusal", "over_refusal_dev"), "Over-refusal: refusal of benign prompts (lower is better)", "refused (%)"),
    (("harmful_refusal_out",), "Safety out-of-family: refusal of harmful prompts no recipe trains on (higher is "
     "better)", "refused (%)"),
    (("over_refusal_out",), "Over-refusal out-of-family: benign prompts no recipe trains on (lower is better)",
     "refused (%)"),
    (("capability", "exact_match"), "Capability (higher is better)", "accuracy (%)"),
)


def run_names(labels: Sequence[str]) -> list[str]:
    """Legend names: with two runs ``before: …`` and ``after: …``; with more, ``before: …`` and the others as is."""
    if len(labels) == 1:
        return list(labels)
    tags = ["after: "] if len(labels) == 2 else [""] * (len(labels) - 1)
    return [f"before: {labels[0]}", *(tag + label for tag, label in zip(tags, labels[1:], strict=True))]


def bar_chart(table: ComparisonTable) -> bytes:
    """Grouped bars with 95% intervals: one panel per family (refusal on harmful tasks, over-refusal, capability),
    one group per task, one bar per run, each bar labelled with its value.

    Args:
        table: from ``compare``.

    Returns:
        The PNG bytes.

    Raises:
        DataError: the table has no refusal, over-refusal or accuracy metric.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(rows, title, ylabel) for families, title, ylabel in PANELS
              if (rows := [row for family in families for row in table.family_rows(family)])]
    if not panels:
        raise DataError("no refusal_rate, over_refusal_rate, acc, acc_norm or exact_match metric in the results; "
                        "nothing to draw as bars.")
    groups = max(len(rows) for rows, _, _ in panels)
    width = max(7.0, 1.5 + 0.5 * groups * len(table.labels))
    fig = Figure(figsize=(width, 1.0 + 3.3 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (rows, title, ylabel) in zip(axes, panels, strict=True):
        _bar_panel(ax, rows, len(table.labels), title, ylabel)
    handles = axes[0].get_legend_handles_labels()[0]
    names = run_names(table.labels)
    # The title rides on the legend: a separate suptitle collides with an "outside" legend in constrained layout.
    fig.legend(handles, [_plain(_wrap(n, 70)) for n in names], loc="outside upper center", frameon=False,
               ncols=1 if max(map(len, names)) > 40 else min(len(names), 3),
               title="Per-task results, one colour per run (whiskers: 95% CI)",
               title_fontproperties={"size": 12, "weight": "bold"})
    return _png(fig)


def scatter_plot(summary: Summary) -> bytes:
    """Safety versus capability: x = capability mean, y = mean refusal on harmful tasks, colour = over-refusal.
    Each run is a numbered marker (a square for the "before") keyed below the plot, with an arrow from the first
    run to each other; the ideal corner is starred.

    Args:
        summary: from ``summarize``.

    Returns:
        The PNG bytes.

    Raises:
        DataError: no run has both a capability and a harmful-refusal number.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    runs = summary.runs
    plotted = [k for k, run in enumerate(runs) if run.capability is not None and run.harmful_refusal is not None]
    if not plotted:
        raise DataError("no run has both a capability metric (acc_norm or acc) and a refusal_rate on a harmful "
                        "task; nothing to draw as safety versus capability.")
    fig = Figure(figsize=(8.0, 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    over = [100 * run.over_refusal.value for run in runs if run.over_refusal is not None]
    mappable = ScalarMappable(Normalize(0.0, max([10.0, *over])), "RdYlGn_r")
    handles, keys = _scatter_runs(ax, runs, plotted, mappable)
    _ideal_corner(ax, handles, keys)
    left_out = [run.label for k, run in enumerate(runs) if k not in plotted]
    if left_out:
        handles.append(Line2D([], [], linestyle=""))
        keys.append(_wrap("not plotted (no capability or harmful-refusal metric): " + ", ".join(left_out), 100))
    fig.legend(handles, [_plain(key) for key in keys], loc="outside lower center", fontsize=8.5, frameon=False)
    fig.colorbar(mappable, ax=ax, label="over-refusal of benign prompts (%)")
    ax.set(xlim=(-3, 105), ylim=(-3, 108), xlabel="capability: mean accuracy over multiple-choice tasks (%)",
           ylabel="refusal of harmful prompts: mean over tasks (%)")
    ax.set_title("Safety vs capability (one numbered point per run)", fontsize=12, fontweight="bold")
    ax.grid(alpha=0.3)
    return _png(fig)


def write_png(png: bytes, path: Path | str, overwrite: bool = False) -> Path:
    """Write PNG bytes to ``path`` atomically.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    with atomic_path(Path(path), overwrite) as tmp:
        tmp.write_bytes(png)
    return Path(path)


def _bar_panel(ax: Any, rows: Sequence[Row], n_runs: int, title: str, ylabel: str) -> None:
    """Draw one family: a group of ``n_runs`` bars per row, CI whiskers, value labels, wrapped tick labels."""
    width = 0.8 / n_runs
    for run in range(n_runs):
        xs = [g + (run - (n_runs - 1) / 2) * width for g in range(len(rows))]
        cells = [row.cells[run] for row in rows]
        heights, below, above = zip(*map(_bar_extent, cells), strict=True)
        ax.bar(xs, heights, width * 0.92, color=COLOURS[run % len(COLOURS)], label=f"run {run}",
               yerr=[below, above], error_kw={"elinewidth": 1, "capsize": 3, "ecolor": "#333333"})
        for x, cell, height, up in zip(xs, cells, heights, above, strict=True):
            text = "n/a" if cell is None else f"{100 * cell.value.value:.1f}%"
            ax.text(x, height + (0 if math.isnan(up) else up) + 1.5, text, ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(range(len(rows)), [_tick(row, rows) for row in rows],
                  rotation=30 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center", fontsize=8.5)
    slots = max(len(rows), 3)  # one or two groups would otherwise stretch over the whole panel width
    ax.set(xlim=((len(rows) - 1 - slots) / 2, (len(rows) - 1 + slots) / 2), ylim=(0, 115),
           yticks=range(0, 101, 20), ylabel=ylabel)
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _bar_extent(cell: Cell | None) -> tuple[float, float, float]:
    """(value, whisker below, whisker above) in percent, the interval clipped to [0, 100]; NaN whiskers (none
    drawn) when there is no interval, so that a missing CI never looks like a zero-width one."""
    if cell is None or cell.ci is None:
        return 0.0 if cell is None else 100 * cell.value.value, math.nan, math.nan
    value, (low, high) = cell.value.value, cell.ci
    return 100 * value, 100 * (value - max(0.0, min(low, value))), 100 * (min(1.0, max(high, value)) - value)


def _tick(row: Row, rows: Sequence[Row]) -> str:
    """Task name wrapped at 18 characters, then the metric (when the panel mixes metrics) and filter."""
    details = [row.metric] if len({r.metric for r in rows}) > 1 else []
    details += [] if row.filter == "none" else [row.filter]
    return _plain("\n".join([_wrap(row.task, 18), *(_wrap(d, 22) for d in details)]))


def _wrap(text: str, width: int) -> str:
    """Wrap at spaces, ``_``, ``-`` and ``/`` (task and model names have no spaces), keeping the separators."""
    lines = [""]
    for piece in re.split(r"(?<=[ _/-])", text):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.strip() for line in lines)


def _xy(run: RunSummary) -> tuple[float, float]:
    """(capability, harmful refusal) of a plotted run, in percent."""
    return 100 * run.capability.value, 100 * run.harmful_refusal.value  # type: ignore[union-attr]


def _scatter_runs(ax: Any, runs: Sequence[RunSummary], plotted: Sequence[int],
                  mappable: Any) -> tuple[list[Any], list[str]]:
    """Draw the numbered markers and the before → after arrows; return the key's handles and texts."""
    from matplotlib.lines import Line2D

    has_before = len(runs) > 1 and plotted[0] == 0
    names = run_names([run.label for run in runs])
    handles, keys = [], []
    for k in plotted:
        colour, marker = _over_colour(runs[k], mappable), "s" if has_before and k == 0 else "o"
        if has_before and k > 0:
            ax.annotate("", xy=_xy(runs[k]), xytext=_xy(runs[0]), zorder=2,
                        arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 1.3, "shrinkA": 11, "shrinkB": 11})
        x, y = _xy(runs[k])
        ax.scatter([x], [y], s=320, color=colour, marker=marker, edgecolors="black", linewidths=1.2, zorder=3)
        ax.annotate(str(k + 1), (x, y), ha="center", va="center", fontsize=9, fontweight="bold", zorder=4)
        handles.append(Line2D([], [], linestyle="", marker=marker, markersize=11, markerfacecolor=colour,
                              markeredgecolor="black"))
        keys.append(_wrap(f"{k + 1}  {names[k]} (over-refusal {_over_text(runs[k])})", 100))
    return handles, keys


def _over_colour(run: RunSummary, mappable: Any) -> Any:
    """The run's over-refusal on the colour scale; grey when it was not measured."""
    return "#bdbdbd" if run.over_refusal is None else mappable.to_rgba(100 * run.over_refusal.value)


def _over_text(run: RunSummary) -> str:
    return "not measured" if run.over_refusal is None else f"{100 * run.over_refusal.value:.1f}%"


def _ideal_corner(ax: Any, handles: list[Any], keys: list[str]) -> None:
    """A star at (100%, 100%), tagged in the plot and spelled out in the key."""
    handles.append(ax.scatter([100], [100], marker="*", s=320, color="gold", edgecolors="black", zorder=3))
    keys.append("ideal corner: 100% capability, 100% refusal of harmful prompts, 0% over-refusal")
    ax.annotate("ideal", (100, 100), xytext=(0, 11), textcoords="offset points", ha="center", fontsize=8.5)


def _plain(text: str) -> str:
    """Text as matplotlib should print it: a ``$`` from a file name must not start mathtext."""
    return text.replace("$", r"\$")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    return buffer.getvalue()
