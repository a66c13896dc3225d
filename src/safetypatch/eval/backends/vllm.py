"""Optional vLLM generation backend, gated by a parity check against HF transformers (docs/methods.md §4.4).

vLLM is an optional extra: it is imported inside the functions that need it, and a missing install says how to add
it. Prompts are rendered and tokenised by the same code as the HF backend (:mod:`safetypatch.eval.generate`) and
handed to vLLM as token ids, so both backends see identical inputs and record identical prompt hashes. vLLM LoRA
paths have silently returned base-model outputs before (docs/methods.md §5.8), which is why a run is only trusted after
:func:`parity_check` on the first prompts.

A safety patch is served unmerged, as vLLM serves any PEFT LoRA folder: the engine is built with ``enable_lora``
and a ``max_lora_rank`` vLLM accepts, and every request carries one ``LoRARequest`` (:class:`VllmAdapter`). The
parity check then compares against the HF model carrying the same patch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetypatch.errors import ConfigError, DataError
from safetypatch.eval.generate import (
    Generation,
    GenerationProtocol,
    encode_prompt,
    prompt_sha256,
    render_prompt,
    stop_token_ids,
)

logger = logging.getLogger(__name__)

_FINISH = {"stop": "eos", "length": "length"}
# vllm.config.lora.MaxLoRARanks: the only max_lora_rank values the engine accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VllmAdapter:
    """A PEFT LoRA folder served by vLLM next to the unmerged base weights.

    Attributes:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        rank: its LoRA rank r.
        name: the ``lora_name`` of the request.
        int_id: the ``lora_int_id`` of the request (vLLM wants a positive id per distinct adapter).
    """

    path: Path
    rank: int
    name: str = "safetypatch"
    int_id: int = 1

    @classmethod
    def from_folder(cls, folder: str | Path) -> VllmAdapter:
        """Read and check a patch folder for vLLM: a plain LoRA adapter (``load_patch`` refuses DoRA, bias and
        ``modules_to_save`` adapters, which vLLM does not load either) of a rank vLLM serves.

        Raises:
            PatchError: not a readable plain LoRA adapter.
            ConfigError: its rank is above the largest rank vLLM serves.
        """
        from safetypatch.patch.artifact import load_patch

        patch = load_patch(Path(folder))
        max_lora_rank(patch.rank)
        return cls(Path(folder), patch.rank)

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``vllm.LLM`` arguments that enable serving this adapter."""
        return {"enable_lora": True, "max_lora_rank": max_lora_rank(self.rank), "max_loras": 1}

    def request(self) -> Any:
        """The ``vllm.lora.request.LoRARequest`` every prompt is generated with.

        Raises:
            ConfigError: vLLM is not installed.
        """
        _import_vllm()
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.int_id, str(self.path))


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves an adapter of rank ``rank``.

    Raises:
        ConfigError: ``rank`` exceeds vLLM's largest (512).
    """
    fitting = [value for value in VLLM_LORA_RANKS if value >= rank]
    if not fitting:
        raise ConfigError(f"a LoRA adapter of rank {rank} is above the largest rank vLLM serves "
                          f"({VLLM_LORA_RANKS[-1]}); evaluate it with backend='hf' or merge it into the weights.")
    return fitting[0]


@dataclass(frozen=True)
class ParityReport:
    """Token agreement between two backends' generations of the same prompts.

    Attributes:
        n: prompts compared.
        exact: prompts whose generated token ids are identical.
        token_agreement: tokens of the common prefixes over tokens of the longer generation, summed over prompts.
        first_divergence: per prompt, the first differing position (``None`` when identical).
    """

    n: int
    exact: int
    token_agreement: float
    first_divergence: tuple[int | None, ...]


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(
            'the vLLM backend needs the optional extra: pip install "safetypatch[vllm]" (CUDA machine). The HF '
            "transformers backend (safetypatch.eval.generate.generate_chat) needs nothing extra."
        ) from exc
    return vllm


def load_vllm(model_path: str | Path, protocol: GenerationProtocol, adapter: VllmAdapter | None = None,
              **llm_kwargs: Any) -> Any:
    """A ``vllm.LLM`` for ``model_path`` in the protocol's dtype and seed.

    Args:
        model_path: local model folder (or Hub id on a connected machine).
        protocol: supplies ``dtype`` and ``seed``.
        adapter: a LoRA patch to serve (LoRA is enabled with a fitting ``max_lora_rank``), or None.
        **llm_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``, ...).

    Returns:
        The engine.

    Raises:
        ConfigError: vLLM is not installed.
    """
    vllm = _import_vllm()
    lora = adapter.engine_kwargs() if adapter is not None else {}
    return vllm.LLM(model=str(model_path), dtype=protocol.dtype, seed=protocol.seed, **lora, **llm_kwargs)


def generate_vllm(
    llm: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    protocol: GenerationProtocol,
    adapter: VllmAdapter | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Generate under ``protocol`` with vLLM; same inputs, stop ids and bookkeeping as the HF backend.

    Args:
        llm: from :func:`load_vllm` (given the same ``adapter`` when one is served).
        tokenizer: the HF tokenizer of the model (renders and tokenises the prompts).
        prompts: user turns.
        protocol: the generation settings.
        adapter: the LoRA patch every prompt is generated with (its ``LoRARequest``), or None.
        progress: called once as ``progress(total, total)`` (vLLM batches internally).

    Returns:
        One :class:`~safetypatch.eval.generate.Generation` per prompt, in input order.

    Raises:
        ConfigError: vLLM is not installed, or the prompt cannot be rendered (see ``render_prompt``).
    """
    vllm = _import_vllm()
    texts = [render_prompt(tokenizer, prompt, protocol) for prompt in prompts]
    inputs = [{"prompt_token_ids": encode_prompt(tokenizer, text, protocol)} for text in texts]
    stops = stop_token_ids(tokenizer, None)  # vLLM adds the model's generation-config EOS ids itself
    params = vllm.SamplingParams(
        n=1,
        max_tokens=protocol.max_new_tokens,
        temperature=protocol.temperature if protocol.do_sample else 0.0,
        top_p=protocol.top_p,
        top_k=protocol.top_k or -1,
        repetition_penalty=1.0,
        seed=protocol.seed,
        stop_token_ids=list(stops),
        skip_special_tokens=True,
    )
    lora = adapter.request() if adapter is not None else None
    outputs = llm.generate(inputs, params, use_tqdm=False, lora_request=lora)
    if progress is not None:
        progress(len(outputs), len(prompts))
    return [
        Generation(
            prompt=prompt,
            response=out.outputs[0].text,
            n_new_tokens=len(out.outputs[0].token_ids),
            finish_reason=_FINISH.get(out.outputs[0].finish_reason, "length"),
            templated_prompt_sha256=prompt_sha256(text),
            token_ids=tuple(out.outputs[0].token_ids),
        )
        for prompt, text, out in zip(prompts, texts, outputs, strict=True)
    ]


