"""What a catalog entry is: the set's card (role, licence, citation), its Hub id, its pinned offline source and the
row mapper that turns a raw record from either source into an :class:`~safetypatch.data.schema.Example`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from safetypatch.data.schema import Example
from safetypatch.data.sources import Row, read_file
from safetypatch.errors import ConfigError, DataError
from safetypatch.utils.wheels import WheelAsset, extract, is_extracted

Role = Literal["harmful", "benign", "capability", "chat", "labels", "jailbreak_templates"]
ROLES: tuple[str, ...] = get_args(Role)

RowMapper = Callable[[Row], Example | None]
"""``raw row -> Example | None``; ``None`` drops a row on purpose (e.g. the other XSTest label on the Hub)."""

FILE_KEY = "_file"
"""Key added to every raw row read from wheel files: the member path it came from (mappers read sub-sets from it)."""


class OfflineSource(Protocol):
    """A pinned, network-free source of raw rows."""

    def describe(self) -> str:
        """A one-line provenance string (``pypi:<name>==<version>/<member>``)."""
        ...

    def is_cached(self) -> bool:
        """Whether reading needs no download."""
        ...

    def read(self) -> list[Row]:
        """The raw rows (rows read from files carry their member path under ``FILE_KEY``)."""
        ...


@dataclass(frozen=True)
class WheelFiles:
    """Data files inside a pinned wheel, read with :func:`~safetypatch.data.sources.read_file` by suffix.

    Attributes:
        asset: the pinned wheel.
        members: file members, or folder members (ending in ``/``), read in this order.
        pattern: for folder members, a glob inside the folder selecting what to read (sorted); e.g. ``*/test``
            picks every subject's test split of an MMLU folder.
    """

    asset: WheelAsset
    members: tuple[str, ...]
    pattern: str | None = None

    def describe(self) -> str:
        glob = f" [{self.pattern}]" if self.pattern else ""
        return f"pypi:{self.asset.requirement}/{','.join(self.members)}{glob}"

    def is_cached(self) -> bool:
        return all(is_extracted(self.asset, m) for m in self.members)

    def read(self) -> list[Row]:
        rows: list[Row] = []
        for member in self.members:
            root = extract(self.asset, member)
            for path in self._files(root, member):
                label = member + path.relative_to(root).as_posix() if path != root else member
                rows.extend({**row, FILE_KEY: label} for row in read_file(path))
        return rows

    def _files(self, root: Path, member: str) -> list[Path]:
        if self.pattern is None:
            return [root]
        found = sorted(root.glob(self.pattern))
        if not found:
            raise DataError(f"{self.asset.requirement}: nothing under {member!r} matches {self.pattern!r}.")
        return found


@dataclass(frozen=True)
class PackagedFile:
    """A data file written by this project and shipped inside the package (``safetypatch/data/builtin/``).

    Attributes:
        name: the file name under ``builtin/``.
    """

    name: str

    @property
    def path(self) -> Path:
        return Path(__file__).with_name("builtin") / self.name

    def describe(self) -> str:
        return f"safetypatch:data/builtin/{self.name}"

    def is_cached(self) -> bool:
        return True

    def read(self) -> list[Row]:
        if not self.path.is_file():
            raise DataError(f"{self.describe()}: the packaged file {self.path} is missing; reinstall safetypatch "
                            "(pip install -e .) so its package data is present.")
        return [{**row, FILE_KEY: self.name} for row in read_file(self.path)]


@dataclass(frozen=True)
class HubRef:
    """Where users find the set on the Hugging Face Hub (``datasets.load_dataset`` arguments).

    Attributes:
        id: the repository id.
        split: the split to read.
        configs: config names; rows of several configs are concatenated in this order.
        revision: a branch, tag or commit; ``None`` reads the default branch (not reproducible).
    """

    id: str
    split: str
    configs: tuple[str | None, ...] = (None,)
    revision: str | None = None

    def describe(self) -> str:
        configs = ",".join(c for c in self.configs if c)
        return f"hf:{self.id}{'/' + configs if configs else ''}@{self.revision or 'main'}:{self.split}"


@dataclass(frozen=True)
class DatasetSpec:
    """A named set in the catalog.

    Attributes:
        name: catalog name (lowercase).
        description: one line on what the rows are and how they were normalised.
        role: what the set is for: ``harmful`` (should be refused), ``benign`` (should be answered, including
            over-refusal probes), ``capability`` (benchmarks), ``chat`` (instruction data), ``labels`` (judge
            calibration) or ``jailbreak_templates``.
        licence: SPDX id (or short text) of the rows' licence.
        citation: how to cite the set.
        offline: the pinned offline source, read by ``source="auto"``/``"pypi"``.
        rows: the pinned row count of the offline source after mapping (a mismatch is an error).
        mapper: raw row (from the offline source or the Hub) to ``Example``, or ``None`` to drop the row.
        hub: the Hub copy users know, or ``None`` when the set exists only in the wheel.
        dedupe: drop rows equal to an earlier row (same prompt, response, category, choices and answer).
        out_of_family: the set is for evaluation only: no training recipe may use any of its rows, so that what it
            measures is generalisation to a set no recipe was trained or chosen on (docs/generalization.md).
        dev_rows: development rows carved from the train half (``data.splits.training_split``): recipes are chosen
            on them (``split: dev`` tasks) and training never reads them; 0 = none.
    """

    name: str
    description: str
    role: Role
    licence: str
    citation: str
    offline: OfflineSource
    rows: int
    mapper: RowMapper
    hub: HubRef | None = None
    dedupe: bool = False
    out_of_family: bool = False
    dev_rows: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"dataset {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}.")
        if self.rows <= 0:
            raise ConfigError(f"dataset {self.name!r}: the pinned row count must be positive, got {self.rows}.")
