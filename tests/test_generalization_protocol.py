"""The generalisation protocol: out-of-family sets and held-out forms are evaluation only, development rows are
carved from train halves for recipe choices, tasks carry their family, and training can add forms."""

from __future__ import annotations

import json

import pytest

from safetypatch import api
from safetypatch.data import canonical_split, development_split, load_dataset, normalize_prompt, training_split
from safetypatch.data.catalog import dev_row_count
from safetypatch.data.forms import FORMS
from safetypatch.data.sets import DATASETS
from safetypatch.errors import ConfigError
from safetypatch.eval.task import TASKS, task_rows


def test_the_catalog_marks_evaluation_only_sets():
    held = sorted(name for name in DATASETS.names() if DATASETS.get(name).out_of_family)
    assert held == ["jailbreak-templates", "strongreject", "xstest-safe"]
    infos = {info.name: info for info in api.list_datasets()}
    assert infos["xstest-safe"].out_of_family and not infos["harmbench"].out_of_family
    assert all(DATASETS.get(name).dev_rows == 0 for name in held)


@pytest.mark.parametrize(("option", "value", "culprit"), [
    ("harmful", ["harmbench", "strongreject"], "strongreject"),
    ("retain", ["everyday-requests", "xstest-safe"], "xstest-safe"),
    ("harmful_forms", ["past", "future"], "future"),
    ("retain_forms", ["fiction"], "fiction"),
])
def test_training_refuses_out_of_family_sets_and_held_out_forms(option, value, culprit):
    with pytest.raises(ConfigError, match=rf"{option} names .*{culprit}"):
        api.TrainConfig(**{option: value})


def test_training_defaults_use_no_evaluation_only_data():
    cfg = api.TrainConfig()
    assert not any(DATASETS.get(name).out_of_family for name in [*cfg.harmful, *cfg.retain])
    assert all(FORMS.get(f).family == "train" for f in [*cfg.harmful_forms, *cfg.retain_forms])


def test_development_rows_come_from_the_train_half_and_training_never_reads_them():
    dataset = load_dataset("harmbench")
    canonical, dev = canonical_split(dataset), development_split(dataset, dev_row_count("harmbench"))
    trained = training_split(dataset, dev_row_count("harmbench"))
    key = lambda rows: {normalize_prompt(r.prompt) for r in rows}  # noqa: E731
    assert len(dev.eval) == 40 and key(dev.eval.rows) <= key(canonical.train.rows)
    assert key(trained.train.rows) == key(canonical.train.rows) - key(dev.eval.rows)
    assert trained.eval.rows == canonical.eval.rows and trained.train_sha256 != canonical.train_sha256
    assert training_split(dataset, 0) == canonical


def test_tasks_carry_their_family():
    family = {name: TASKS.get(name).family for name in TASKS}
    assert family["harmbench"] == family["advbench-past"] == family["benign-edgy"] == "in"
    assert family["strongreject"] == family["xstest-safe"] == family["jailbreak"] == "out"
    assert family["advbench-future"] == family["advbench-fiction"] == family["everyday-fiction"] == "out"
    assert family["harmbench-dev"] == family["advbench-past-dev"] == family["everyday-dev"] == "dev"
    dev = task_rows(TASKS.get("advbench-past-dev"))
    originals = {normalize_prompt(r.meta["original_prompt"]) for r in dev.rows}
    train = {normalize_prompt(r.prompt) for r in training_split(load_dataset("advbench"), 40).train.rows}
    assert len(dev.rows) == 40 and originals.isdisjoint(train)
    assert all(r.meta["form"] == "past" and r.prompt != r.meta["original_prompt"] for r in dev.rows)


def test_train_patch_adds_form_copies_of_harmful_and_retain_prompts(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(api.train, "own_refusals", lambda rs: [i == 0 for i in range(len(rs))])
    cfg = api.TrainConfig(
        model=str(tiny_model_dirs["llama"]), n_harmful=3, harmful=["harmbench"], retain=["everyday-requests"],
        harmful_forms=["past", "roleplay"], retain_forms=["hypothetical"], forms_per_prompt=None,
        recipe_overrides={"max_steps": 1, "per_device_train_batch_size": 4, "retain_count": 4, "max_length": 256},
        retain_max_new_tokens=6, output=tmp_path / "patch",
    )
    result = api.train_patch(cfg)
    manifest = json.loads((result.path / "safety_patch.json").read_text())
    # 3 prompts + 2 forms each; 4 retain answers, 1 dropped as the model's own refusal, each kept one with a twin
    assert (result.n_refusal, result.n_retain) == (3 * 3, 3 * 2)
    assert manifest["extra"]["form_copies"] == {"harmful": 6, "retain": 3}
    assert manifest["extra"]["train_config"]["harmful_forms"] == ["past", "roleplay"]
    assert {d["name"]: d["rows"] for d in manifest["data"]}["harmbench"] == 200 - 40


def test_the_probe_learns_from_the_patch_training_sets_and_refuses_out_of_family_ones():
    from safetypatch.api.probe import ProbeConfig

    cfg = ProbeConfig()
    assert cfg.harmful == api.TrainConfig().harmful and cfg.benign == api.TrainConfig().retain
    with pytest.raises(ConfigError, match=r"benign names \['xstest-safe'\].*out-of-family"):
        ProbeConfig(benign=["everyday-requests", "xstest-safe"])


def test_an_empty_forms_option_turns_the_default_forms_off(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from safetypatch.cli import app

    seen = []
    monkeypatch.setattr(api, "train_patch", lambda cfg, progress=None: seen.append(cfg) or (_ for _ in ()).throw(
        SystemExit(0)))
    CliRunner().invoke(app, ["train", "--harmful-forms", "", "--retain-forms", "", "-o", str(tmp_path / "p")])
    CliRunner().invoke(app, ["train", "-o", str(tmp_path / "q")])
    assert (seen[0].harmful_forms, seen[0].retain_forms) == ([], [])
    assert seen[1].harmful_forms == seen[1].retain_forms == ["question", "past", "hypothetical", "roleplay"]


def test_a_small_retain_budget_is_dealt_over_every_retain_set():
    from safetypatch.api.train import spread

    sets = [[f"a{i}" for i in range(10)], ["b0", "b1"], [f"c{i}" for i in range(5)], []]
    assert spread(sets, 7) == ["a0", "a1", "a2", "b0", "b1", "c0", "c1"]
    assert spread(sets, 3) == ["a0", "b0", "c0"]
    assert spread(sets, 100) == [p for prompts in sets for p in prompts]  # the whole budget keeps the sets' order
    assert spread(sets, 0) == []
