"""``safetypatch demo``: the main job on the embedded default model."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import Field

from safetypatch.api._progress import Progress
from safetypatch.config import StrictConfig
from safetypatch.data.catalog import load_dataset
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.models.loading import LoadedModel, load_model


class DemoConfig(StrictConfig):
    """Options of ``safetypatch demo``."""

    model: str = Field(DEFAULT_MODEL, description="Model to run: catalog name, local folder, .gguf or Hub id.")
    n_harmful: int = Field(4, ge=0, description="Harmful prompts shown (standard HarmBench behaviours).")
    n_benign: int = Field(4, ge=0, description="Benign prompts shown (from xstest-safe).")
    max_new_tokens: int = Field(48, ge=1, description="Greedy tokens generated per answer.")
    seed: int = Field(0, description="Seed of the prompt sample.")


@dataclass(frozen=True)
class DemoAnswer:
    kind: str
    prompt: str
    response: str


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: the model's provenance, its answers, and the time each step took."""

    model: dict
    answers: tuple[DemoAnswer, ...]
    seconds: dict[str, float]


def demo(config: DemoConfig | None = None, progress: Progress | None = None) -> DemoResult:
    """Load the model and show its greedy answers to a few harmful and benign prompts.

    Args:
        config: demo options (defaults: the embedded SmolLM2-135M-Instruct).
        progress: optional callback ``(step, done, total)``.

    Returns:
        The answers and timings.
    """
    from safetypatch.eval.generate import GenerationProtocol, generate_chat

    cfg = config or DemoConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded: LoadedModel = load_model(cfg.model)
    seconds["load"] = time.perf_counter() - start
    harmful = _sample_prompts("harmbench", cfg.n_harmful, cfg.seed, functional_category="standard")
    benign = _sample_prompts("xstest-safe", cfg.n_benign, cfg.seed)
    protocol = GenerationProtocol(max_new_tokens=cfg.max_new_tokens, dtype=loaded.dtype)
    start = time.perf_counter()
    total = len(harmful) + len(benign)
    generations = generate_chat(
        loaded.model, loaded.tokenizer, harmful + benign, protocol,
        progress=(lambda done, _: progress("generate", done, total)) if progress else None,
    )
    seconds["generate"] = time.perf_counter() - start
    kinds = ["harmful"] * len(harmful) + ["benign"] * len(benign)
    answers = tuple(DemoAnswer(k, g.prompt, g.response) for k, g in zip(kinds, generations, strict=True))
    return DemoResult(loaded.provenance(), answers, seconds)


def _sample_prompts(name: str, n: int, seed: int, **meta: str) -> list[str]:
    import random

    if n == 0:
        return []
    rows = [row for row in load_dataset(name).rows
            if len(row.prompt) < 300 and all(row.meta.get(k) == v for k, v in meta.items())]
    return [row.prompt for row in random.Random(seed).sample(rows, min(n, len(rows)))]
