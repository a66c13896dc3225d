"""PNG figures of a subspace analysis (docs/methods.md §3.8), drawn from its ``analysis.json`` alone: layer × module
heatmaps of each metric, each similarity against its random baseline per module type, and the hidden-state shift.

Drawn like ``report.plots``: matplotlib imported inside each function, a standalone ``Figure`` on the Agg canvas.
"""

from __future__ import annotations

import math
from typing import Any

from safetypatch.analysis import AnalysisDocument
from safetypatch.report.plots import _plain, _png

# (metric, title, colour map, scale): "unit" pins the colours to [0, 1] so runs compare at a glance, "log" draws
# log10 on a diverging scale centred on the random value, "data" spans the values.
HEATMAPS = (
    ("mou_norm", "Mou similarity ‖S‖_F/√r of the top-r input subspaces (0 = orthogonal, 1 = same)", "viridis", "unit"),
    ("overlap", "Xue overlap O_k: share of ΔW in W_0's top-k output subspace", "viridis", "unit"),
    ("enrichment", "log10 enrichment O_k² / (k/d_out): 0 = as a random ΔW, > 0 concentrated in W_0's top-k",
     "RdBu_r", "log"),
    ("stable_rank", "stable rank ‖ΔW‖_F² / ‖ΔW‖_2²", "magma", "data"),
    ("relative_norm", "update size ‖ΔW‖_F / ‖W_0‖_F", "magma", "data"),
    ("entropy_rank", "LSSF entropy rank r(η) of ΔW's spectrum", "magma", "data"),
    ("r_ft", "LoX R_ft: share of W_ft − W_base in the top-k alignment subspace", "viridis", "unit"),
)
# The log scale spans at least a factor 2 either way, so that sampling noise around 1 stays pale.
_LOG_MIN_SPREAD = math.log10(2.0)
# Similarities drawn against their baseline: (metric, y label).
AGAINST_BASELINE = (("mou_norm", "‖S‖_F/√r"), ("overlap", "O_k"))
_ANNOTATE_MAX_LAYERS = 16


def analysis_figures(doc: AnalysisDocument) -> dict[str, bytes]:
    """Every figure the document supports, by file name (``heatmap_<metric>.png``, ``baseline.png``,
    ``hidden_shift.png``); metrics no row has (LoX without a base model, all-zero ΔW) are left out."""
    figures = {f"heatmap_{metric}.png": heatmap(doc, metric) for metric, *_ in HEATMAPS if doc.has(metric)}
    if doc.has("mou_norm"):
        figures["baseline.png"] = baseline_plot(doc)
    if doc.hidden_shift:
        figures["hidden_shift.png"] = shift_plot(doc)
    return figures


def heatmap(doc: AnalysisDocument, metric: str) -> bytes:
    """One metric as a module (rows) × layer (columns) heatmap; grey where undefined (ΔW = 0 or module absent).

    The title carries the median random baseline where the metric has one. Similarities bounded by 1 use a fixed
    [0, 1] colour scale; the enrichment is drawn as log10 on a diverging scale centred on the random value (0).

    Args:
        doc: the analysis.
        metric: a row key, e.g. ``mou_norm``.

    Returns:
        The PNG bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    title, cmap, scale = {m: rest for m, *rest in HEATMAPS}.get(metric, (metric, "viridis", "data"))
    grid = [[_cell(value, scale == "log") for value in row] for row in doc.grid(metric)]
    layers, modules = doc.layers(), doc.modules()
    fig = Figure(figsize=(max(6.0, 1.6 + 0.38 * len(layers)), 1.4 + 0.42 * len(modules)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap=_with_grey(cmap), norm=_norm(grid, scale), interpolation="nearest")
    if len(layers) <= _ANNOTATE_MAX_LAYERS:
        _annotate(ax, image, grid)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(len(modules)), [_plain(m) for m in modules], fontsize=8.5)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, shrink=0.9)
    ax.set_title(_plain(title + _baseline_note(doc, metric)), fontsize=10, loc="left")
    return _png(fig)


def baseline_plot(doc: AnalysisDocument) -> bytes:
    """Small multiples: for each similarity (rows) and module type (columns), the value per layer against the random
    baseline of the same module: its mean (dashed), the band up to its quantile, and the exact rms (dotted).

    Args:
        doc: the analysis.

    Returns:
        The PNG bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modules = doc.modules()
    fig = Figure(figsize=(max(7.0, 2.3 * len(modules)), 2.4 * len(AGAINST_BASELINE) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(AGAINST_BASELINE), len(modules), squeeze=False, sharey="row")
    quantile = doc.data["config"].get("baseline_quantile", 0.95)
    for (metric, label), row_axes in zip(AGAINST_BASELINE, axes, strict=True):
        for module, ax in zip(modules, row_axes, strict=True):
            rows = [r for r in doc.rows if r["module"] == module and r.get(metric) is not None]
            layers = [r["layer"] for r in rows]
            stats = [r["baseline"][metric] for r in rows]
            ax.fill_between(layers, [s["mean"] for s in stats], [s["quantile"] for s in stats], color="#bbbbbb",
                            alpha=0.6, label=f"random ΔW: mean to q{100 * quantile:g}")
            ax.plot(layers, [s["mean"] for s in stats], "--", color="#666666", lw=1)
            if stats and "analytic_rms" in stats[0]:
                ax.plot(layers, [s["analytic_rms"] for s in stats], ":", color="black", lw=1, label="exact rms")
            ax.plot(layers, [r[metric] for r in rows], "o-", color="#1f77b4", ms=3, lw=1.4, label="this ΔW")
            ax.set_title(_plain(module), fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_xlabel("layer", fontsize=8)
        row_axes[0].set_ylabel(_plain(label))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), frameon=False,
               title="Similarity per layer against a random ΔW of the same spectrum",
               title_fontproperties={"size": 11, "weight": "bold"})
    return _png(fig)


