"""The listing verbs (``models``, ``data``, ``ls``, ``env``) print what a user copies whole, in a narrow terminal or a
pipe, and each takes ``--json`` for scripts (issue 29)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.cli import app
from safetypatch.train.distributed import PRESETS

SRC = Path(__file__).resolve().parents[1] / "src"


def _piped(*args: str, columns: int) -> str:
    """The verb's stdout through a pipe (``COLUMNS=<columns> safetypatch ... | cat``)."""
    env = {**os.environ, "COLUMNS": str(columns),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "safetypatch.cli", *args], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("columns", [80, 40])
def test_models_in_a_narrow_pipe_shows_every_catalog_name_whole(columns):
    names = [entry.name for entry in api.list_models()]
    assert any(len(name) > 16 for name in names)  # one that an even share of 80 columns would cut
    lines = _piped("models", columns=columns).splitlines()
    for name in names:
        assert any(name in line for line in lines), name
    assert "…" not in "".join(line.split("│")[1] for line in lines if line.startswith("│"))


def test_the_other_listings_keep_names_whole_at_80_columns():
    tasks = _piped("ls", columns=80)
    assert all(task["name"] in tasks for task in api.list_tasks())
    presets = _piped("ls", "accelerate", columns=80)
    assert all(name in presets for name in PRESETS) and "safetypatch[deepspeed]" in presets  # text, not markup
    assert "cache (SAFETYPATCH_HOME)" in _piped("env", columns=80)


@pytest.mark.parametrize(("args", "key"), [
    (["models"], "name"), (["data"], "name"), (["env"], None), (["ls"], "name"), (["ls", "tasks"], "name"),
    (["ls", "models"], "name"), (["ls", "datasets"], "name"), (["ls", "accelerate"], "name"),
    (["ls", "accelerate", "zero3"], None),
])
def test_every_listing_verb_takes_json(args, key):
    run = CliRunner().invoke(app, [*args, "--json"])
    assert run.exit_code == 0, run.output
    parsed = json.loads(run.stdout)
    if key is None:
        assert isinstance(parsed, dict) and parsed
    else:
        assert isinstance(parsed, list) and parsed and all(isinstance(row[key], str) for row in parsed)


def test_json_listings_hold_the_catalog_rows():
    runner = CliRunner()
    models = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert [row["name"] for row in models] == [entry.name for entry in api.list_models()]
    assert {"hub_id", "licence", "revision", "cached", "path"} <= set(models[0])
    tasks = json.loads(runner.invoke(app, ["ls", "--json"]).stdout)
    assert tasks == api.list_tasks()
    datasets = json.loads(runner.invoke(app, ["data", "--json"]).stdout)
    assert [row["name"] for row in datasets] == [info.name for info in api.list_datasets()]
    env = json.loads(runner.invoke(app, ["env", "--json"]).stdout)
    assert {"safetypatch", "torch", "git_hash", "safetypatch_home"} <= set(env)
    preset = json.loads(runner.invoke(app, ["ls", "accelerate", "zero3", "--json"]).stdout)
    assert preset["name"] == "zero3" and Path(preset["path"]).is_file()
