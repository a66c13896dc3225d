"""``safetypatch probe``: the linear-probe ceiling, the separation of harmful from benign prompts that the model's own
hidden states allow with the data a patch is trained on.

A logistic regression (``analysis.probe``) on the unpatched model's residual stream at the last token of the
chat-templated user turn is trained on the train halves of the harmful sets (label 1) against the benign sets (label
0), at the decoder block chosen by k-fold cross-validation. It then flags the held-out rows of evaluation tasks,
exactly the rows ``safetypatch eval`` answers, and, given an eval results folder, sits next to the patch's refusal
rate on the same rows (matched by prompt text) under the headline judge. The output folder holds ``probe.json``
(provenance, per-layer accuracy, one row per task) and ``samples.jsonl`` (one line per held-out prompt).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from safetypatch.api._progress import Progress
from safetypatch.api.train import check_trainable
from safetypatch.config import StrictConfig
from safetypatch.errors import ConfigError
from safetypatch.models.catalog import DEFAULT_MODEL

if TYPE_CHECKING:
    from safetypatch.eval.results import Results
    from safetypatch.eval.task import TaskRows

PROBE_FILE = "probe.json"
SAMPLES_FILE = "samples.jsonl"
FORMAT_VERSION = 1

DEFAULT_HARMFUL = ["harmbench", "advbench", "xstest-unsafe", "contrast-harmful", "donotanswer"]
DEFAULT_BENIGN = ["everyday-requests", "public-knowledge", "contrast-benign", "benign-edgy", "chat"]
"""The sets ``safetypatch train`` trains a patch on by default: the probe learns from the same data, and never from an
out-of-family set (docs/generalization.md)."""
DEFAULT_TASKS = ["harmbench", "advbench", "advbench-past", "donotanswer", "xstest-unsafe", "contrast-harmful",
                 "benign-edgy", "everyday-requests", "everyday-past", "contrast-benign", "public-knowledge",
                 "strongreject", "advbench-future", "advbench-fiction", "jailbreak", "xstest-safe", "everyday-future",
                 "everyday-fiction"]
class ProbeConfig(StrictConfig):
    """Options of ``safetypatch probe``: the training sets, the layer search, the held-out tasks, the eval results
    to compare with, and where the output goes."""

    model: str = Field(DEFAULT_MODEL, description="Model whose hidden states are probed, unpatched (catalog name, "
                                                  "folder, .gguf or Hub id).")
    revision: str | None = Field(None, description="Hub revision of model (Hub ids only).")
    harmful: list[str] = Field(default_factory=lambda: list(DEFAULT_HARMFUL), min_length=1,
                               description="Harmful sets (label 1): their train halves train the probe.")
    benign: list[str] = Field(default_factory=lambda: list(DEFAULT_BENIGN), min_length=1,
                              description="Benign sets (label 0): their train halves train the probe.")
    n_train: int | None = Field(None, gt=0, description="Most training prompts per set (the first of its train half); "
                                                        "unset: all of them.")
    tasks: list[str] | None = Field(None, description="Held-out evaluation tasks (refusal, jailbreak or over_refusal "
                                                      "kind) whose rows the probe flags; unset: the safety tasks of "
                                                      "results, or DEFAULT_TASKS without results.")
    limit: int | None = Field(None, gt=0, description="Most rows per task (seeded sample, as eval draws it).")
    limits: dict[str, int] = Field(default_factory=dict, description="Most rows per named task; wins over limit. "
                                                                     "Unset with results: the rows results hold.")
    layers: list[int] | None = Field(None, description="Decoder blocks the cross-validation chooses from (0 = the "
                                                       "first block's output); unset: every block.")
    folds: int = Field(5, ge=2, description="k of the stratified k-fold cross-validation that picks the layer.")
    l2: float = Field(1e-3, ge=0, description="L2 weight: the probe minimises the mean log-loss + l2/2·‖w‖² on "
                                              "standardised features.")
    balanced: bool = Field(True, description="Weigh harmful and benign training prompts to half the loss each.")
    seed: int = Field(0, description="Seed of the cross-validation folds.")
    row_seed: int | None = Field(None, description="Seed of the held-out row sample (eval's seed); unset: the seed "
                                                   "recorded in results, else seed.")
    batch_size: int = Field(16, gt=0, description="Prompts per forward pass when reading hidden states.")
    dtype: str = Field("auto", description="Weights dtype: auto, float32, bfloat16 or float16.")
    results: Path | None = Field(None, description="An eval results folder (or results_<ts>.json) of the patch: "
                                                   "its refusal rate on the same rows goes next to the probe's.")
    judge: str | None = Field(None, description="Judge of results whose refusals are read (id, or its name such as "
                                                "embedding); unset: the headline (first) judge.")
    output_dir: Path = Field(Path("runs/probe"), description="Output folder: probe.json and samples.jsonl.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")

    @model_validator(mode="after")
    def _consistent(self) -> ProbeConfig:
        both = sorted(set(self.harmful) & set(self.benign))
        if both:
            raise ConfigError(f"ProbeConfig: {both} are both harmful and benign; a set has one label.")
        check_trainable({"harmful": self.harmful, "benign": self.benign})
        if self.judge is not None and self.results is None:
            raise ConfigError("ProbeConfig: judge picks a judge of results, but no results are given.")
        bad = {name: n for name, n in self.limits.items() if n < 1}
        if bad:
            raise ConfigError(f"ProbeConfig: limits must be positive, got {bad}.")
        return self


@dataclass(frozen=True)
class ProbeResult:
    """What ``probe`` wrote.

    Attributes:
        output: the output folder.
        document: the contents of ``probe.json``.
        seconds: wall time.
    """

    output: Path
    document: dict[str, Any]
    seconds: float

    @property
    def layer(self) -> int:
        """The decoder block the cross-validation chose."""
        return int(self.document["probe"]["layer"])

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per held-out task."""
        return list(self.document["rows"])


