"""Benchmark of ``safetypatch train``'s trainer (Refusal-SFT over TRL, loss at supervised positions only, batches
grouped by length) against stock TRL ``SFTTrainer`` + PEFT (issue 7 goal: ≥ 1.5× tokens/s, ≤ 0.6× peak RSS).

Both sides train the same LoRA (the ``mou`` recipe: r = 8 on every linear module) of the same model for one epoch
over the same tokenised prompt-completion examples (half refusals of harmbench/advbench train prompts, half arith
train pairs; identical token ids and completion masks, all at loss weight 1), with the same batch size,
optimiser, schedule, precision, activation checkpointing (off, the recipe's default; ``--checkpointing`` turns it
on for both, TRL's own default being on) and thread count. Each side runs in a fresh process, so its peak RSS is its
own; the tokens counted are the examples' real (non-padding) tokens. Stock TRL otherwise keeps its defaults
(random batches, its fused LM head with entropy and accuracy metrics); ``--stock-group-by-length`` gives it
length-grouped batches too.

A third fresh process only imports the libraries, loads the model and tokenises the examples (``baseline``): the
fixed part of both peaks, which bounds their ratio from below.

With ``--profile`` each side also trains ``--profile-steps`` steps under ``torch.profiler`` (in another fresh
process, so the timed run is not slowed) and the table of its top operators is written next to the JSON, which
shows what bounds each side. Usage (from the repository root)::

    python -m bench.train_bench --json train.json --profile
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import emit, in_fresh_process, parse, parser, peak_rss_bytes, set_threads

SIDES = ("safetypatch", "stock_trl")
GOALS = {"tokens_per_second_ratio_at_least": 1.5, "peak_rss_ratio_at_most": 0.6}


@dataclass(frozen=True)
class Setup:
    """What both sides share (recorded in the JSON)."""

    model: str = "smollm2-135m-instruct"
    examples: int = 256
    batch_size: int = 8
    max_length: int = 256
    threads: int | None = None
    seed: int = 0
    max_steps: int = -1
    checkpointing: bool = False
    stock_group_by_length: bool = False


def _examples(setup: Setup, tokenizer: Any) -> list[Any]:
    """``setup.examples`` tokenised examples: refusals of harmful train prompts, then benign train pairs."""
    from itertools import chain, cycle, islice

    from safetypatch.data import canonical_split, load_dataset
    from safetypatch.train import build_refusal_examples, build_retain_examples, tokenize_examples

    def train_rows(*names: str) -> list[Any]:
        return list(chain.from_iterable(canonical_split(load_dataset(n)).train.rows for n in names))

    n_refusal = setup.examples // 2
    harmful = list(islice(cycle(train_rows("harmbench", "advbench")), n_refusal))
    benign = list(islice(cycle(train_rows("arith")), setup.examples - n_refusal))
    examples = build_refusal_examples(harmful) + build_retain_examples(
        [row.prompt for row in benign], [row.response for row in benign])
    return tokenize_examples(tokenizer, examples, max_length=setup.max_length)


def _recipe(setup: Setup) -> Any:
    from safetypatch.train.recipes import get_recipe

    # Stock TRL has plain cross-entropy: no lead-token weighting and no unlikelihood term on either side, so both
    # train the same objective.
    return get_recipe("mou", num_train_epochs=1, max_steps=setup.max_steps, seed=setup.seed,
                      per_device_train_batch_size=setup.batch_size, max_length=setup.max_length, retain_weight=1.0,
                      lead_tokens=0, retain_unlikelihood=0.0, gradient_checkpointing=setup.checkpointing)


def _stock_trainer(setup: Setup, loaded: Any, data: list[Any], recipe: Any, work: Path) -> Any:
    """Stock TRL: SFTTrainer over the pre-tokenised examples, PEFT through ``peft_config``, TRL's defaults."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from safetypatch.train.distributed import resolve_precision
    from safetypatch.train.refusal_sft import lora_config

    precision = resolve_precision(recipe.precision)
    args = SFTConfig(
        output_dir=str(work), completion_only_loss=True, packing=False, max_length=None,
        per_device_train_batch_size=recipe.per_device_train_batch_size, learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type, weight_decay=recipe.weight_decay,
        num_train_epochs=recipe.num_train_epochs, max_steps=recipe.max_steps, seed=recipe.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=recipe.gradient_checkpointing,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
        **({"train_sampling_strategy": "group_by_length"} if setup.stock_group_by_length else {}))
    dataset = Dataset.from_dict({"input_ids": [list(ex.input_ids) for ex in data],
                                 "completion_mask": [list(ex.completion_mask) for ex in data]})
    layers = loaded.model.config.get_text_config().num_hidden_layers
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=dataset, processing_class=loaded.tokenizer,
                         peft_config=lora_config(recipe, layers))
    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON only
    return trainer


