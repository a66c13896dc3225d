"""Subspace analysis of weight updates (docs/methods.md §3.8): how a safety patch or a fine-tuning delta sits relative
to the weights it changes, with a random-subspace baseline for every similarity, and how far it moves hidden states.

- ``metrics``: Mou's similarity, principal angles, Xue's overlaps, stable rank, LSSF entropy, LoX R-metrics.
- ``baseline``: the same similarities of random ΔW with the same spectrum, and their exact expectations.
- ``cache``: W_0's top singular triplets on disk, keyed by the model's fingerprint.
- ``modules``: streams W_0 and ΔW (patch factors or a second checkpoint) into per-module rows.
- ``hidden``: the hidden-state shift per layer over benign and harmful prompts.
- ``probe``: the linear-probe ceiling, a logistic regression on last-token hidden states, its layer by k-fold CV.
- ``document``: the JSON document, its aggregates and its reader (what ``report`` reads).
"""

from __future__ import annotations

from safetypatch.analysis.document import ANALYSIS_FILE, AnalysisDocument, read_analysis
from safetypatch.analysis.settings import SubspaceSettings

__all__ = ["ANALYSIS_FILE", "AnalysisDocument", "SubspaceSettings", "read_analysis"]
