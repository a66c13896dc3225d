"""The demo pipeline on a tiny local model: evaluate, train, apply, evaluate, report; and resuming it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.cli import app
from safetypatch.errors import ConfigError

TINY_TRAIN = {"max_steps": 2, "per_device_train_batch_size": 4, "retain_count": 2, "max_length": 256,
              "learning_rate": 1e-3}


def _config(model_dir, out, **extra):
    return api.DemoConfig(model=str(model_dir), n_harmful=2, recipe_overrides=TINY_TRAIN, limit=2,
                          output_dir=out, **extra)


def test_demo_writes_before_after_report_and_patch_then_resumes(tmp_path, tiny_model_dirs):
    out = tmp_path / "demo"
    result = api.demo(_config(tiny_model_dirs["llama"], out))
    before, after = (json.loads(p.read_text()) for p in (result.before, result.after))
    assert "drift" not in before["results"] and "drift" in after["results"]
    assert set(before["results"]) | {"drift"} == set(after["results"])
    assert after["config"]["adapter"]["paths"] == [str(result.patch)]
    assert (result.patch / "safety_patch.json").is_file() and (result.patch / "adapter_config.json").is_file()
    html = result.report.read_text()
    assert "before" in html and "after (patched)" in html and "<img" in html
    assert [s.split(":")[0] for s in result.summary] == ["before", "after (patched)"]
    assert {a.task for a in result.answers} >= {"harmbench", "xstest-safe"}
    assert all(result.seconds[step] > 0 for step in ("evaluate before", "train patch", "evaluate after"))

    resumed = api.demo(_config(tiny_model_dirs["llama"], out))
    assert resumed.seconds["evaluate before"] == resumed.seconds["train patch"] == 0.0
    assert (resumed.before, resumed.after) == (result.before, result.after)
    with pytest.raises(ConfigError, match="recipe"):
        api.demo(_config(tiny_model_dirs["llama"], out, recipe="xue"))


def test_cli_demo_prints_plan_summary_and_answers(tmp_path, tiny_model_dirs):
    args = ["demo", "--model", str(tiny_model_dirs["qwen2"]), "--n-harmful", "2", "--limit", "2",
            "--set", ",".join(f"{k}={v}" for k, v in TINY_TRAIN.items()), "--output-dir", str(tmp_path / "d")]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "4 steps" in run.output and "after (patched):" in run.output and "report.html" in run.output


def test_the_demo_budget_shrinks_the_patch_and_explicit_settings_win(tmp_path):
    from safetypatch.api.demo import DEMO_BUDGET, DEMO_N_HARMFUL, demo_train_config

    small = demo_train_config(api.DemoConfig(), tmp_path / "p")
    assert (small.n_harmful, small.recipe_overrides) == (DEMO_N_HARMFUL, DEMO_BUDGET) == (40, {"retain_count": 320})
    assert small.harmful == [n for n in api.TrainConfig().harmful if n != "donotanswer"]
    default = api.TrainConfig().patch_recipe()
    assert small.patch_recipe() == default.model_copy(update={"retain_count": 320})  # the default recipe
    mine = demo_train_config(api.DemoConfig(n_harmful=7, recipe_overrides={"learning_rate": 1e-4}), tmp_path / "p")
    assert (mine.n_harmful, mine.recipe_overrides) == (7, {**DEMO_BUDGET, "learning_rate": 1e-4})
    full = demo_train_config(api.DemoConfig(budget="full"), tmp_path / "p")
    assert (full.n_harmful, full.recipe_overrides, full.harmful) == (
        api.TrainConfig().n_harmful, {}, api.TrainConfig().harmful)
