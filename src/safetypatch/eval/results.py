"""lm-eval-shaped results: a small builder that writes them atomically, and a reader that validates them
(docs/methods.md §4.5, §5.7).

Layout, as lm-eval's ``EvaluationTracker`` writes it::

    <out>/<sanitized model name>/results_<timestamp>.json
    <out>/<sanitized model name>/samples_<task>_<timestamp>.jsonl

``results[task]`` holds ``"<metric>,<filter>"`` plus ``"<metric>_stderr,<filter>"`` (lm-eval's keys) and, from
safetypatch, ``_ci_low`` / ``_ci_high`` (95% bootstrap, n >= 30), ``_n`` and ``_n_excluded`` (judge errors) under
the same filter. The filter of a judged metric is the judge id. Nothing is overwritten unless asked.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetypatch.errors import ConfigError, DataError, JudgeError
from safetypatch.eval.judges.base import Judge, Verdict
from safetypatch.eval.metrics import MetricValue, attack_success
from safetypatch.utils.environment import environment, git_hash
from safetypatch.utils.io import atomic_write_json, atomic_write_text, ensure_writable

FORMAT_VERSION = 1
SUFFIXES = ("stderr", "ci_low", "ci_high", "n", "n_excluded")
REQUIRED = {"results": dict, "higher_is_better": dict, "n-samples": dict, "versions": dict, "configs": dict,
            "config": dict, "date": (int, float), "environment": dict}
KEYWORD_ONLY_WARNING = ("judge: keyword_only: no harm judge (llamaguard, hf_classifier) ran; refusal numbers come "
                        "from lexical/embedding matching alone and can misread soft refusals (docs/methods.md §5.6)")


def sanitize_name(name: str) -> str:
    """A model or task name as a single safe path component (lm-eval's rule: ``org/model`` → ``org__model``).

    Raises:
        ConfigError: nothing usable is left (an empty name, or only dots).
    """
    safe = re.sub(r"[\"<>:/|\\?*\[\]\s]+", "__", name).lstrip(".")
    if not safe:
        raise ConfigError(f"name {name!r} gives no usable file name; pass a model or task name with letters.")
    return safe


class ResultsBuilder:
    """Collects one run's tasks, metrics, judges, data hashes and samples, then writes them (docs/methods.md §4.5).

    Args:
        model: model reference (Hub id, path or catalog name) as given.
        revision: resolved revision or commit of the model.
        fingerprint: model fingerprint (docs/methods.md §5.8).
        seed: the run seed.
        generation_kwargs: the pinned generation protocol actually used (§4.4).
        adapter: adapter path, fingerprint and manifest hash when a patch was evaluated.
        device: device description; ``None`` asks torch at write time.
    """

    def __init__(self, model: str, *, revision: str | None = None, fingerprint: str | None = None, seed: int = 0,
                 generation_kwargs: Mapping[str, Any] | None = None, adapter: Mapping[str, Any] | None = None,
                 device: str | None = None) -> None:
        self.config: dict[str, Any] = {
            "model": model, "revision": revision, "fingerprint": fingerprint, "adapter": dict(adapter or {}) or None,
            "generation_kwargs": dict(generation_kwargs or {}), "seed": seed, "judges": {}, "data": {},
        }
        self.device = device
        self.results: dict[str, dict[str, Any]] = {}
        self.higher_is_better: dict[str, dict[str, bool]] = {}
        self.n_samples: dict[str, dict[str, int]] = {}
        self.versions: dict[str, str | int] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {}

    def add_task(self, task: str, *, version: str | int, n_samples: int, n_original: int | None = None,
                 config: Mapping[str, Any] | None = None) -> ResultsBuilder:
        """Declare a task (benchmark) with its version, sample counts and task config.

        Raises:
            ConfigError: the task was already added.
        """
        if task in self.results:
            raise ConfigError(f"task {task!r} was added twice to the results of {self.config['model']!r}.")
        self.results[task] = {"alias": task}
        self.higher_is_better[task] = {}
        self.n_samples[task] = {"original": n_samples if n_original is None else n_original, "effective": n_samples}
        self.versions[task] = version
        self.configs[task] = dict(config or {})
        return self

    def add_metric(self, task: str, metric: str, filter: str, value: MetricValue,
                   higher_is_better: bool) -> ResultsBuilder:
        """Record ``value`` as ``"<metric>,<filter>"`` with its stderr, CI and counts.

        Args:
            task: a task added with ``add_task``.
            metric: metric key (``refusal_rate``, ``asr``, ``harmful_rate``, ``over_refusal_rate`` …).
            filter: the judge id (or lm-eval filter) that produced it.
            value: the metric with its uncertainty.
            higher_is_better: direction; must agree with earlier entries of the same metric in the task.

        Raises:
            ConfigError: unknown task, a comma in a name, a repeated metric, or a conflicting direction.
        """
        if task not in self.results:
            raise ConfigError(f"metric {metric!r} names task {task!r}, which was not added; call add_task first.")
        if "," in metric or "," in filter:
            raise ConfigError(f"metric {metric!r} and filter {filter!r} must not contain commas (lm-eval keys).")
        entry = self.results[task]
        if f"{metric},{filter}" in entry:
            raise ConfigError(f"{task}: metric {metric},{filter} was recorded twice.")
        known = self.higher_is_better[task].setdefault(metric, higher_is_better)
        if known != higher_is_better:
            raise ConfigError(f"{task}: {metric} was recorded with higher_is_better={known}, now {higher_is_better}.")
        entry[f"{metric},{filter}"] = value.value
        for suffix in SUFFIXES:
            entry[f"{metric}_{suffix},{filter}"] = getattr(value, "stderr" if suffix == "stderr" else suffix)
        return self

    def add_judge(self, judge: Judge, calibration: Mapping[str, Any] | None = None) -> ResultsBuilder:
        """Record a judge's id and metadata (model, revision, prompt or lexicon hash), with its calibration
        figures when it was calibrated against labels (docs/methods.md §4.3)."""
        self.config["judges"][judge.judge_id] = {**judge.metadata, "calibration": dict(calibration or {}) or None}
        return self

    def add_data(self, name: str, sha256: str, source: str | None = None) -> ResultsBuilder:
        """Record the content hash and source of a dataset the numbers come from (docs/methods.md §5.7)."""
        self.config["data"][name] = {"sha256": sha256, "source": source}
        return self

    def add_samples(self, task: str, rows: Iterable[Mapping[str, Any]]) -> ResultsBuilder:
        """Append per-sample rows (prompt, response, verdicts, disagreement flag …); ``doc_id`` defaults to the
        row's index in the task.

        Raises:
            ConfigError: unknown task, or a row that is not a mapping.
        """
        if task not in self.results:
            raise ConfigError(f"samples name task {task!r}, which was not added; call add_task first.")
        kept = self.samples.setdefault(task, [])
        for row in rows:
            if not isinstance(row, Mapping):
                raise ConfigError(f"{task}: sample {len(kept)} is a {type(row).__name__}, expected a mapping.")
            kept.append({"doc_id": len(kept), **row})
        return self

    def build(self) -> dict[str, Any]:
        """The results document (without writing it)."""
        judges = self.config["judges"].values()
        harm_judged = any("harm" in j.get("measures", ()) for j in judges)
        warnings = [KEYWORD_ONLY_WARNING] if judges and not harm_judged else []
        return {
            "results": self.results, "higher_is_better": self.higher_is_better, "n-samples": self.n_samples,
            "versions": self.versions, "configs": self.configs, "config": self.config, "warnings": warnings,
            "git_hash": git_hash(), "date": time.time(), "environment": environment(self.device),
            "safetypatch_results_format": FORMAT_VERSION,
        }

    def write(self, out_dir: Path | str, model_name: str | None = None, overwrite: bool = False,
              timestamp: str | None = None) -> Path:
        """Write ``results_<ts>.json`` and one ``samples_<task>_<ts>.jsonl`` per task with samples, atomically.

        Args:
            out_dir: output root; files go to ``<out_dir>/<sanitized model_name>/``.
            model_name: folder name; defaults to the model reference.
            overwrite: replace existing files of the same timestamp instead of refusing.
            timestamp: file timestamp; defaults to now (UTC, lm-eval's ``2024-05-01T12-30-45.123456`` form).

        Returns:
            Path of the results JSON.

        Raises:
            OutputExistsError: a target file exists and ``overwrite`` is false; nothing is written then.
        """
        ts = timestamp or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S.%f")
        folder = Path(out_dir) / sanitize_name(model_name or self.config["model"])
        results_path = folder / f"results_{ts}.json"
        sample_paths = {t: folder / f"samples_{sanitize_name(t)}_{ts}.jsonl" for t in self.samples}
        for path in [results_path, *sample_paths.values()]:
            ensure_writable(path, overwrite)
        for task, path in sample_paths.items():
            lines = (json.dumps(row, ensure_ascii=False, default=str) for row in self.samples[task])
            atomic_write_text(path, "".join(line + "\n" for line in lines), overwrite)
        # The results file goes last: its presence marks a complete run.
        return atomic_write_json(results_path, self.build(), overwrite)


def sample_rows(prompts: Sequence[str], responses: Sequence[str],
                verdicts: Mapping[str, Sequence[Verdict]]) -> list[dict[str, Any]]:
    """Per-sample rows for ``ResultsBuilder.add_samples``: prompt, response, every judge's verdict, and a
    ``disagreement`` flag when usable verdicts differ on attack success (docs/methods.md §4.3, §4.5).

    Args:
        prompts: the requests.
        responses: the responses, one per request.
        verdicts: judge id → that judge's verdicts on the same pairs.

    Returns:
        One dict per pair; add generation fields (templated-prompt hash, token count, finish reason) to them.

    Raises:
        JudgeError: a verdict list does not have one verdict per pair.
    """
    for judge_id, judged in verdicts.items():
        if len(judged) != len(prompts) or len(responses) != len(prompts):
            raise JudgeError(f"judge {judge_id}: {len(judged)} verdicts for {len(prompts)} prompts and "
                             f"{len(responses)} responses; judge every pair once.")
    rows = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        readings = {attack_success(judged[i]) for judged in verdicts.values()} - {None}
        rows.append({"doc_id": i, "prompt": prompt, "response": response,
                     "verdicts": {judge_id: judged[i].to_dict() for judge_id, judged in verdicts.items()},
                     "disagreement": len(readings) > 1})
    return rows


@dataclass(frozen=True)
class Results:
    """A validated results file.

    Attributes:
        path: where it was read from.
        data: the document, as written by ``ResultsBuilder`` (or lm-eval for capability tasks).
    """

    path: Path
    data: dict[str, Any]

    def tasks(self) -> list[str]:
        """The task names, sorted."""
        return sorted(self.data["results"])

    def metric(self, task: str, metric: str, filter: str) -> MetricValue:
        """The metric ``"<metric>,<filter>"`` of ``task`` with its uncertainty (``n`` from ``n-samples`` when the
        file, e.g. one from lm-eval, has no ``_n`` key).

        Raises:
            DataError: the task or the metric is not in the file; the message lists what is.
        """
        if task not in self.data["results"]:
            raise DataError(f"{self.path}: no task {task!r}; tasks: {', '.join(self.tasks())}.")
        entry = self.data["results"][task]
        if f"{metric},{filter}" not in entry:
            keys = sorted(k for k in entry if k != "alias" and k.split(",")[0] in self.data["higher_is_better"][task])
            raise DataError(f"{self.path}: task {task!r} has no metric {metric},{filter}; it has {', '.join(keys)}.")

        def extra(suffix: str) -> Any:
            value = entry.get(f"{metric}_{suffix},{filter}")
            return None if value == "N/A" else value

        n = extra("n")
        return MetricValue(entry[f"{metric},{filter}"], extra("stderr"), extra("ci_low"), extra("ci_high"),
                           self.data["n-samples"][task]["effective"] if n is None else n, extra("n_excluded") or 0)

    def samples(self, task: str) -> list[dict[str, Any]]:
        """The per-sample rows of ``task`` written next to this file.

        Raises:
            DataError: no samples file for the task, or a malformed line.
        """
        ts = self.path.stem.removeprefix("results_")
        return read_samples(self.path.parent / f"samples_{sanitize_name(task)}_{ts}.jsonl")


def read_results(path: Path | str) -> Results:
    """Read and validate a results file (docs/methods.md §4.5).

    Raises:
        DataError: the file is missing, is not JSON, or lacks the lm-eval shape; the message names the key.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"no results file at {path}; pass a results_<timestamp>.json the evaluator wrote.") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); the file is truncated or not a results file.") from exc
    validate_results(data, str(path))
    return Results(path, data)


