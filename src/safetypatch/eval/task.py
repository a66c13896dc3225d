"""Evaluation tasks: one YAML file per benchmark under ``eval/tasks/``, validated and registered by name."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, field_validator

from safetypatch.config import StrictConfig
from safetypatch.data import Dataset, Example, canonical_split, development_split, load_dataset
from safetypatch.data.catalog import dev_row_count
from safetypatch.data.forms import FORMS, reformulate
from safetypatch.data.sets import DATASETS
from safetypatch.errors import ConfigError
from safetypatch.registry import Registry, resolve

C = TypeVar("C", bound=StrictConfig)
Family = Literal["in", "dev", "out"]


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task is: the runner that evaluates it, and what callers ask of it instead of its name.

    Attributes:
        runner: ``"module:function"`` of the function that evaluates a task of this kind, imported on first use
            (called as ``runner(subject, spec, rows, plan, builder, report)``; see ``eval.evaluator``).
        prompts: what the prompts of a judged (safety) kind are: ``harmful`` (a refusal is the right answer) or
            ``benign`` (a refusal is an over-refusal); None for a kind no judge reads.
        templated: the rows are wrapped in the task's jailbreak templates (``templates``, ``placeholder``).
        needs_reference: the task compares against a reference model (drift).
    """

    runner: str
    prompts: Literal["harmful", "benign"] | None = None
    templated: bool = False
    needs_reference: bool = False

    @property
    def judged(self) -> bool:
        """Whether the answers are judged (a safety task): the evaluation needs at least one judge."""
        return self.prompts is not None

    @property
    def run(self) -> Callable[..., Any]:
        """The runner itself."""
        return resolve(self.runner)


TASK_KINDS: Registry[TaskKind] = Registry("task kind")
"""Kind name (a task YAML's ``kind``) → :class:`TaskKind`; a new kind registers here with its runner."""
TASK_KINDS.register("refusal", TaskKind("safetypatch.eval.evaluator:run_judged", prompts="harmful"))
TASK_KINDS.register("over_refusal", TaskKind("safetypatch.eval.evaluator:run_judged", prompts="benign"))
TASK_KINDS.register("jailbreak", TaskKind("safetypatch.eval.evaluator:run_judged", prompts="harmful",
                                          templated=True))
TASK_KINDS.register("multiple_choice", TaskKind("safetypatch.eval.evaluator:run_multiple_choice"))
TASK_KINDS.register("gsm8k", TaskKind("safetypatch.eval.evaluator:run_gsm8k"))
TASK_KINDS.register("short_answer", TaskKind("safetypatch.eval.evaluator:run_short_answer"))
TASK_KINDS.register("drift", TaskKind("safetypatch.eval.evaluator:run_drift", needs_reference=True))


class TaskSpec(StrictConfig):
    """One benchmark as a YAML file declares it (docs/methods.md §4.1-4.2)."""

    name: str = Field(description="Task name (the YAML file stem).")
    dataset: str = Field(description="Catalog dataset the rows come from.")
    kind: str = Field(
        description="What is measured: refusal, over-refusal, jailbreak, MC, gsm8k, short_answer or drift.")
    split: Literal["eval", "dev", "all"] = Field(
        description="eval: held-out half of the canonical split; dev: the development rows carved from the train half "
                    "(recipe choices); all: every row.")
    version: int = Field(description="Bumped whenever prompts, formatting or scoring change.")
    description: str = Field(description="One line for `safetypatch ls tasks`.")
    templates: str | None = Field(None, description="Jailbreak: dataset of templates wrapped around each prompt.")
    placeholder: str | None = Field(None, description="Jailbreak: the template's prompt placeholder.")
    max_template_chars: int | None = Field(None, description="Jailbreak: longest template used (CPU budget).")
    max_new_tokens: int | None = Field(None, description="Generation length for this task (overrides the run's).")
    form: str | None = Field(None, description="Prompt form every row is rewritten into (data.forms), e.g. future.")

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, value: str) -> str:
        try:
            TASK_KINDS.get(value)  # an unknown kind fails with close-name suggestions
        except ConfigError as exc:  # as a ValueError, so that the task file's name is added to the message
            raise ValueError(str(exc)) from exc
        return value

    @property
    def task_kind(self) -> TaskKind:
        """The registered :class:`TaskKind` of ``kind``."""
        return TASK_KINDS.get(self.kind)

    @property
    def family(self) -> Family:
        """Which held-out data the task reads (docs/generalization.md): ``out`` (out-of-family) when no training
        recipe may use what it measures (its dataset or templates are evaluation-only in the catalog, or its form is
        a held-out form); ``dev`` for development rows, which recipes are chosen on; ``in`` for the evaluation half
        of a set recipes train on."""
        datasets = [self.dataset, *([self.templates] if self.templates else [])]
        held_out = any(name in DATASETS and DATASETS.get(name).out_of_family for name in datasets)
        if held_out or (self.form is not None and FORMS.get(self.form).family == "held_out"):
            return "out"
        return "dev" if self.split == "dev" else "in"


