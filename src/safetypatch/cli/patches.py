"""Verbs that make and apply safety patches: demo, train, finetune, apply."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from safetypatch.cli._app import (
    ConfigOpt,
    app,
    console,
    friendly,
    key_value_table,
    out,
    pairs,
    paths,
    split,
    task_bars,
)


@app.command()
@friendly
def demo(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Model to patch: catalog name, folder, .gguf or Hub id.")] = None,
    recipe: Annotated[str | None, typer.Option(help="Patch recipe: mou, xue, or a Xue mode string.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Recipe fields, e.g. learning_rate=1e-4,r=4; repeatable.")] = None,
    budget: Annotated[str | None, typer.Option(
        help="Patch budget: demo (a smaller patch, under 20 min on 2 CPU cores) or full (train's defaults).")] = None,
    n_harmful: Annotated[int | None, typer.Option(help="Most harmful training prompts per set.")] = None,
    preset: Annotated[str | None, typer.Option(help="Evaluation budget before and after: demo, quick, full.")] = None,
    limit: Annotated[int | None, typer.Option(help="Most rows per evaluation task.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder: before/, patch/, after/, report.html.")] = None,
    n_show: Annotated[int | None, typer.Option(help="Answers shown before/after per task.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Redo every step instead of resuming.")] = None,
) -> None:
    """The main job: evaluate the model, train a LoRA safety patch, apply it, evaluate again, write a report."""
    from safetypatch import api
    from safetypatch.api.demo import STEP_MINUTES, STEPS
    from safetypatch.config import load_config

    cfg = load_config(api.DemoConfig, config, dict(
        model=model, recipe=recipe, recipe_overrides=pairs(set_), budget=budget, n_harmful=n_harmful, preset=preset,
        limit=limit, output_dir=output_dir, n_show=n_show, overwrite=overwrite))
    plan = ", ".join(f"{name} (~{STEP_MINUTES[name]} min)" for name in STEPS)
    console.print(f"[bold]safetypatch demo[/] on {cfg.model} -> {cfg.output_dir}\n{len(STEPS)} steps, timed on 2 "
                  f"CPU cores (a first run also converts the model, ~1 min): {plan}")
    with task_bars() as report:

        def started(index: int, name: str, reused: bool) -> None:
            report.reset()
            console.print(f"[bold]{index + 1}/{len(STEPS)} {name}[/]" + (" (reused from the last run)" if reused
                                                                          else ""))

        result = api.demo(cfg, progress=report, on_step=started)
    table = Table(title="answers before and after the patch (greedy)")
    for col in ("task", "prompt", "before", "after"):
        table.add_column(col, overflow="fold")
    for answer in result.answers:
        table.add_row(answer.task, answer.prompt[:160], answer.before[:200], answer.after[:200])
    out.print(table)
    for sentence in result.summary:
        out.print(sentence)
    timing = ", ".join(f"{step} {secs / 60:.1f} min" for step, secs in result.seconds.items() if secs)
    console.print(f"[green]done[/] ({timing}). Report: {result.report}  Patch: {result.patch}")


@app.command()
@friendly
def train(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Patch base: catalog name, folder, .gguf or Hub id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    recipe: Annotated[str | None, typer.Option(help="mou, xue, or a Xue mode string.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Recipe fields, e.g. learning_rate=1e-4,r=4; repeatable.")] = None,
    full: Annotated[bool | None, typer.Option("--full", help="Full-parameter Refusal-SFT (Mou et al.'s baseline): "
                                                             "a complete model folder.")] = None,
    harmful: Annotated[str | None, typer.Option(help="Comma-separated harmful sets (train halves).")] = None,
    n_harmful: Annotated[int | None, typer.Option(help="Most harmful prompts per set.")] = None,
    n_per_set: Annotated[list[str] | None, typer.Option(help="Per-set counts that replace --n-harmful, e.g. "
                                                             "harmbench=150; repeatable.")] = None,
    harmful_categories: Annotated[list[str] | None, typer.Option(
        help="Narrow a harmful set to some categories, e.g. donotanswer=malicious_uses+information_hazard; "
             "repeatable.")] = None,
    retain: Annotated[str | None, typer.Option(help="Comma-separated benign retain sets.")] = None,
    retain_max_new_tokens: Annotated[int | None, typer.Option(help="Length of retain answers.")] = None,
    harmful_forms: Annotated[str | None, typer.Option(
        help="Comma-separated training forms every harmful prompt is also rewritten into (question, past, "
             "hypothetical, roleplay).")] = None,
    retain_forms: Annotated[str | None, typer.Option(
        help="Comma-separated training forms every retain prompt is also rewritten into (benign twins).")] = None,
    forms_per_prompt: Annotated[int | None, typer.Option(
        help="Rewrite each prompt into this many of the forms, chosen by its hash (default: all).")] = None,
    retain_keep_refusals: Annotated[bool | None, typer.Option(
        "--retain-keep-refusals", help="Keep retain answers in which the model refuses a benign prompt.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Patch folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing patch (and, without "
                                                                       "--resume, remove old checkpoints).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="Save a checkpoint every N optimiser steps into <output>.checkpoints/ (removed when done).")] = None,
    resume: Annotated[bool | None, typer.Option(
        "--resume", help="Continue from the last checkpoint an interrupted run left in <output>.checkpoints/.",
    )] = None,
) -> None:
    """Train a safety patch (LoRA Refusal-SFT on safety data) into a verified PEFT folder; --full: a model folder."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.TrainConfig, config, dict(
        model=model, revision=revision, recipe=recipe, recipe_overrides=pairs(set_), full=full,
        harmful=split(harmful), n_harmful=n_harmful, n_per_set=pairs(n_per_set),
        harmful_categories=_categories(pairs(harmful_categories)), retain=split(retain),
        retain_max_new_tokens=retain_max_new_tokens, harmful_forms=split(harmful_forms),
        retain_forms=split(retain_forms), forms_per_prompt=forms_per_prompt,
        retain_keep_refusals=retain_keep_refusals, output=output,
        dtype=dtype, overwrite=overwrite, checkpoint_every=checkpoint_every, resume=resume))
    console.print(f"[bold]safetypatch train[/] {cfg.recipe} patch on {cfg.model} -> {cfg.output}")
    with task_bars() as report:
        result = api.train_patch(cfg, progress=report)
    launch = result.training["launch"]
    where = f" on {launch['num_processes']} processes ({launch['distributed_type']})" if launch["num_processes"] > 1 \
        else ""
    losses = result.training["loss_history"]
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min{where}: {result.n_refusal} refusals, "
                  f"{result.n_retain} retain answers, {result.training['steps']} steps, "
                  f"loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; patch at {result.path}")


