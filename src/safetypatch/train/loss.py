"""Completion-only cross-entropy that applies the LM head only at supervised positions (docs/methods.md §3.1 step 3).

Most of a refusal-SFT step's memory on a CPU is the fp32 logits, batch × seq × vocab, yet only the
completion positions (often a third of the tokens or fewer) carry a label. The backbone runs on the whole batch;
the LM head, the final-logit soft-capping (Gemma 2/3) and the loss run only where the shifted label is not −100.

A model inside a distributed wrapper (DDP, FSDP, a DeepSpeed engine) must be called through the wrapper, which
gathers shards and synchronises gradients in its forward. There the loss reads the per-token log-probabilities of
TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which ``SFTTrainer`` installs on the model): the same
supervised tokens, scored in chunks without the full logits. The retain unlikelihood term needs whole distributions
at the first completion positions; with it on, the wrapper's forward returns the full logits instead.

Even at the supervised positions the logits (n × vocab, and their fp32 log-softmax and gradient: about 0.3 GB for
500 positions of a 49k vocabulary) are a large share of a step's peak, since they exist while every activation is
still held for the backward pass. :class:`ChunkedNLL` therefore scores the supervised positions a few rows at a
time and computes their logits again in the backward pass (an LM-head product over the supervised rows only, a few
per cent of a step) instead of keeping them: the same operations on the same values row for row, so the same loss
and gradients (``tests/train/test_memory.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Config fields that rescale logits between the LM head and the softmax in some architectures (Cohere, Granite,
# Falcon-H1, MiniCPM, …). Only soft-capping is reproduced here; a model with any of these takes the full forward.
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def unwrap_causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fast_path_supported(model: Any) -> bool:
    """Whether :func:`supervised_logits` may call the backbone and LM head directly for ``model``.

    False for architectures that rescale logits (see ``_LOGIT_SCALES``) and for models without the usual
    ``base_model_prefix`` backbone; those take the model's own full forward instead. Distributed wrappers never get
    here: :func:`completion_loss` calls them through their forward (``wrapped=True``).
    """
    base = unwrap_causal_lm(model)
    if not hasattr(base, "config"):
        return False
    config = base.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_SCALES):
        return False
    return hasattr(base, base.base_model_prefix) and base.get_output_embeddings() is not None


def supervised_logits(model: Any, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Logits at the positions whose next-token label is supervised, (n_supervised × vocab).

    Args:
        model: a causal LM, possibly PEFT-wrapped (LoRA layers live inside the backbone, so calling it directly
            keeps them active).
        inputs: ``input_ids`` and ``attention_mask`` (no labels), batch × seq.
        mask: batch × (seq − 1) booleans, True where ``labels[:, 1:] != -100``.

    Returns:
        The logits predicting each supervised token, in row-major order of ``mask``, equal to the model's own
        logits at those positions (soft-capping applied when the config sets ``final_logit_softcapping``).
    """
    if not fast_path_supported(model):
        return model(**inputs, use_cache=False).logits[:, :-1][mask]
    hidden, head, cap = supervised_states(model, inputs, mask)
    return _head_logits(hidden, head, cap)


def supervised_states(model: Any, inputs: dict[str, torch.Tensor],
                      mask: torch.Tensor) -> tuple[torch.Tensor, Any, float | None]:
    """The backbone's last hidden states at the supervised positions (n_supervised × hidden), the LM head and the
    final-logit soft-cap (None: none) of a model with :func:`fast_path_supported`."""
    base = unwrap_causal_lm(model)
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][mask]
    return hidden, base.get_output_embeddings(), getattr(base.config.get_text_config(), "final_logit_softcapping",
                                                         None) or None


