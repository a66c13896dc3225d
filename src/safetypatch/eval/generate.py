"""Pinned chat generation with HF transformers, the reference backend (docs/methods.md §4.4).

Prompts are rendered with the evaluated model's own chat template (``add_generation_prompt=True``, a system turn
only when configured), sorted by token length into batches of ``batch_size``, generated under one frozen
:class:`GenerationProtocol`, and returned in the caller's order with per-sample bookkeeping (templated prompt hash,
token count, finish reason) for the per-sample results (§4.5).

The protocol's ``batching`` says how a batch is run. ``whole``: left-padded to its longest prompt, in one
``generate`` call. ``grouped`` (the default): split into groups of similar length (:func:`length_groups`), and in
each group the prompt prefix every row shares (the chat template's system turn and user header, about 25 of a
typical 45 tokens on SmolLM2) run once and its KV cache repeated for the rows, each row's rest left-padded after it.
Why: prompt lengths can have a long tail (HarmBench's contextual behaviours run to 1,000 tokens while most prompts
have about 50), so a whole first batch of a length-sorted set can cost more than all the others together; and the
shared prefix is half of a short prompt's prefill. Both change which numbers meet in a matrix product, and so the
logits in the last bits (about 1e-5, as any change of batch composition does), not, in every check so far, a greedy
token (docs/performance.md, *Evaluation wall time*).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from safetypatch.errors import ConfigError
from safetypatch.eval.cores import cpu_workers, map_on_cores
from safetypatch.eval.logprobs import cache_argument, causal_lm, decoder_forward, eval_mode, output_cache, pad_left
from safetypatch.models.chat import END_OF_TURN_TOKENS, end_of_turn_ids, render_user_turn

logger = logging.getLogger(__name__)

# End-of-turn markers of the common chat formats (ChatML, Llama-3, Gemma); each stops generation when in the vocab.

# Decoding fields pinned to neutral values: transformers fills every field left unset from the model's own
# generation_config.json, so a repo shipping repetition_penalty=1.1 would otherwise change "greedy" silently.
_NEUTRAL_DECODING = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                     "typical_p": 1.0}
# Fields that cannot be forced back to "unset"; if the model's generation config sets one, the user is told.
_INHERITED_PROCESSORS = ("min_p", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                         "sequence_bias", "forced_bos_token_id", "forced_eos_token_id")

FinishReason = Literal["eos", "length"]


class GenerationProtocol(BaseModel):
    """The pinned generation settings recorded in every results file (docs/methods.md §4.4).

    Attributes:
        max_new_tokens: most new tokens per response (§4.4 default 512).
        do_sample: ``False`` for greedy decoding (the default protocol); ``True`` for the sampling presets.
        temperature: sampling temperature; must stay 1.0 when ``do_sample`` is false.
        top_p: nucleus mass; must stay 1.0 when ``do_sample`` is false.
        top_k: top-k cut-off, 0 = disabled (vLLM's -1); must stay 0 when ``do_sample`` is false.
        system_prompt: a system turn, recorded verbatim; ``None`` sends none (the template may still add its default).
        template: ``"chat"`` renders the model's chat template; ``"none"`` feeds the prompt text as is (base models).
        batch_size: prompts per generation batch; on a 2-core CPU (SmolLM2-135M, fp32) 64 generates about twice as
            fast as 8 and 1.3× as fast as 16 (128 is no faster), and greedy fp32 tokens matched batch-size-1
            generation in every check.
        batching: ``grouped`` splits each length-sorted batch where prompt lengths spread (:func:`length_groups`)
            and runs the prompt prefix a group shares once; ``whole`` pads every batch to its longest prompt and runs
            it whole (the batching of results written before this field existed).
        seed: torch seed set before generating (sampling presets; harmless for greedy).
        dtype: dtype the weights must be in (``bfloat16`` per §4.4; ``float32`` on CPUs without bf16).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(512, gt=0, description="Most new tokens per response (docs/methods.md §4.4).")
    do_sample: bool = Field(False, description="False: greedy decoding (default protocol); True: sampling presets.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass (only with do_sample).")
    top_k: int = Field(0, ge=0, description="Top-k cut-off, 0 disables it (only with do_sample).")
    system_prompt: str | None = Field(None, description="System turn, recorded verbatim; None sends none.")
    template: Literal["chat", "none"] = Field("chat", description="'chat': the model's chat template; 'none': raw.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (64: fastest of 8/16/32/64/128 on 2 "
                                                  "CPU cores).")
    batching: Literal["grouped", "whole"] = Field(
        "grouped", description="'grouped': each batch split into groups of similar prompt length, the prefix a group "
                               "shares run once; 'whole': each batch padded to its longest prompt and run whole.")
    seed: int = Field(0, description="torch seed set before generating.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype the weights must have.")

    @model_validator(mode="after")
    def _sampling_fields_need_sampling(self) -> GenerationProtocol:
        changed = [name for name, neutral in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))
                   if getattr(self, name) != neutral]
        if changed and not self.do_sample:
            raise ConfigError(
                f"GenerationProtocol: {', '.join(changed)} set but do_sample=False, so greedy decoding would ignore "
                "them. Set do_sample=True to sample, or drop those fields."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The protocol as a JSON-ready dict for the results ``config`` block (§4.5)."""
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class Generation:
    """One generated response and the bookkeeping the per-sample results need (docs/methods.md §4.5).

    Attributes:
        prompt: the user prompt as given.
        response: decoded new tokens before the stop token, special tokens removed.
        n_new_tokens: tokens generated, the stop token included.
        finish_reason: ``"eos"`` (an end-of-turn id was produced) or ``"length"`` (``max_new_tokens`` reached).
        templated_prompt_sha256: hex sha256 of the exact text fed to the tokenizer (template and system turn).
        token_ids: the generated ids, the stop token included (empty when rebuilt from text-only records).
    """

    prompt: str
    response: str
    n_new_tokens: int
    finish_reason: FinishReason
    templated_prompt_sha256: str
    token_ids: tuple[int, ...] = ()


def render_prompt(tokenizer: Any, prompt: str, protocol: GenerationProtocol) -> str:
    """The exact text the model sees for ``prompt`` under ``protocol`` (chat template or raw).

    Args:
        tokenizer: the evaluated model's tokenizer.
        prompt: the user turn.
        protocol: supplies ``template`` and ``system_prompt``.

    Returns:
        The templated prompt, ending with the assistant generation prompt in chat mode.

    Raises:
        ConfigError: chat mode with a tokenizer that has no chat template, or a system prompt in raw mode.
    """
    if protocol.template == "none":
        if protocol.system_prompt is not None:
            raise ConfigError("GenerationProtocol: system_prompt needs template='chat'; raw prompts have no turns.")
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template, "
            "so chat prompts cannot be rendered (a base model?). Use an instruct model, set tokenizer.chat_template, "
            "or set template='none' in the generation protocol to feed prompts as raw text."
        )
    return render_user_turn(tokenizer, prompt, protocol.system_prompt)


def prompt_sha256(text: str) -> str:
    """Hex sha256 of a rendered prompt's UTF-8 bytes (``templated_prompt_sha256`` in the per-sample results)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_prompt(tokenizer: Any, text: str, protocol: GenerationProtocol) -> list[int]:
    """Token ids of a rendered prompt: a chat template carries its own BOS; raw text gets the tokenizer's."""
    return tokenizer(text, add_special_tokens=protocol.template == "none")["input_ids"]


def stop_token_ids(tokenizer: Any, generation_eos: int | Sequence[int] | None) -> tuple[int, ...]:
    """End-of-turn ids that stop generation.

    Args:
        tokenizer: the model's tokenizer.
        generation_eos: ``eos_token_id`` of the model's generation config (an id, a list, or ``None``).

    Returns:
        Sorted unique ids: the generation config's, the tokenizer's EOS, and every :data:`END_OF_TURN_TOKENS` entry
        present in the vocabulary.

    Raises:
        ConfigError: no stop id at all (generation could never end before ``max_new_tokens``).
    """
    ids = {generation_eos} if isinstance(generation_eos, int) else set(generation_eos or ())
    ids.update(end_of_turn_ids(tokenizer))
    if not ids:
        raise ConfigError(
            "no end-of-turn id: the generation config has no eos_token_id, the tokenizer no eos_token and no known "
            f"end-of-turn token {END_OF_TURN_TOKENS}. Set model.generation_config.eos_token_id."
        )
    return tuple(sorted(ids))


def generate_chat(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    protocol: GenerationProtocol,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> list[Generation]:
    """Generate one response per prompt under the pinned protocol (docs/methods.md §4.4).

    Prompts are sorted by token length (longest first) into batches of ``protocol.batch_size``
    (:func:`generation_batches`), run as ``protocol.batching`` says (module docstring), left-padded by hand (the
    tokenizer is never modified), and results come back in the order of ``prompts``. A group stops once every row
    has produced a stop id. Greedy fp32 results equal batch-size-1 generation in every check (not bit for bit: the
    logits differ in the last bits).

    Args:
        model: a transformers causal LM or a PEFT ``PeftModel``, already loaded; run in eval mode for the call.
        tokenizer: its tokenizer.
        prompts: user turns.
        protocol: the generation settings (recorded by the caller with :meth:`GenerationProtocol.to_dict`).
        progress: called as ``progress(done, total)`` after each group.
        workers: groups generated side by side (:func:`~safetypatch.eval.cores.map_on_cores`, the same answers);
            ``None``: one per torch thread on a CPU, one on an accelerator or when sampling.

    Returns:
        One :class:`Generation` per prompt, in input order.

    Raises:
        ConfigError: the weights' dtype differs from ``protocol.dtype``, no chat template (see
            :func:`render_prompt`), or no stop id.
    """
    _check_dtype(model, protocol)
    texts = [render_prompt(tokenizer, prompt, protocol) for prompt in prompts]
    encoded = [encode_prompt(tokenizer, text, protocol) for text in texts]
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    kwargs = _generate_kwargs(model, protocol, stops, pad_id)
    new_ids: dict[int, list[int]] = {}
    share = protocol.batching == "grouped" and _can_share_prefix(model)
    groups = _groups([len(ids) for ids in encoded], protocol)
    if workers is None:
        workers = 1 if protocol.do_sample else cpu_workers(model.get_input_embeddings().weight.device)
    costs = [group_cost(len(batch), max(len(encoded[i]) for i in batch), protocol.max_new_tokens) for batch in groups]

    def run(batch: list[int]) -> list[list[int]]:
        rows = [encoded[i] for i in batch]
        with torch.inference_mode():
            return _generate_group(model, rows, shared_prefix(rows) if share else 0, pad_id, kwargs)

    torch.manual_seed(protocol.seed)
    with eval_mode(model):
        for batch, new in zip(groups, map_on_cores(run, groups, workers, costs), strict=True):
            new_ids.update(zip(batch, new, strict=True))
            if progress is not None:
                progress(len(new_ids), len(prompts))
    return [_finish(tokenizer, prompts[i], texts[i], new_ids[i], stops) for i in range(len(prompts))]


def generation_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches :func:`generate_chat` runs (each split into groups of similar length when the protocol's
    ``batching`` is ``grouped``): prompt indices sorted by token length, longest first (ties in input order),
    ``batch_size`` per batch.

    Generating a contiguous run of these batches as one call reproduces them exactly (the sort is stable, and a
    batch's groups depend on its own lengths only), which is how several processes share one generation job without
    changing any batch.

    Args:
        lengths: token count of each rendered prompt.
        batch_size: prompts per batch.

    Returns:
        Lists of prompt indices, one per batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


# The cost model of :func:`length_groups`, in units of one prompt token through the decoder, measured on
# SmolLM2-135M in fp32 on one CPU thread (about 2.7 ms a token): a generation step costs a fixed _STEP_COST (the
# weights are read once per step, whatever the rows: 64 ms at one row) plus _ROW_STEP_COST per row (the LM head
# included: 317 ms at 64 rows); attention over a padded length L multiplies a prompt token's cost by
# 1 + L / _ATTENTION_TOKENS and a row's step by 1 + L / _DECODE_ATTENTION_TOKENS (a step reads every cached
# position, padding included). Only where a batch splits depends on them.
_STEP_COST = 26.0
_ROW_STEP_COST = 1.4
_ATTENTION_TOKENS = 2500.0
_DECODE_ATTENTION_TOKENS = 340.0


def group_cost(rows: int, longest: int, max_new_tokens: int) -> float:
    """Estimated cost of generating one group (units of one prompt token through the decoder; cost model above).

    Args:
        rows: prompts in the group.
        longest: token count of its longest prompt (every row is padded to it).
        max_new_tokens: the steps the group may run.
    """
    prefill = rows * longest * (1 + longest / _ATTENTION_TOKENS)
    return prefill + max_new_tokens * (_STEP_COST + rows * _ROW_STEP_COST * (1 + longest / _DECODE_ATTENTION_TOKENS))


def length_groups(lengths: Sequence[int], max_new_tokens: int) -> list[int]:
    """Where to split one batch of prompts sorted longest first: the group sizes of the least estimated cost.

    A group is padded to its first (longest) prompt; its cost is the padded prompt tokens (attention growing with
    their length) plus ``max_new_tokens`` steps of a fixed part and a part per row. Splitting saves padding and
    costs a fixed part per step, so a batch of similar lengths stays whole and a long tail is cut off. Exact
    minimum over every split into contiguous runs (dynamic programming, quadratic in the batch size).

    Args:
        lengths: token counts of the batch's prompts, longest first.
        max_new_tokens: generation length (the steps each group may run).

    Returns:
        Sizes of consecutive groups, summing to ``len(lengths)``.

    Raises:
        ValueError: ``lengths`` not sorted longest first.
    """
    n = len(lengths)
    if any(lengths[k] < lengths[k + 1] for k in range(n - 1)):
        raise ValueError("length_groups needs the lengths sorted longest first")

    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        for start in range(stop):
            total = best[start] + group_cost(stop - start, lengths[start], max_new_tokens)
            if total < best[stop]:
                best[stop], cut[stop] = total, start
    sizes: list[int] = []
    stop = n
    while stop:
        sizes.append(stop - cut[stop])
        stop = cut[stop]
    return sizes[::-1]


def _groups(lengths: Sequence[int], protocol: GenerationProtocol) -> list[list[int]]:
    """The groups :func:`generate_chat` generates: each of :func:`generation_batches`, split by
    :func:`length_groups` when ``protocol.batching`` is ``grouped``."""
    batches = generation_batches(lengths, protocol.batch_size)
    if protocol.batching == "whole":
        return batches
    groups = []
    for batch in batches:
        start = 0
        for size in length_groups([lengths[i] for i in batch], protocol.max_new_tokens):
            groups.append(batch[start : start + size])
            start += size
    return groups


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading token ids every row shares, leaving each row at least one of its own (0 for one row).

    Args:
        rows: token ids of a group's prompts.

    Returns:
        The length of the prefix :func:`generate_chat` runs once for the group.
    """
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(row) for row in rows) - 1
    k = 0
    while k < limit and all(row[k] == first[k] for row in rows):
        k += 1
    return k


def _can_share_prefix(model: Any) -> bool:
    """A prompt-learning PEFT adapter puts virtual tokens before the prompt, so its prefix cannot be run apart."""
    return not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)


def _generate_group(model: Any, rows: list[list[int]], shared: int, pad_id: int,
                    kwargs: dict[str, Any]) -> list[list[int]]:
    """The new ids of one group: left-padded whole (``shared`` 0), or the ``shared`` prefix run once through the
    decoder, its KV cache repeated for every row, and each row's rest left-padded after it (positions follow the
    attention mask, so a row's tokens keep the positions they have unpadded)."""
    device = model.get_input_embeddings().weight.device
    if not shared:
        input_ids, attention_mask = pad_left(rows, pad_id)
        cache: dict[str, Any] = {}
    else:
        lm = causal_lm(model)
        prefix = torch.tensor([rows[0][:shared]], dtype=torch.long)
        out = decoder_forward(lm, prefix, torch.ones_like(prefix), use_cache=True)
        prefix_cache = output_cache(out)
        prefix_cache.batch_repeat_interleave(len(rows))
        rest_ids, rest_mask = pad_left([row[shared:] for row in rows], pad_id)
        input_ids = torch.cat([prefix.expand(len(rows), -1), rest_ids], dim=1)
        attention_mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), rest_mask], dim=1)
        cache = {cache_argument(lm.base_model): prefix_cache}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs, **cache)
    return out[:, input_ids.shape[1] :].tolist()


