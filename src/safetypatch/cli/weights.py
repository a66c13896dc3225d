"""Verbs that work on weights: restore, extract, analyze."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from safetypatch.cli._app import ConfigOpt, app, console, friendly, key_value_table, out, pairs, task_bars


@app.command()
@friendly
def restore(
    config: ConfigOpt = None,
    method: Annotated[str | None, typer.Option(help="lssf, resta, safe_lora or lox.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Method settings, e.g. eta=0.8,alpha=1.5; repeatable.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Unaligned base (Safe LoRA, LoX, LSSF data-free).")] = None,
    aligned_model: Annotated[str | None, typer.Option(help="Safety-aligned model (every method).")] = None,
    unsafe_model: Annotated[str | None, typer.Option(help="Aligned model tuned on harmful data.")] = None,
    target_model: Annotated[str | None, typer.Option(help="Fine-tune to repair (Safe LoRA: or an adapter).")] = None,
    scope: Annotated[str | None, typer.Option(help="Tensors touched: linear or all_2d.")] = None,
    module_map: Annotated[list[str] | None, typer.Option(help="model_type=regex of linear weight names.")] = None,
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
        method=method, params=pairs(set_), base_model=base_model, aligned_model=aligned_model,
        unsafe_model=unsafe_model, target_model=target_model, scope=scope, module_map=pairs(module_map),
        n_anchors=n_anchors, anchor_dataset=anchor_dataset, anchor_seed=anchor_seed,
        anchor_max_new_tokens=anchor_max_new_tokens, dtype=dtype, output=output, dry_run=dry_run,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch restore[/] {cfg.method} -> {cfg.output}" + (" (dry run)" if cfg.dry_run else ""))
    with task_bars() as report:
        result = api.restore(cfg, progress=report)
    if result.run.dry_run:
        out.print(result.run.describe())
        return
    out.print(_restored_table(result))
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output}")


@app.command()
@friendly
def extract(
    config: ConfigOpt = None,
    target: Annotated[str | None, typer.Option(help="Model whose difference is extracted.")] = None,
    reference: Annotated[str | None, typer.Option(help="Model the patch applies to.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank of every module.")] = None,
    module_map: Annotated[list[str] | None, typer.Option(help="model_type=regex of linear weight names.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Patch folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Dtype of the reference the patch is checked on.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing patch.")] = None,
) -> None:
    """Turn a weight delta (target - reference) into a LoRA patch of a chosen rank by SVD, with its error."""
    from safetypatch import api
    from safetypatch.config import load_config

    cfg = load_config(api.ExtractJob, config, dict(
        target=target, reference=reference, rank=rank, module_map=pairs(module_map), output=output, dtype=dtype,
        overwrite=overwrite))
    console.print(f"[bold]safetypatch extract[/] {cfg.target} - {cfg.reference}, rank {cfg.rank} -> {cfg.output}")
    with console.status("streaming the two checkpoints, factoring and verifying the patch..."):
        result = api.extract(cfg)
    worst = max(result.errors, key=result.errors.__getitem__)
    rows = {"modules": f"{len(result.errors)} ({len(result.unchanged)} unchanged, left out)",
            "rank": str(result.rank), "relative error (overall)": f"{result.error:.3g}",
            "worst module": f"{worst} ({result.errors[worst]:.3g})", "seconds": f"{result.seconds:.1f}",
            "output": str(result.path)}
    out.print(key_value_table("extracted", rows))


@app.command()
@friendly
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
    module_map: Annotated[list[str] | None, typer.Option(help="model_type=regex of linear weight names.")] = None,
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
        seed=seed, module_map=pairs(module_map), hidden_shift=hidden_shift, n_prompts=n_prompts,
        harmful_set=harmful_set, benign_set=benign_set, position=position, dtype=dtype, cache=cache,
        output_dir=output_dir, overwrite=overwrite))
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
