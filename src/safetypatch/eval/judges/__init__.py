"""Judges of responses, one module each, registered lazily by name (docs/methods.md §4.3): ``keyword`` (default),
``embedding``, ``hf_classifier``, ``llamaguard``. Build one with ``build_judge(name, **options)``."""

from __future__ import annotations

from safetypatch.eval.judges.base import DEFAULT_JUDGE, JUDGES, Judge, Verdict, build_judge

__all__ = ["DEFAULT_JUDGE", "JUDGES", "Judge", "Verdict", "build_judge"]