@dataclass(frozen=True)
class _HeldOut:
    task: str
    role: str
    rows: TaskRows
    limit: int | None


def probe(config: ProbeConfig | None = None, progress: Progress | None = None) -> ProbeResult:
    """Fit the linear probe on the model's own hidden states and report what it flags per held-out task.

    Args:
        config: the data, the layer search and the output (default :class:`ProbeConfig`).
        progress: called as ``("hidden states", done, total)`` after each forward pass and ``("layers", done,
            total)`` after each layer's cross-validation.

    Returns:
        A :class:`ProbeResult`.

    Raises:
        OutputExistsError: ``output_dir`` exists and ``overwrite`` is false (checked before any work).
        ConfigError: an unknown task or a task that is not a safety task, a bad layer, or results that are not
            one run or lack the judge.
        DataError: a set cannot be loaded, or results cannot be read.
        ModelError: the model cannot be loaded, or has no list of decoder blocks.
    """
    import torch

    from safetypatch.analysis.hidden import residual_states
    from safetypatch.analysis.probe import THRESHOLD, best_layer, cross_validate, fit_probe
    from safetypatch.models.loading import load_model
    from safetypatch.utils.io import ensure_writable

    cfg = config or ProbeConfig()
    start = time.perf_counter()
    ensure_writable(cfg.output_dir, cfg.overwrite)
    results = _read_results(cfg.results) if cfg.results is not None else None
    judge = _judge_id(results, cfg.judge) if results is not None else None
    row_seed = cfg.row_seed if cfg.row_seed is not None else (
        int(results.data["config"].get("seed", cfg.seed)) if results is not None else cfg.seed)
    held = _held_out(cfg, results, row_seed)
    prompts, labels, sets = _training_data(cfg)
    loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype)
    held_prompts = [row.prompt for part in held for row in part.rows.rows]
    total = len(prompts) + len(held_prompts)
    done = 0

    def tick(step: int) -> None:
        nonlocal done
        done += step
        if progress is not None:
            progress("hidden states", done, total)

    states = residual_states(loaded.model, loaded.tokenizer, [*prompts, *held_prompts], "last", tick, cfg.batch_size)
    train_states, held_states = states[:len(prompts)], states[len(prompts):]
    y = torch.tensor(labels)
    layers = list(range(states.shape[1])) if cfg.layers is None else list(cfg.layers)
    accuracy: dict[int, float] = {}
    for i, layer in enumerate(layers):
        accuracy.update(cross_validate(train_states, y, [layer], cfg.folds, cfg.seed, cfg.l2, cfg.balanced))
        if progress is not None:
            progress("layers", i + 1, len(layers))
    layer = best_layer(accuracy)
    fitted = fit_probe(train_states[:, layer], y, cfg.l2, cfg.balanced)
    probabilities = fitted.probability(held_states[:, layer]).tolist()
    rows, samples = _rows(held, probabilities, results, judge)
    document = {
        "format": FORMAT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "provenance": _provenance(loaded, cfg, row_seed, time.perf_counter() - start),
        "training": {"sets": sets, "n": len(labels), "n_harmful": sum(labels), "n_benign": len(labels) - sum(labels)},
        "probe": {"position": "last", "threshold": THRESHOLD, "layer": layer, "layers": states.shape[1],
                  "cv": {"folds": cfg.folds, "seed": cfg.seed, "accuracy": {str(k): v for k, v in accuracy.items()}},
                  "cv_accuracy": accuracy[layer],
                  "train_accuracy": float((fitted.flags(train_states[:, layer]) == y.bool()).double().mean()),
                  "l2": cfg.l2, "balanced": cfg.balanced, "iterations": fitted.iterations,
                  "gradient": fitted.gradient},
        "results": None if results is None else {"path": str(results.path), "judge": judge,
                                                 "model": results.data["config"].get("model"),
                                                 "adapter": results.data["config"].get("adapter")},
        "rows": rows,
    }
    _write(cfg, document, samples)
    return ProbeResult(cfg.output_dir, document, time.perf_counter() - start)


