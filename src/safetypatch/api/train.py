"""``safetypatch train``: Refusal-SFT of a safety patch, saved as a verified PEFT folder with its manifest."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from safetypatch.config import StrictConfig
from safetypatch.data.catalog import load_dataset
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.models.loading import load_model


class TrainConfig(StrictConfig):
    """Options of ``safetypatch train``: Refusal-SFT of a safety patch on safety data (METHODS.md §3.1)."""

    model: str = Field(DEFAULT_MODEL, description="Patch base: catalog name, local folder, .gguf or Hub id.")
    revision: str | None = Field(None, description="Hub revision (Hub ids only).")
    recipe: str = Field("mou", description="Recipe preset (mou, xue) or a Xue mode string.")
    recipe_overrides: dict[str, Any] = Field(default_factory=dict, description="PatchRecipe fields that win.")
    harmful: list[str] = Field(["harmbench", "advbench", "strongreject"], description="Harmful sets (train halves).")
    n_harmful: int | None = Field(100, gt=0, description="Most harmful prompts per set.")
    retain: list[str] = Field(
        ["xstest-safe", "benign-edgy"],
        description="Benign sets (train halves) whose first recipe.retain_count prompts the model answers itself.")
    retain_max_new_tokens: int = Field(40, gt=0, description="Length of the model's own retain answers.")
    output: Path = Field(Path("runs/patch"), description="Patch folder (PEFT adapter + safety_patch.json).")
    overwrite: bool = Field(False, description="Replace an existing patch folder.")
    dtype: str = Field("auto", description="Weights dtype: auto, float32, bfloat16 or float16.")


@dataclass(frozen=True)
class TrainPatchResult:
    """Where the patch went and how training went."""

    path: Path
    training: dict
    n_refusal: int
    n_retain: int
    seconds: float


def train_patch(config: TrainConfig | None = None) -> TrainPatchResult:
    """Train a safety patch by Refusal-SFT on the train halves of the harmful sets, with benign retain prompts
    answered by the model itself, save it as a verified PEFT folder with its manifest (Mou et al.; METHODS.md §3.1).

    Raises:
        ConfigError: unknown recipe or dataset. DataError: training prompts overlap an evaluation split.
        OutputExistsError: the output folder exists and ``overwrite`` is false.
    """
    from safetypatch.data import canonical_split, check_no_overlap, count_ngram_overlap
    from safetypatch.eval.generate import GenerationProtocol, generate_chat
    from safetypatch.patch.artifact import PatchManifest, chat_template_sha256, save_patch
    from safetypatch.train import (
        build_refusal_examples,
        build_retain_examples,
        get_recipe,
        tokenize_examples,
        train_refusal_patch,
    )
    from safetypatch.utils.io import ensure_writable

    cfg = config or TrainConfig()
    ensure_writable(cfg.output, cfg.overwrite)
    start = time.perf_counter()
    recipe = get_recipe(cfg.recipe, **cfg.recipe_overrides)
    loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype)
    splits = {name: canonical_split(load_dataset(name)) for name in [*cfg.harmful, *cfg.retain]}
    harmful = [row for name in cfg.harmful for row in splits[name].train.rows[: cfg.n_harmful]]
    benign = [row.prompt for name in cfg.retain for row in splits[name].train.rows][: recipe.retain_count]
    train_prompts = [row.prompt for row in harmful] + benign
    held_out = [row.prompt for split in splits.values() for row in split.eval.rows]
    check_no_overlap(train_prompts, held_out, what="patch training prompts vs evaluation splits")
    protocol = GenerationProtocol(max_new_tokens=cfg.retain_max_new_tokens, dtype=loaded.dtype, seed=recipe.seed)
    answers = generate_chat(loaded.model, loaded.tokenizer, benign, protocol) if benign else []
    examples = build_refusal_examples(harmful, seed=recipe.refusal_seed) + build_retain_examples(
        [a.prompt for a in answers], [a.response for a in answers], weight=recipe.retain_weight)
    tokenized = tokenize_examples(loaded.tokenizer, examples, max_length=recipe.max_length, think=recipe.think)
    with tempfile.TemporaryDirectory(prefix="safetypatch-train-") as scratch:
        result = train_refusal_patch(loaded.model, loaded.tokenizer, tokenized, recipe, Path(scratch))
    manifest = PatchManifest(
        method="refusal_sft", recipe=recipe.model_dump(mode="json"), base_model=loaded.provenance(),
        data=[{"name": n, "source": s.train.source, "sha256": s.train_sha256, "rows": len(s.train)}
              for n, s in splits.items()],
        template_sha256=chat_template_sha256(loaded.tokenizer), seed=recipe.seed,
        contamination={"ngram13_eval_prompts": count_ngram_overlap(train_prompts, held_out)},
        training=result.to_dict(), extra={"retain_protocol": protocol.to_dict(), "train_config": cfg.model_dump(
            mode="json")},
    )
    save_patch(result.model, cfg.output, manifest, overwrite=cfg.overwrite)
    return TrainPatchResult(cfg.output, result.to_dict(), len(harmful), len(answers), time.perf_counter() - start)
