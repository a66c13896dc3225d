"""The public API and the CLI end to end on a tiny local model: evaluation with an attached safety patch."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.cli import app
from safetypatch.errors import ConfigError, OutputExistsError
from safetypatch.models.loading import load_model
from safetypatch.patch.artifact import PatchManifest, save_patch
from tests.patch.helpers import random_patch


def _patch_folder(tmp_path, model_dir):
    base = load_model(str(model_dir), device="cpu").model
    folder = tmp_path / "patch"
    save_patch(random_patch(base, modules=("up_proj", "down_proj"), scale=0.5), folder,
               PatchManifest(method="test"), model=base)
    return folder


def test_evaluate_with_an_attached_patch_records_it_and_measures_drift(tmp_path, tiny_model_dirs):
    folder = _patch_folder(tmp_path, tiny_model_dirs["llama"])
    cfg = api.EvalConfig(model=str(tiny_model_dirs["llama"]), adapter=folder, tasks=["harmbench", "drift"],
                         limits={"harmbench": 3, "drift": 2}, judges=["keyword"], max_new_tokens=6,
                         output_dir=tmp_path / "out")
    result = api.evaluate(cfg)
    data = json.loads(result.path.read_text())
    adapter = data["config"]["adapter"]
    assert adapter["mode"] == "attach" and adapter["rank"] == 2 and adapter["max_logit_change"] > 1e-4
    assert adapter["manifest_sha256"] and adapter["applied_to"]
    assert data["n-samples"]["harmbench"]["effective"] == 3
    assert data["config"]["generation_kwargs"]["batching"] == "grouped"
    assert result.headline["drift"]["kl,reference"] > 0.0


def test_cli_eval_takes_per_task_limits_and_report_renders(tmp_path, tiny_model_dirs):
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_model_dirs["qwen2"]), "--tasks", "harmbench,arc-easy",
            "--limits", "harmbench=2,arc-easy=3", "--judges", "keyword", "--max-new-tokens", "4",
            "--batching", "whole", "--output-dir", str(out)]
    run = runner.invoke(app, args)
    assert run.exit_code == 0, run.output
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert data["n-samples"]["harmbench"]["effective"] == 2 and data["n-samples"]["arc-easy"]["effective"] == 3
    assert data["config"]["generation_kwargs"]["batching"] == "whole"  # the batching is part of the protocol
    page = tmp_path / "report.html"
    run = runner.invoke(app, ["report", str(results[0]), "-o", str(page)])
    assert run.exit_code == 0, run.output
    assert "data:image/png;base64," in page.read_text()
    again = runner.invoke(app, ["report", str(results[0]), "-o", str(page)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_reports_bad_input_without_traceback(tmp_path):
    run = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--tasks", "harmbench"])
    assert run.exit_code == 2
    assert "Did you mean 'smollm2-135m-instruct'" in run.output and "Traceback" not in run.output
    run = CliRunner().invoke(app, ["eval", "--limits", "harmbench"])
    assert run.exit_code != 0 and "name=value" in run.output


def test_train_patch_writes_a_verified_patch_that_evaluates(tmp_path, tiny_model_dirs, monkeypatch):
    judged = []
    monkeypatch.setattr(api.train, "own_refusals", lambda rs: judged.extend(rs) or [i == 0 for i in range(len(rs))])
    cfg = api.TrainConfig(
        model=str(tiny_model_dirs["llama"]), n_harmful=3, n_per_set={"advbench": 1}, harmful=["harmbench", "advbench"],
        recipe_overrides={"max_steps": 2, "per_device_train_batch_size": 4, "retain_count": 4, "max_length": 256,
                          "learning_rate": 1e-3},
        retain_max_new_tokens=6, output=tmp_path / "patch",
    )
    result = api.train_patch(cfg)
    manifest = json.loads((result.path / "safety_patch.json").read_text())
    # each prompt once as written and once in one of the default training forms
    assert (result.n_refusal, result.n_retain) == (2 * (3 + 1), 2 * (4 - 1)) and len(judged) == 4
    assert manifest["extra"]["retain_own_refusals_dropped"] == 1
    assert manifest["extra"]["form_copies"] == {"harmful": 3 + 1, "retain": 4 - 1}
    assert manifest["extra"]["harmful_categories_used"] == {}
    assert manifest["method"] == "refusal_sft" and manifest["training"]["steps"] == 2
    assert {d["name"] for d in manifest["data"]} == {
        "harmbench", "advbench", "everyday-requests", "public-knowledge", "contrast-benign",
        "benign-edgy", "chat"}
    assert "ngram13_eval_prompts" in manifest["contamination"]
    assert manifest["base_model"]["fingerprint"] == load_model(str(tiny_model_dirs["llama"])).fingerprint.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch"]
    with pytest.raises(OutputExistsError, match="already exists"):
        api.train_patch(cfg)


def test_own_refusals_flags_the_models_refusals_of_benign_prompts():
    answers = ["I'm sorry for any misunderstanding, but as a chatbot designed to assist with general questions, I",
               "Sorry, that's not something I can help with.", "Preheat the oven to 180 C and grease the tin."]
    assert api.train.own_refusals(answers) == [True, True, False]


def test_train_config_per_set_counts_must_name_a_harmful_set():
    with pytest.raises(ConfigError, match=r"n_per_set names \['strongreject'\].*--harmful"):
        api.TrainConfig(harmful=["harmbench"], n_per_set={"strongreject": 5})
    with pytest.raises(ConfigError, match="must be positive"):
        api.TrainConfig(harmful=["harmbench"], n_per_set={"harmbench": 0})


def test_train_config_harmful_categories_narrow_a_set_and_name_what_it_has():
    from safetypatch.data.schema import Example

    rows = [Example(prompt=f"p{i}", category=cat) for i, cat in enumerate(["a", "b", "a", "c", None])]
    cfg = api.TrainConfig(harmful=["harmbench", "donotanswer"], harmful_categories={"donotanswer": ["a", "c"]})
    assert [r.prompt for r in cfg.harmful_rows("donotanswer", rows)] == ["p0", "p2", "p3"]
    assert cfg.harmful_rows("harmbench", rows) == rows
    names = ["human_chatbox", "malicious_uses", "misinformation_harms", "information_hazard",
             "discrimination_exclusion_toxicity_hateful_offensive"]
    areas = [Example(prompt=f"q{i}", category=c) for i, c in enumerate(names)]
    assert [r.prompt for r in api.TrainConfig().harmful_rows("donotanswer", areas)] == ["q1", "q3"]
    assert api.TrainConfig().categories_used() == {"donotanswer": ["malicious_uses", "information_hazard"]}
    assert api.TrainConfig(harmful=["harmbench"]).categories_used() == {}
    with pytest.raises(ConfigError, match=r"asks 'donotanswer' for \['z'\].*categories are \['None', 'a', 'b', 'c'\]"):
        api.TrainConfig(harmful=["donotanswer"], harmful_categories={"donotanswer": ["a", "z"]}).harmful_rows(
            "donotanswer", rows)
    with pytest.raises(ConfigError, match=r"harmful_categories names \['advbench'\].*--harmful-categories"):
        api.TrainConfig(harmful=["harmbench"], harmful_categories={"advbench": ["a"]})
    with pytest.raises(ConfigError, match=r"no category for \['harmbench'\]"):
        api.TrainConfig(harmful=["harmbench"], harmful_categories={"harmbench": []})


def test_train_config_harmful_counts():
    assert api.TrainConfig(harmful=["harmbench", "advbench"]).harmful_counts() == {"harmbench": 150, "advbench": 60}
    assert api.TrainConfig().harmful_counts()["donotanswer"] is None
    assert api.TrainConfig(harmful=["advbench"]).harmful_counts() == {"advbench": 60}
    assert api.TrainConfig(harmful=["harmbench", "advbench"], n_harmful=5).harmful_counts() == {
        "harmbench": 5, "advbench": 5}
    assert api.TrainConfig(harmful=["harmbench", "advbench"], n_harmful=5, n_per_set={"advbench": 9}).harmful_counts(
    ) == {"harmbench": 5, "advbench": 9}


def test_cli_train_with_recipe_overrides(tmp_path, tiny_model_dirs):
    out = tmp_path / "patch"
    args = ["train", "--model", str(tiny_model_dirs["qwen2"]), "--harmful", "harmbench,donotanswer",
            "--harmful-categories", "donotanswer=malicious_uses+information_hazard", "--n-harmful", "2",
            "--set", "max_steps=1,per_device_train_batch_size=2,retain_count=2,max_length=256",
            "--retain-max-new-tokens", "4", "--output", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / "safety_patch.json").read_text())
    assert manifest["recipe"]["max_steps"] == 1 and manifest["recipe"]["per_device_train_batch_size"] == 2
    assert manifest["extra"]["train_config"]["harmful_categories"] == {
        "donotanswer": ["malicious_uses", "information_hazard"]}
    bad = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dirs["qwen2"]), "--set", "rank=2",
                                   "--output", str(tmp_path / "other")])
    assert bad.exit_code == 2 and "rank" in bad.output


def test_public_restore_stays_the_function_after_the_restoration_package_is_imported():
    import importlib
    import pkgutil

    import safetypatch

    importlib.import_module("safetypatch.restoration.runner")
    assert callable(safetypatch.restore) and safetypatch.restore.__module__ == "safetypatch.api.restore"
    # No module of the package is named like a public API name, so importing one never hides the API.
    assert not {module.name for module in pkgutil.iter_modules(safetypatch.__path__)} & set(dir(safetypatch))
