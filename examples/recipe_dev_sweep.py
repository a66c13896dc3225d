"""Measure a patch recipe on development rows carved out of the training halves, never on the evaluation halves.

The development rows are the catalog's (``DatasetSpec.dev_rows``, ``data.splits.development_split``: HarmBench,
AdvBench, benign-edgy and the everyday look-alikes give up a seeded sample of their train half, which ``safetypatch
train`` never reads either, docs/generalization.md); the patch is trained on the rest with the recipe given,
snapshotted every ``--snap-every`` optimiser steps, and every snapshot is judged on the development rows (greedy,
``--dev-tokens`` new tokens, keyword and embedding judges). Out-of-family sets are neither trained nor judged here.
Recipe choices are made here, so that the evaluation halves stay untouched until the final measurement under the
``standard`` and ``generalization`` presets. One JSON line per run is appended to ``<output-dir>/log.jsonl`` and the
answers go to ``<output-dir>/samples/``; the retain answers are cached in ``<output-dir>/retain_cache.json``.

    python examples/recipe_dev_sweep.py --name lead --set num_train_epochs=3,lead_tokens=4,lead_weight=3 \\
        --snap-every 75 --output-dir runs/dev-sweep
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import safetypatch
from safetypatch.api.train import TrainConfig, own_refusals
from safetypatch.data import development_split, training_split
from safetypatch.data.catalog import dev_row_count
from safetypatch.data.sets import DATASETS
from safetypatch.eval.generate import GenerationProtocol, generate_chat
from safetypatch.eval.judges import build_judge
from safetypatch.train import build_refusal_examples, build_retain_examples, tokenize_examples, train_refusal_patch
from safetypatch.train.recipes import get_recipe

DEV = {name: dev_row_count(name) for name in DATASETS.names() if dev_row_count(name)}
HARMFUL = [name for name in TrainConfig().harmful if name != "donotanswer"]
RETAIN = TrainConfig().retain


def main() -> None:
    args = _parser().parse_args()
    out: Path = args.output_dir
    (out / "samples").mkdir(parents=True, exist_ok=True)
    recipe = get_recipe(args.recipe, **_overrides(args.set))
    harmful_names, retain_names = args.harmful.split(","), [r for r in args.retain.split(",") if r]
    loaded = safetypatch.load_model(args.model, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    train_rows, dev = {}, {}
    for name in {*harmful_names, *retain_names, *DEV}:
        dataset = safetypatch.load_dataset(name)
        train_rows[name] = list(training_split(dataset, DEV.get(name, 0)).train.rows)
        if name in DEV:
            dev[name] = [r.prompt for r in development_split(dataset, DEV[name]).eval.rows]
    per_set = {n: int(k) for n, k in (item.split("=") for item in filter(None, args.n_per.split(",")))}
    harmful = [r for n in harmful_names for r in train_rows[n][: per_set.get(n, args.n_harmful)]]
    benign = [r.prompt for n in retain_names for r in train_rows[n]][: recipe.retain_count]
    start = time.perf_counter()
    answers = _cached_answers(model, tok, benign, args.retain_max_new, out / "retain_cache.json") if benign else []
    if not args.keep_retain_refusals:  # as safetypatch train does by default
        kept = [i for i, refused in enumerate(own_refusals(answers)) if not refused]
        benign, answers = [benign[i] for i in kept], [answers[i] for i in kept]
    examples = build_refusal_examples(harmful, seed=recipe.refusal_seed) + build_retain_examples(
        benign, answers, weight=recipe.retain_weight)
    tokenized = tokenize_examples(tok, examples, max_length=recipe.max_length, think=recipe.think)
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if args.snap_every and state.global_step % args.snap_every == 0 and state.global_step < state.max_steps:
                snaps[state.global_step] = _lora_state(model)

    with tempfile.TemporaryDirectory() as scratch:
        result = train_refusal_patch(model, tok, tokenized, recipe, Path(scratch), callbacks=[Snapshot()])
    snaps[result.steps] = _lora_state(result.model)
    seconds = time.perf_counter() - start
    rates = {}
    for step, state in sorted(snaps.items()):
        result.model.load_state_dict(state, strict=False)
        result.model.eval()
        with torch.no_grad():
            rates[f"step{step}"] = _judge(result.model, tok, dev, args.dev_tokens, out / "samples" /
                                          f"{args.name}_step{step}.json")
        print(step, {k: v["keyword"] for k, v in rates[f"step{step}"].items()}, flush=True)
    record = {"name": args.name, "recipe": args.recipe, "set": _overrides(args.set), "n_harmful": len(harmful),
              "n_retain": len(benign), "train_seconds": round(seconds), "steps": result.steps, "results": rates,
              "harmful_sets": harmful_names, "retain_sets": retain_names, "dev_rows": DEV,
              "fingerprint": loaded.fingerprint.sha256}
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _cached_answers(model, tok, prompts: list[str], max_new: int, cache_file: Path) -> list[str]:
    """The model's own greedy answers to the retain prompts, cached across runs (they do not depend on the recipe)."""
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    todo = [p for p in dict.fromkeys(prompts) if f"{max_new}|{p}" not in cache]
    if todo:
        protocol = GenerationProtocol(max_new_tokens=max_new, dtype="float32", batch_size=16)
        cache.update({f"{max_new}|{g.prompt}": g.response for g in generate_chat(model, tok, todo, protocol)})
        cache_file.write_text(json.dumps(cache))
    return [cache[f"{max_new}|{p}"] for p in prompts]


def _judge(model, tok, dev: dict[str, list[str]], max_new: int, samples_file: Path) -> dict[str, dict]:
    keyword, embedding = build_judge("keyword"), build_judge("embedding")
    protocol = GenerationProtocol(max_new_tokens=max_new, dtype="float32", batch_size=16)
    rates, samples = {}, {}
    for name, prompts in dev.items():
        responses = [g.response for g in generate_chat(model, tok, prompts, protocol)]
        kw = [v.refused for v in keyword.judge(prompts, responses)]
        emb = [v.refused for v in embedding.judge(prompts, responses)]
        rates[name] = {"keyword": sum(kw) / len(kw), "embedding": sum(emb) / len(emb), "n": len(kw)}
        samples[name] = [{"prompt": p, "response": r, "keyword": a, "embedding": b}
                         for p, r, a, b in zip(prompts, responses, kw, emb, strict=True)]
    samples_file.write_text(json.dumps(samples, indent=1))
    return rates


def _overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="Run name in the log and the sample files.")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--recipe", default="mou")
    p.add_argument("--set", default="", help="PatchRecipe overrides, key=value,...")
    p.add_argument("--n-harmful", type=int, default=60, help="Most harmful training prompts per set.")
    p.add_argument("--n-per", default="", help="Per-set counts that replace --n-harmful, name=n,...")
    p.add_argument("--harmful", default=",".join(HARMFUL))
    p.add_argument("--retain", default=",".join(RETAIN))
    p.add_argument("--retain-max-new", type=int, default=32)
    p.add_argument("--keep-retain-refusals", action="store_true", help="Keep retain answers that refuse.")
    p.add_argument("--snap-every", type=int, default=0, help="Also judge a snapshot every N optimiser steps.")
    p.add_argument("--dev-tokens", type=int, default=24, help="New tokens per development answer.")
    p.add_argument("--output-dir", type=Path, default=Path("runs/dev-sweep"))
    return p


if __name__ == "__main__":
    main()
