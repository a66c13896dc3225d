"""The TRL trainer of Refusal-SFT (docs/methods.md §3.1): ``SFTTrainer`` with the loss at supervised positions only.

This module imports trl at module level; :mod:`safetypatch.train.refusal_sft` imports it only when it builds a
trainer, so importing the package stays free of trl.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTTrainer

from safetypatch.errors import ConfigError
from safetypatch.models.blocks import decoder_layers
from safetypatch.train.lean import lean_forward
from safetypatch.train.loss import IGNORE_INDEX, completion_loss, supervised_logits
from safetypatch.train.regularizer import OverlapRegularizer
from safetypatch.train.representation import RefusalDirection, capture, representation_loss


class RefusalSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss applies the LM head at supervised positions only, plus β Σ R and the retain
    unlikelihood term."""

    def __init__(self, *args: Any, regularizer: OverlapRegularizer | None = None,
                 lead: tuple[int, float] = (0, 1.0),
                 unlikelihood: tuple[tuple[int, ...], float] = ((), 0.0),
                 representation: tuple[RefusalDirection | None, float] = (None, 0.0), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direction, self.representation_weight = representation
        self.regularizer = regularizer
        self.lead = lead
        self.openings, self.unlikelihood_weight = unlikelihood
        self.tokens_seen = 0
        # Ask Trainer for the supervised-token count of the whole accumulated batch, so the CE is normalised
        # once per optimiser step whatever the accumulation (the loss below divides by it).
        self.model_accepts_loss_kwargs = True

    def train(self, *args: Any, **kwargs: Any) -> Any:
        # The lean forwards (train.lean: LoRA modules, gated MLPs) for the whole run, the recomputation of activation
        # checkpointing included; FSDP and DeepSpeed hold the weights themselves and keep the modules' own forwards.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        with contextlib.nullcontext(0) if sharded else lean_forward(self.model):
            return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "loss_weight", "unlikely", "distill", "rep_target",
                                       "rep_harmful"]

    def _get_train_sampler(self, train_dataset=None):
        # Trainer groups lengths per process and shuffles with the global RNG, for which accelerate substitutes
        # a generator of its own under several processes. Grouping over the global batch (every process's share
        # of one optimiser step) with a generator seeded by data_seed gives the same batches, and so the same
        # loss curve, whatever the number of processes.
        args = self.args
        return EpochReplayingSampler(
            args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            dataset=self.train_dataset if train_dataset is None else train_dataset, model_input_name="input_ids",
            generator=torch.Generator().manual_seed(args.data_seed if args.data_seed is not None else args.seed))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("loss_weight", None)
        unlikely = inputs.pop("unlikely", None)
        distill = inputs.pop("distill", None)
        rep_target, rep_harmful = inputs.pop("rep_target", None), inputs.pop("rep_harmful", None)
        labels = inputs.pop("labels")
        wrapped = self.is_fsdp_enabled or self.accelerator.unwrap_model(model) is not model
        distilled = distill is not None and bool(distill.any())
        if distilled and wrapped:
            raise ConfigError("retain_loss='kl' runs in one process for now: the unpatched teacher is the same "
                              "model with its adapter switched off, which a distributed wrapper does not expose. "
                              "Train without accelerate launch, or with retain_loss='ce'.")
        # The fast path calls the backbone and the LM head itself, around the autocast that accelerate wraps
        # the model's forward in: without this context bf16/fp16 would train in the weights' dtype (fp32 on a
        # CPU) while the manifest said bf16.
        steer = self.direction is not None and rep_target is not None
        reading = capture(decoder_layers(self.accelerator.unwrap_model(model)), self.direction.layers) if steer \
            else contextlib.nullcontext([])
        with self.accelerator.autocast():
            teacher = self._teacher_logits(model, inputs, labels, distill) if distilled else None
            with reading as states:
                loss, count = completion_loss(model, inputs, labels, weights, num_items_in_batch,
                                              lead_tokens=self.lead[0], lead_weight=self.lead[1],
                                              unlikely=unlikely, openings=self.openings,
                                              unlikelihood_weight=self.unlikelihood_weight, distill=distill,
                                              teacher_logits=teacher, wrapped=wrapped)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As SFTTrainer.compute_loss: num_items_in_batch counts every process's tokens while DDP averages
            # the gradients over the processes. The penalty below is the same on every process: not scaled.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if model.training else "eval"
        self._metrics[mode]["supervised_tokens"].append(float(count))
        if steer:
            positions = (labels[:, 1:] != IGNORE_INDEX).int().argmax(dim=1)
            term = representation_loss(states, positions, rep_target, rep_harmful, self.direction)
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.representation_weight * term / steps
            self._metrics[mode]["representation_term"].append(float(term.detach()))
        if self.regularizer is not None:
            penalty = self.regularizer()
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.regularizer.beta * penalty / steps
            self._metrics[mode]["overlap_penalty"].append(float(penalty.detach()))
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def _teacher_logits(self, model, inputs, labels, distill):
        """The unpatched model's logits (adapter off) at the supervised positions of the distilled rows."""
        rows = distill.to(torch.bool)
        sub = {key: value[rows] for key, value in inputs.items()}
        mask = labels[rows][:, 1:] != IGNORE_INDEX
        with model.disable_adapter():
            return supervised_logits(model, sub, mask)


class EpochReplayingSampler(LengthGroupedSampler):
    """``LengthGroupedSampler`` whose generator draws every epoch's order even when a run starts in a later epoch:
    Trainer calls ``set_epoch(e)`` before each epoch, and a run resumed from a checkpoint in epoch e first draws the
    orders of the epochs before it, so that epoch e gets the order an uninterrupted run gave it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drawn = 0  # epoch orders drawn from the generator so far

    def __iter__(self):
        self.drawn += 1
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        while self.drawn < epoch:
            get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
            self.drawn += 1
