"""One generic name → object registry (datasets, models, judges, tasks, restoration methods).

Entries are objects or lazy ``"module:attribute"`` strings imported on first use; a collision is refused, and an
unknown name is answered with the closest names and the full list, as lm-eval does.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from safetypatch.errors import ConfigError

T = TypeVar("T")


def resolve(reference: str) -> Any:
    """The object a lazy ``"module:attribute"`` reference names, importing the module."""
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """A named collection of ``T`` with close-name suggestions on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str) -> None:
        """Add ``entry`` (an object, or a lazy ``"module:attr"`` string) under ``name``."""
        if name != name.lower() or not name:
            raise ConfigError(f"{self.kind} name {name!r} must be non-empty and lowercase")
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """Return the entry for ``name``, importing it if it is lazy.

        Raises:
            ConfigError: ``name`` is unknown; the message lists close names and every registered name.
        """
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}.")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = resolve(entry)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