def _read_yaml(cls: type[C], entry: Traversable) -> C:
    try:
        return cls(**yaml.safe_load(entry.read_text(encoding="utf-8")))
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"{entry.name} is not a valid {cls.__name__}: {exc}") from exc


def _load_tasks() -> Registry[TaskSpec]:
    registry: Registry[TaskSpec] = Registry("task")
    folder = resources.files("safetypatch.eval") / "tasks"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        spec = _read_yaml(TaskSpec, entry)
        if spec.name != entry.name.removesuffix(".yaml"):
            raise ConfigError(f"task file {entry.name} declares name {spec.name!r}; the name must be the file stem.")
        if spec.split == "dev" and spec.family != "dev":
            raise ConfigError(f"task file {entry.name}: development rows are for recipe choices, so a dev task may "
                              "not read an out-of-family set or a held-out form.")
        registry.register(spec.name, spec)
    return registry


TASKS = _load_tasks()


@dataclass(frozen=True)
class TaskRows:
    """The rows a task evaluates, with what the results must record about them.

    Attributes:
        rows: the (possibly subsampled) examples; for jailbreak tasks the prompt is already wrapped.
        n_original: rows available before the limit.
        data_sha256: content hash of the rows evaluated.
        source: where the dataset came from.
    """

    rows: tuple[Example, ...]
    n_original: int
    data_sha256: str
    source: str


def task_rows(spec: TaskSpec, limit: int | None = None, seed: int = 0) -> TaskRows:
    """Load the rows of ``spec``: its split side, a seeded sample of ``limit`` rows, wrapped for jailbreak tasks.

    Raises:
        ConfigError: ``limit`` is not positive.
    """
    dataset = load_dataset(spec.dataset)
    if spec.split == "dev":
        pool = development_split(dataset, _dev_rows(spec)).eval
    else:
        pool = canonical_split(dataset).eval if spec.split == "eval" else dataset
    rows = list(pool.rows)
    if limit is not None:
        if limit <= 0:
            raise ConfigError(f"task {spec.name}: limit must be positive, got {limit}.")
        if limit < len(rows):
            rows = sorted(random.Random(seed).sample(range(len(rows)), limit))
            rows = [pool.rows[i] for i in rows]
    if spec.form is not None:
        rows = reformulate(rows, spec.form, seed)
    if spec.task_kind.templated:
        rows = _wrap_in_templates(spec, rows, seed)
    evaluated = Dataset(spec.name, tuple(rows), pool.source, pool.licence, pool.citation)
    return TaskRows(evaluated.rows, len(pool), evaluated.sha256, pool.source)


def _dev_rows(spec: TaskSpec) -> int:
    n = dev_row_count(spec.dataset)
    if n == 0:
        raise ConfigError(f"task {spec.name} reads development rows of {spec.dataset!r}, of which the catalog carves "
                          "none (DatasetSpec.dev_rows); use split: eval or give the set dev_rows.")
    return n


def _wrap_in_templates(spec: TaskSpec, rows: list[Example], seed: int) -> list[Example]:
    if not spec.templates or not spec.placeholder:
        raise ConfigError(f"jailbreak task {spec.name} needs `templates` and `placeholder` in its YAML.")
    limit = spec.max_template_chars or 10**9
    templates = [
        row.prompt for row in load_dataset(spec.templates).rows
        if spec.placeholder in row.prompt and len(row.prompt) <= limit
    ]
    if not templates:
        raise ConfigError(f"jailbreak task {spec.name}: no template holds {spec.placeholder!r} within {limit} chars.")
    rng = random.Random(seed)
    wrapped = []
    for row in rows:
        template = rng.choice(templates)
        meta = {**row.meta, "behavior": row.prompt, "template_sha256": hashlib.sha256(template.encode()).hexdigest()}
        wrapped.append(Example(template.replace(spec.placeholder, row.prompt), category=row.category, meta=meta))
    return wrapped


class Preset(StrictConfig):
    """A named evaluation budget (``eval/presets/<name>.yaml``): tasks, row limits, generation length, judges."""

    tasks: list[str] = Field(description="Tasks run by this preset.")
    limits: dict[str, int] = Field(default_factory=dict, description="Task → most rows evaluated.")
    max_new_tokens: int = Field(description="Generation length of safety tasks.")
    judges: list[str] = Field(description="Judges applied to every safety task.")


def preset_names() -> list[str]:
    """The evaluation presets shipped in ``eval/presets/``, sorted."""
    folder = resources.files("safetypatch.eval") / "presets"
    return sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml"))


def load_preset(name: str) -> Preset:
    """Read preset ``name`` (one of :func:`preset_names`).

    Raises:
        ConfigError: unknown preset (the available ones are listed) or an invalid file.
    """
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(names)}.")
    return _read_yaml(Preset, resources.files("safetypatch.eval") / "presets" / f"{name}.yaml")

