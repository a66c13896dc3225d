"""A single self-contained HTML report: summary sentences, summary table, plots (base64 PNG), the full metric table
and, per run, the protocol the numbers were measured under (docs/methods.md §4.5, §5.7: safety numbers are only
meaningful with their judges, decoding, seeds and data hashes); then one section per subspace analysis (§3.8): its
per-module summary against the random baseline, its figures and its provenance.

Every string that comes from a results file is HTML-escaped; the page loads no external asset.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from typing import Any

from safetypatch.analysis import AnalysisDocument
from safetypatch.errors import ConfigError, DataError
from safetypatch.eval.results import Results
from safetypatch.report.analysis import analysis_figures
from safetypatch.report.plots import bar_chart, scatter_plot
from safetypatch.report.summary import Summary, SummaryValue, summarize
from safetypatch.report.tables import ComparisonTable, Row, compare

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { white-space: nowrap; }
table.kv td:first-child { font-weight: 600; white-space: nowrap; background: #fafafa; }
table.kv td { word-break: break-all; } table.kv table.kv { margin: 0; font-size: 0.85rem; }
.delta { display: block; font-size: 0.82rem; color: #666; }
.better { color: #1a7f37; } .worse { color: #c62828; }
.na { color: #999; } .note { color: #666; font-size: 0.88rem; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.4rem 0.7rem; margin: 0.4rem 0; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
"""
# Protocol fields shown first, in this order; any other config key follows them so that nothing is hidden.
PROTOCOL_CONFIG = (("model", "model"), ("revision", "revision"), ("fingerprint", "fingerprint"),
                   ("adapter", "adapter / patch"), ("generation_kwargs", "generation kwargs"), ("seed", "seed"),
                   ("judges", "judges (id → metadata, calibration)"), ("data", "data (name → sha256, source)"))


def render_html(results: list[Results], labels: list[str] | None = None, title: str = "safetypatch report",
                analyses: Sequence[AnalysisDocument] = ()) -> str:
    """Render one self-contained HTML page comparing evaluated runs, then one section per subspace analysis.

    Args:
        results: read results files; the first is the "before" that deltas are taken against (may be empty when
            ``analyses`` are given).
        labels: display labels, one per file; default the model plus the adapter name (``tables.run_label``).
        title: page title.
        analyses: read analysis documents (``safetypatch.analysis.read_analysis``).

    Returns:
        The HTML document.

    Raises:
        ConfigError: neither results nor analyses, or bad labels.
        DataError: two files disagree on a metric's direction.
    """
    if not results and not analyses:
        raise ConfigError("nothing to report: give results files of `safetypatch eval`, analyses of "
                          "`safetypatch analyze` (--analysis), or both.")
    body = [f"<h1>{escape(title)}</h1>", *(_results_sections(results, labels) if results else []),
            *(analysis_section(doc) for doc in analyses)]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _results_sections(results: list[Results], labels: list[str] | None) -> list[str]:
    """Summary, plots, the full metric table and the protocols of the evaluated runs."""
    table = compare(results, labels)
    summary = summarize(table)
    return [
        f'<p class="note">{len(results)} run(s); deltas (Δ) are against the first run, '
        f"<b>{escape(table.labels[0])}</b>. ± is half the width of the 95% CI (the file's bootstrap CI, else "
        "1.96·stderr); n is the number of judged samples.</p>",
        _summary_section(summary, results),
        _figures_section(table, summary),
        "<h2>All metrics</h2>",
        _metric_table(table),
        "<h2>Protocol</h2>",
        '<p class="note">Safety numbers are only comparable under the same judges, decoding, data and seeds.</p>',
        *(_protocol(run, label) for run, label in zip(results, table.labels, strict=True)),
    ]


def analysis_section(doc: AnalysisDocument) -> str:
    """One subspace analysis: what was compared, the per-module medians next to a random ΔW's, the figures and the
    provenance (config, fingerprints, patch hashes, prompt sets, versions)."""
    head = "".join(f"<th>{escape(name)}</th>" for name in (
        "module", "layers", "Mou ‖S‖_F/√r [random]", "Xue O_k [random]", "enrichment", "stable rank", "‖ΔW‖/‖W₀‖",
        "entropy rank"))
    rows = []
    for row in doc.module_summary():
        cells = [escape(row["module"]), f"{row['n']}" + (f" ({row['zero']} zero)" if row["zero"] else ""),
                 f"{_num(row['mou_norm'])} [{_num(row['mou_norm_random'])}]",
                 f"{_num(row['overlap'])} [{_num(row['overlap_random'])}]",
                 *(_num(row[key]) for key in ("enrichment", "stable_rank", "relative_norm", "entropy_rank"))]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    figures = [f'<img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
               for name, png in analysis_figures(doc).items()]
    provenance = {"analysis file": str(doc.path), "source": doc.data["source"], "config": doc.data["config"],
                  **doc.data["provenance"],
                  "hidden-state prompts": (doc.hidden_shift or {}).get("sets") or "not measured"}
    return "\n".join([
        f"<h2>Subspace analysis: {escape(doc.describe())}</h2>",
        '<p class="note">Medians over layers per module type. In brackets, what a random ΔW with the same spectrum '
        "scores against the same W₀ (Mou: mean over the baseline draws; O_k: the exact √(k/d_out)); an enrichment of "
        "1 is a random ΔW. docs/methods.md §3.8 defines every metric; docs/analysis.md says how to read them.</p>",
        f"<table><tr>{head}</tr>\n" + "\n".join(rows) + "</table>", *figures,
        "<h3>Provenance</h3>", _value(provenance)])


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _summary_section(summary: Summary, results: Sequence[Results]) -> str:
    """One sentence per run, each file's warnings (e.g. keyword-only judging), then the summary table."""
    parts = ["<h2>Summary</h2>"]
    parts += [f"<p>{escape(run.sentence())}</p>" for run in summary.runs]
    for run, label in zip(results, (r.label for r in summary.runs), strict=True):
        parts += [f'<p class="warning"><b>{escape(label)}</b>: {escape(str(w))}</p>'
                  for w in run.data.get("warnings") or []]
    families = summary.families()
    head = "".join(f"<th>{escape(f.heading)} {summary.arrow(f)}</th>" for f in families)
    rows = []
    for run in summary.runs:
        cells = "".join(_summary_cell(getattr(run, f.key)) for f in families)
        rows.append(f"<tr><td>{escape(run.label)}</td>{cells}</tr>")
    parts.append(f"<table><tr><th>run</th>{head}</tr>\n" + "\n".join(rows) + "</table>")
    return "\n".join(parts)


