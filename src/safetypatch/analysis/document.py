"""The analysis report as a JSON document: per-module rows, per-layer and per-module aggregates, the hidden-state
shift, the config and the provenance; built here, read back by :func:`read_analysis` (the HTML report reads only this
file and loads no model; docs/methods.md §3.8, ARCHITECTURE.md *Data flow* step 7).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from statistics import fmean, median
from typing import Any

from safetypatch.errors import DataError

ANALYSIS_FILE = "analysis.json"
KIND = "safetypatch.analysis"
VERSION = 1
# Attention then MLP, as the blocks compute them; other module names follow alphabetically.
MODULE_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.qkv_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj")
_BASELINE_STATS = ("mean", "quantile", "analytic_rms")


_NOT_METRICS = ("layer", "d_out", "d_in", "r", "k")


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric metrics (no layer index, shapes, depths, flags, lists or nested baselines)."""
    return {key: float(value) for key, value in row.items()
            if key not in _NOT_METRICS and isinstance(value, Real) and not isinstance(value, bool)}


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median and mean of every scalar metric over ``rows`` (modules with ΔW = 0 count only in ``zero``), and the
    median over rows of each baseline's mean, quantile and analytic rms.

    Args:
        rows: module rows.

    Returns:
        ``n``, ``zero``, ``median``, ``mean`` (metric → value), ``baseline`` (metric → stat → median).
    """
    columns: dict[str, list[float]] = {}
    baselines: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for key, value in _scalars(row).items():
            columns.setdefault(key, []).append(value)
        for metric, stats in (row.get("baseline") or {}).items():
            for stat in _BASELINE_STATS:
                if stat in stats:
                    baselines.setdefault(metric, {}).setdefault(stat, []).append(stats[stat])
    return {
        "n": len(rows), "zero": sum(bool(row.get("zero")) for row in rows),
        "median": {key: median(values) for key, values in sorted(columns.items())},
        "mean": {key: fmean(values) for key, values in sorted(columns.items())},
        "baseline": {metric: {stat: median(values) for stat, values in stats.items()}
                     for metric, stats in sorted(baselines.items())},
    }


def module_sort_key(module: str) -> tuple[int, str]:
    """Order of module types in tables and plots: :data:`MODULE_ORDER`, then alphabetical."""
    return (MODULE_ORDER.index(module), "") if module in MODULE_ORDER else (len(MODULE_ORDER), module)


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`summarize_rows` over all rows, per module type, and per layer (keys are layer indices as strings)."""
    modules = sorted({row["module"] for row in rows}, key=module_sort_key)
    layers = sorted({row["layer"] for row in rows if row["layer"] is not None})
    return {
        "overall": summarize_rows(rows),
        "by_module": {m: summarize_rows([row for row in rows if row["module"] == m]) for m in modules},
        "by_layer": {str(la): summarize_rows([row for row in rows if row["layer"] == la]) for la in layers},
    }