def read_probe(path: Path | str) -> dict[str, Any]:
    """The ``probe.json`` of an output folder (or the file itself).

    Raises:
        DataError: no such file, or not JSON.
    """
    from safetypatch.errors import DataError

    path = Path(path)
    file = path / PROBE_FILE if path.is_dir() else path
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"no {PROBE_FILE} at {path}; give the folder `safetypatch probe` wrote.") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON ({exc}).") from exc


def patch_refusals(samples: list[dict[str, Any]], prompts: list[str], judge: str) -> list[bool | None]:
    """Per prompt, whether the patch refused it in an eval run's per-sample rows under ``judge``: True or False
    where the judge read a refusal label, None where the prompt is not among the samples, or the judge failed on it
    or gives no refusal label (a harm classifier). Rows are matched by exact prompt text.

    Args:
        samples: the rows of a ``samples_<task>_<ts>.jsonl`` file.
        prompts: the prompts to look up.
        judge: a judge id of the run.
    """
    found: dict[str, bool | None] = {}
    for sample in samples:
        verdict = (sample.get("verdicts") or {}).get(judge) or {}
        refused = verdict.get("refused") if verdict.get("error") is None else None
        found.setdefault(str(sample.get("prompt")), None if refused is None else bool(refused))
    return [found.get(prompt) for prompt in prompts]


def _read_results(path: Path) -> Results:
    """The one results file at ``path`` (a file, or a folder holding exactly one ``results_*.json`` below it)."""
    from safetypatch.errors import DataError
    from safetypatch.eval.results import read_results

    if path.is_file():
        return read_results(path)
    found = sorted(path.rglob("results_*.json")) if path.is_dir() else []
    if not found:
        raise DataError(f"no results_*.json at or below {path}; give the output folder of `safetypatch eval` or a "
                        "results file.")
    if len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} results files ({', '.join(map(str, found))}); give one of "
                          "them.")
    return read_results(found[0])


def _judge_id(results: Results, wanted: str | None) -> str:
    """The judge id whose verdicts are read: ``wanted`` (an id or a judge name), else the headline (first) one."""
    from safetypatch.errors import DataError

    judges = list(results.data["config"].get("judges") or {})
    if not judges:
        raise DataError(f"{results.path} records no judge; it holds no safety task the probe can compare with.")
    if wanted is None:
        return judges[0]
    named = [j for j in judges if j == wanted] or [j for j in judges if j.startswith(f"{wanted}_")]
    if len(named) != 1:
        raise ConfigError(f"judge {wanted!r} is not one judge of {results.path}; its judges are {judges}.")
    return named[0]


def _held_out(cfg: ProbeConfig, results: Results | None, seed: int) -> list[_HeldOut]:
    """Each task's rows as eval draws them: its limit (from results when unset here) and the row seed."""
    from safetypatch.eval.task import TASKS, task_rows

    names = cfg.tasks
    if names is None and results is not None:
        names = [t for t in results.data["results"] if t in TASKS and TASKS.get(t).task_kind.judged]
        if not names:
            raise ConfigError(f"{results.path} holds no refusal, jailbreak or over-refusal task; name tasks.")
    held = []
    for name in names or DEFAULT_TASKS:
        spec = TASKS.get(name)
        if not spec.task_kind.judged:
            raise ConfigError(f"task {name!r} is a {spec.kind} task; the probe flags the prompts of refusal, "
                              "jailbreak and over_refusal tasks.")
        limit = cfg.limits.get(name, cfg.limit)
        counts = results.data["n-samples"].get(name) if results is not None else None
        if limit is None and counts is not None and counts["effective"] < counts.get("original", counts["effective"]):
            limit = counts["effective"]
        held.append(_HeldOut(name, spec.task_kind.prompts, task_rows(spec, limit, seed), limit))
    return held


