"""Verbs that work on weights: restore, extract, analyze."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from safetypatch.api.analyze import AnalyzeConfig
from safetypatch.api.extract import ExtractJob
from safetypatch.api.restore import RestoreJob
from safetypatch.cli._app import console, key_value_table, out, task_bars
from safetypatch.cli._options import config_verb, flag


@config_verb(RestoreJob, flags={"params": flag("--set"), "output": flag("--output", "-o")})
def restore(cfg: RestoreJob) -> None:
    """Repair a fine-tuned model's safety post hoc (LSSF, RESTA, Safe LoRA, LoX), streaming the checkpoints."""
    from safetypatch import api

    console.print(f"[bold]safetypatch restore[/] {cfg.method} -> {cfg.output}" + (" (dry run)" if cfg.dry_run else ""))
    with task_bars() as report:
        result = api.restore(cfg, progress=report)
    if result.run.dry_run:
        out.print(result.run.describe())
        return
    out.print(_restored_table(result))
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output}")


@config_verb(ExtractJob, flags={"output": flag("--output", "-o")})
def extract(cfg: ExtractJob) -> None:
    """Turn a weight delta (target - reference) into a LoRA patch of a chosen rank by SVD, with its error."""
    from safetypatch import api

    console.print(f"[bold]safetypatch extract[/] {cfg.target} - {cfg.reference}, rank {cfg.rank} -> {cfg.output}")
    with console.status("streaming the two checkpoints, factoring and verifying the patch..."):
        result = api.extract(cfg)
    worst = max(result.errors, key=result.errors.__getitem__)
    rows = {"modules": f"{len(result.errors)} ({len(result.unchanged)} unchanged, left out)",
            "rank": str(result.rank), "relative error (overall)": f"{result.error:.3g}",
            "worst module": f"{worst} ({result.errors[worst]:.3g})", "seconds": f"{result.seconds:.1f}",
            "output": str(result.path)}
    out.print(key_value_table("extracted", rows))


@config_verb(AnalyzeConfig, flags={"patch": flag("--patch", "-p"), "output_dir": flag("--output-dir", "-o")})
def analyze(cfg: AnalyzeConfig) -> None:
    """Where a patch (or target - model) lives relative to the model's weights, against a random baseline."""
    from safetypatch import api

    what = f"patch {cfg.patch}" if cfg.patch is not None else f"{cfg.target} - {cfg.model}"
    console.print(f"[bold]safetypatch analyze[/] {what} on {cfg.model} -> {cfg.output_dir}")
    with task_bars() as report:
        result = api.analyze(cfg, progress=report)
    out.print(_analysis_table(result.document))
    for line in _shift_lines(result.document):
        out.print(line)
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output} (analysis.json, "
                  f"{len(result.figures)} figures)")


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
    return key_value_table("restored", rows)


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
