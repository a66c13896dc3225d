"""Verbs that measure and show: eval, probe, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from safetypatch.api.evaluate import EvalConfig
from safetypatch.api.probe import ProbeConfig
from safetypatch.cli._app import app, console, friendly, out, split, task_bars, whole_names_table
from safetypatch.cli._options import config_verb, flag


@config_verb(EvalConfig, name="eval")
def eval_(cfg: EvalConfig) -> None:
    """Evaluate safety, over-refusal and capability; write lm-eval-shaped results."""
    from safetypatch import api

    console.print(f"[bold]safetypatch eval[/] {cfg.model}, preset {cfg.preset}")
    with task_bars() as report:
        result = api.evaluate(cfg, progress=report)
    out.print(whole_names_table(f"{cfg.model}: headline metrics (95% CI in the results file)",
                                ("task", "metric,filter", "value"),
                                [(task, key, f"{value:.3f}") for task, metrics in result.headline.items()
                                 for key, value in metrics.items()]))
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min: {result.path}")


@config_verb(ProbeConfig, flags={"output_dir": flag("--output-dir", "-o")})
def probe(cfg: ProbeConfig) -> None:
    """The linear-probe ceiling: how well the model's own hidden states flag the held-out harmful prompts."""
    from safetypatch import api

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
