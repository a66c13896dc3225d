"""Verbs that make and apply safety patches: demo, train, finetune, apply."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from safetypatch.api.apply import ApplyConfig
from safetypatch.api.demo import STEP_MINUTES, STEPS, DemoConfig
from safetypatch.api.finetune import FinetuneConfig
from safetypatch.api.train import TrainConfig
from safetypatch.cli._app import console, key_value_table, out, pairs, task_bars
from safetypatch.cli._options import config_verb, flag

SET = flag("--set")
"""``--set name=value``: the recipe fields that win over the preset's."""


CATEGORIES = "As set=category+category pairs, e.g. donotanswer=malicious_uses+information_hazard; repeatable."


def _categories(values: list[str] | None) -> dict[str, list[str]] | None:
    """``--harmful-categories donotanswer=a+b`` → ``{"donotanswer": ["a", "b"]}``."""
    by_set = pairs(values)
    return {name: [c for c in text.split("+") if c] for name, text in by_set.items()} if by_set else None


@config_verb(DemoConfig, flags={"recipe_overrides": SET})
def demo(cfg: DemoConfig) -> None:
    """The main job: evaluate the model, train a LoRA safety patch, apply it, evaluate again, write a report."""
    from safetypatch import api

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


@config_verb(TrainConfig, flags={"recipe_overrides": SET, "output": flag("--output", "-o"),
                                 "harmful_categories": flag(parse=_categories, note=CATEGORIES)})
def train(cfg: TrainConfig) -> None:
    """Train a safety patch (LoRA Refusal-SFT on safety data) into a verified PEFT folder; --full: a model folder."""
    from safetypatch import api

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


@config_verb(FinetuneConfig, flags={"recipe_overrides": SET, "output": flag("--output", "-o")})
def finetune(cfg: FinetuneConfig) -> None:
    """Fine-tune a model on a dataset's prompt -> response pairs and save it as a complete model folder."""
    from safetypatch import api

    console.print(f"[bold]safetypatch finetune[/] {cfg.model} on {cfg.dataset} ({cfg.mode}) -> {cfg.output}")
    with task_bars() as report:
        result = api.finetune(cfg, progress=report)
    losses = result.training["loss_history"]
    console.print(f"[green]done[/] in {result.seconds / 60:.1f} min: {result.rows} rows, "
                  f"{result.training['steps']} steps, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; "
                  f"model at {result.path}")


@config_verb(ApplyConfig, flags={"patches": flag("--patch", "-p"), "output": flag("--output", "-o")})
def apply(cfg: ApplyConfig) -> None:
    """Apply safety patches to a model: attach them as a PEFT adapter or merge them into the weights."""
    from safetypatch import api

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