def parity_check(
    hf_generations: Sequence[Generation], vllm_generations: Sequence[Generation], n: int = 16
) -> ParityReport:
    """Greedy token agreement between the HF reference and vLLM on the first ``n`` prompts (docs/methods.md §4.4).

    Args:
        hf_generations: generations from ``generate_chat``.
        vllm_generations: generations from :func:`generate_vllm` for the same prompts and protocol.
        n: prompts to compare (fewer if fewer are given).

    Returns:
        A :class:`ParityReport`; the caller decides the threshold and records the report.

    Raises:
        DataError: nothing to compare, a pair from different prompts or templates, or generations without token ids.
    """
    if len(hf_generations) != len(vllm_generations) or not hf_generations:
        raise DataError(
            f"parity_check got {len(hf_generations)} HF and {len(vllm_generations)} vLLM generations; generate the "
            "same non-empty prompt list with both backends."
        )
    pairs = list(zip(hf_generations, vllm_generations, strict=True))[:n]
    divergences, common, longest = [], 0, 0
    for k, (hf, other) in enumerate(pairs):
        if hf.templated_prompt_sha256 != other.templated_prompt_sha256:
            raise DataError(f"pair {k}: the backends saw different templated prompts ({hf.prompt[:60]!r}).")
        if not hf.token_ids or not other.token_ids:
            raise DataError(f"pair {k}: a generation has no token_ids; compare generations made in this session.")
        prefix = next((i for i, (a, b) in enumerate(zip(hf.token_ids, other.token_ids, strict=False)) if a != b), None)
        same_length = len(hf.token_ids) == len(other.token_ids)
        shared = prefix if prefix is not None else min(len(hf.token_ids), len(other.token_ids))
        divergences.append(None if prefix is None and same_length else shared)
        common += shared
        longest += max(len(hf.token_ids), len(other.token_ids))
    report = ParityReport(len(pairs), divergences.count(None), common / longest, tuple(divergences))
    logger.info("vLLM parity: %d/%d identical, token agreement %.4f", report.exact, report.n, report.token_agreement)
    return report