def _summary_cell(value: SummaryValue | None) -> str:
    if value is None:
        return '<td class="na">not measured</td>'
    delta = _delta(value.delta_text, value.improved)
    return f'<td class="num" title="{escape(value.described)}">{escape(value.text)}{delta}</td>'


def _delta(text: str | None, improved: bool | None) -> str:
    """The delta line of a cell, green when it moved in the better direction and red when in the worse."""
    if text is None:
        return ""
    css = "" if improved is None else " better" if improved else " worse"
    return f'<span class="delta{css}">Δ {escape(text)}</span>'


def _figures_section(table: ComparisonTable, summary: Summary) -> str:
    """Both plots as inline PNGs; a plot with nothing to draw becomes a visible note saying why."""
    parts = ["<h2>Plots</h2>"]
    figures: tuple[tuple[str, Callable[[], bytes]], ...] = (
        ("Per-task refusal, over-refusal and capability with 95% CIs", lambda: bar_chart(table)),
        ("Safety vs capability per run", lambda: scatter_plot(summary)),
    )
    for alt, draw in figures:
        try:
            png = draw()
        except DataError as exc:
            parts.append(f'<p class="note">{escape(alt)}: not drawn ({escape(str(exc))})</p>')
            continue
        parts.append(f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    return "\n".join(parts)


def _metric_table(table: ComparisonTable) -> str:
    """Every (task, metric, filter) row; deltas coloured by whether they moved in the better direction."""
    head = "".join(f"<th>{escape(label)}</th>" for label in table.labels)
    rows = [f"<tr><th>task</th><th>metric</th><th>filter</th>{head}</tr>"]
    for row in table.rows:
        cells = "".join(_metric_cell(row, run) for run in range(len(table.labels)))
        rows.append(f"<tr><td>{escape(row.task)}</td><td>{escape(row.metric)} {row.arrow}</td>"
                    f"<td>{escape(row.filter)}</td>{cells}</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _metric_cell(row: Row, run: int) -> str:
    cell = row.cells[run]
    if cell is None:
        return '<td class="na">–</td>'
    return f'<td class="num">{escape(cell.text)}{_delta(cell.delta_text, row.improved(run))}</td>'


def _protocol(results: Results, label: str) -> str:
    """The run's provenance: file, config (model, revision, fingerprint, adapter, generation kwargs, seed, judges,
    data hashes, anything else recorded), task versions, sample counts, package versions, git hash and date."""
    data = results.data
    config = data["config"]
    known = dict(PROTOCOL_CONFIG)
    fields: dict[str, Any] = {"results file": str(results.path)}
    fields.update({name: config.get(key) for key, name in PROTOCOL_CONFIG})
    fields["adapter / patch"] = config.get("adapter") or "none (base model)"
    fields.update({key: value for key, value in config.items() if key not in known})
    counts = data["n-samples"]
    fields["tasks (version, samples)"] = {
        task: f"version {data['versions'].get(task)}, n={counts[task]['effective']} of {counts[task].get('original')}"
        for task in results.tasks()}
    fields.update({"package versions and device": data["environment"], "git hash": data.get("git_hash"),
                   "date": _date(data["date"]), "warnings": data.get("warnings")})
    return f"<h3>{escape(label)}</h3>\n{_value(fields)}"


def _value(value: Any) -> str:
    """A value from a results file as escaped HTML: mappings as nested key/value tables, lists comma-joined."""
    if value is None:
        return '<span class="na">not recorded</span>'
    if isinstance(value, (Mapping, list)) and not value:
        return '<span class="na">none</span>'
    if isinstance(value, Mapping):
        rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{_value(v)}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list) and all(not isinstance(v, (Mapping, list)) for v in value):
        return escape(", ".join(json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v) for v in value))
    if isinstance(value, list):
        return "".join(_value(v) for v in value)
    return escape(str(value))


def _date(timestamp: Any) -> str:
    """A results ``date`` (Unix seconds, as lm-eval writes it) in UTC ISO form."""
    return datetime.fromtimestamp(float(timestamp), timezone.utc).isoformat(timespec="seconds")
