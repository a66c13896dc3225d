"""Benchmark of the evaluation engine's generation (``safetypatch.eval.generate``, the pinned greedy protocol):
batched (``--batch-size``, default 16, the protocol's) against one prompt at a time (issue 7 goal on a CPU: ≥ 4×),
and on a GPU with vLLM installed, vLLM (through ``safetypatch.eval.backends.vllm``) against the HF backend.

Every backend generates the same ``--prompts`` prompts (harmbench and xstest-safe evaluation prompts, rendered by
the model's chat template) for ``--max-new-tokens`` tokens, in one process, after a short warm-up; throughput is
generated tokens (the stop token included) per second. Greedy outputs are compared with batch-size-1 generation
(the reference), prompt by prompt.

``--tasks`` measures the evaluation's own batching instead (issue 30 goal: ``eval --preset standard`` ≥ 2× faster
with every answer identical): every prompt of the named safety tasks as ``safetypatch eval`` generates them (a
task's held-out rows, ``--limit`` a seeded sample), batch ``--batch-size`` (64 there), generated as before
(``whole``: ``batching="whole"``, one batch at a time on torch's threads) and as now (``grouped``: length groups,
shared prefix run once, groups side by side on the cores), alternating ``--repeats`` times (so that a change of
machine load hits both sides), each answer compared token for token.
``--compare-samples OLD NEW`` compares the per-sample files of two ``safetypatch eval`` output folders (one run of
the code before, one after): response, token count and finish reason of every generated answer. Usage (from the
repository root)::

    python -m bench.generate_bench --json generate.json               # CPU: batch 16 vs batch 1
    python -m bench.generate_bench --backends hf,vllm --json gen.json  # GPU: also vLLM vs HF
    python -m bench.generate_bench --tasks harmbench,xstest-safe --max-new-tokens 48 --batch-size 64 \
        --json eval_batching.json                                      # whole batches vs grouped ones
    python -m bench.generate_bench --compare-samples runs/eval-old runs/eval-new --json identity.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
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


def task_prompts(tasks: list[str], limit: int | None, seed: int = 0) -> dict[str, list[str]]:
    """The prompts ``safetypatch eval`` generates for each task (its held-out rows, a seeded sample of ``limit``)."""
    from safetypatch.eval.task import TASKS, task_rows

    return {name: [row.prompt for row in task_rows(TASKS.get(name), limit, seed).rows] for name in tasks}


def run_eval_batching(model: str, tasks: list[str], limit: int | None, max_new_tokens: int, batch_size: int,
                      repeats: int, threads: int | None = None) -> dict[str, Any]:
    """Each task's prompts generated with whole and with grouped batches, alternating ``repeats`` times.

    Args:
        model: model reference.
        tasks: safety task names (``safetypatch ls tasks``).
        limit: most rows per task (a seeded sample, as ``eval --limit``); None: every held-out row.
        max_new_tokens: generation length (the ``standard`` preset's is 48).
        batch_size: prompts per batch (``eval``'s default is 64).
        repeats: rounds of (whole, grouped); each side's fastest round is its time.
        threads: CPU threads (default: all usable cores).

    Returns:
        Per task and in total: seconds of each side (every round and the fastest), the ratio, and how many answers
        are identical token for token (and finish the same way) in every round.
    """
    from safetypatch.eval.generate import GenerationProtocol, generate_chat
    from safetypatch.models.loading import load_model

    used_threads = set_threads(threads)
    loaded = load_model(model)
    grouped = GenerationProtocol(max_new_tokens=max_new_tokens, dtype=loaded.dtype, batch_size=batch_size)
    sides = {"whole": grouped.model_copy(update={"batching": "whole"}), "grouped": grouped}
    generate_chat(loaded.model, loaded.tokenizer, bench_prompts(_WARMUP_PROMPTS), grouped)
    per_task: dict[str, Any] = {}
    for name, prompts in task_prompts(tasks, limit).items():
        rounds: dict[str, list[float]] = {side: [] for side in sides}
        answers: dict[str, list[Any]] = {}
        identical = len(prompts)
        for _ in range(repeats):
            for side, protocol in sides.items():
                start = time.perf_counter()
                answers[side] = generate_chat(loaded.model, loaded.tokenizer, prompts, protocol,
                                              workers=1 if side == "whole" else None)
                rounds[side].append(round(time.perf_counter() - start, 3))
            identical = min(identical, sum(
                (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
                for a, b in zip(answers["whole"], answers["grouped"], strict=True)))
        per_task[name] = {"prompts": len(prompts), "new_tokens": sum(g.n_new_tokens for g in answers["grouped"]),
                          "seconds": rounds, "fastest": {side: min(times) for side, times in rounds.items()},
                          "identical_answers": identical}
        per_task[name]["ratio_whole_over_grouped"] = round(
            per_task[name]["fastest"]["whole"] / per_task[name]["fastest"]["grouped"], 3)
    total = {side: round(sum(t["fastest"][side] for t in per_task.values()), 3) for side in sides}
    return {"model": loaded.provenance(), "tasks": per_task, "limit": limit, "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "repeats": repeats, "threads": used_threads, "fastest_total_seconds": total,
            "ratio_whole_over_grouped": round(total["whole"] / total["grouped"], 3),
            "identical_answers": sum(t["identical_answers"] for t in per_task.values()),
            "answers": sum(t["prompts"] for t in per_task.values())}


# Fields of a sample that two runs of the same rows must share: a generated answer and its bookkeeping (safety and
# exact-match tasks), the reference answer and its scores (drift), the log-likelihoods (multiple choice).
_COMPARED = ("response", "n_new_tokens", "finish_reason", "reference_response", "kl", "nll_delta", "loglikelihoods")


def compare_samples(old: Path, new: Path) -> dict[str, Any]:
    """Compare the generated answers of two ``safetypatch eval`` output folders, sample file by sample file.

    Args:
        old: an output folder (``<output_dir>`` or the model folder inside it) of one run.
        new: the same of the other run, with the same tasks, rows and protocol.

    Returns:
        Per task: samples, the fields compared (those of ``_COMPARED`` it has), how many samples agree on all of
        them exactly, the first differing doc ids, the seconds each run's results file records; the totals over the
        tasks with generated answers, and the summed task seconds of each run and their ratio.

    Raises:
        DataError: a folder holds no sample file, or the two runs have different tasks or rows.
    """
    from safetypatch.errors import DataError

    files = {side: _sample_files(folder) for side, folder in (("old", old), ("new", new))}
    seconds = {side: _task_seconds(folder) for side, folder in (("old", old), ("new", new))}
    if not files["old"] or files["old"].keys() != files["new"].keys():
        raise DataError(f"sample files differ: {sorted(files['old'])} in {old} against {sorted(files['new'])} in "
                        f"{new}; compare two eval runs of the same tasks.")
    tasks: dict[str, Any] = {}
    for task in sorted(files["old"]):
        rows = {side: [json.loads(line) for line in files[side][task].read_text().splitlines() if line.strip()]
                for side in files}
        if [r["prompt"] for r in rows["old"]] != [r["prompt"] for r in rows["new"]]:
            raise DataError(f"task {task}: the two runs have different rows; compare runs with the same limits.")
        keys = [key for key in _COMPARED if key in rows["old"][0]]
        differ = [a["doc_id"] for a, b in zip(rows["old"], rows["new"], strict=True)
                  if any(a.get(key) != b.get(key) for key in keys)]
        tasks[task] = {"samples": len(rows["old"]), "compared": keys, "identical": len(rows["old"]) - len(differ),
                       "first_differing_doc_ids": differ[:10],
                       "seconds": {side: seconds[side].get(task) for side in seconds}}
    answered = [t for t in tasks.values() if {"response", "reference_response"} & set(t["compared"])]
    totals = {side: round(sum(times.values()), 1) for side, times in seconds.items()}
    return {"old": str(old), "new": str(new), "tasks": tasks, "task_seconds": totals,
            "ratio_old_over_new": round(totals["old"] / totals["new"], 3) if totals["new"] else None,
            "answers": sum(t["samples"] for t in answered), "identical_answers": sum(t["identical"] for t in answered)}


def _task_seconds(folder: Path) -> dict[str, float]:
    """Task → the seconds its results file records (``configs[task]["seconds"]``), over every results file found."""
    seconds: dict[str, float] = {}
    for path in sorted(folder.rglob("results_*.json")):
        for task, config in json.loads(path.read_text()).get("configs", {}).items():
            if "seconds" in config:
                seconds[task] = config["seconds"]
    return seconds


def _sample_files(folder: Path) -> dict[str, Path]:
    """Task → its newest ``samples_<task>_<timestamp>.jsonl`` under ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("samples_*.jsonl")):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        found[task] = path
    return found


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print (and with ``--json`` write) its JSON."""
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--model", default="smollm2-135m-instruct", help="model reference")
    arguments.add_argument("--prompts", type=int, default=64, help="prompts per configuration (default 64)")
    arguments.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default 64)")
    arguments.add_argument("--batch-size", type=int, default=16, help="batched configuration (default 16)")
    arguments.add_argument("--backends", default="hf", help="comma-separated: hf, vllm (GPU)")
    arguments.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    arguments.add_argument("--tasks", default=None,
                           help="comma-separated safety tasks: whole vs grouped batches on their eval prompts")
    arguments.add_argument("--limit", type=int, default=None, help="with --tasks: most rows per task")
    arguments.add_argument("--repeats", type=int, default=2, help="with --tasks: alternating rounds (default 2)")
    arguments.add_argument("--compare-samples", nargs=2, type=Path, metavar=("OLD", "NEW"), default=None,
                           help="compare the generated answers of two eval output folders")
    args = parse(arguments, argv)
    if args.compare_samples:
        emit(compare_samples(*args.compare_samples), args, argv, __spec__.name)
        return
    if args.tasks:
        emit(run_eval_batching(args.model, args.tasks.split(","), args.limit, args.max_new_tokens, args.batch_size,
                               args.repeats, args.threads), args, argv, __spec__.name)
        return
    emit(run_benchmark(args.model, args.prompts, args.max_new_tokens, args.batch_size, args.backends.split(","),
                       args.threads), args, argv, __spec__.name)


if __name__ == "__main__":
    main()
