"""Verbs that measure and show: eval, probe, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from safetypatch.cli._app import (
    ConfigOpt,
    app,
    console,
    friendly,
    out,
    pairs,
    paths,
    split,
    task_bars,
    whole_names_table,
)


@app.command("eval")
@friendly
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
    limits: Annotated[list[str] | None, typer.Option(
        help="Per-task rows, e.g. harmbench=100,arc-easy=200; repeatable.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length of safety tasks.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch.")] = None,
    mc_batch_size: Annotated[int | None, typer.Option(help="Multiple-choice items per forward.")] = None,
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
        model=model, revision=revision, adapter=paths(adapter), merge_adapter=merge_adapter, merge_scale=merge_scale,
        reference_model=reference_model,
        preset=preset, tasks=split(tasks), limit=limit, limits=pairs(limits), max_new_tokens=max_new_tokens,
        batch_size=batch_size, mc_batch_size=mc_batch_size, judges=split(judges),
        system_prompt=system_prompt, dtype=dtype, backend=backend, seed=seed, output_dir=output_dir,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch eval[/] {cfg.model}, preset {cfg.preset}")
    with task_bars() as report:
        result = api.evaluate(cfg, progress=report)
    out.print(whole_names_table(f"{cfg.model}: headline metrics (95% CI in the results file)",
                                ("task", "metric,filter", "value"),
                                [(task, key, f"{value:.3f}") for task, metrics in result.headline.items()
                                 for key, value in metrics.items()]))
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min: {result.path}")


@app.command()
@friendly
def probe(
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="Model probed (unpatched): catalog name, folder, Hub id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (Hub ids only).")] = None,
    harmful: Annotated[str | None, typer.Option(help="Comma-separated harmful sets (train halves, label 1).")] = None,
    benign: Annotated[str | None, typer.Option(help="Comma-separated benign sets (train halves, label 0).")] = None,
    n_train: Annotated[int | None, typer.Option(help="Most training prompts per set.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated held-out safety tasks.")] = None,
    limit: Annotated[int | None, typer.Option(help="Most rows per task (seeded sample, as eval draws it).")] = None,
    limits: Annotated[list[str] | None, typer.Option(
        help="Per-task rows, e.g. harmbench=100,xstest-safe=60; repeatable.")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated decoder blocks to try (default all).")] = None,
    folds: Annotated[int | None, typer.Option(help="k of the cross-validation choosing the layer.")] = None,
    l2: Annotated[float | None, typer.Option(help="L2 weight of the logistic regression.")] = None,
    balanced: Annotated[bool | None, typer.Option("--balanced/--no-balanced",
                                                  help="Weigh the two labels equally.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the folds.")] = None,
    row_seed: Annotated[int | None, typer.Option(help="Held-out rows' seed (default: results', else --seed).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per forward pass.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    results: Annotated[Path | None, typer.Option(help="Eval results folder (or file) of the patch.")] = None,
    judge: Annotated[str | None, typer.Option(help="Judge of --results (default its headline judge).")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="probe.json + samples.jsonl.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing output folder.")] = None,
) -> None:
    """The linear-probe ceiling: how well the model's own hidden states flag the held-out harmful prompts."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.ProbeConfig, config, dict(
        model=model, revision=revision, harmful=split(harmful), benign=split(benign), n_train=n_train,
        tasks=split(tasks), limit=limit, limits=pairs(limits), layers=split(layers), folds=folds, l2=l2,
        balanced=balanced, seed=seed, row_seed=row_seed, batch_size=batch_size, dtype=dtype, results=results,
        judge=judge, output_dir=output_dir, overwrite=overwrite))
    console.print(f"[bold]safetypatch probe[/] {cfg.model} -> {cfg.output_dir}")
    with task_bars() as report:
        result = api.probe(cfg, progress=report)
    out.print(_probe_table(result.document))
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output}")


def _probe_table(document: dict[str, Any]) -> Table:
    """One row per held-out task: its role, rows, the probe's share flagged and, with results, the patch's refusal
    rate on the rows both judged."""
    fitted, compared = document["probe"], document["results"]
    training = document["training"]
    title = escape(f"linear probe at layer {fitted['layer']} (CV accuracy {fitted['cv_accuracy']:.3f}), trained on "
                   f"{training['n_harmful']} harmful and {training['n_benign']} benign prompts")
    caption = escape(
        "probe flags: share of the task's rows called harmful; on benign tasks a false alarm"
        + (f"; patch refuses: {compared['judge']}'s refusals on the rows the results hold (in brackets: the probe's "
           "share on those rows)"
           if compared else ""))

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = []
    for row in document["rows"]:
        cells = [row["task"], row["role"], str(row["n"]), share(row["share_flagged"])]
        if compared:
            cells += [f"{share(row['patch_refusal'])} ({share(row['share_flagged_judged'])})",
                      f"{row['n_judged']}/{row['n']}"]
        rows.append(cells)
    return whole_names_table(title, ("set", "role", "n", "probe flags",
                                     *(("patch refuses", "judged") if compared else ())), rows, caption=caption)


@app.command()
@friendly
def report(
    results: Annotated[list[Path] | None, typer.Argument(help="Results JSON files (first = the 'before').")] = None,
    analysis: Annotated[list[Path] | None, typer.Option(
        "--analysis", help="analysis.json (or its folder) of `safetypatch analyze`; repeat for several.")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels, one per results file.")] = None,
    title: Annotated[str, typer.Option(help="Page title.")] = "safetypatch report",
    markdown: Annotated[Path | None, typer.Option(
        help="Also write the summary and metric tables as Markdown to this file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report.")] = False,
) -> None:
    """Render results files (and subspace analyses) as one HTML page with tables, plots and protocols."""
    from safetypatch.report import write_markdown, write_report

    path = write_report(results or [], out_path, labels=split(labels), title=title, overwrite=overwrite,
                        analyses=analysis or [])
    console.print(f"[green]wrote[/] {path}")
    if markdown is not None:
        console.print(f"[green]wrote[/] {write_markdown(results or [], markdown, split(labels), overwrite)}")
