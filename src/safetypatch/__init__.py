"""safetypatch: safety patches for open chat LLMs.

Importing the package is cheap: the public API is loaded on first attribute access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "analyze", "AnalyzeConfig", "apply_patch", "ApplyConfig", "demo", "DemoConfig", "evaluate", "EvalConfig",
    "extract", "ExtractJob", "finetune", "FinetuneConfig", "list_models", "list_datasets", "list_tasks",
    "load_dataset", "load_model", "restore", "RestoreJob", "train_patch", "TrainConfig",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module("safetypatch.api"), name)
    raise AttributeError(f"module 'safetypatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_API, "__version__"])

