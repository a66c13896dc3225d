"""``safetypatch restore``: post-hoc safety restoration of a fine-tuned model (LSSF, RESTA, Safe LoRA, LoX;
docs/methods.md §3.4–§3.7).

``restore`` resolves each model role to a local folder, builds LSSF's anchor set when the method needs one, and
hands everything to :func:`safetypatch.restoration.runner.run_restore`, which streams the checkpoints tensor by tensor.

Anchor set (§3.4 step 2). The specified PKU-SafeRLHF both-unsafe queries are not in the offline catalog, so the
default anchors are the train half of ``harmbench`` (its canonical split; the evaluation half stays unseen),
de-duplicated by normalised prompt, without HarmBench's contextual behaviours (their long context strings are not
the short harmful queries §3.4 describes; 148 prompts remain, enough for the default 128), and sampled with
``anchor_seed``. The aligned
model answers each one greedily under the pinned chat protocol; those answers are the refusals. Ids, content hash
and protocol are recorded in ``restore.json``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from safetypatch.api._progress import Progress
from safetypatch.config import Dtype, StrictConfig, load_config
from safetypatch.data.catalog import load_dataset
from safetypatch.errors import ConfigError, ModelError
from safetypatch.models.loading import LoadedModel, load_model
from safetypatch.models.resolve import resolve_model

if TYPE_CHECKING:
    from safetypatch.data.schema import Example
    from safetypatch.restoration import RestoreMethod
    from safetypatch.restoration.runner import RestoreRun

Scope = Literal["linear", "all_2d"]
"""``weights.stream.ParamScope``, restated so that importing the API loads no torch (a test keeps them equal)."""
_ANCHOR_FIELDS = ("n_anchors", "anchor_dataset", "anchor_seed", "anchor_max_new_tokens")
# HarmBench's functional category left out of the anchors (a behaviour preceded by a long context string).
_CONTEXTUAL = "contextual"


class RestoreJob(StrictConfig):
    """Options of ``safetypatch restore``: which method repairs which models, and where the result goes."""

    method: str = Field("lssf", description="Restoration method (docs/methods.md §3.4–§3.7).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="The method's own settings, validated by its config class (e.g. "
        "eta, alpha for lssf; beta for resta; threshold for safe_lora; k, coef for lox).")
    base_model: str | None = Field(None, description="Unaligned base model (Safe LoRA, LoX, LSSF data-free).")
    aligned_model: str | None = Field(None, description="Safety-aligned model (every method).")
    unsafe_model: str | None = Field(None, description="The aligned model fine-tuned on harmful data (LSSF, RESTA).")
    target_model: str | None = Field(
        None, description="Fine-tune of the aligned model to repair (LSSF, RESTA, Safe LoRA; a PEFT adapter folder "
        "for Safe LoRA's adapter mode).")
    scope: Scope | None = Field(None, description="Tensors touched: linear or all_2d (default: the method's).")
    module_map: dict[str, str] = Field(
        default_factory=dict, description="model_type → regex of the linear-scope weight names, for architectures "
        "without a shipped pattern.")
    output: Path = Field(Path("runs/restore"), description="Repaired model folder (or adapter folder).")
    dry_run: bool = Field(False, description="Print the plan and the expected peak memory; write nothing.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    n_anchors: int = Field(128, gt=0, description="LSSF anchor prompts (§3.4: 128).")
    anchor_dataset: str = Field("harmbench", description="LSSF anchor set; its train half is used.")
    anchor_seed: int = Field(0, description="Seed of the anchor sample (§3.4: 0).")
    anchor_max_new_tokens: int = Field(256, gt=0, description="Length of the aligned model's refusals (§3.4: 256).")
    dtype: Dtype = Field("auto", description="Dtype of the aligned model that writes the anchor refusals.")

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        from safetypatch.restoration import METHODS

        METHODS.get(value)  # unknown names fail with close-name suggestions
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RestoreJob:
        from safetypatch.restoration.runner import check_roles

        method = self.build_method()
        check_roles(method, self.roles())
        if self.scope is not None and "param_scope" in self.params:
            raise ConfigError(f"RestoreJob: scope={self.scope!r} and params.param_scope="
                              f"{self.params['param_scope']!r} both set the tensors touched; give one.")
        stray = sorted(set(_ANCHOR_FIELDS) & self.model_fields_set)
        if stray and not method.needs_anchors:
            raise ConfigError(f"RestoreJob: {', '.join(stray)} shape LSSF's anchor set, but method "
                              f"{self.method!r} uses none; drop them.")
        return self

    def build_method(self) -> RestoreMethod:
        """The registered method with ``params`` validated by its config class.

        Raises:
            ConfigError: an unknown method, or a parameter that is unknown or invalid (named).
        """
        from safetypatch.restoration import METHODS

        cls = METHODS.get(self.method)
        return cls(load_config(cls.config_class, overrides=self.params))

    def roles(self) -> dict[str, str]:
        """The model references given, by role (the fields named like the docs/methods.md §2.1 roles)."""
        return {role: getattr(self, role) for role in type(self).model_fields
                if role.endswith("_model") and getattr(self, role) is not None}


@dataclass(frozen=True)
class RestoreResult:
    """What ``restore`` did (or, for a dry run, would do).

    Attributes:
        run: the runner's account: plan, report, provenance, output.
        anchors: the LSSF anchors (prompt + the aligned model's refusal); empty for other methods and dry runs.
        seconds: wall time of the whole call, anchor generation included.
    """

    run: RestoreRun
    anchors: tuple[Example, ...]
    seconds: float

    @property
    def output(self) -> Path | None:
        """The written folder; None for a dry run."""
        return self.run.output

    @property
    def summary(self) -> dict[str, Any]:
        """Tensors, changed tensors, skip reasons and column means of the per-layer report (empty for a dry run)."""
        return self.run.report.summary() if self.run.report is not None else {}

    @property
    def mean_rank(self) -> float | None:
        """LSSF's mean per-module rank r (None for methods without ranks, and dry runs)."""
        return self.summary.get("means", {}).get("rank")


def restore(job: RestoreJob, progress: Progress | None = None) -> RestoreResult:
    """Repair a fine-tuned model's safety post hoc with one method, streaming the checkpoints
    (docs/methods.md §3.4–§3.7).

    Writes ``job.output``: the repaired model folder (config and tokenizer copied from the target) or, for a Safe
    LoRA adapter target, the repaired adapter; both with ``restore_report.json`` (per-layer ranks, similarities,
    entropies) and ``restore.json`` (method, config, role fingerprints, versions, seconds, anchor ids and hash).

    Args:
        job: method, parameters, model roles and output.
        progress: called as ``("anchor refusals", done, total)`` while the aligned model answers the anchors and
            ``("restore", done, total)`` per streamed tensor.

    Returns:
        A :class:`RestoreResult`; with ``dry_run`` its ``run.describe()`` is the plan and nothing is written.

    Raises:
        ConfigError: see :class:`RestoreJob`, or more anchors asked for than the set holds.
        ModelError: a role cannot be resolved or read (role and reference named).
        ModelMismatchError: the roles' tensors differ in names or shapes (tensor and roles named).
        OutputExistsError: ``output`` exists and ``overwrite`` is false (checked before any model is loaded).
        DataError: the anchor set cannot be loaded, or an anchor got an empty refusal.
        PatchError: the adapter target is unreadable or the repaired adapter fails its reload check.
    """
    from safetypatch.restoration import RestoreContext
    from safetypatch.restoration.runner import run_restore
    from safetypatch.utils.io import ensure_writable

    start = time.perf_counter()
    method = job.build_method()
    folders = {role: _role_folder(role, ref) for role, ref in job.roles().items()}
    context, anchors, record = RestoreContext(), (), {}
    if not job.dry_run:
        ensure_writable(job.output, job.overwrite, folder=True)
        if method.needs_anchors:
            loaded = load_model(str(folders["aligned_model"]), dtype=job.dtype)
            anchors, record = build_anchors(loaded, job.anchor_dataset, job.n_anchors, job.anchor_seed,
                                            job.anchor_max_new_tokens, progress)
            context = RestoreContext(model=loaded.model, tokenizer=loaded.tokenizer, anchors=anchors)
    meta = {"models": job.roles(), "anchors": record, "job": job.model_dump(mode="json")}
    run = run_restore(method, folders, job.output, scope=job.scope, module_map=job.module_map or None,
                      context=context, meta=meta, dry_run=job.dry_run, overwrite=job.overwrite, progress=progress)
    return RestoreResult(run, tuple(anchors), time.perf_counter() - start)


def build_anchors(loaded: LoadedModel, dataset: str, n: int, seed: int, max_new_tokens: int,
                  progress: Progress | None = None) -> tuple[list[Example], dict[str, Any]]:
    """LSSF's anchor set: ``n`` harmful prompts from ``dataset``'s train half, each with the aligned model's greedy
    answer as its refusal (docs/methods.md §3.4 step 2; the choice of prompts is in the module docstring).

    Args:
        loaded: the aligned model.
        dataset: a catalog set of harmful prompts (or a local file).
        n: how many anchors.
        seed: seed of the sample.
        max_new_tokens: length of the refusals.
        progress: called as ``("anchor refusals", done, total)``.

    Returns:
        (anchors in train-half order, the record for ``restore.json``: set, split hash, seed, ids, content hash,
        generation protocol, and how many refusals hit the length limit).

    Raises:
        ConfigError: ``n`` exceeds the distinct non-contextual prompts of the train half.
        DataError: the set cannot be loaded.
    """
    from safetypatch.data import canonical_split, normalize_prompt
    from safetypatch.eval.generate import GenerationProtocol, generate_chat
    from safetypatch.utils.hashing import sha256_json

    split = canonical_split(load_dataset(dataset))
    seen: set[str] = set()
    candidates: list[tuple[str, Example]] = []
    for index, row in enumerate(split.train.rows):
        key = normalize_prompt(row.prompt)
        if key not in seen and row.meta.get("functional_category") != _CONTEXTUAL:
            seen.add(key)
            candidates.append((str(row.meta.get("id") or f"{dataset}:train:{index}"), row))
    if n > len(candidates):
        raise ConfigError(f"n_anchors={n}, but the train half of {dataset!r} has {len(candidates)} distinct "
                          "non-contextual prompts; lower n_anchors or choose another anchor_dataset.")
    picked = [candidates[i] for i in sorted(random.Random(seed).sample(range(len(candidates)), n))]
    protocol = GenerationProtocol(max_new_tokens=max_new_tokens, dtype=loaded.dtype, seed=seed)
    answers = generate_chat(loaded.model, loaded.tokenizer, [row.prompt for _, row in picked], protocol,
                            progress=(lambda done, total: progress("anchor refusals", done, total)) if progress
                            else None)
    anchors = [replace(row, response=answer.response) for (_, row), answer in zip(picked, answers, strict=True)]
    record = {"dataset": dataset, "split": "train", "source": split.train.source, "train_sha256": split.train_sha256,
              "seed": seed, "n": n, "ids": [anchor_id for anchor_id, _ in picked],
              "sha256": sha256_json([anchor.to_dict() for anchor in anchors]), "protocol": protocol.to_dict(),
              "hit_length_limit": sum(answer.finish_reason == "length" for answer in answers)}
    return anchors, record


def _role_folder(role: str, ref: str) -> Path:
    """A role's local folder: a PEFT adapter folder as is, any other reference through ``resolve_model``."""
    from safetypatch.patch.artifact import ADAPTER_CONFIG

    path = Path(ref).expanduser()
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return path
    try:
        return resolve_model(ref).path
    except ModelError as exc:
        raise ModelError(f"{role} {ref!r}: {exc}") from exc
