"""Benchmark of the evaluation engine's generation (``safetypatch.eval.generate``, the pinned greedy protocol):
batched (``--batch-size``, default 16, the protocol's) against one prompt at a time (issue 7 goal on a CPU: ≥ 4×),
and on a GPU with vLLM installed, vLLM (through ``safetypatch.eval.backends.vllm``) against the HF backend.

Every backend generates the same ``--prompts`` prompts (harmbench and xstest-safe evaluation prompts, rendered by
the model's chat template) for ``--max-new-tokens`` tokens, in one process, after a short warm-up; throughput is
generated tokens (the stop token included) per second. Greedy outputs are compared with batch-size-1 generation
(the reference), prompt by prompt. Usage (from the repository root)::

    python -m bench.generate_bench --json generate.json               # CPU: batch 16 vs batch 1
    python -m bench.generate_bench --backends hf,vllm --json gen.json  # GPU: also vLLM vs HF
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import emit, parse, parser, set_threads

GOAL_BATCHED_OVER_SINGLE = 4.0
_WARMUP_PROMPTS = 2


def bench_prompts(n: int) -> list[str]:
    """``n`` evaluation prompts, alternating harmful (harmbench) and benign look-alikes (xstest-safe)."""
    from itertools import chain, zip_longest

    from safetypatch.data import canonical_split, load_dataset

    sets = [canonical_split(load_dataset(name)).eval.prompts() for name in ("harmbench", "xstest-safe")]
    mixed = [p for p in chain.from_iterable(zip_longest(*sets)) if p is not None]
    return (mixed * (n // max(1, len(mixed)) + 1))[:n]


def _timed(generate: Any, prompts: list[str]) -> tuple[float, list[Any]]:
    generate(prompts[:_WARMUP_PROMPTS])
    start = time.perf_counter()
    out = generate(prompts)
    return time.perf_counter() - start, out


def _record(seconds: float, generations: list[Any], reference: list[Any] | None) -> dict[str, Any]:
    tokens = sum(g.n_new_tokens for g in generations)
    same = None if reference is None else sum(a.token_ids == b.token_ids for a, b in zip(generations, reference,
                                                                                          strict=True))
    return {"seconds": round(seconds, 3), "new_tokens": tokens, "tokens_per_second": round(tokens / seconds, 2),
            "identical_to_batch_1": same}


def run_benchmark(model: str, n_prompts: int, max_new_tokens: int, batch_size: int, backends: list[str],
                  threads: int | None = None) -> dict[str, Any]:
    """Generate the same prompts with each backend and batch size; return throughputs and ratios.

    Args:
        model: model reference (catalog name, folder, Hub id).
        n_prompts: prompts generated per configuration.
        max_new_tokens: generation length.
        batch_size: the batched configuration's batch size.
        backends: ``hf`` (batch ``batch_size`` and batch 1) and optionally ``vllm`` (needs a GPU and the extra).
        threads: CPU threads (default: all usable cores).

    Returns:
        The measurements as a JSON-ready dict.
    """
    from safetypatch.eval.generate import GenerationProtocol, generate_chat
    from safetypatch.models.loading import load_model

    used_threads = set_threads(threads)
    loaded = load_model(model)
    prompts = bench_prompts(n_prompts)
    protocol = GenerationProtocol(max_new_tokens=max_new_tokens, dtype=loaded.dtype, batch_size=batch_size)
    single = protocol.model_copy(update={"batch_size": 1})
    results: dict[str, Any] = {}
    seconds, reference = _timed(lambda ps: generate_chat(loaded.model, loaded.tokenizer, ps, single), prompts)
    results["hf_batch_1"] = _record(seconds, reference, reference)
    seconds, batched = _timed(lambda ps: generate_chat(loaded.model, loaded.tokenizer, ps, protocol), prompts)
    results[f"hf_batch_{batch_size}"] = _record(seconds, batched, reference)
    ratios = {f"hf_batch_{batch_size}_over_batch_1": round(
        results[f"hf_batch_{batch_size}"]["tokens_per_second"] / results["hf_batch_1"]["tokens_per_second"], 3)}
    if "vllm" in backends:
        from safetypatch.eval.backends.vllm import generate_vllm, load_vllm

        engine = load_vllm(loaded.resolved.path, protocol)
        seconds, out = _timed(lambda ps: generate_vllm(engine, loaded.tokenizer, ps, protocol), prompts)
        results["vllm"] = _record(seconds, out, reference)
        ratios[f"vllm_over_hf_batch_{batch_size}"] = round(
            results["vllm"]["tokens_per_second"] / results[f"hf_batch_{batch_size}"]["tokens_per_second"], 3)
    return {"model": loaded.provenance(), "prompts": n_prompts, "max_new_tokens": max_new_tokens,
            "threads": used_threads, **results, "ratios": ratios,
            "goal_batched_over_batch_1_at_least": GOAL_BATCHED_OVER_SINGLE,
            "goal_met": ratios[f"hf_batch_{batch_size}_over_batch_1"] >= GOAL_BATCHED_OVER_SINGLE}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print (and with ``--json`` write) its JSON."""
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--model", default="smollm2-135m-instruct", help="model reference")
    arguments.add_argument("--prompts", type=int, default=64, help="prompts per configuration (default 64)")
    arguments.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default 64)")
    arguments.add_argument("--batch-size", type=int, default=16, help="batched configuration (default 16)")
    arguments.add_argument("--backends", default="hf", help="comma-separated: hf, vllm (GPU)")
    arguments.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = parse(arguments, argv)
    emit(run_benchmark(args.model, args.prompts, args.max_new_tokens, args.batch_size, args.backends.split(","),
                       args.threads), args, argv, __spec__.name)


if __name__ == "__main__":
    main()