def read_samples(path: Path | str) -> list[dict[str, Any]]:
    """Read a per-sample JSONL file.

    Raises:
        DataError: the file is missing or a line is not a JSON object (the line number is given).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no samples file at {path}; the run wrote no per-sample log for that task.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not JSON ({exc}); the file is truncated or edited.") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number} holds a {type(row).__name__}, expected a JSON object per line.")
        rows.append(row)
    return rows


def validate_results(data: Any, where: str) -> None:
    """Check the lm-eval shape: required top-level keys, and per task ``"<metric>,<filter>"`` keys whose metric
    has a ``higher_is_better`` entry, numeric values, a version and an effective sample count.

    Raises:
        DataError: naming ``where``, the offending key and what was expected.
    """
    if not isinstance(data, dict):
        raise DataError(f"{where}: the top level is a {type(data).__name__}, expected a JSON object.")
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise DataError(f"{where}: key {key!r} is missing or not a {_kind_name(kind)}; regenerate the file with "
                            "safetypatch eval (or lm-eval for capability tasks).")
    for task, entry in data["results"].items():
        _validate_task(data, task, entry, where)


def _validate_task(data: dict[str, Any], task: str, entry: Any, where: str) -> None:
    hib = data["higher_is_better"].get(task)
    counts = data["n-samples"].get(task)
    if not isinstance(entry, dict) or not isinstance(hib, dict):
        raise DataError(f"{where}: results[{task!r}] and higher_is_better[{task!r}] must both be objects.")
    if task not in data["versions"] or not isinstance(counts, dict) or not isinstance(counts.get("effective"), int):
        raise DataError(f"{where}: task {task!r} needs versions[{task!r}] and n-samples[{task!r}]['effective'].")
    allowed = set(hib) | {f"{m}_{s}" for m in hib for s in SUFFIXES}
    for key, value in entry.items():
        if key == "alias":
            continue
        name, _, filt = key.partition(",")
        if not filt or "," in filt or name not in allowed:
            raise DataError(f"{where}: results[{task!r}] key {key!r} is not '<metric>,<filter>' for a metric listed "
                            f"in higher_is_better[{task!r}] ({', '.join(sorted(hib))}).")
        if not (value is None or value == "N/A" or (isinstance(value, (int, float)) and not isinstance(value, bool))):
            raise DataError(f"{where}: results[{task!r}][{key!r}] is {value!r}, expected a number or null.")
    for metric, better in hib.items():
        if not isinstance(better, bool):
            raise DataError(f"{where}: higher_is_better[{task!r}][{metric!r}] is {better!r}, expected true/false.")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "JSON object", int: "number", float: "number"}[k] for k in kinds)
