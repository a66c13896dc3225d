"""Benign drift: how far a patched model moves from a reference on the reference's own benign answers.

A helpfulness-side complement to capability benchmarks (docs/methods.md §4.1 asks for safety, over-refusal and
capability together; this definition is ours, not a seed paper's). The reference model answers benign prompts greedily
(:func:`safetypatch.eval.generate.generate_chat`); on exactly those prompt + answer tokens this module measures, per
sample and over answer positions only, the evaluated model's mean per-token NLL, the reference's, their difference,
and the mean per-token KL(reference || evaluated). A patch that keeps benign behaviour scores near 0 on both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import torch

from safetypatch.errors import ConfigError, DataError, ModelMismatchError
from safetypatch.eval.generate import Generation, GenerationProtocol, encode_prompt, prompt_sha256, render_prompt
from safetypatch.eval.logprobs import causal_lm, decoder_forward, eval_mode, head_log_softmax, pad_right

# Answer positions per LM-head call: bounds the fp32 [positions x vocab] block (1024 x 262k ≈ 1 GiB for Gemma).
_POSITION_CHUNK = 1024


@dataclass(frozen=True)
class DriftResult:
    """Per-sample benign drift (nats per answer token) and its means over samples.

    Attributes:
        nll: the evaluated model's mean per-token NLL of each reference answer.
        nll_reference: the reference model's mean per-token NLL of its own answer.
        kl: mean per-token KL(reference || evaluated) over the answer positions.
        n_tokens: answer tokens scored per sample (the stop token included when the reference produced one).
    """

    nll: tuple[float, ...]
    nll_reference: tuple[float, ...]
    kl: tuple[float, ...]
    n_tokens: tuple[int, ...]

    @property
    def nll_delta(self) -> tuple[float, ...]:
        """Per-sample ``nll - nll_reference``; positive when the evaluated model finds the answers less likely."""
        return tuple(a - b for a, b in zip(self.nll, self.nll_reference, strict=True))

    def to_dict(self) -> dict[str, float | int]:
        """Sample-mean summary for a results file (each sample weighs the same, whatever its length)."""
        return {
            "nll": fmean(self.nll),
            "nll_reference": fmean(self.nll_reference),
            "nll_delta": fmean(self.nll_delta),
            "kl": fmean(self.kl),
            "n_samples": len(self.kl),
        }


def measure_drift(
    reference_model: Any,
    model: Any,
    tokenizer: Any,
    references: Sequence[Generation],
    protocol: GenerationProtocol,
    progress: Callable[[int, int], None] | None = None,
) -> DriftResult:
    """Benign drift of ``model`` from ``reference_model`` on the reference's own answers.

    Each prompt is rendered as ``protocol`` renders it (chat template, system turn) and must hash to the reference
    generation's ``templated_prompt_sha256``. The answer tokens are the reference's generated ``token_ids`` (stop
    token included); a generation rebuilt from text alone (empty ``token_ids``) is re-encoded from ``response``.
    Logits are computed only at answer positions.

    Args:
        reference_model: the model that produced ``references`` (transformers or PEFT).
        model: the evaluated model; it must share the reference's tokenizer and vocabulary.
        tokenizer: the shared tokenizer.
        references: the reference's greedy generations on benign prompts.
        protocol: the protocol the references were generated under (template, system prompt, batch size).
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        A :class:`DriftResult` in the order of ``references``.

    Raises:
        ModelMismatchError: vocabulary sizes differ. ConfigError: a prompt renders differently from the reference's
        (another template or system prompt). DataError: no references, or a reference with no answer tokens.
    """
    ref_lm, lm = causal_lm(reference_model), causal_lm(model)
    vocab = (ref_lm.get_output_embeddings().weight.shape[0], lm.get_output_embeddings().weight.shape[0])
    if vocab[0] != vocab[1]:
        raise ModelMismatchError(f"reference vocabulary {vocab[0]} != evaluated {vocab[1]}; KL needs one vocabulary.")
    if not references:
        raise DataError("measure_drift got no reference generations; generate them with generate_chat first.")
    rows = [_encode_reference(tokenizer, k, ref, protocol) for k, ref in enumerate(references)]
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k][0]) - len(rows[k][1]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals = torch.zeros(3, len(rows), dtype=torch.float64)
    done = 0
    with torch.inference_mode(), eval_mode(ref_lm), eval_mode(lm):
        for start in range(0, len(order), protocol.batch_size):
            batch = order[start : start + protocol.batch_size]
            sums = _batch_sums(ref_lm, lm, [rows[k] for k in batch], pad_id)
            totals[:, batch] = sums
            done += len(batch)
            if progress is not None:
                progress(done, len(rows))
    counts = [len(answer) for _, answer in rows]
    nll, nll_ref, kl = ((totals[j] / torch.tensor(counts, dtype=torch.float64)).tolist() for j in range(3))
    return DriftResult(tuple(nll), tuple(nll_ref), tuple(kl), tuple(counts))


def _encode_reference(
    tokenizer: Any, k: int, ref: Generation, protocol: GenerationProtocol
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of reference ``k``, checking its prompt renders as it did at generation time."""
    text = render_prompt(tokenizer, ref.prompt, protocol)
    if prompt_sha256(text) != ref.templated_prompt_sha256:
        raise ConfigError(
            f"reference {k} ({ref.prompt[:60]!r}) was generated from a differently templated prompt (sha256 "
            f"{ref.templated_prompt_sha256[:12]}…, now {prompt_sha256(text)[:12]}…). Pass the protocol and tokenizer "
            "the references were generated with (template, system_prompt)."
        )
    prompt = encode_prompt(tokenizer, text, protocol)
    answer = list(ref.token_ids) or tokenizer(ref.response, add_special_tokens=False)["input_ids"]
    if not prompt or not answer:
        raise DataError(f"reference {k} ({ref.prompt[:60]!r}) has an empty prompt or no answer tokens to score.")
    return prompt, answer


def _batch_sums(ref_lm: Any, lm: Any, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """``[3, batch]`` sums over answer positions of (NLL evaluated, NLL reference, KL(ref || evaluated))."""
    ids, mask = pad_right([prompt + answer[:-1] for prompt, answer in rows], pad_id)
    sample, cols, targets = [], [], []
    for b, (prompt, answer) in enumerate(rows):
        sample += [b] * len(answer)
        cols += range(len(prompt) - 1, len(prompt) - 1 + len(answer))
        targets += answer
    sample_t, cols_t, targets_t = (torch.tensor(x, dtype=torch.long) for x in (sample, cols, targets))
    hidden_ref = decoder_forward(ref_lm, ids, mask).last_hidden_state[sample_t, cols_t]
    hidden = decoder_forward(lm, ids, mask).last_hidden_state[sample_t, cols_t]
    sums = torch.zeros(3, len(rows), dtype=torch.float64)
    for lo in range(0, len(targets), _POSITION_CHUNK):
        part = slice(lo, lo + _POSITION_CHUNK)
        logp = head_log_softmax(lm, hidden[part])
        logp_ref = head_log_softmax(ref_lm, hidden_ref[part]).to(logp.device)
        target = targets_t[part, None].to(logp.device)
        per_position = torch.stack([
            -logp.gather(1, target).squeeze(1),
            -logp_ref.gather(1, target).squeeze(1),
            torch.nn.functional.kl_div(logp, logp_ref, reduction="none", log_target=True).sum(-1),
        ])
        sums.index_add_(1, sample_t[part], per_position.double().cpu())
    return sums
