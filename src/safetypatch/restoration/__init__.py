"""Post-hoc safety restoration as per-tensor math (docs/methods.md §3.4–§3.7): LSSF, RESTA, Safe LoRA, LoX.

Each method is one module behind :class:`RestoreMethod`, registered in :data:`METHODS` under its file name; the
streaming engine (``weights.stream``) drives ``restore_tensor`` one tensor at a time.
"""

from __future__ import annotations

from safetypatch.restoration.base import (
    LORA_A,
    LORA_B,
    METHODS,
    ROLES,
    RestoreConfig,
    RestoreContext,
    RestoredTensor,
    RestoreMethod,
)
from safetypatch.restoration.report import RestoreReport

__all__ = [
    "LORA_A",
    "LORA_B",
    "METHODS",
    "ROLES",
    "RestoreConfig",
    "RestoreContext",
    "RestoreMethod",
    "RestoreReport",
    "RestoredTensor",
]
