"""``safetypatch demo``: the main job. Evaluate a model, train a LoRA safety patch on safety data, evaluate the
patched model, and write the before/after HTML report next to the patch folder.

Every step leaves its output in ``output_dir`` (``before/``, ``patch/``, ``after/``, ``report.html``) and a rerun
resumes: a finished step is reused when the run's settings (``demo.json``) are unchanged; ``overwrite`` redoes all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field

from safetypatch.api._progress import Progress, StepStarted
from safetypatch.api.evaluate import EvalConfig, evaluate
from safetypatch.api.train import TrainConfig, train_patch
from safetypatch.config import StrictConfig
from safetypatch.errors import ConfigError, OutputExistsError
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.utils.io import atomic_write_json, ensure_output_folder, is_tool_output, read_json

T = TypeVar("T")
STEPS = ("evaluate before", "train patch", "evaluate after", "report")
STEP_MINUTES = {"evaluate before": 2, "train patch": 10, "evaluate after": 2, "report": 0}
"""Minutes each step took from a fresh clone on 2 quiet CPU cores with AVX512-BF16, the embedded model and the
defaults (1.8, 10.0, 1.7; shown as the plan; docs/performance.md); training takes about twice as long on a CPU
without bf16."""
DEMO_N_HARMFUL = 40
DEMO_HARMFUL = ["harmbench", "advbench", "xstest-unsafe", "contrast-harmful"]
DEMO_BUDGET: dict[str, Any] = {"retain_count": 320}
"""The demo's patch under ``budget="demo"``: the default recipe on fewer prompts, 40 of each of :data:`DEMO_HARMFUL`
(each also in one training form) and 320 retain prompts dealt over every retain set, so the whole demo stays near a
quarter of an hour on 2 CPU cores (docs/performance.md). Chosen on the development rows among smaller and faster
budgets, which refused half of the benign development requests (docs/results/2026-12-05-generalization.md, *The
demo's budget*); ``safetypatch train`` (and ``--budget full``) trains the default patch on every prompt."""


class DemoConfig(StrictConfig):
    """Options of ``safetypatch demo``; the patch is trained with ``safetypatch train``'s defaults."""

    model: str = Field(DEFAULT_MODEL, description="Model to patch: catalog name, local folder, .gguf or Hub id.")
    recipe: str = Field("mou", description="Recipe preset of the patch or a Xue mode string such as "
                                           "lora_mlp_r8.")
    recipe_overrides: dict[str, Any] = Field(default_factory=dict, description="PatchRecipe fields that win over the "
                                                                                "recipe's (e.g. learning_rate, r).")
    budget: Literal["demo", "full"] = Field(
        "demo", description="demo: the default recipe on fewer prompts (40 per harmful set, 320 retain prompts) so "
                            "the run stays near a quarter of an hour on 2 CPU cores; full: "
                            "safetypatch train's defaults.")
    n_harmful: int | None = Field(None, gt=0, description="Most harmful training prompts per set (budget demo: 40; "
                                                          "full: train's default).")
    preset: str = Field("demo", description="Evaluation budget preset run before and after.")
    limit: int | None = Field(None, gt=0, description="Most rows per evaluation task, instead of the preset's.")
    output_dir: Path = Field(Path("runs/demo"), description="Folder of the run: before/, patch/, after/, report.html.")
    n_show: int = Field(3, ge=0, description="Harmful and benign answers shown before and after, of each kind.")
    overwrite: bool = Field(False, description="Redo every step instead of resuming a run with the same settings.")


@dataclass(frozen=True)
class DemoAnswer:
    """One prompt's greedy answer before and after the patch."""

    task: str
    prompt: str
    before: str
    after: str


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced.

    Attributes:
        before, after: the two results files.
        patch: the patch folder.
        report: the HTML report.
        summary: one sentence per run (refusal, over-refusal, capability, drift).
        answers: a few answers before and after.
        seconds: wall time per step (0 for a step reused from an earlier run).
    """

    before: Path
    after: Path
    patch: Path
    report: Path
    summary: tuple[str, ...]
    answers: tuple[DemoAnswer, ...]
    seconds: dict[str, float]


def demo(config: DemoConfig | None = None, progress: Progress | None = None,
         on_step: StepStarted | None = None) -> DemoResult:
    """Run the demo: evaluate, train a patch, apply it, evaluate again, report.

    Args:
        config: demo options (defaults: the embedded SmolLM2-135M-Instruct, preset ``demo``, recipe ``mou``).
        progress: called as ``(what, done, total)`` inside steps (tasks of an evaluation, retain answers,
            training steps).
        on_step: called as ``(index, step name, reused)`` when a step starts (or is reused).

    Returns:
        The paths, the summary sentences, a few answers before and after, and the time of each step.

    Raises:
        ConfigError: ``output_dir`` holds a run with other settings (use ``overwrite`` or another folder), or the
            patch's recipe is invalid (checked before anything runs).
        OutputExistsError: ``output_dir`` is a file, or a folder of other files than a demo run's.
    """
    from safetypatch.report import compare, summarize, write_report

    cfg = config or DemoConfig()
    out = cfg.output_dir
    demo_train_config(cfg, out / "patch").patch_recipe()  # a bad recipe field fails now, not after the first step
    _claim(out, cfg)
    seconds: dict[str, float] = {}

    def step(index: int, run: Callable[[], T], reuse: Callable[[], T | None]) -> T:
        found = None if cfg.overwrite else reuse()
        if on_step is not None:
            on_step(index, STEPS[index], found is not None)
        start = time.perf_counter()
        value = found if found is not None else run()
        seconds[STEPS[index]] = 0.0 if found is not None else time.perf_counter() - start
        return value

    patch = out / "patch"
    before = step(0, lambda: _evaluate(cfg, out / "before", None, progress), lambda: _results(out / "before"))
    train = demo_train_config(cfg, patch)
    step(1, lambda: train_patch(train, progress), lambda: patch if (patch / "safety_patch.json").is_file() else None)
    after = step(2, lambda: _evaluate(cfg, out / "after", patch, progress), lambda: _results(out / "after"))
    report = out / "report.html"
    labels = ["before", "after (patched)"]
    step(3, lambda: write_report([before, after], report, labels=labels, title=f"safetypatch demo: {cfg.model}",
                                 overwrite=True), lambda: None)
    summary = summarize(compare(_read(before, after), labels))
    return DemoResult(before, after, patch, report, tuple(run.sentence() for run in summary.runs),
                      _answers(before, after, cfg.n_show), seconds)


def demo_train_config(cfg: DemoConfig, patch: Path) -> TrainConfig:
    """The ``safetypatch train`` settings of the demo's patch: ``cfg.budget``'s sizes, then ``cfg``'s own fields."""
    demo_budget = cfg.budget == "demo"
    n_harmful = cfg.n_harmful or (DEMO_N_HARMFUL if demo_budget else None)
    sizes = {"n_harmful": n_harmful} if n_harmful else {}
    if demo_budget:
        sizes["harmful"] = DEMO_HARMFUL
    overrides = {**(DEMO_BUDGET if demo_budget else {}), **cfg.recipe_overrides}
    return TrainConfig(model=cfg.model, recipe=cfg.recipe, recipe_overrides=overrides, output=patch, overwrite=True,
                       **sizes)


def _claim(out: Path, cfg: DemoConfig) -> None:
    """Record the run's settings in ``out/demo.json``; refuse a folder of other files, and refuse to resume a run
    made with other settings."""
    settings = cfg.model_dump(mode="json", exclude={"overwrite", "n_show"})
    marker = out / "demo.json"
    ensure_output_folder(out)
    if out.is_dir() and not is_tool_output(out):
        raise OutputExistsError(f"{out} is a folder of other files than a demo run's (no demo.json); the demo writes "
                                "before/, patch/, after/ and report.html into its folder, so nothing was changed. "
                                "Give a new or empty --output-dir.")
    if marker.is_file() and not cfg.overwrite:
        previous = read_json(marker, ConfigError, what="demo run's settings",
                             advice="Pass --overwrite to redo the run there, or choose another --output-dir.")
        if previous != settings:
            changed = sorted(k for k in {*settings, *previous} if settings.get(k) != previous.get(k))
            raise ConfigError(f"{out} holds a demo run with other settings ({', '.join(changed)} differ); pass "
                              "--overwrite to redo it there, or choose another --output-dir.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, settings, overwrite=True)


def _evaluate(cfg: DemoConfig, folder: Path, patch: Path | None, progress: Progress | None) -> Path:
    """Run the preset on the model, with the patch attached when given (the unpatched run skips drift)."""
    result = evaluate(EvalConfig(model=cfg.model, adapter=patch, preset=cfg.preset, limit=cfg.limit,
                                 output_dir=folder, overwrite=True), progress)
    for stale in folder.rglob("results_*.json"):  # keep one results file per side, so a resume finds this one
        if stale != result.path:
            stale.unlink()
    return result.path


def _results(folder: Path) -> Path | None:
    found = sorted(folder.rglob("results_*.json"))
    return found[-1] if found else None


def _read(*paths: Path) -> list[Any]:
    from safetypatch.eval.results import read_results

    return [read_results(path) for path in paths]


def _answers(before: Path, after: Path, n: int) -> tuple[DemoAnswer, ...]:
    """The first ``n`` answers of each generation task that both runs share, before and after."""
    first, second = _read(before, after)
    shown = []
    for task in (t for t in first.tasks() if t in second.tasks()):
        pairs = list(zip(first.samples(task), second.samples(task), strict=False))
        shown += [DemoAnswer(task, a["prompt"], a["response"], b["response"]) for a, b in pairs[:n]
                  if "response" in a and "response" in b]
    return tuple(shown)
