"""Evaluation: pinned generation, judges, metrics with uncertainty, and lm-eval-shaped results (docs/methods.md §4)."""
