"""The public Python API: one module per verb. The CLI is a thin layer over these functions."""

from __future__ import annotations

from safetypatch.api.analyze import AnalyzeConfig, AnalyzeResult, analyze
from safetypatch.api.apply import AppliedModel, ApplyConfig, apply_patch
from safetypatch.api.demo import DemoConfig, DemoResult, demo
from safetypatch.api.evaluate import EvalConfig, EvalResult, evaluate
from safetypatch.api.export import ExportConfig, ExportResult, export
from safetypatch.api.extract import ExtractJob, ExtractResult, extract
from safetypatch.api.finetune import FinetuneConfig, FinetuneResult, finetune
from safetypatch.api.probe import ProbeConfig, ProbeResult, probe, read_probe
from safetypatch.api.restore import RestoreJob, RestoreResult, restore
from safetypatch.api.train import TrainConfig, TrainPatchResult, train_patch
from safetypatch.data.catalog import list_datasets, load_dataset
from safetypatch.models.loading import load_model
from safetypatch.models.resolve import CatalogEntry, list_catalog

__all__ = [
    "AnalyzeConfig", "AnalyzeResult", "AppliedModel", "ApplyConfig", "DemoConfig", "DemoResult", "EvalConfig",
    "EvalResult", "ExportConfig", "ExportResult", "ExtractJob", "ExtractResult", "FinetuneConfig", "FinetuneResult",
    "ProbeConfig", "ProbeResult", "RestoreJob", "RestoreResult", "TrainConfig", "TrainPatchResult", "analyze",
    "apply_patch", "demo", "evaluate", "export", "extract", "finetune", "list_datasets", "list_models", "list_tasks",
    "load_dataset", "load_model", "probe", "read_probe", "restore", "train_patch",
]


def list_models() -> list[CatalogEntry]:
    """The embedded model catalog, with what is already converted in the cache."""
    return list_catalog()


def list_tasks() -> list[dict[str, str]]:
    """Registered evaluation tasks with their kind, dataset and description."""
    from safetypatch.eval.task import TASKS

    return [{"name": n, "kind": TASKS.get(n).kind, "dataset": TASKS.get(n).dataset,
             "description": TASKS.get(n).description} for n in TASKS]