def _head_logits(hidden: torch.Tensor, head: Any, cap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# Rows × vocab elements per chunk of ChunkedNLL: 4 Mi elements, 16 MiB per fp32 tensor of a chunk.
CHUNK_ELEMENTS = 1 << 22


class ChunkedNLL(torch.autograd.Function):
    """−log p(target) at each row of ``hidden`` under the LM head ``weight`` (optionally soft-capped), computed a
    few rows at a time, and the logits of the rows ``keep`` (for the unlikelihood term); the backward pass computes
    each chunk's logits again instead of keeping them.

    The operations are those of ``logits = lm_head(hidden)`` (then ``tanh(logits / cap) · cap``), ``F.cross_entropy(
    logits.float(), targets, reduction="none")`` and ``logits[keep]``, in ``dtype`` (the autocast dtype, or the
    weights' own), chunk by chunk; the backward pass repeats autograd's (nll_loss, log_softmax, cast, the sum with
    the kept rows' gradient, soft-cap and matrix-product backward), so loss and gradients are those of the unchunked
    computation. The head's weight gets no gradient (it is frozen in a LoRA patch).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                cap: float | None, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        low, weight_low = hidden.to(dtype), weight.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        kept = torch.empty(len(keep), weight.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            log_p, scored, _ = ChunkedNLL._log_probs(low[chunk], weight_low, cap)
            out[chunk] = -log_p.gather(1, targets[chunk, None]).squeeze(1)
            here = (keep >= start) & (keep < start + rows)
            if bool(here.any()):
                kept[here] = scored[keep[here] - start]
        ctx.save_for_backward(low, weight, targets, keep)
        ctx.cap, ctx.dtype, ctx.rows, ctx.hidden_dtype = cap, dtype, rows, hidden.dtype
        return out, kept

    @staticmethod
    def _log_probs(low: torch.Tensor, weight: torch.Tensor,
                   cap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = F.linear(low, weight)
        capped = torch.tanh(logits / cap) if cap else None
        scored = capped * cap if cap else logits
        return torch.log_softmax(scored.float(), dim=-1), scored, capped

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, grad_kept: torch.Tensor | None) -> tuple[Any, ...]:
        low, weight, targets, keep = ctx.saved_tensors
        cap, dtype, rows = ctx.cap, ctx.dtype, ctx.rows
        weight_low = weight.to(dtype)
        grad_hidden = torch.empty(low.shape, dtype=ctx.hidden_dtype, device=low.device)
        for start in range(0, low.shape[0], rows):
            chunk = slice(start, start + rows)
            log_p, _, capped = ChunkedNLL._log_probs(low[chunk], weight_low, cap)
            grad_log_p = torch.zeros_like(log_p).scatter_(1, targets[chunk, None], -grad[chunk, None].float())
            grad_logits = torch._log_softmax_backward_data(grad_log_p, log_p, -1, log_p.dtype).to(dtype)
            here = (keep >= start) & (keep < start + rows)
            if grad_kept is not None and bool(here.any()):
                grad_logits[keep[here] - start] += grad_kept[here].to(dtype)
            if cap:
                grad_logits = torch.ops.aten.tanh_backward(grad_logits * cap, capped) / cap
            grad_hidden[chunk] = grad_logits.mm(weight_low).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None, None


def _chunked_nll(hidden: torch.Tensor, head: Any, cap: float | None, targets: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:class:`ChunkedNLL` over ``hidden`` with ``head`` (the NLL at every row, the logits at the rows ``keep``), or
    None where it is not the same computation (a head with a bias, or trained, as in the full-parameter mode)."""
    weight = getattr(head, "weight", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or weight is None or weight.requires_grad
            or hidden.shape[0] == 0):
        return None
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return ChunkedNLL.apply(hidden, weight, targets, keep, cap, dtype, rows)


def completion_loss(
    model: Any,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_items: torch.Tensor | int | None = None,
    *,
    lead_tokens: int = 0,
    lead_weight: float = 1.0,
    unlikely: torch.Tensor | None = None,
    openings: Sequence[int] = (),
    unlikelihood_weight: float = 0.0,
    distill: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    wrapped: bool = False,
) -> tuple[torch.Tensor, int]:
    """Σ_t w_t · ℓ_t / N over supervised positions t, ℓ_t = −log p(y_t | y_<t) (docs/methods.md §3.1 step 3) or, for a
    distilled example, KL(p_teacher ‖ p_model) at t.

    With unit weights and N = the number of supervised tokens this is L_CE of §3.1. Padding is excluded by its
    −100 label, set by position in the collator, never by token id. The first ``lead_tokens`` supervised tokens of
    each example weigh ``lead_weight`` times more: whether an answer refuses is decided by its first tokens.

    Args:
        model: the causal LM being trained.
        inputs: ``input_ids`` and ``attention_mask``.
        labels: batch × seq, −100 on prompt and padding positions.
        weights: per-example loss weights (batch,), or None for 1.
        lead_tokens: how many leading supervised tokens of each example get ``lead_weight`` (0: none).
        lead_weight: the extra factor of those tokens.
        unlikely: per-example flags (batch,): at the first supervised position of a flagged example the loss adds
            ``unlikelihood_weight`` · (−log(1 − Σ_{o ∈ openings} p(o))), which pushes the refusal openings down
            there (benign retain prompts whose own answer opens otherwise).
        openings: the token ids that open a refusal (:func:`safetypatch.train.examples.refusal_openings`).
        unlikelihood_weight: the factor of that term (0: off).
        num_items: the normaliser N (the supervised-token count of the whole accumulated batch, as transformers'
            Trainer passes it), or None for this batch's count.
        distill: per-example flags (batch,): at every supervised position of a flagged example the cross-entropy is
            replaced by KL(p_teacher ‖ p_model) over the whole next-token distribution (self-distillation of the
            retain answers from the unpatched model).
        teacher_logits: the teacher's logits at the supervised positions of the flagged examples, in row-major
            order ((Σ flagged positions) × vocab); required with ``distill``.
        wrapped: ``model`` is a distributed wrapper (DDP, FSDP, a DeepSpeed engine) around a model carrying TRL's
            fused LM head; it is called through its own forward and the fused head scores the supervised tokens
            (with the unlikelihood term on, the forward returns the whole logits instead).

    Returns:
        (loss, number of supervised tokens in this batch).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    penalise = unlikelihood_weight > 0 and unlikely is not None and len(openings) > 0
    distilled = distill is not None and bool(distill.any())
    if distilled and (wrapped or teacher_logits is None):
        raise ValueError("completion_loss: distill needs teacher_logits and an unwrapped model")
    first = _first_rows(mask, unlikely) if penalise else None  # the unlikelihood rows among the supervised ones
    nll = first_logits = None  # first_logits: the logits at the unlikelihood rows, where only those are formed
    if wrapped and not penalise:
        nll = -model(**inputs, labels=labels, fused_lm_head=True).log_probs[mask].float()
    elif not wrapped and not distilled and fast_path_supported(model):
        hidden, head, cap = supervised_states(model, inputs, mask)
        keep = first.nonzero()[:, 0] if first is not None else mask.new_zeros(0, dtype=torch.long)
        chunked = _chunked_nll(hidden, head, cap, shifted[mask], keep)
        if chunked is None:
            logits = _head_logits(hidden, head, cap)
        else:
            nll, first_logits = chunked
    else:
        # The unlikelihood term needs whole distributions, which the fused head does not return: a wrapper's own
        # forward then gives the full logits.
        logits = (model(**inputs, use_cache=False).logits[:, :-1][mask] if wrapped
                  else supervised_logits(model, inputs, mask))
    if nll is None:
        nll = F.cross_entropy(logits.float(), shifted[mask], reduction="none")
    if distilled:
        flagged = distill.to(torch.bool)[:, None].expand_as(shifted)[mask]
        teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
        student = torch.log_softmax(logits[flagged].float(), dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
        nll = nll.masked_scatter(flagged, kl)
    if weights is not None:
        nll = nll * weights.to(nll.dtype)[:, None].expand_as(shifted)[mask]
    if lead_tokens > 0 and lead_weight != 1.0:
        lead = mask.cumsum(dim=1)[mask] <= lead_tokens
        nll = torch.where(lead, nll * lead_weight, nll)
    if first is not None:
        log_p = torch.log_softmax((logits[first] if first_logits is None else first_logits).float(), dim=-1)
        p_open = log_p[:, list(openings)].logsumexp(dim=-1).exp().clamp(max=1 - 1e-6)
        nll = nll.index_add(0, first.nonzero()[:, 0], -unlikelihood_weight * torch.log1p(-p_open))
    count = int(mask.sum())
    denominator = torch.as_tensor(num_items if num_items is not None else count, device=nll.device).clamp(min=1)
    return nll.sum() / denominator, count


def _first_rows(mask: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """Among the supervised positions (row-major order of ``mask``), the first of each flagged example."""
    return (mask.cumsum(dim=1)[mask] == 1) & unlikely.to(torch.bool)[mask.nonzero()[:, 0]]