def build_document(rows: Sequence[dict[str, Any]], *, source: dict[str, Any], config: dict[str, Any],
                   provenance: dict[str, Any], hidden_shift: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON document of one analysis run.

    Args:
        rows: module rows (``analysis.modules.module_row``).
        source: what was analysed: ``kind`` (``patch`` or ``checkpoints``) and its references.
        config: the run's config as JSON values.
        provenance: model fingerprints, patch hashes, seed, versions, timing.
        hidden_shift: ``position``, ``sets`` and ``layers`` of the hidden-state shift, or None when not measured.

    Returns:
        ``kind``, ``version``, ``source``, ``config``, ``provenance``, ``aggregates``, ``hidden_shift`` and ``rows``
        sorted by (layer, module).
    """
    ordered = sorted(rows, key=lambda r: (r["layer"] is None, r["layer"] or 0, module_sort_key(r["module"])))
    return {"kind": KIND, "version": VERSION, "source": source, "config": config, "provenance": provenance,
            "aggregates": aggregate(ordered), "hidden_shift": hidden_shift, "rows": ordered}


def hidden_shift_layers(sets: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per-layer records ``{layer, <kind>_shift, <kind>_relative, …}`` from ``kind → layer_shift(...)``."""
    n_layers = len(next(iter(sets.values()))["shift"])
    return [{"layer": layer, **{f"{kind}_{stat}": values[stat][layer] for kind, values in sets.items()
                                for stat in ("shift", "relative")}} for layer in range(n_layers)]


@dataclass(frozen=True)
class AnalysisDocument:
    """A read (or freshly built) analysis document.

    Attributes:
        data: the JSON document.
        path: the file it was read from, or None.
    """

    data: dict[str, Any]
    path: Path | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    @property
    def aggregates(self) -> dict[str, Any]:
        return self.data["aggregates"]

    @property
    def hidden_shift(self) -> dict[str, Any] | None:
        return self.data.get("hidden_shift")

    def modules(self) -> list[str]:
        """Module types present, in :func:`module_sort_key` order."""
        return list(self.aggregates["by_module"])

    def layers(self) -> list[int]:
        """Layer indices present, ascending."""
        return [int(layer) for layer in self.aggregates["by_layer"]]

    def has(self, metric: str) -> bool:
        """Whether any row carries ``metric`` with a value."""
        return any(row.get(metric) is not None for row in self.rows)

    def grid(self, metric: str) -> list[list[float | None]]:
        """``metric`` as a modules × layers table (None where a module is absent, ΔW = 0, or the value undefined)."""
        index = {(row["module"], row["layer"]): row.get(metric) for row in self.rows}
        return [[index.get((module, layer)) for layer in self.layers()] for module in self.modules()]

    def module_summary(self) -> list[dict[str, Any]]:
        """Per module type: medians over layers of the headline metrics, next to the random baseline's.

        Returns:
            One dict per module type: ``module``, ``n``, ``zero``, ``mou_norm`` and ``mou_norm_random`` (median of
            the baseline means), ``overlap`` and ``overlap_random`` (√(k/d_out)), ``enrichment``, ``stable_rank``,
            ``relative_norm``, ``entropy_rank`` (None where undefined).
        """
        out = []
        for module, agg in self.aggregates["by_module"].items():
            median_of, baseline = agg["median"], agg["baseline"]
            out.append({"module": module, "n": agg["n"], "zero": agg["zero"],
                        "mou_norm": median_of.get("mou_norm"),
                        "mou_norm_random": baseline.get("mou_norm", {}).get("mean"),
                        "overlap": median_of.get("overlap"),
                        "overlap_random": baseline.get("overlap", {}).get("analytic_rms"),
                        **{key: median_of.get(key) for key in ("enrichment", "stable_rank", "relative_norm",
                                                               "entropy_rank")}})
        return out

    def describe(self) -> str:
        """One line: what was analysed against what."""
        source = self.data["source"]
        what = (f"patch {source.get('patch')}" if source.get("kind") == "patch"
                else f"{source.get('target')} − {source.get('model')}")
        return f"{what} on {source.get('model')}"


def read_analysis(path: Path | str) -> AnalysisDocument:
    """Read an analysis JSON file (or the ``analysis.json`` of an analysis output folder).

    Raises:
        DataError: the file is missing, not JSON, or not a safetypatch analysis document of a known version; the
            message names the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ANALYSIS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path} does not exist; give the analysis.json written by `safetypatch analyze`.") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); write it again with `safetypatch analyze`.") from exc
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise DataError(f"{path} is not a safetypatch analysis file (no \"kind\": \"{KIND}\"); results files of "
                        "`safetypatch eval` are given to `safetypatch report` as arguments, analyses with --analysis.")
    if data.get("version") != VERSION:
        raise DataError(f"{path} is analysis format version {data.get('version')}, this safetypatch reads version "
                        f"{VERSION}; run `safetypatch analyze` again.")
    missing = [key for key in ("rows", "aggregates", "source", "config", "provenance") if key not in data]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; the file is truncated or was edited. Run "
                        "`safetypatch analyze` again.")
    return AnalysisDocument(data, path)
