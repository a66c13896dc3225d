"""Reports over results files: comparison tables, plots and a self-contained HTML page (ARCHITECTURE.md *Data flow*
step 7).

The report reads only lm-eval-shaped results files (``safetypatch.eval.results``) and subspace analyses
(``safetypatch.analysis.read_analysis``), and never loads a model:

- ``tables``: ``compare`` (every metric side by side with 95% CIs and deltas against the first run), Markdown.
- ``summary``: ``summarize`` (per run: refusal on harmful tasks, over-refusal, capability, exact match, drift).
- ``plots``: ``bar_chart`` and ``scatter_plot`` as PNG bytes (matplotlib, imported lazily), ``write_png``.
- ``analysis``: ``analysis_figures``, the heatmaps, baseline and hidden-shift plots of an analysis.
- ``html``: ``render_html``, one page with the summary, the plots, the full table and each run's protocol, then
  each analysis.
- ``write_report``: read result and analysis files, render, and write the page atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetypatch.analysis import read_analysis
from safetypatch.eval.results import read_results
from safetypatch.report.analysis import analysis_figures
from safetypatch.report.html import render_html
from safetypatch.report.plots import bar_chart, scatter_plot, write_png
from safetypatch.report.summary import RunSummary, Summary, summarize
from safetypatch.report.tables import ComparisonTable, compare, run_label
from safetypatch.utils.io import atomic_write_text, ensure_writable

__all__ = ["ComparisonTable", "RunSummary", "Summary", "analysis_figures", "bar_chart", "compare", "render_html",
           "run_label", "scatter_plot", "summarize", "write_markdown", "write_png", "write_report"]


def write_report(result_paths: Sequence[Path | str], out: Path | str, labels: Sequence[str] | None = None,
                 title: str = "safetypatch report", overwrite: bool = False,
                 analyses: Sequence[Path | str] = ()) -> Path:
    """Read results files (and analyses) and write one self-contained HTML report comparing them.

    Args:
        result_paths: ``results_<timestamp>.json`` files; the first is the "before" that deltas are taken against.
            May be empty when ``analyses`` are given.
        out: the HTML file to write.
        labels: display labels, one per file; default the model plus the adapter name.
        title: page title.
        overwrite: replace an existing ``out`` instead of refusing.
        analyses: ``analysis.json`` files (or their folders) of ``safetypatch analyze``, each rendered as a section.

    Returns:
        ``out``.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before anything is read).
        DataError: a results or analysis file is missing or malformed (the reader's error, naming the file).
        ConfigError: neither results nor analyses, or labels of the wrong count or with repeats.
    """
    out = Path(out)
    ensure_writable(out, overwrite, folder=False)
    results = [read_results(path) for path in result_paths]
    documents = [read_analysis(path) for path in analyses]
    html = render_html(results, None if labels is None else list(labels), title, documents)
    return atomic_write_text(out, html, overwrite)


def write_markdown(result_paths: Sequence[Path | str], out: Path | str, labels: Sequence[str] | None = None,
                   overwrite: bool = False) -> Path:
    """Write the report's two tables as Markdown (for docs and pull requests): the summary (one row per run, the
    in-family, development and out-of-family safety families apart) and every metric side by side.

    Args:
        result_paths: ``results_<timestamp>.json`` files; the first is the "before" that deltas are taken against.
        out: the Markdown file to write.
        labels: display labels, one per file.
        overwrite: replace an existing ``out`` instead of refusing.

    Returns:
        ``out``.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before anything is read).
        DataError: a results file is missing or malformed.
        ConfigError: no results, or labels of the wrong count or with repeats.
    """
    out = Path(out)
    ensure_writable(out, overwrite, folder=False)
    table = compare([read_results(path) for path in result_paths], None if labels is None else list(labels))
    text = f"## Summary\n\n{summarize(table).to_markdown()}\n## Every metric\n\n{table.to_markdown()}"
    return atomic_write_text(out, text, overwrite)
