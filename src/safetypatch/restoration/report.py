"""The per-layer report of a restoration run: one row per tensor (layer index, module, whether it changed, and the
method's own figures: rank, similarity, entropy, norms), written as JSON next to the output (docs/methods.md §3.4–§3.7
*Outputs*, §3.8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from safetypatch.restoration.base import RestoredTensor, RestoreMethod
from safetypatch.utils.io import atomic_write_json
from safetypatch.weights.stream import locate

REPORT_VERSION = 1


@dataclass
class RestoreReport:
    """Rows collected tensor by tensor, then summarised and written once.

    Attributes:
        method: registry name of the method.
        paper: its reference URL.
        config: the method's config as JSON values.
        meta: anything the caller records with it (model fingerprints, anchor ids and hashes, seeds).
        rows: one dict per tensor, in the order added.
    """

    method: str
    paper: str
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def for_method(cls, method: RestoreMethod, **meta: Any) -> RestoreReport:
        """An empty report of ``method`` with its config; ``meta`` is stored as given."""
        return cls(method.name, method.paper, method.config.model_dump(mode="json"), dict(meta))

    def add(self, name: str, result: RestoredTensor) -> None:
        """Add the row of one tensor from its :class:`RestoredTensor`."""
        layer, module = locate(name)
        self.rows.append({"tensor": name, "layer": layer, "module": module, "changed": result.tensor is not None,
                          **result.report})

    def summary(self) -> dict[str, Any]:
        """Counts of tensors and changed tensors, the skip reasons, and the mean of every numeric column."""
        skipped: dict[str, int] = {}
        columns: dict[str, list[float]] = {}
        for row in self.rows:
            if "skipped" in row:
                skipped[row["skipped"]] = skipped.get(row["skipped"], 0) + 1
            for key, value in row.items():
                if key != "layer" and isinstance(value, Real) and not isinstance(value, bool):
                    columns.setdefault(key, []).append(float(value))
        return {"tensors": len(self.rows), "changed": sum(row["changed"] for row in self.rows), "skipped": skipped,
                "means": {key: sum(values) / len(values) for key, values in sorted(columns.items())}}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: method, paper, config, meta, summary, and the rows sorted by (layer, module)."""
        rows = sorted(self.rows, key=lambda r: (r["layer"] is not None, r["layer"] or 0, r["module"]))
        return {"version": REPORT_VERSION, "method": self.method, "paper": self.paper, "config": self.config,
                "meta": self.meta, "summary": self.summary(), "layers": rows}

    def write(self, path: Path, overwrite: bool = False) -> Path:
        """Write :meth:`to_dict` atomically to ``path``.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is False.
        """
        return atomic_write_json(Path(path), self.to_dict(), overwrite=overwrite)
