"""What the verbs share: the progress callback type."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""Called as ``(step or task, done, total)``."""
