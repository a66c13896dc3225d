"""Every verb that takes options builds them from its config class (issue 29): ``--help`` lists one option per field,
named after it, with the field's description and default, the registries' names where a field names a preset,
recipe, method, task or judge; a field added to a config is a new flag that reaches the config, and an unset flag
leaves the YAML value and the field default alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import Field
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.cli import app
from safetypatch.cli._options import ConfigCommand, config_verb

VERBS: dict[str, type] = {
    "demo": api.DemoConfig, "train": api.TrainConfig, "finetune": api.FinetuneConfig, "apply": api.ApplyConfig,
    "eval": api.EvalConfig, "probe": api.ProbeConfig, "restore": api.RestoreJob, "extract": api.ExtractJob,
    "analyze": api.AnalyzeConfig, "export": api.ExportConfig,
}
"""Each verb and the config class its options come from."""
OTHER_VERBS = {"models", "data", "env", "ls", "report"}
"""Verbs without a config class: the listings, and report, which reads files only."""
RESPELLED = {("demo", "recipe_overrides"): "--set", ("train", "recipe_overrides"): "--set",
             ("finetune", "recipe_overrides"): "--set", ("apply", "patches"): "--patch",
             ("restore", "params"): "--set", ("export", "patches"): "--patch"}
"""Fields whose option keeps the name it had before the options were generated."""
SHORT = {("train", "output"): "-o", ("finetune", "output"): "-o", ("apply", "output"): "-o",
         ("apply", "patches"): "-p", ("probe", "output_dir"): "-o", ("restore", "output"): "-o",
         ("extract", "output"): "-o", ("analyze", "patch"): "-p", ("analyze", "output_dir"): "-o",
         ("export", "patches"): "-p", ("export", "output"): "-o"}
"""The short aliases the verbs had before, kept."""


def _registries() -> dict[str, list[str]]:
    from safetypatch.eval.judges.base import JUDGES
    from safetypatch.eval.task import TASKS, preset_names
    from safetypatch.restoration import METHODS
    from safetypatch.train.recipes import RECIPES

    return {"preset": preset_names(), "recipe": RECIPES.names(), "method": METHODS.names(), "tasks": TASKS.names(),
            "judges": JUDGES.names(), "judge": JUDGES.names()}


def _squeeze(text: str) -> str:
    return "".join(text.replace("│", " ").split())


def _help_rows(output: str) -> dict[str, str]:
    """The options of a ``--help`` page: first name → the row's text (names, type, help, default), squeezed."""
    rows: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("│ -"):
            current = line[2:].split()[0]
            rows[current] = ""
        if current is not None and line.startswith("│"):
            rows[current] += _squeeze(line)
    return rows


def _flag(verb: str, name: str, info: FieldInfo) -> str:
    return RESPELLED.get((verb, name), f"--{name.replace('_', '-')}")


def _default(info: FieldInfo, flag: str) -> str | None:
    """The field default as the help shows it; None where it shows none (required, None, empty, false)."""
    if info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    if value is None or value is False or value in ([], {}):
        return None
    if value is True:
        return flag
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _help(*args: str, target: typer.Typer = app) -> str:
    run = CliRunner().invoke(target, [*args, "--help"], env={"COLUMNS": "160"})
    assert run.exit_code == 0, run.output
    return run.output


def test_every_verb_with_options_is_built_from_its_config():
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    generated = {name for name, command in commands.items() if isinstance(command, ConfigCommand)}
    assert generated == set(commands) - OTHER_VERBS == set(VERBS)
    for verb, config_class in VERBS.items():
        assert commands[verb].config_class is config_class, verb


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_lists_each_field_with_its_description_and_default(verb):
    config_class, registries = VERBS[verb], _registries()
    rows = _help_rows(_help(verb))
    flags = {name: _flag(verb, name, info) for name, info in config_class.model_fields.items()}
    assert set(rows) == {"--config", "--help", *flags.values()}
    for name, info in config_class.model_fields.items():
        flag = flags[name]
        row = rows[flag]
        assert _squeeze(info.description or "") in row, (flag, row)
        default = _default(info, flag)
        if default is None:
            assert "[default:" not in row, (flag, row)
        else:
            assert _squeeze(f"[default: {default}]") in row, (flag, row)
        if (verb, name) in SHORT:
            assert row.startswith(flag + SHORT[verb, name]), (flag, row)
        for known in registries.get(name, ()):
            assert known in row, (flag, known, row)


class _Widened(api.ExtractJob):
    knob: int = Field(3, description="A knob added by this test.")
    names: list[str] = Field(["a", "b"], description="Names added by this test.")
    lively: bool = Field(True, description="A switch added by this test.")


def _widened_verb() -> tuple[typer.Typer, list[Any]]:
    toy, seen = typer.Typer(), []

    @config_verb(_Widened, on=toy)
    def widened(cfg: _Widened) -> None:
        """A verb of the widened config."""
        seen.append(cfg)

    return toy, seen


def test_a_field_added_to_a_config_is_a_flag_in_help():
    toy, _ = _widened_verb()
    rows = _help_rows(_help(target=toy))
    assert rows["--knob"].endswith(_squeeze("A knob added by this test. [default: 3]"))
    assert _squeeze("Names added by this test. Comma-separated. [default: a,b]") in rows["--names"]
    assert rows["--lively"].startswith("--lively--no-lively") and "[default:--lively]" in rows["--lively"]


def test_a_field_added_to_a_config_reaches_it_and_unset_flags_leave_yaml_and_defaults(tmp_path: Path):
    toy, seen = _widened_verb()
    required = ["--target", "t", "--reference", "r"]
    yaml_file = tmp_path / "widened.yaml"
    yaml_file.write_text("knob: 7\nrank: 5\n", encoding="utf-8")
    for args in ([], ["--knob", "9", "--names", "x, y", "--no-lively"], ["--config", str(yaml_file)],
                 ["--config", str(yaml_file), "--knob", "9"]):
        run = CliRunner().invoke(toy, [*required, *args])
        assert run.exit_code == 0, run.output
    plain, flagged, from_yaml, flag_over_yaml = seen
    assert (plain.knob, plain.names, plain.lively, plain.rank) == (3, ["a", "b"], True, 16)
    assert plain.model_fields_set == {"target", "reference"}  # an unset flag is no override
    assert (flagged.knob, flagged.names, flagged.lively) == (9, ["x", "y"], False)
    assert (from_yaml.knob, from_yaml.rank) == (7, 5)
    assert (flag_over_yaml.knob, flag_over_yaml.rank) == (9, 5)