def _check_dtype(model: Any, protocol: GenerationProtocol) -> None:
    actual = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    if actual != protocol.dtype:
        raise ConfigError(
            f"the model's weights are {actual} but the generation protocol records dtype={protocol.dtype!r}; the "
            f"results would misreport the run. Load the model with dtype=torch.{protocol.dtype}, or set "
            f"dtype={actual!r} in the protocol (float32 on CPUs without bf16)."
        )


def _generate_kwargs(model: Any, protocol: GenerationProtocol, stops: tuple[int, ...], pad_id: int) -> dict[str, Any]:
    inherited = [name for name in _INHERITED_PROCESSORS if getattr(model.generation_config, name, None) is not None]
    if inherited:
        logger.warning("the model's generation_config sets %s; transformers applies them on top of the protocol",
                       ", ".join(inherited))
    kwargs: dict[str, Any] = {
        **_NEUTRAL_DECODING,
        "max_new_tokens": protocol.max_new_tokens,
        "do_sample": protocol.do_sample,
        "eos_token_id": list(stops),
        "pad_token_id": pad_id,
        "return_dict_in_generate": False,
    }
    if protocol.do_sample:
        kwargs.update(temperature=protocol.temperature, top_p=protocol.top_p, top_k=protocol.top_k)
    return kwargs


def _finish(tokenizer: Any, prompt: str, text: str, ids: list[int], stops: tuple[int, ...]) -> Generation:
    """Cut the new ids at the first stop id (padding after it is dropped) and decode."""
    end = next((k for k, tok in enumerate(ids) if tok in stops), None)
    kept = ids if end is None else ids[: end + 1]
    body = kept if end is None else kept[:-1]
    return Generation(
        prompt=prompt,
        response=tokenizer.decode(body, skip_special_tokens=True),
        n_new_tokens=len(kept),
        finish_reason="length" if end is None else "eos",
        templated_prompt_sha256=prompt_sha256(text),
        token_ids=tuple(kept),
    )