def side_phase(side: str, setup: Setup, profile_to: str | None = None) -> dict[str, Any]:
    """Train one side in this (fresh) process; with ``profile_to``, under the profiler, writing its table there."""
    import torch

    from safetypatch.models.loading import load_model
    from safetypatch.train.refusal_sft import make_trainer

    threads = set_threads(setup.threads)
    loaded = load_model(setup.model)
    data = _examples(setup, loaded.tokenizer)
    recipe = _recipe(setup)
    with tempfile.TemporaryDirectory(prefix=f"train-bench-{side}-") as work:
        trainer = (make_trainer(loaded.model, loaded.tokenizer, data, recipe, Path(work)) if side == "safetypatch"
                   else _stock_trainer(setup, loaded, data, recipe, Path(work)))
        rss_before = peak_rss_bytes()
        profiler = _profiler() if profile_to else None
        start = time.perf_counter()
        with profiler or _nothing():
            trainer.train()
        seconds = time.perf_counter() - start
    if profiler is not None:
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        Path(profile_to).write_text(profiler.key_averages().table(sort_by=sort, row_limit=30) + "\n")
    tokens = sum(len(ex.input_ids) for ex in data) if setup.max_steps < 0 else None
    return {"seconds": round(seconds, 3), "steps": trainer.state.global_step, "threads": threads,
            "tokens": tokens, "tokens_per_second": round(tokens / seconds, 1) if tokens else None,
            "final_loss": next((log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None),
            "peak_rss_bytes": peak_rss_bytes(), "rss_before_training_bytes": rss_before,
            "supervised_fraction": round(sum(sum(ex.completion_mask) for ex in data)
                                         / sum(len(ex.input_ids) for ex in data), 4)}


def baseline_phase(setup: Setup) -> dict[str, Any]:
    """The fixed part both sides pay, in this (fresh) process: import torch, transformers, PEFT and TRL, load the
    model and tokenise the examples; no trainer, no step."""
    import peft  # noqa: F401
    import trl  # noqa: F401

    from safetypatch.models.loading import load_model

    set_threads(setup.threads)
    loaded = load_model(setup.model)
    _examples(setup, loaded.tokenizer)
    return {"peak_rss_bytes": peak_rss_bytes()}


def _profiler() -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, profile_memory=True)


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def run_benchmark(setup: Setup, profile_dir: Path | None = None, profile_steps: int = 5) -> dict[str, Any]:
    """Time both sides (fresh processes), and with ``profile_dir`` profile ``profile_steps`` steps of each.

    Returns:
        The measurements, ratios (safetypatch over stock) and the goals met, as a JSON-ready dict.
    """
    baseline = in_fresh_process(baseline_phase, setup)
    sides = {side: in_fresh_process(side_phase, side, setup) for side in SIDES}
    ours, stock = sides["safetypatch"], sides["stock_trl"]
    fixed = baseline["peak_rss_bytes"]
    ratios = {"peak_rss": round(ours["peak_rss_bytes"] / stock["peak_rss_bytes"], 3),
              "peak_rss_above_baseline": round((ours["peak_rss_bytes"] - fixed)
                                               / max(1, stock["peak_rss_bytes"] - fixed), 3),
              "peak_rss_above_model": round((ours["peak_rss_bytes"] - ours["rss_before_training_bytes"])
                                            / max(1, stock["peak_rss_bytes"] - stock["rss_before_training_bytes"]),
                                            3)}
    if ours["tokens_per_second"] and stock["tokens_per_second"]:
        ratios["tokens_per_second"] = round(ours["tokens_per_second"] / stock["tokens_per_second"], 3)
    profiles = {}
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        short = replace(setup, max_steps=profile_steps)
        for side in SIDES:
            path = profile_dir / f"train_profile.{side}.txt"
            in_fresh_process(side_phase, side, short, str(path))
            profiles[side] = str(path)
    goals = {"tokens_per_second": ratios.get("tokens_per_second", 0) >= GOALS["tokens_per_second_ratio_at_least"],
             "peak_rss": ratios["peak_rss"] <= GOALS["peak_rss_ratio_at_most"]}
    return {"setup": asdict(setup), "baseline": baseline, **sides, "ratios": ratios, "goals": GOALS,
            "goals_met": goals,
            "profiles": profiles}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print (and with ``--json`` write) its JSON."""
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--model", default=Setup.model, help="model reference (default: the embedded SmolLM2)")
    arguments.add_argument("--examples", type=int, default=Setup.examples, help="examples in the epoch")
    arguments.add_argument("--batch-size", type=int, default=Setup.batch_size, help="per-device batch")
    arguments.add_argument("--max-length", type=int, default=Setup.max_length, help="token budget per example")
    arguments.add_argument("--threads", type=int, default=None, help="CPU threads of each side (default: all)")
    arguments.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    arguments.add_argument("--stock-group-by-length", action="store_true", help="length-grouped stock batches")
    arguments.add_argument("--profile", action="store_true", help="also profile a few steps of each side")
    arguments.add_argument("--profile-steps", type=int, default=5, help="steps profiled per side")
    args = parse(arguments, argv)
    setup = Setup(model=args.model, examples=args.examples, batch_size=args.batch_size, max_length=args.max_length,
                  threads=args.threads, checkpointing=args.checkpointing,
                  stock_group_by_length=args.stock_group_by_length)
    profile_dir = (args.json.parent if args.json else Path(".")) if args.profile else None
    emit(run_benchmark(setup, profile_dir, args.profile_steps), args, argv, __spec__.name)


if __name__ == "__main__":
    main()
