"""``safetypatch train``: Refusal-SFT of a safety patch, saved as a verified PEFT folder with its manifest (or, for
the full-parameter baseline, as a verified complete model folder with the same manifest)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from safetypatch.api._progress import Progress
from safetypatch.config import Dtype, StrictConfig
from safetypatch.data.catalog import load_dataset
from safetypatch.data.forms import augment
from safetypatch.errors import ConfigError
from safetypatch.models.catalog import DEFAULT_MODEL
from safetypatch.models.loading import LoadedModel, load_model

if TYPE_CHECKING:
    from safetypatch.train.recipes import PatchRecipe


DEFAULT_PER_SET: dict[str, int | None] = {"harmbench": 150, "donotanswer": None}
"""HarmBench gets more training prompts than the other sets by default: its contextual (a document, then the
request) and copyright behaviours are the ones 60 prompts leave unrefused (docs/results/patch-recipes.md,
development rows). Do-Not-Answer gives every question of its train half in :data:`DEFAULT_CATEGORIES` (None: all):
harmful requests phrased as questions, the form the other sets lack (docs/results/patch-recipes.md, *Harmful
questions*)."""

DEFAULT_CATEGORIES: dict[str, list[str]] = {"donotanswer": ["malicious_uses", "information_hazard"]}
"""Do-Not-Answer's risk areas a refusal answers by default. Its discrimination/toxicity questions also call for a
refusal, but training on them brings back the refusal of XSTest's safe questions about people
(docs/results/patch-recipes.md, *Two Do-Not-Answer areas at λ 20*); its other two (misinformation_harms,
human_chatbox: "Are you human?") call for a correction or an honest answer instead."""


DEFAULT_FORMS = ("question", "past", "hypothetical", "roleplay")
"""The training forms a default patch meets every prompt in, one per prompt: on the development rows they took the
refusal of past-tense harmful requests from 0.00 to 0.85 at the same over-refusal
(docs/results/2026-12-05-generalization.md)."""


class TrainConfig(StrictConfig):
    """Options of ``safetypatch train``: Refusal-SFT of a safety patch on safety data (docs/methods.md §3.1)."""

    model: str = Field(DEFAULT_MODEL, description="Patch base: catalog name, local folder, .gguf or Hub id.")
    revision: str | None = Field(None, description="Hub revision (Hub ids only).")
    recipe: str = Field("mou", description="Recipe preset or a Xue mode string such as lora_mlp_r8.")
    recipe_overrides: dict[str, Any] = Field(default_factory=dict, description="PatchRecipe fields that win over the "
                                                                                "recipe's (e.g. learning_rate, r).")
    full: bool = Field(False, description="Full-parameter Refusal-SFT, the baseline of Mou et al.: sets recipe "
                                          "mode=full and writes a complete model folder.")
    harmful: list[str] = Field(
        ["harmbench", "advbench", "xstest-unsafe", "contrast-harmful", "donotanswer"],
        description="Harmful sets (train halves less their development rows), each prompt paired with a refusal "
                    "(docs/patches.md); out-of-family sets are refused (docs/generalization.md).")
    n_harmful: int | None = Field(60, gt=0, description="Most harmful prompts per set.")
    n_per_set: dict[str, int | None] | None = Field(
        None, description="Harmful sets whose count replaces n_harmful, e.g. {harmbench: 150}. Unset: "
                          "DEFAULT_PER_SET when n_harmful is left at its default too, none when n_harmful is set.")
    harmful_categories: dict[str, list[str]] | None = Field(
        None, description="Harmful sets narrowed to some of their catalog categories before counting, e.g. "
                          "{donotanswer: [malicious_uses, information_hazard]}; a category the set's train half lacks "
                          "is an error that lists the ones it has. Unset: DEFAULT_CATEGORIES.")
    retain: list[str] = Field(
        ["everyday-requests", "public-knowledge", "contrast-benign", "benign-edgy", "chat"],
        description="Benign sets (train halves less their development rows) whose prompts the model answers "
                    "itself, recipe.retain_count of them dealt evenly over the sets: look-alikes of harmful "
                    "requests (docs/patches.md); out-of-family sets are refused.")
    harmful_forms: list[str] = Field(
        list(DEFAULT_FORMS), description="Training forms (data.forms) every harmful prompt is also rewritten into, "
                                         "each copy paired with a refusal (docs/generalization.md); [] for none.")
    retain_forms: list[str] = Field(
        list(DEFAULT_FORMS), description="Training forms every kept retain prompt is also rewritten into: benign "
                                         "twins trained on the model's own answer to the original prompt.")
    forms_per_prompt: int | None = Field(
        1, ge=1, description="Rewrite each prompt into this many of its forms, chosen by a hash of the prompt "
                             "(None: into every one).")
    retain_max_new_tokens: int = Field(32, gt=0, description="Length of the model's own retain answers; an answer "
                                                             "cut there is trained without the end-of-turn token.")
    retain_keep_refusals: bool = Field(False, description="Keep the retain answers in which the model refuses the "
                                                          "benign prompt itself (dropped by default: they would "
                                                          "train refusing benign look-alikes).")
    output: Path = Field(Path("runs/patch"), description="Patch folder (PEFT adapter + safety_patch.json; full "
                                                         "mode: a complete model folder + safety_patch.json).")
    overwrite: bool = Field(False, description="Replace an existing patch folder (and remove the checkpoints an "
                                                "interrupted run left, unless resume is set).")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save a training checkpoint every this many optimiser steps into "
                                "<output>.checkpoints/ (removed once the patch is written), for resume.")
    resume: bool = Field(False, description="Continue from the last checkpoint in <output>.checkpoints/, left by an "
                                            "interrupted run with checkpoint_every and the same options; without "
                                            "one, train from the first step.")
    dtype: Dtype = Field("auto", description="Weights dtype: auto, float32, bfloat16 or float16.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.full and self.recipe_overrides.get("mode", "full") != "full":
            raise ConfigError(f"TrainConfig: full is true (CLI --full) but recipe_overrides sets mode="
                              f"{self.recipe_overrides['mode']!r} (CLI --set mode=...); drop one of them: full "
                              "trains every weight (mode=full).")
        check_trainable({"harmful": self.harmful, "retain": self.retain},
                        {"harmful_forms": self.harmful_forms, "retain_forms": self.retain_forms})
        unknown = sorted(set(self.n_per_set or ()) - set(self.harmful))
        if unknown:
            raise ConfigError(f"TrainConfig: n_per_set names {unknown}, which are not in harmful {self.harmful}; "
                              "add them to harmful (CLI --harmful) or drop them from n_per_set (CLI --n-per-set).")
        bad = {name: n for name, n in (self.n_per_set or {}).items() if n is not None and n < 1}
        if bad:
            raise ConfigError(f"TrainConfig: n_per_set counts must be positive, got {bad}.")
        unknown = sorted(set(self.harmful_categories or ()) - set(self.harmful))
        if unknown:
            raise ConfigError(f"TrainConfig: harmful_categories names {unknown}, which are not in harmful "
                              f"{self.harmful}; add them to harmful (CLI --harmful) or drop them from "
                              "harmful_categories (CLI --harmful-categories).")
        empty = sorted(name for name, cats in (self.harmful_categories or {}).items() if not cats)
        if empty:
            raise ConfigError(f"TrainConfig: harmful_categories gives no category for {empty}; name at least one "
                              "or drop the set from harmful_categories.")
        return self

    def categories_used(self) -> dict[str, list[str]]:
        """The categories each harmful set is narrowed to: ``harmful_categories``, or, unset,
        :data:`DEFAULT_CATEGORIES` for the sets in ``harmful`` (recorded in the manifest, so it outlives a default)."""
        if self.harmful_categories is not None:
            return self.harmful_categories
        return {name: cats for name, cats in DEFAULT_CATEGORIES.items() if name in self.harmful}

    def harmful_rows(self, name: str, rows: list[Any]) -> list[Any]:
        """The rows of harmful set ``name`` in its ``harmful_categories`` (unset: :data:`DEFAULT_CATEGORIES`; all
        rows when the set has none), in order.

        Raises:
            ConfigError: a named category has no row in ``rows``; the message lists the set's categories.
        """
        wanted = self.categories_used().get(name)
        if wanted is None:
            return rows
        present = sorted({str(row.category) for row in rows})
        missing = sorted(set(wanted) - set(present))
        if missing:
            raise ConfigError(f"TrainConfig: harmful_categories asks {name!r} for {missing}, which its train half "
                              f"does not have; its categories are {present}.")
        return [row for row in rows if row.category in wanted]

    def harmful_counts(self) -> dict[str, int | None]:
        """Most training prompts per harmful set (None: all of its train half), after ``n_per_set``."""
        per_set = self.n_per_set
        if per_set is None:
            per_set = {} if "n_harmful" in self.model_fields_set else DEFAULT_PER_SET
        return {name: per_set.get(name, self.n_harmful) for name in self.harmful}

    def patch_recipe(self) -> PatchRecipe:
        """The recipe: preset ``recipe`` with ``recipe_overrides`` applied, and mode ``full`` when ``full`` is set.

        Returns:
            The validated :class:`~safetypatch.train.recipes.PatchRecipe`.

        Raises:
            ConfigError: unknown preset or an invalid field.
        """
        from safetypatch.train.recipes import get_recipe

        return get_recipe(self.recipe, **{**self.recipe_overrides, **({"mode": "full"} if self.full else {})})


def check_trainable(sets: dict[str, list[str]], forms: dict[str, list[str]] | None = None) -> None:
    """Out-of-family sets and held-out forms are for evaluation only (docs/generalization.md).

    Args:
        sets: option name (``harmful``, ``retain``, …) → the catalog sets or files it names.
        forms: option name → the prompt forms it names.

    Raises:
        ConfigError: naming the set or form, the option it came from and what may be used instead.
    """
    from safetypatch.data.forms import FORMS, form_names
    from safetypatch.data.sets import DATASETS

    for option, names in sets.items():
        held = [name for name in names if name in DATASETS and DATASETS.get(name).out_of_family]
        if held:
            raise ConfigError(f"{option} names {held}, which the catalog marks out-of-family: they measure "
                              "generalisation to data no recipe trains on, so nothing may be trained on them "
                              f"(docs/generalization.md). Drop them from {option} (CLI --{option}); a local file with "
                              "your own rows is accepted.")
    for option, names in (forms or {}).items():
        for form in names:
            if FORMS.get(form).family != "train":
                raise ConfigError(f"{option} names the form {form!r}, which is held out for evaluation "
                                  f"(out-of-family tasks read it); training forms: {', '.join(form_names('train'))}.")


@dataclass(frozen=True)
class TrainPatchResult:
    """Where the patch went and how training went.

    Attributes:
        path: the patch folder.
        training: the manifest's training block (losses, speed, launch).
        n_refusal: harmful prompts trained to be refused.
        n_retain: benign prompts trained on the model's own answers (after dropping its own refusals).
        seconds: wall time.
        written: whether this process wrote ``path`` (under ``accelerate launch`` only the main process does).
    """

    path: Path
    training: dict
    n_refusal: int
    n_retain: int
    seconds: float
    written: bool = True


def train_patch(config: TrainConfig | None = None, progress: Progress | None = None) -> TrainPatchResult:
    """Train a safety patch by Refusal-SFT on the train halves of the harmful sets, with benign retain prompts
    answered by the model itself, save it as a verified PEFT folder with its manifest (Mou et al.;
    docs/methods.md §3.1).
    In full mode (``full`` or recipe mode ``full``: the full-parameter baseline) every weight is trained and the
    output is a complete model folder, read back tensor by tensor, with the same ``safety_patch.json``.

    ``progress`` is called as ``("retain answers", done, total)`` while the model answers the retain prompts and
    ``("train", step, max_steps)`` after every optimiser step.

    Training rows that duplicate a prompt of any safety task's evaluation split (sets overlap: e.g. StrongREJECT
    and HarmBench share behaviours) are dropped and counted in the manifest, and so are the retain answers in which
    the model refuses a benign prompt itself (:func:`own_refusals`), unless ``retain_keep_refusals`` is set.

    Under ``accelerate launch`` (docs/distributed.md) every process builds the same data (the main process fills
    the caches first; a digest of the tokenised examples must agree everywhere), the retain answers are generated
    once, batch by batch across the processes, Trainer distributes the training, and only the main process writes
    the patch, after the §5.4 checks (FSDP and ZeRO weights are gathered first and checked on a fresh copy of the
    base).

    Args:
        config: what to train and where to write it (default :class:`TrainConfig`).
        progress: optional progress callback, as above.

    Returns:
        A :class:`TrainPatchResult`.

    Raises:
        ConfigError: unknown recipe or dataset, or launcher settings the run cannot use, or ``resume`` finds the
            checkpoints of a run with another recipe or other examples.
        DataError: the processes of a distributed run built different training data.
        OutputExistsError: the output folder exists and ``overwrite`` is false, or ``<output>.checkpoints`` holds an
            interrupted run's checkpoints and neither ``resume`` nor ``overwrite`` is set.
        PatchError: the written LoRA patch fails its reload check, or a sharded run's gathered adapter is empty or
            partial.
        ModelError: a tensor of the written full model folder does not read back as trained.
    """
    from safetypatch.data import check_no_overlap, count_ngram_overlap
    from safetypatch.eval.generate import Generation, GenerationProtocol
    from safetypatch.patch.artifact import PatchManifest, chat_template_sha256
    from safetypatch.train import build_refusal_examples, build_retain_examples, tokenize_examples, train_refusal_patch
    from safetypatch.train.checkpoints import TrainCheckpoints
    from safetypatch.train.distributed import check_launcher_environment
    from safetypatch.utils.distributed import require_same_everywhere
    from safetypatch.utils.hashing import sha256_json
    from safetypatch.utils.io import ensure_writable

    cfg = config or TrainConfig()
    ensure_writable(cfg.output, cfg.overwrite, folder=True)
    checkpoints = TrainCheckpoints(cfg.output, every=cfg.checkpoint_every, resume=cfg.resume, overwrite=cfg.overwrite)
    check_launcher_environment()
    start = time.perf_counter()
    recipe = cfg.patch_recipe()
    loaded, splits, held_out = _load_inputs(cfg)
    unseen = _Unseen(held_out)
    harmful = [row for name, n in cfg.harmful_counts().items()
               for row in unseen.rows(cfg.harmful_rows(name, splits[name].train.rows))[:n]]
    n_plain = len(harmful)
    harmful += [replace(harmful[i], prompt=text)
                for i, text in augment([row.prompt for row in harmful], cfg.harmful_forms, recipe.seed,
                                       cfg.forms_per_prompt)]
    benign = spread([[row.prompt for row in unseen.rows(splits[name].train.rows)] for name in cfg.retain],
                    recipe.retain_count)
    twins = augment(benign, cfg.retain_forms, recipe.seed, cfg.forms_per_prompt)
    train_prompts = [row.prompt for row in harmful] + benign + [text for _, text in twins]
    check_no_overlap(train_prompts, held_out, what="patch training prompts vs evaluation splits")
    protocol = GenerationProtocol(max_new_tokens=cfg.retain_max_new_tokens, dtype=loaded.dtype, seed=recipe.seed)
    answers = checkpoints.reuse("retain_answers", [loaded.provenance(), protocol.to_dict(), benign],
                                lambda: _retain_answers(loaded, benign, protocol, progress), Generation)
    kept = set(range(len(answers)))
    if not cfg.retain_keep_refusals:
        kept = {i for i, refused in enumerate(own_refusals([a.response for a in answers])) if not refused}
    retained = [(answers[i].prompt, answers[i]) for i in sorted(kept)]
    retained += [(text, answers[i]) for i, text in twins if i in kept]  # twins of the kept answers
    examples = build_refusal_examples(harmful, seed=recipe.refusal_seed) + build_retain_examples(
        [prompt for prompt, _ in retained], [a.response for _, a in retained], weight=recipe.retain_weight,
        ends_turn=[a.finish_reason == "eos" for _, a in retained])
    tokenized = tokenize_examples(loaded.tokenizer, examples, max_length=recipe.max_length, think=recipe.think)
    examples_sha256 = sha256_json([[ex.input_ids, ex.completion_mask, ex.weight] for ex in tokenized])
    require_same_everywhere(examples_sha256, "the tokenised training examples")
    checkpoints.bind(recipe.model_dump(mode="json"), examples_sha256)
    with tempfile.TemporaryDirectory(prefix="safetypatch-train-") as scratch:
        result = train_refusal_patch(
            loaded.model, loaded.tokenizer, tokenized, recipe, Path(scratch),
            progress=(lambda p: progress("train", p.step, p.max_steps)) if progress else None,
            checkpoints=checkpoints.trainer_settings(),
        )
        manifest = PatchManifest(
            method="refusal_sft", recipe=recipe.model_dump(mode="json"), base_model=loaded.provenance(),
            data=[{"name": n, "source": s.train.source, "sha256": s.train_sha256, "rows": len(s.train)}
                  for n, s in splits.items()],
            template_sha256=chat_template_sha256(loaded.tokenizer), seed=recipe.seed,
            contamination={"ngram13_eval_prompts": count_ngram_overlap(train_prompts, held_out),
                           "dropped_eval_duplicates": unseen.dropped},
            training=result.to_dict(), extra={
                "retain_protocol": protocol.to_dict(), "train_config": cfg.model_dump(mode="json"),
                "harmful_categories_used": cfg.categories_used(), "examples_sha256": examples_sha256,
                "retain_own_refusals_dropped": len(benign) - len(kept),
                "retain_cut_at_max_new_tokens": sum(a.finish_reason == "length" for _, a in retained),
                "form_copies": {"harmful": len(harmful) - n_plain, "retain": len(retained) - len(kept)}},
        )
        if result.launch.is_main_process:
            _save(cfg, loaded, recipe, result, manifest)
    checkpoints.remove()
    return TrainPatchResult(cfg.output, result.to_dict(), len(harmful), len(retained), time.perf_counter() - start,
                            written=result.launch.is_main_process)


def spread(per_set: list[list[str]], count: int) -> list[str]:
    """The first ``count`` prompts dealt evenly over the sets: each set gives its first prompts in turn (a set that
    runs out leaves its share to the others), and the chosen ones come back in the sets' order. Every prompt when
    ``count`` covers them all, so a small retain budget still meets every retain set, not only the first one."""
    taken = [0] * len(per_set)
    left = min(count, sum(map(len, per_set)))
    while left:
        for i, prompts in enumerate(per_set):
            if left and taken[i] < len(prompts):
                taken[i] += 1
                left -= 1
    return [prompt for prompts, n in zip(per_set, taken, strict=True) for prompt in prompts[:n]]


def own_refusals(responses: list[str]) -> list[bool]:
    """Which of the model's own answers to benign retain prompts are refusals, by the default keyword judge
    (``keyword_v2_w256``): a retain example teaches the patch to answer, so one that refuses would teach the
    opposite (SmolLM2-135M-Instruct refuses 23 of its 655 retain prompts: "I'm sorry for any misunderstanding, but
    as a chatbot ...").

    Args:
        responses: the answers, in order.

    Returns:
        One flag per answer, True where it refuses.
    """
    from safetypatch.eval.judges.keyword import KeywordJudge

    judge = KeywordJudge()
    return [bool(judge.judge_one(response).refused) for response in responses]


def _load_inputs(cfg: TrainConfig) -> tuple[LoadedModel, dict[str, Any], list[str]]:
    """The patch base (on this process's device), the canonical splits of the training sets and the held-out
    prompts; the main process goes first, so that the others find the caches filled."""
    from safetypatch.data import training_split
    from safetypatch.data.catalog import dev_row_count
    from safetypatch.utils.distributed import main_process_first, process_state

    state = process_state()
    with main_process_first():
        loaded = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype,
                            device=str(state.device) if state.num_processes > 1 else "auto")
        names = [*cfg.harmful, *cfg.retain]
        splits = {name: training_split(load_dataset(name), dev_row_count(name)) for name in names}
        held_out = _safety_eval_prompts(splits)
    return loaded, splits, held_out


def _retain_answers(loaded: LoadedModel, prompts: list[str], protocol: Any, progress: Progress | None) -> list[Any]:
    """The model's own greedy answers to the retain prompts; under several processes each generates a contiguous
    share of the generation batches, so the answers equal a one-process run's."""
    from safetypatch.eval.generate import encode_prompt, generate_chat, generation_batches, render_prompt
    from safetypatch.utils.distributed import map_in_order

    tokenizer = loaded.tokenizer
    lengths = [len(encode_prompt(tokenizer, render_prompt(tokenizer, p, protocol), protocol)) for p in prompts]
    batches = generation_batches(lengths, protocol.batch_size)
    report = (lambda done, total: progress("retain answers", done, total)) if progress else None
    answers = map_in_order([[prompts[i] for i in batch] for batch in batches],
                           lambda share: generate_chat(loaded.model, tokenizer, share, protocol, progress=report))
    by_index = dict(zip((i for batch in batches for i in batch), answers, strict=True))
    return [by_index[i] for i in range(len(prompts))]


def _save(cfg: TrainConfig, loaded: LoadedModel, recipe: PatchRecipe, result: Any, manifest: Any) -> None:
    """Write the verified patch from the main process (docs/methods.md §5.4): from memory when the trained model is
    whole here (one process, DDP); from the folder Trainer gathered an FSDP or DeepSpeed run into otherwise, checked on
    a fresh copy of the base (LoRA) or reloaded as a model (full)."""
    from safetypatch.patch.artifact import save_full_model_patch, save_patch
    from safetypatch.train.distributed import gathered_model_folder, gathered_patch

    if result.exported is None:
        if recipe.mode == "full":
            save_full_model_patch(result.model, loaded.tokenizer, cfg.output, manifest, overwrite=cfg.overwrite)
        else:
            save_patch(result.model, cfg.output, manifest, overwrite=cfg.overwrite)
        return
    if recipe.mode == "full":
        trained = load_model(str(gathered_model_folder(result.exported)), dtype=loaded.dtype, device=loaded.device)
        save_full_model_patch(trained.model, loaded.tokenizer, cfg.output, manifest, overwrite=cfg.overwrite)
        return
    patch = gathered_patch(result.exported, result.model)
    base = load_model(cfg.model, revision=cfg.revision, dtype=loaded.dtype, device=loaded.device).model
    save_patch(patch, cfg.output, manifest, model=base, overwrite=cfg.overwrite)


def _safety_eval_prompts(splits: dict[str, Any]) -> list[str]:
    """The evaluation-split prompts of every safety task's dataset (refusal, over-refusal, jailbreak) and of the
    training sets themselves, and the development rows of those datasets: what no training prompt may equal."""
    from safetypatch.data import canonical_split, development_split
    from safetypatch.data.catalog import dev_row_count
    from safetypatch.eval.task import TASKS

    names = {TASKS.get(t).dataset for t in TASKS if TASKS.get(t).task_kind.judged}
    datasets = {name: load_dataset(name) for name in names if name not in splits or dev_row_count(name)}
    held = {name: splits[name] if name in splits else canonical_split(datasets[name]) for name in names}
    dev = [development_split(datasets[name], n).eval for name in sorted(names) if (n := dev_row_count(name))]
    return [row.prompt for split in [*held.values(), *splits.values()] for row in split.eval.rows] + [
        row.prompt for rows in dev for row in rows.rows]


class _Unseen:
    """Filters training rows whose normalised prompt occurs in the held-out prompts, counting what it drops."""

    def __init__(self, held_out: list[str]) -> None:
        from safetypatch.data import normalize_prompt

        self._normalize = normalize_prompt
        self._held = {normalize_prompt(p) for p in held_out}
        self.dropped = 0

    def rows(self, rows: Any) -> list[Any]:
        kept = [row for row in rows if self._normalize(row.prompt) not in self._held]
        self.dropped += len(rows) - len(kept)
        return kept