def shift_plot(doc: AnalysisDocument) -> bytes:
    """The hidden-state shift per layer, benign against harmful prompts: absolute (left) and relative (right).

    Args:
        doc: an analysis with ``hidden_shift``.

    Returns:
        The PNG bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shift = doc.hidden_shift or {}
    layers = [entry["layer"] for entry in shift["layers"]]
    fig = Figure(figsize=(11.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("shift", "‖h_patched − h_0‖"), ("relative", "‖h_patched − h_0‖ / ‖h_0‖"))
    for ax, (stat, label) in zip(axes, panels, strict=True):
        for kind, colour in (("benign", "#1f77b4"), ("harmful", "#d62728")):
            n = (shift["sets"].get(kind) or {}).get("n")
            ax.plot(layers, [entry[f"{kind}_{stat}"] for entry in shift["layers"]], "o-", ms=3, color=colour,
                    label=f"{kind} prompts (n={n})")
        ax.set(xlabel="layer (output of the decoder block)", ylabel=_plain(label))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    where = "last prompt token" if shift.get("position") == "last" else "mean over prompt tokens"
    fig.suptitle(f"Hidden-state shift per layer at the {where}", fontsize=11, fontweight="bold")
    return _png(fig)


def _annotate(ax: Any, image: Any, grid: list[list[float]]) -> None:
    """Write each defined cell's value on it, black on light colours and white on dark ones."""
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            if not math.isnan(value):
                r, g, b, _ = image.cmap(image.norm(value))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(x, y, f"{value:.2g}", ha="center", va="center", fontsize=7, color=colour)


def _norm(grid: list[list[float]], scale: str) -> Any:
    """The colour normalisation of a heatmap (see :data:`HEATMAPS`)."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if scale == "unit":
        return Normalize(0.0, 1.0)
    finite = [v for row in grid for v in row if not math.isnan(v)]
    if scale == "log":
        spread = max([_LOG_MIN_SPREAD, *(abs(v) for v in finite)])
        return TwoSlopeNorm(vcenter=0.0, vmin=-spread, vmax=spread)
    return None


def _cell(value: Any, log: bool) -> float:
    """A heatmap cell: NaN where undefined; log10 for the enrichment (NaN at 0)."""
    if value is None:
        return math.nan
    return math.log10(value) if log and value > 0 else math.nan if log else float(value)


def _with_grey(name: str) -> Any:
    """The colour map ``name`` with undefined cells drawn light grey."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#e0e0e0")


def _baseline_note(doc: AnalysisDocument, metric: str) -> str:
    """``(random ΔW: median mean …, q… …)`` from the overall aggregate, or nothing when the metric has no baseline."""
    stats = doc.aggregates["overall"]["baseline"].get(metric)
    if not stats:
        return ""
    return f"\nrandom ΔW of the same spectrum: median {stats['mean']:.3g} (high quantile {stats['quantile']:.3g})"
