"""The full-parameter Refusal-SFT baseline through ``safetypatch train --full`` on the tiny llama model: a complete,
loadable model folder whose every weight was trained, carrying the patch manifest, that evaluates like any model;
and the conflicting-mode refusal."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.cli import app
from safetypatch.errors import ConfigError
from safetypatch.models.loading import load_model
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)

FAST_STEPS, FAST_DATA = "max_steps=2,per_device_train_batch_size=4", "retain_count=3,max_length=256,learning_rate=1e-3"
FAST = f"{FAST_STEPS},{FAST_DATA}"


def test_cli_train_full_writes_a_loadable_model_folder_that_evaluates(tmp_path, tiny_model_dirs):
    out = tmp_path / "full"
    run = CliRunner().invoke(app, [
        "train", "--full", "--model", str(tiny_model_dirs["llama"]), "--harmful", "harmbench,advbench",
        "--n-harmful", "3", "--set", FAST_STEPS, "--set", FAST_DATA, "--retain-max-new-tokens", "6",
        "--output", str(out)])
    assert run.exit_code == 0, run.output
    assert not (out / "adapter_config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    base, trained = load_model(str(tiny_model_dirs["llama"])), load_model(str(out))
    before, after = base.model.state_dict(), trained.model.state_dict()
    assert set(before) == set(after)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"full mode left {unchanged} untrained"
    assert trained.tokenizer.chat_template == base.tokenizer.chat_template

    manifest = json.loads((out / "safety_patch.json").read_text())
    assert manifest["method"] == "refusal_sft" and manifest["recipe"]["mode"] == "full"
    recipe = manifest["recipe"]  # both --set flags apply
    assert (recipe["max_steps"], recipe["retain_count"], recipe["learning_rate"]) == (2, 3, 1e-3)
    assert manifest["recipe"]["gradient_checkpointing"] is False and "adapter" not in manifest
    assert manifest["base_model"]["fingerprint"] == base.fingerprint.sha256 != trained.fingerprint.sha256
    assert manifest["base_model"]["arch"]["model_type"] == "llama"
    assert manifest["training"]["steps"] == 2 and len(manifest["training"]["loss_history"]) == 2
    assert {d["name"] for d in manifest["data"]} == {
        "harmbench", "advbench", "everyday-requests", "public-knowledge", "contrast-benign",
        "benign-edgy", "chat"}
    assert all(len(d["sha256"]) == 64 for d in manifest["data"])
    assert manifest["extra"]["train_config"]["full"] is True

    result = api.evaluate(api.EvalConfig(model=str(out), tasks=["harmbench"], limits={"harmbench": 2},
                                         judges=["keyword"], max_new_tokens=4, output_dir=tmp_path / "eval"))
    data = json.loads(result.path.read_text())
    assert data["n-samples"]["harmbench"]["effective"] == 2
    assert data["config"]["fingerprint"] == trained.fingerprint.sha256 and data["config"]["adapter"] is None


def test_full_sets_the_recipe_mode_and_refuses_a_lora_override(tmp_path, tiny_model_dirs):
    assert api.TrainConfig(full=True).patch_recipe().mode == "full"
    assert api.TrainConfig(recipe_overrides={"mode": "full"}).patch_recipe().mode == "full"
    assert api.TrainConfig(full=True, recipe_overrides={"mode": "full"}).patch_recipe().mode == "full"
    assert api.TrainConfig().patch_recipe().mode == "lora"
    with pytest.raises(ConfigError, match=r"full is true \(CLI --full\) but recipe_overrides sets mode='lora'"):
        api.TrainConfig(full=True, recipe_overrides={"mode": "lora"})
    run = CliRunner().invoke(app, ["train", "--full", "--model", str(tiny_model_dirs["llama"]), "--set",
                                   "mode=lora", "--output", str(tmp_path / "never")])
    output = " ".join(run.output.split())  # rich wraps long lines
    assert run.exit_code == 2 and "full is true (CLI --full) but recipe_overrides sets mode='lora'" in output
    assert "Traceback" not in output and not (tmp_path / "never").exists()


def test_a_field_set_twice_to_two_values_is_refused(tiny_model_dirs, tmp_path):
    run = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dirs["llama"]), "--set", "r=4",
                                   "--set", "learning_rate=1e-3,r=2", "--output", str(tmp_path / "p")])
    assert run.exit_code == 2 and "r is set twice" in run.output and not (tmp_path / "p").exists()
