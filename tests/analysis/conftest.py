"""Shared fixtures of the analysis tests."""

from __future__ import annotations

from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)