def _categories(by_set: dict[str, str] | None) -> dict[str, list[str]] | None:
    """``{"donotanswer": "a+b"}`` → ``{"donotanswer": ["a", "b"]}``."""
    return {name: [c for c in text.split("+") if c] for name, text in by_set.items()} if by_set else None


@app.command()
@friendly
def finetune(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Base model: catalog name, folder, .gguf or Hub id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Set with responses (arith, chat, harmful-qa) or file.")] = None,
    n: Annotated[int | None, typer.Option(help="Most rows of the set's train half.")] = None,
    recipe: Annotated[str | None, typer.Option(help="Hyper-parameters: mou, xue, or a Xue mode string.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Recipe fields, e.g. learning_rate=1e-4,r=4; repeatable.")] = None,
    mode: Annotated[str | None, typer.Option(help="lora (merged into the weights) or full.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Model folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing model folder.")] = None,
) -> None:
    """Fine-tune a model on a dataset's prompt -> response pairs and save it as a complete model folder."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.FinetuneConfig, config, dict(
        model=model, revision=revision, dataset=dataset, n=n, recipe=recipe, recipe_overrides=pairs(set_),
        mode=mode, output=output, dtype=dtype, overwrite=overwrite))
    console.print(f"[bold]safetypatch finetune[/] {cfg.model} on {cfg.dataset} ({cfg.mode}) -> {cfg.output}")
    with task_bars() as report:
        result = api.finetune(cfg, progress=report)
    losses = result.training["loss_history"]
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min: {result.rows} rows, "
                  f"{result.training['steps']} steps, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; "
                  f"model at {result.path}")


@app.command()
@friendly
def apply(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Target: the patch base or a fine-tune of it.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    patch: Annotated[list[str] | None, typer.Option(
        "--patch", "-p", help="Patch folder; repeat or comma-separate for several (combined exactly in ΔW).")] = None,
    weights: Annotated[str | None, typer.Option(help="Comma-separated weight per patch, e.g. 1,0.5.")] = None,
    mode: Annotated[str | None, typer.Option(help="attach (PEFT adapter, default) or merge.")] = None,
    scale: Annotated[float | None, typer.Option(help="Merge scale gamma (merge only).")] = None,
    reduce_k: Annotated[int | None, typer.Option(help="Overlap reduction: top-k subspace (merge only).")] = None,
    reduce_side: Annotated[str | None, typer.Option(help="Reduction side: column, row or both.")] = None,
    reduce_retention: Annotated[float | None, typer.Option(help="Share of the in-subspace part kept.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Merged model or adapter folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing output.")] = None,
) -> None:
    """Apply safety patches to a model: attach them as a PEFT adapter or merge them into the weights."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.ApplyConfig, config, dict(
        model=model, revision=revision, patches=paths(patch), weights=split(weights), mode=mode, scale=scale,
        reduce_k=reduce_k, reduce_side=reduce_side, reduce_retention=reduce_retention, output=output, dtype=dtype,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch apply[/] {len(cfg.patches)} patch(es) onto {cfg.model} ({cfg.mode})")
    with console.status("loading the model and applying the patches..."):
        result = api.apply_patch(cfg)
    out.print(_applied_table(result))
    console.print(f"[green]done[/]: {result.output or 'kept in memory only (no --output given)'}")


def _applied_table(result: Any) -> Table:
    """The summary of ``safetypatch apply``: what was applied, how, its effect, and where it went."""
    record = result.record
    fingerprint = {True: "same as the patch base", False: "different: a descendant (recorded as applied_to)",
                   None: "unknown: the patch records no base fingerprint"}[result.applied_to["same_as_patch_base"]]
    reduction = record["reduction"]
    rows = {
        "patches": record["name"], "mode": result.mode, "scale": f"{result.scale:g}",
        "modules": f"{record['modules']} (rank {record['rank']})",
        "overlap reduction": f"k={reduction['k']}, {reduction['side']}, λ={reduction['retention']:g}" if reduction
        else "none",
        "max logit change": f"{result.max_logit_change:.3g}", "fingerprint": fingerprint,
        "output": str(result.output or "-"),
    }
    return key_value_table("applied", rows)