def _training_data(cfg: ProbeConfig) -> tuple[list[str], list[int], list[dict[str, Any]]]:
    """The training prompts and labels: each set's train half less the prompts of any safety task's evaluation split
    (as patch training drops them), less prompts seen before in these sets, at most ``n_train`` per set."""
    from safetypatch.api.train import _safety_eval_prompts, _Unseen
    from safetypatch.data import canonical_split, load_dataset, normalize_prompt

    labelled = [(name, 1) for name in cfg.harmful] + [(name, 0) for name in cfg.benign]
    splits = {name: canonical_split(load_dataset(name)) for name, _ in labelled}
    unseen = _Unseen(_safety_eval_prompts(splits))
    seen: set[str] = set()
    prompts, labels, sets = [], [], []
    for name, label in labelled:
        split = splits[name]
        kept = unseen.rows(split.train.rows)
        dropped = len(split.train) - len(kept)
        fresh = [row.prompt for row in kept if normalize_prompt(row.prompt) not in seen]
        used = fresh[:cfg.n_train]
        seen.update(normalize_prompt(prompt) for prompt in used)
        prompts += used
        labels += [label] * len(used)
        sets.append({"name": name, "role": "harmful" if label else "benign", "split": "train",
                     "source": split.train.source, "sha256": split.train_sha256, "rows": len(split.train),
                     "dropped_eval_duplicates": dropped, "dropped_repeats": len(kept) - len(fresh), "used": len(used)})
    return prompts, labels, sets


def _rows(held: list[_HeldOut], probabilities: list[float], results: Results | None,
          judge: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per task (share flagged; with results, the patch's refusal rate and the probe's share on the rows
    both judged) and one sample per prompt."""
    from safetypatch.analysis.probe import THRESHOLD

    rows, samples, offset = [], [], 0
    for part in held:
        prompts = [row.prompt for row in part.rows.rows]
        probs = probabilities[offset:offset + len(prompts)]
        offset += len(prompts)
        flags = [p > THRESHOLD for p in probs]
        row: dict[str, Any] = {"task": part.task, "role": part.role, "n": len(prompts),
                               "flagged": sum(flags), "share_flagged": sum(flags) / len(flags) if flags else None,
                               "limit": part.limit, "n_original": part.rows.n_original,
                               "data_sha256": part.rows.data_sha256}
        refused: list[bool | None] = [None] * len(prompts)
        if results is not None and judge is not None:
            refused = _patch_row(row, part, prompts, flags, results, judge)
        rows.append(row)
        samples += [{"task": part.task, "role": part.role, "prompt": prompt, "probability": prob, "flagged": flag,
                     "patch_refused": refusal}
                    for prompt, prob, flag, refusal in zip(prompts, probs, flags, refused, strict=True)]
    return rows, samples


def _patch_row(row: dict[str, Any], part: _HeldOut, prompts: list[str], flags: list[bool], results: Results,
               judge: str) -> list[bool | None]:
    """Add the patch's columns to ``row``; return its refusal per prompt (None where not matched or not judged)."""
    recorded = (results.data["config"].get("data") or {}).get(part.task) or {}
    row["same_rows_as_results"] = recorded.get("sha256") == part.rows.data_sha256
    if part.task not in results.data["results"]:
        row.update(n_matched=0, n_judged=0, patch_refusal=None, share_flagged_judged=None)
        return [None] * len(prompts)
    samples = results.samples(part.task)
    known = {str(sample.get("prompt")) for sample in samples}
    refused = patch_refusals(samples, prompts, judge)
    judged = [i for i, value in enumerate(refused) if value is not None]
    row.update(n_matched=sum(prompt in known for prompt in prompts), n_judged=len(judged),
               patch_refusal=sum(bool(refused[i]) for i in judged) / len(judged) if judged else None,
               share_flagged_judged=sum(flags[i] for i in judged) / len(judged) if judged else None)
    return refused


def _provenance(loaded: Any, cfg: ProbeConfig, row_seed: int, seconds: float) -> dict[str, Any]:
    """The model (reference, revision, fingerprint, dtype, device), seeds, versions, git hash, time."""
    from safetypatch.utils.environment import environment, git_hash

    return {"model": loaded.provenance(), "seed": cfg.seed, "row_seed": row_seed,
            "environment": environment(), "git_hash": git_hash(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds}


def _write(cfg: ProbeConfig, document: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """``probe.json`` and ``samples.jsonl`` as one folder, atomically."""
    from safetypatch.utils.io import atomic_path, atomic_write_json

    with atomic_path(cfg.output_dir, cfg.overwrite) as tmp:
        tmp.mkdir()
        atomic_write_json(tmp / PROBE_FILE, document)
        (tmp / SAMPLES_FILE).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples),
                                        encoding="utf-8")
