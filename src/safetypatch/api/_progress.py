"""What the verbs share: the progress callback type."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""Called as ``(step or task, done, total)``."""

StepStarted = Callable[[int, str, bool], None]
"""Called as ``(index, step name, reused)`` when a step of a multi-step job starts or is reused."""
