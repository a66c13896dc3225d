"""``safetypatch finetune``: supervised fine-tuning of a model on a dataset's prompt → response pairs, saved as a
complete model folder (a benign descendant, or an unsafe one trained on harmful Q/A)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from safetypatch.api._progress import Progress
from safetypatch.config import Dtype, StrictConfig
from safetypatch.data.catalog import load_dataset
from safetypatch.errors import ConfigError
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.models.loading import load_model


class FinetuneConfig(StrictConfig):
    """Options of ``safetypatch finetune``: SFT of a model on the train half of a dataset with responses."""

    model: str = Field(DEFAULT_MODEL, description="Base model: catalog name, local folder, .gguf or Hub id.")
    revision: str | None = Field(None, description="Hub revision (Hub ids only).")
    dataset: str = Field(
        "arith", description="Catalog set with responses (arith, sciq, chat, harmful-qa) or a local data file.")
    n: int | None = Field(None, gt=0, description="Most rows, taken in order from the train half of the split.")
    recipe: str = Field("mou", description="Hyper-parameter preset or a Xue mode string such as "
                                           "lora_mlp_r8.")
    recipe_overrides: dict[str, Any] = Field(default_factory=dict, description="PatchRecipe fields that win over the "
                                                                                "recipe's (e.g. learning_rate, r).")
    mode: Literal["lora", "full"] = Field("lora", description="lora (merged into the weights) or full fine-tuning.")
    output: Path = Field(Path("runs/finetune"), description="Model folder (weights, tokenizer, finetune.json).")
    overwrite: bool = Field(False, description="Replace an existing model folder.")
    dtype: Dtype = Field("auto", description="Weights dtype: auto, float32, bfloat16 or float16.")


@dataclass(frozen=True)
class FinetuneResult:
    """Where the fine-tuned model went and how training went.

    Attributes:
        path: the model folder (loadable with ``safetypatch.load_model``).
        training: loss history, steps, seconds and speed (``finetune.json``'s ``training`` block).
        rows: rows trained on.
        dataset_sha256: content hash of those rows.
        seconds: wall time of the whole call.
    """

    path: Path
    training: dict[str, Any]
    rows: int
    dataset_sha256: str
    seconds: float


def finetune(config: FinetuneConfig | None = None, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune a model on the first ``n`` rows of the train half of a dataset's canonical split (so the eval half
    stays unseen by tasks that read it) and save it as a model folder with ``finetune.json``.

    ``progress`` is called as ``("train", step, max_steps)`` after every optimiser step.

    Raises:
        ConfigError: unknown recipe, an invalid recipe override, a refusal-only recipe field, a dataset that an
            evaluation task reads in full (its train half is evaluated too, e.g. gsm8k), or several processes
            (``accelerate launch``).
        DataError: unknown dataset, or rows without a response.
        OutputExistsError: the output folder exists and ``overwrite`` is false.
    """
    from safetypatch.data import canonical_split
    from safetypatch.train.finetune import finetune_model, finetune_recipe
    from safetypatch.utils.distributed import process_state
    from safetypatch.utils.io import ensure_writable

    if process_state().num_processes > 1:
        raise ConfigError(f"safetypatch finetune runs in one process, but it was started on "
                          f"{process_state().num_processes} (accelerate launch / torchrun), which would all write "
                          f"the model folder. Run it with plain python; safetypatch train runs distributed.")
    cfg = config or FinetuneConfig()
    ensure_writable(cfg.output, cfg.overwrite, folder=True)
    start = time.perf_counter()
    recipe = finetune_recipe(cfg.recipe, cfg.mode, cfg.recipe_overrides)
    _refuse_fully_evaluated(cfg.dataset)
    train = canonical_split(load_dataset(cfg.dataset)).train
    rows = replace(train, rows=train.rows[: cfg.n])
    loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype)
    manifest = finetune_model(
        loaded, rows, recipe, cfg.output, overwrite=cfg.overwrite,
        extra={"finetune_config": cfg.model_dump(mode="json"), "split_train_sha256": train.sha256},
        progress=(lambda p: progress("train", p.step, p.max_steps)) if progress else None,
    )
    return FinetuneResult(cfg.output, manifest.training, len(rows), manifest.data["sha256"],
                          time.perf_counter() - start)


def _refuse_fully_evaluated(dataset: str) -> None:
    """Refuse a dataset whose every row some task evaluates: its train half would be trained on and evaluated."""
    from safetypatch.eval.task import TASKS

    tasks = [name for name in TASKS if TASKS.get(name).dataset == dataset and TASKS.get(name).split == "all"]
    if tasks:
        raise ConfigError(f"task {tasks[0]!r} evaluates every row of {dataset!r} (split: all), so fine-tuning on its "
                          "train half would train on evaluated rows. Fine-tune on another set (e.g. arith, chat).")
