"""Refusal-SFT: train a LoRA safety patch (or the full-parameter baseline) with TRL's ``SFTTrainer``
(docs/methods.md §3.1; Mou et al., arXiv 2510.09004; Xue & Mirzasoleiman, arXiv 2507.17075).

A thin layer over TRL: the data arrive tokenised with a completion mask (``examples.tokenize_examples``), TRL
builds the labels with ``completion_only_loss=True`` set explicitly and packing off, and the loss is computed by
:mod:`safetypatch.train.loss` at supervised positions only (plus β Σ R when the overlap regulariser is on).

Under ``accelerate launch`` Trainer distributes the run (DDP, FSDP, DeepSpeed; :mod:`safetypatch.train.distributed`).
Batches are grouped by length over the global batch, so one process with batch 4 and two with batch 2 each train on
the same batches with the same loss curve.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from safetypatch.errors import ConfigError, DataError
from safetypatch.train.checkpoints import Checkpointing
from safetypatch.train.distributed import Launch, export_if_sharded, launch_of, resolve_precision
from safetypatch.train.examples import TokenizedExample, check_supervision, end_of_turn_ids, refusal_openings
from safetypatch.train.recipes import PatchRecipe
from safetypatch.train.regularizer import OverlapRegularizer
from safetypatch.train.representation import (
    RefusalDirection,
    fit_direction,
    prompt_states,
    targets,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainProgress:
    """One progress report, sent after every optimiser step.

    Attributes:
        step: optimiser steps done.
        max_steps: total optimiser steps planned.
        loss: training loss of the step (CE plus β Σ R).
        epoch: fractional epoch.
    """

    step: int
    max_steps: int
    loss: float
    epoch: float


@dataclass(frozen=True)
class TrainResult:
    """What a refusal-SFT run produced and measured (recorded in the patch manifest).

    Attributes:
        model: the trained model (a PEFT model in LoRA mode, the fine-tuned model in full mode), unwrapped from any
            distributed wrapper; after FSDP or DeepSpeed its parameters may be shards: save from ``exported``.
        loss_history: (step, loss) after every optimiser step (the loss of the global batch, on every process).
        steps: optimiser steps done.
        seconds: wall time of the training loop.
        tokens_per_second: input tokens (padding excluded) of all processes per second of training.
        supervised_fraction: share of tokens that carry a label (§3.1 step 4).
        regularizer: final R per penalised module (empty without the regulariser).
        launch: how the run was distributed and its precision.
        refusal_openings: the token ids the retain unlikelihood term pushes down (empty when it is off).
        unlikelihood_examples: retain examples that term applies to (those whose own answer opens otherwise).
        distilled_examples: retain examples trained by KL from the unpatched model (recipe ``retain_loss='kl'``).
        refusal_direction: the representation term's layers and unpatched harmful and benign mean projections (empty
            when the term is off).
        exported: on the main process of an FSDP or DeepSpeed run, the folder Trainer gathered the trained weights
            into (a PEFT adapter folder in LoRA mode, a model folder in full mode); None otherwise.
        resumed_from_step: the step of the checkpoint the run continued from (0: it trained from the start);
            ``seconds`` and ``tokens_per_second`` then cover the steps after it.
    """

    model: Any = field(repr=False, compare=False)
    loss_history: tuple[tuple[int, float], ...]
    steps: int
    seconds: float
    tokens_per_second: float
    supervised_fraction: float
    regularizer: dict[str, float] = field(default_factory=dict)
    launch: Launch = field(default_factory=lambda: Launch("NO", 1, "fp32"))
    refusal_openings: tuple[int, ...] = ()
    unlikelihood_examples: int = 0
    distilled_examples: int = 0
    refusal_direction: dict[str, Any] = field(default_factory=dict)
    exported: Path | None = None
    resumed_from_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The training block of a manifest (everything but the model and the export folder)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "exported")}
        out["loss_history"] = [list(pair) for pair in self.loss_history]
        out["regularizer"] = dict(self.regularizer)
        out["launch"] = self.launch.to_dict()
        out["refusal_openings"] = list(self.refusal_openings)
        return out


def train_refusal_patch(
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[TokenizedExample],
    recipe: PatchRecipe,
    output_dir: Path,
    callbacks: Sequence[Any] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    checkpoints: Checkpointing | None = None,
) -> TrainResult:
    """Train a refusal patch on ``model`` (docs/methods.md §3.1 steps 4-6, §3.2 when ``recipe.regularizer`` is set).

    Args:
        model: the patch base (a transformers causal LM, fp32 on CPU). LoRA mode wraps it in a PEFT model (its
            weights stay frozen); full mode trains it in place.
        tokenizer: its tokenizer (pad id used for padding; labels are masked by position, not by pad id).
        train_examples: output of :func:`safetypatch.train.examples.tokenize_examples`.
        recipe: the recipe; ``max_length`` must already have been applied when tokenising.
        output_dir: the trainer's working folder (save the patch with :func:`safetypatch.patch.artifact.save_patch`).
            After FSDP or DeepSpeed, the main process finds the gathered weights in ``output_dir / "trained"``
            (``TrainResult.exported``).
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. early stopping).
        progress: called with a :class:`TrainProgress` after every optimiser step.
        checkpoints: where Trainer saves checkpoints and how often, and the one it resumes from
            (:mod:`safetypatch.train.checkpoints`); None: no checkpoints. A resumed run's loss history starts at the
            first step, as an uninterrupted run's.

    Returns:
        A :class:`TrainResult` holding the trained model.

    Raises:
        DataError: no examples, or a §3.1 runtime assertion fails on the labels TRL built.
        ConfigError: the recipe's modules or layer range do not fit the model, or its precision contradicts the
            launcher's.
    """
    trainer = make_trainer(model, tokenizer, train_examples, recipe, output_dir, callbacks, progress, checkpoints)
    resume_from = checkpoints.resume_from if checkpoints is not None else None
    fraction = check_supervision(trainer.train_dataset["labels"], end_of_turn_ids(tokenizer),
                                 [ex.ends_turn for ex in train_examples])
    with _cpu_threads():
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        seconds = time.perf_counter() - start
    final_r = {}
    if trainer.regularizer is not None:
        with torch.no_grad():
            final_r = {name: float(value) for name, value in trainer.regularizer.per_module().items()}
    exported = export_if_sharded(trainer, Path(output_dir) / "trained")
    tokens = float(trainer.accelerator.reduce(torch.tensor(float(trainer.tokens_seen), device=trainer.args.device),
                                              reduction="sum"))
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    return TrainResult(
        model=trained, loss_history=tuple(trainer.recorder.history), steps=trainer.state.global_step,
        seconds=seconds, tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        supervised_fraction=fraction, regularizer=final_r, launch=launch_of(trainer),
        refusal_openings=trainer.openings, unlikelihood_examples=int(sum(trainer.train_dataset["unlikely"])),
        distilled_examples=int(sum(trainer.train_dataset["distill"])),
        refusal_direction=trainer.direction.to_dict() if trainer.direction is not None else {},
        exported=exported, resumed_from_step=trainer.recorder.resumed_from,
    )


def make_trainer(
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[TokenizedExample],
    recipe: PatchRecipe,
    output_dir: Path,
    callbacks: Sequence[Any] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    checkpoints: Checkpointing | None = None,
) -> Any:
    """The configured ``SFTTrainer`` subclass of :func:`train_refusal_patch`, before training (arguments as there).

    Its ``train_dataset`` holds the labels TRL built, ``model`` the PEFT (or full) model, ``regularizer`` the
    overlap regulariser or None, and ``recorder.history`` fills with (step, loss) while it trains.

    Raises:
        DataError: no examples.
        ConfigError: the recipe's modules or layer range do not fit the model, its precision contradicts the
            launcher's, or it has the overlap regulariser under FSDP or DeepSpeed.
    """
    if not train_examples:
        raise DataError("train_refusal_patch: no training examples; build some with tokenize_examples.")
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed

    from safetypatch.train.trainer import RefusalSFTTrainer

    set_seed(recipe.seed)
    direction, columns = _refusal_direction(model, train_examples, recipe)
    model = _prepare_model(model, recipe)
    openings = refusal_openings(train_examples) if recipe.retain_unlikelihood > 0 else ()
    dataset = Dataset.from_dict({
        **columns,
        "input_ids": [list(ex.input_ids) for ex in train_examples],
        "completion_mask": [list(ex.completion_mask) for ex in train_examples],
        "loss_weight": [ex.weight for ex in train_examples],
        "unlikely": [bool(openings) and ex.kind == "retain" and ex.first_completion_id not in openings
                     for ex in train_examples],
        "distill": [recipe.retain_loss == "kl" and ex.kind == "retain" for ex in train_examples],
    })
    regularizer = None
    if recipe.regularizer is not None:
        regularizer = OverlapRegularizer(model, recipe.regularizer, seed=recipe.seed)
    recorder = _recorder_class()(progress)
    with _quiet_datasets():
        trainer = RefusalSFTTrainer(
            model=model, args=_sft_config(recipe, output_dir, checkpoints), train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=_WeightedCollator(_pad_id(tokenizer)), callbacks=[recorder, *(callbacks or [])],
            regularizer=regularizer, lead=(recipe.lead_tokens, recipe.lead_weight),
            unlikelihood=(openings, recipe.retain_unlikelihood),
            representation=(direction, recipe.representation_weight),
        )
    if regularizer is not None and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ConfigError("the overlap regulariser reads the LoRA factors and W_0 directly, which FSDP and DeepSpeed "
                          "shard or recast; train a regularised recipe in one process or with DDP (accelerate "
                          "preset multi_gpu).")
    if openings and not any(dataset["unlikely"]):
        logger.warning("retain_unlikelihood=%g has no effect: every retain answer opens with a refusal opening %s",
                       recipe.retain_unlikelihood, list(openings))
    trainer.remove_callback(PrinterCallback)  # library code reports through `progress`, never stdout
    trainer.recorder = recorder
    return trainer


def _refusal_direction(model: Any, examples: Sequence[TokenizedExample],
                       recipe: PatchRecipe) -> tuple[RefusalDirection | None, dict[str, list[Any]]]:
    """The unpatched model's refusal direction and the representation term's per-example columns (``rep_target``,
    ``rep_harmful``), or (None, {}) when the term is off."""
    if recipe.representation_weight == 0:
        return None, {}
    layers = recipe.steered_layers(model.config.get_text_config().num_hidden_layers)
    harmful = torch.tensor([ex.kind == "refusal" for ex in examples])
    was_training = model.training
    model.eval()
    states = prompt_states(model, examples, layers)
    model.train(was_training)
    direction = fit_direction(states, harmful, layers)
    logger.info("refusal direction at layers %s: harmful mean %s, benign mean %s", list(layers),
                direction.harmful_mean.tolist(), direction.benign_mean.tolist())
    return direction, {"rep_target": targets(direction, states, harmful).tolist(), "rep_harmful": harmful.tolist()}


def lora_config(recipe: PatchRecipe, num_layers: int) -> Any:
    """The PEFT ``LoraConfig`` of a recipe for a model with ``num_layers`` blocks (docs/methods.md §3.1 step 6)."""
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout, use_rslora=recipe.use_rslora,
        target_modules=list(recipe.target_modules), layers_to_transform=recipe.layers(num_layers),
        bias="none", task_type="CAUSAL_LM",
    )


def _prepare_model(model: Any, recipe: PatchRecipe) -> Any:
    if recipe.mode == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    num_layers = model.config.get_text_config().num_hidden_layers
    try:
        return get_peft_model(model, lora_config(recipe, num_layers))
    except ValueError as exc:
        raise ConfigError(f"recipe targets {list(recipe.target_modules)} in layers {recipe.layers(num_layers)}, "
                          f"which {type(model).__name__} does not have ({exc}). Use its module names "
                          "(e.g. q_proj, up_proj) and a layer range inside the model.") from exc


def _sft_config(recipe: PatchRecipe, output_dir: Path, checkpoints: Checkpointing | None = None) -> Any:
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    precision = resolve_precision(recipe.precision)
    every = checkpoints.every if checkpoints is not None else None
    # The newest checkpoint is kept; Trainer removes the one before only once the new one is complete.
    saving = dict(save_strategy="steps", save_steps=every, save_total_limit=1) if every else dict(save_strategy="no")
    return SFTConfig(
        output_dir=str(checkpoints.folder if checkpoints is not None else output_dir), completion_only_loss=True,
        packing=False,
        # Examples arrive truncated from the left of the prompt; TRL's own truncation would cut the completion.
        max_length=None,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate, lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
        num_train_epochs=recipe.num_train_epochs, max_steps=recipe.max_steps,
        seed=recipe.seed, data_seed=recipe.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        activation_checkpointing=recipe.gradient_checkpointing,
        # Batches of similar length: random batches of refusal and retain examples waste ~47% of the tokens on
        # padding (SmolLM2, the default sets); megabatches are still shuffled. Grouped over the global batch
        # (RefusalSFTTrainer._get_train_sampler).
        train_sampling_strategy="group_by_length",
        logging_steps=1, report_to="none", dataloader_num_workers=0, disable_tqdm=True, **saving,
    )


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return pad


class _WeightedCollator:
    """TRL's language-modelling collator (right padding, labels −100 on padding by position) plus loss weights."""

    def __init__(self, pad_token_id: int) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{k: ex[k] for k in ("input_ids", "labels")} for ex in examples])
        batch["loss_weight"] = torch.tensor([float(ex["loss_weight"]) for ex in examples])
        batch["unlikely"] = torch.tensor([bool(ex["unlikely"]) for ex in examples])
        batch["distill"] = torch.tensor([bool(ex["distill"]) for ex in examples])
        if "rep_target" in examples[0]:
            batch["rep_target"] = torch.tensor([ex["rep_target"] for ex in examples])
            batch["rep_harmful"] = torch.tensor([bool(ex["rep_harmful"]) for ex in examples])
        return batch


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars while TRL prepares the data (the previous state is restored)."""
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


@contextlib.contextmanager
def _cpu_threads() -> Iterator[None]:
    """Use every core this process may run on while training (restored afterwards); ``OMP_NUM_THREADS`` wins.

    On a shared machine, more threads than free cores makes OpenMP spin and can slow tiny models tenfold.
    """
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    requested = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(requested) if requested.isdigit() and int(requested) > 0 else cores)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _recorder_class() -> type:
    from transformers import TrainerCallback

    class _Recorder(TrainerCallback):
        """Keeps the loss of every step (those before the checkpoint a run resumes from included) and forwards
        progress."""

        def __init__(self, progress: Callable[[TrainProgress], None] | None) -> None:
            self.progress = progress
            self.history: list[tuple[int, float]] = []
            self.resumed_from = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.resumed_from = state.global_step
            self.history = [(log["step"], float(log["loss"])) for log in state.log_history if "loss" in log]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.history.append((state.global_step, float(logs["loss"])))
                if self.progress is not None:
                    self.progress(TrainProgress(state.global_step, state.max_steps, float(logs["loss"]),
                                                float(state.epoch or 0.0)))

    return _Recorder
