"""``safetypatch eval``: safety, over-refusal and capability tasks into lm-eval-shaped results."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from safetypatch.api._progress import Progress
from safetypatch.api.apply import AppliedPatches, PathList, apply_patch_folders
from safetypatch.config import Dtype, StrictConfig
from safetypatch.errors import ConfigError
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.models.loading import LoadedModel, load_model


class EvalConfig(StrictConfig):
    """Options of ``safetypatch eval``: a preset supplies tasks, limits, length and judges; fields given here win."""

    model: str = Field(DEFAULT_MODEL, description="Model: catalog name, local folder, .gguf or Hub id.")
    revision: str | None = Field(None, description="Hub revision (Hub ids only).")
    adapter: PathList | None = Field(
        None, description="Safety patch folder(s) to evaluate on the model; several are combined exactly in ΔW first.")
    merge_adapter: bool = Field(False, description="Merge the adapter into the weights instead of attaching it.")
    merge_scale: float = Field(1.0, description="Merge scale γ of the adapter (with merge_adapter only).")
    reference_model: str | None = Field(
        None, description="Reference model of the drift task (same tokenizer); the base model when an adapter is set."
    )
    preset: str = Field("quick", description="Budget preset (eval/presets/<name>.yaml): tasks, row limits, "
                                             "generation length and judges.")
    tasks: list[str] | None = Field(None, description="Tasks to run instead of the preset's.")
    limit: int | None = Field(None, gt=0, description="Most rows per task (seeded sample), for every task.")
    limits: dict[str, PositiveInt] = Field(
        default_factory=dict, description="Most rows per named task of the run; wins over limit.")
    max_new_tokens: int | None = Field(None, gt=0, description="Generation length of safety tasks.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (64: twice as fast as 8 on 2 CPU "
                                                  "cores, the same greedy fp32 answers).")
    batching: Literal["grouped", "whole"] = Field(
        "grouped", description="How a generation batch runs: 'grouped' splits it into groups of similar prompt length "
                               "and runs the prompt prefix a group shares once; 'whole' pads it to its longest prompt "
                               "(results written before this option).")
    mc_batch_size: int = Field(8, gt=0, description="Items per multiple-choice forward (8: faster than 32 on 2 CPU "
                                                    "cores).")
    judges: list[str] | None = Field(None, description="Judges of safety tasks (first = headline).")
    system_prompt: str | None = Field(None, description="System turn sent with every prompt (recorded).")
    dtype: Dtype = Field("auto", description="Weights dtype: auto, float32, bfloat16 or float16.")
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend; vllm is parity-gated against hf.")
    seed: int = Field(0, description="Seed of row sampling, templates and generation.")
    output_dir: Path = Field(Path("runs/eval"), description="Results go to <output_dir>/<model>/results_<ts>.json.")
    overwrite: bool = Field(False, description="Replace an existing results file of the same timestamp.")

    @model_validator(mode="after")
    def _merge_scale_needs_merge(self) -> EvalConfig:
        if self.merge_scale != 1.0 and not self.merge_adapter:
            raise ConfigError(f"EvalConfig: merge_scale={self.merge_scale} acts on merged weights, but merge_adapter "
                              "is false. Set merge_adapter: true (CLI: --merge-adapter) or drop merge_scale.")
        if self.backend == "vllm" and self.merge_adapter:
            raise ConfigError("EvalConfig: backend vllm serves a patch unmerged (enable_lora + LoRARequest), but "
                              "merge_adapter is true. Drop merge_adapter, or write the merged model with safetypatch "
                              "apply --mode merge -o <folder> and evaluate that folder.")
        return self

    @model_validator(mode="after")
    def _known_names(self) -> EvalConfig:
        """Preset, tasks, judges and the tasks of ``limits`` are checked here, before any model or data loads."""
        from safetypatch.eval.judges import JUDGES
        from safetypatch.eval.task import TASKS, load_preset

        preset = load_preset(self.preset)
        for name in [*(self.tasks or ()), *self.limits]:
            TASKS.get(name)  # an unknown task fails with close-name suggestions
        for name in self.judges or ():
            if name not in JUDGES:
                JUDGES.get(name)
        tasks = self.tasks or preset.tasks
        unused = sorted(set(self.limits) - set(tasks))
        if unused:
            source = "tasks, CLI --tasks" if self.tasks else f"preset {self.preset!r}"
            raise ConfigError(f"EvalConfig: limits names {', '.join(unused)}, which this run does not evaluate; its "
                              f"tasks are {', '.join(tasks)} (from {source}). Drop {', '.join(unused)} from limits "
                              "(CLI --limits) or add it to tasks (CLI --tasks).")
        return self


@dataclass(frozen=True)
class EvalResult:
    """Where the results went, and the headline numbers: task → metric key → value."""

    path: Path
    headline: dict[str, dict[str, float]]
    seconds: float


def evaluate(config: EvalConfig | None = None, progress: Progress | None = None) -> EvalResult:
    """Evaluate a model on safety, over-refusal and capability tasks and write lm-eval-shaped results.

    Args:
        config: what to evaluate and how (defaults: the embedded model, preset ``quick``).
        progress: optional callback ``(task, done, total)``.

    A preset's drift task is skipped (and listed under ``config.skipped_tasks``) when there is no reference: no
    adapter and no ``reference_model``.

    Returns:
        The results path and headline metrics.

    Raises:
        ConfigError: unknown preset, task or judge (see :class:`EvalConfig`). ModelError: the model cannot be loaded.
        OutputExistsError: ``output_dir`` or a folder above it is a file (checked before the model is loaded).
        PatchError: an adapter folder is missing or unreadable.
    """
    from safetypatch.eval.evaluator import EvalPlan, ModelUnderTest, run_tasks
    from safetypatch.eval.generate import GenerationProtocol
    from safetypatch.eval.judges import build_judge
    from safetypatch.eval.results import ResultsBuilder, read_results
    from safetypatch.eval.task import load_preset
    from safetypatch.utils.io import ensure_output_folder

    cfg = config or EvalConfig()
    ensure_output_folder(cfg.output_dir)
    preset = load_preset(cfg.preset)
    start = time.perf_counter()
    loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype)
    model, applied = _with_adapter(loaded, cfg)
    reference_ref = cfg.reference_model or (cfg.model if cfg.adapter else None)
    reference = load_model(reference_ref, dtype=loaded.dtype).model if reference_ref else None
    tasks = tuple(cfg.tasks or _runnable(preset.tasks, reference is not None))
    limits = {t: cfg.limit for t in tasks} if cfg.limit else {t: n for t, n in preset.limits.items() if t in tasks}
    protocol = GenerationProtocol(max_new_tokens=cfg.max_new_tokens or preset.max_new_tokens,
                                  batch_size=cfg.batch_size, batching=cfg.batching,
                                  system_prompt=cfg.system_prompt, seed=cfg.seed, dtype=loaded.dtype)
    plan = EvalPlan(tasks, {**limits, **cfg.limits}, protocol,
                    tuple(build_judge(name) for name in (cfg.judges or preset.judges)), cfg.seed, cfg.mc_batch_size)
    builder = ResultsBuilder(cfg.model, revision=loaded.resolved.revision, fingerprint=loaded.fingerprint.sha256,
                             seed=cfg.seed, generation_kwargs=protocol.to_dict(),
                             adapter=applied.summary() if applied else None,
                             device=loaded.device)
    builder.config["preset"] = cfg.preset
    builder.config["skipped_tasks"] = {t: "no reference model (drift compares against one)"
                                       for t in (() if cfg.tasks else preset.tasks) if t not in tasks}
    builder.config["eval_config"] = cfg.model_dump(mode="json")
    with tempfile.TemporaryDirectory(prefix="safetypatch-eval-") as scratch:
        engine, served = _vllm_engine(loaded, applied, protocol, Path(scratch)) if cfg.backend == "vllm" \
            else (None, None)
        run_tasks(ModelUnderTest(model, loaded.tokenizer, reference, engine, served), plan, builder, progress)
    path = builder.write(cfg.output_dir, overwrite=cfg.overwrite)
    data = read_results(path).data
    headline = {
        task: {key: value for key, value in entry.items() if key.split(",")[0] in data["higher_is_better"][task]}
        for task, entry in data["results"].items()
    }
    return EvalResult(path, headline, time.perf_counter() - start)


def _runnable(tasks: list[str], has_reference: bool) -> list[str]:
    """A preset's tasks minus drift when there is nothing to compare against (a plain model without
    ``reference_model``); tasks named explicitly are never dropped."""
    from safetypatch.eval.task import TASKS

    return [t for t in tasks if has_reference or not TASKS.get(t).task_kind.needs_reference]


def _with_adapter(loaded: LoadedModel, cfg: EvalConfig) -> tuple[Any, AppliedPatches | None]:
    """Attach (or merge) ``cfg.adapter`` through the code path of ``safetypatch apply``; returns the model to
    evaluate and what was applied."""
    if cfg.adapter is None:
        return loaded.model, None
    applied = apply_patch_folders(loaded.model, cfg.adapter, mode="merge" if cfg.merge_adapter else "attach",
                                  scale=cfg.merge_scale, fingerprint=loaded.fingerprint.sha256)
    return applied.result.model, applied


def _vllm_engine(loaded: LoadedModel, applied: AppliedPatches | None, protocol: Any, scratch: Path) -> tuple[Any, Any]:
    """The vLLM engine over the base weights and the patch it serves unmerged (None without one): the patch folder
    itself, or, for several combined patches, the combination saved (and verified) into ``scratch``."""
    from safetypatch.eval.backends.vllm import VllmAdapter, load_vllm
    from safetypatch.patch.artifact import PatchManifest, save_patch

    served = None
    if applied is not None:
        folder = applied.sources[0].path
        if applied.combination is not None:
            folder = scratch / "combined-patch"
            save_patch(applied.result.model, folder, PatchManifest(method=f"combine:{applied.combination}"))
        served = VllmAdapter.from_folder(folder)
    return load_vllm(loaded.resolved.path, protocol, adapter=served), served
