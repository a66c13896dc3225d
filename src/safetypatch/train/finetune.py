"""Supervised fine-tuning of a causal LM on prompt → response pairs, saved as a complete Hugging Face model folder.

The project needs descendants of a model, since no offline package ships an aligned and an unaligned model of one
architecture: a benign fine-tune (does a safety patch transfer to it, and how much refusal does benign fine-tuning
erode) and an unsafe model fine-tuned on harmful Q/A (an input of the restoration methods). The pairs are rendered with
the chat template and supervised on the response and its end-of-turn token only
(:func:`~safetypatch.train.examples.tokenize_examples`), trained by the Refusal-SFT trainer
(:func:`~safetypatch.train.refusal_sft.train_refusal_patch`) under a :class:`~safetypatch.train.recipes.PatchRecipe`,
LoRA factors are merged into the weights (:func:`~safetypatch.patch.apply.merge_patch`), and the folder (weights,
tokenizer, ``finetune.json``) is written atomically and read back tensor by tensor
(:func:`~safetypatch.models.saving.save_model_folder`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from safetypatch.config import StrictConfig
from safetypatch.data.schema import Dataset
from safetypatch.errors import ConfigError, DataError
from safetypatch.models.loading import LoadedModel
from safetypatch.models.saving import save_model_folder
from safetypatch.patch.apply import merge_patch
from safetypatch.patch.artifact import chat_template_sha256
from safetypatch.patch.factors import patch_from_peft
from safetypatch.patch.probe import detach_peft, is_peft_model
from safetypatch.train.examples import SFTExample, build_retain_examples, tokenize_examples
from safetypatch.train.recipes import PatchRecipe, get_recipe
from safetypatch.train.refusal_sft import TrainProgress, train_refusal_patch
from safetypatch.utils.environment import package_versions
from safetypatch.utils.io import ensure_writable

logger = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
# PatchRecipe fields that only shape refusal-SFT data; fine-tuning trains on the dataset's own responses.
_REFUSAL_ONLY = ("think", "refusal_seed", "retain_count", "retain_weight", "lead_tokens", "lead_weight",
                 "retain_unlikelihood")


class FinetuneManifest(StrictConfig):
    """The ``finetune.json`` of a fine-tuned model folder: what it was made from and how."""

    schema_version: int = Field(1, description="Manifest format version.")
    base_model: dict[str, Any] = Field(description="The base model's provenance (LoadedModel.provenance()).")
    data: dict[str, Any] = Field(description="The rows trained on: name, source, sha256, rows, licence.")
    recipe: dict[str, Any] = Field(description="The recipe, verbatim (PatchRecipe dump; mode lora or full).")
    template_sha256: str | None = Field(description="sha256 of the chat template the pairs were rendered with.")
    training: dict[str, Any] = Field(description="TrainResult.to_dict(): loss history, steps, seconds, speed.")
    merge: dict[str, Any] | None = Field(
        description="LoRA mode: max |Δlogit| of the merge on the probe batch, merged modules and warnings.")
    output_fingerprint: str | None = Field(None, description="Fingerprint sha256 of the written weights.")
    seconds: float = Field(description="Wall time from tokenising to the verified folder.")
    library_versions: dict[str, str | None] = Field(description="Versions of the packages that change numbers.")
    created: str = Field(description="UTC timestamp (ISO 8601).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Caller fields (e.g. the API config).")


def finetune_recipe(name: str, mode: Literal["lora", "full"], overrides: Mapping[str, Any]) -> PatchRecipe:
    """The recipe of a fine-tune: preset ``name`` with ``overrides`` and ``mode`` applied.

    Args:
        name: a recipe preset (``mou``, ``xue``) or a Xue mode string (see :func:`get_recipe`).
        mode: ``lora`` (factors merged into the weights after training) or ``full``.
        overrides: PatchRecipe fields that win over the preset.

    Returns:
        The validated recipe.

    Raises:
        ConfigError: an invalid recipe, ``overrides`` naming another mode, or an override of a refusal-only field
            (``think``, ``refusal_seed``, ``retain_count``, ``retain_weight``, ``lead_tokens``, ``lead_weight``,
            ``retain_unlikelihood``); a preset's values for those are reset to the defaults, as a fine-tune has no
            refusal data.
    """
    if "mode" in overrides and overrides["mode"] != mode:
        raise ConfigError(f"recipe_overrides sets mode={overrides['mode']!r} but the fine-tune mode is {mode!r}; "
                          "choose the mode with mode= (CLI --mode) only.")
    unused = [f for f in _REFUSAL_ONLY if f in overrides]
    if unused:
        raise ConfigError(f"recipe fields {', '.join(unused)} shape refusal-SFT data only; a fine-tune trains on the "
                          "dataset's own responses. Drop them from the recipe overrides.")
    defaults = {f: PatchRecipe.model_fields[f].default for f in _REFUSAL_ONLY}
    return get_recipe(name, **{**overrides, **defaults, "mode": mode})


def finetune_examples(dataset: Dataset) -> list[SFTExample]:
    """The (prompt → reference response) pairs of ``dataset``, one per row, in order.

    Args:
        dataset: rows that carry a ``response`` (e.g. ``arith``, ``sciq``, ``chat``, ``harmful-qa``).

    Returns:
        One example per row, supervised with weight 1.

    Raises:
        DataError: a row has no response or an empty one (the first is named with its index).
    """
    responses = [row.response for row in dataset.rows]
    missing = [i for i, response in enumerate(responses) if response is None]
    if missing:
        raise DataError(
            f"dataset {dataset.name!r}: {len(missing)} of {len(dataset)} rows have no response (first: row "
            f"{missing[0]}, prompt {dataset.rows[missing[0]].prompt[:60]!r}); fine-tuning trains on prompt → "
            "response pairs. Use a set with responses (arith, sciq, chat, harmful-qa) or a local file with a "
            "'response' column."
        )
    return build_retain_examples(dataset.prompts(), [r for r in responses if r is not None])


def finetune_model(
    loaded: LoadedModel,
    dataset: Dataset,
    recipe: PatchRecipe,
    output: Path,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> FinetuneManifest:
    """Fine-tune ``loaded`` on ``dataset``'s prompt → response pairs and save the result as a model folder.

    Args:
        loaded: the base model (trained in place: LoRA mode merges into its weights, full mode updates them).
        dataset: the rows to train on, each with a response.
        recipe: hyper-parameters and ``mode`` (:func:`finetune_recipe`).
        output: the model folder to write (config, safetensors weights, tokenizer, ``finetune.json``); loadable
            with ``safetypatch.load_model``.
        overwrite: replace an existing folder.
        extra: fields recorded under ``extra`` in ``finetune.json``.
        progress: called after every optimiser step.

    Returns:
        The manifest written to ``output / "finetune.json"``.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false (checked before training).
        DataError: a row has no response, or a completion does not fit ``recipe.max_length``.
        PatchError: the merged LoRA update does not change the model's logits (nothing was learnt).
        ModelError: a saved tensor does not read back as trained (nothing is left at ``output``).
    """
    ensure_writable(output, overwrite, folder=True)
    start = time.perf_counter()
    tokenized = tokenize_examples(loaded.tokenizer, finetune_examples(dataset), max_length=recipe.max_length)
    with tempfile.TemporaryDirectory(prefix="safetypatch-finetune-") as scratch:
        result = train_refusal_patch(loaded.model, loaded.tokenizer, tokenized, recipe, Path(scratch),
                                     progress=progress)
    model, merge = _merged(result.model, loaded.fingerprint.sha256)

    def manifest_text(fingerprint: str) -> str:
        return FinetuneManifest(
            base_model=loaded.provenance(),
            data={"name": dataset.name, "source": dataset.source, "sha256": dataset.sha256, "rows": len(dataset),
                  "licence": dataset.licence},
            recipe=recipe.model_dump(mode="json"), template_sha256=chat_template_sha256(loaded.tokenizer),
            training=result.to_dict(), merge=merge, output_fingerprint=fingerprint,
            seconds=time.perf_counter() - start, library_versions=package_versions(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), extra=extra or {},
        ).model_dump_json(indent=2) + "\n"

    save_model_folder(model, loaded.tokenizer, output, sidecars={FINETUNE_FILE: manifest_text}, overwrite=overwrite)
    manifest = FinetuneManifest.model_validate_json((output / FINETUNE_FILE).read_text(encoding="utf-8"))
    logger.info("fine-tuned %s on %d rows of %s (%s, %d steps) into %s", loaded.resolved.ref, len(dataset),
                dataset.name, recipe.mode, result.steps, output)
    return manifest


def _merged(model: Any, fingerprint: str) -> tuple[Any, dict[str, Any] | None]:
    """The plain model with a PEFT model's LoRA update merged into its weights (and the merge report), frozen."""
    merge = None
    if is_peft_model(model):
        patch = patch_from_peft(model, model.active_adapter)
        applied = merge_patch(detach_peft(model), patch, fingerprint=fingerprint)
        model = applied.model
        merge = {"max_logit_change": applied.max_logit_change, "modules": len(applied.modules),
                 "warnings": list(applied.warnings)}
    model.eval().requires_grad_(False)
    return model, merge

