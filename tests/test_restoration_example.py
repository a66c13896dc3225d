"""The restoration experiment script's own parsing (examples/restoration_experiment.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "examples" / "restoration_experiment.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("restoration_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_keep_numbers_and_names(script):
    variants = script._variants(["lssf:decompose=safety_vector,alpha=0.5", "resta:beta=1"])
    assert variants == {"lssf:decompose=safety_vector,alpha=0.5": ("lssf", {"decompose": "safety_vector",
                                                                             "alpha": 0.5}),
                        "resta:beta=1": ("resta", {"beta": 1})}
    assert script._slug("lssf:decompose=safety_vector,alpha=0.5") == "lssf-decompose-safety_vector-alpha-0.5"
    assert script._slug("downstream (no repair)") == "downstream"


@pytest.mark.parametrize("bad", ["lssf", "safe_lora:threshold=0.5", "lssf:alpha"])
def test_bad_variant_is_refused(script, bad):
    with pytest.raises(SystemExit, match="--variant"):
        script._variants([bad])


def test_variant_jobs_validate_and_read_the_right_roles(script, tmp_path):
    roles = {"aligned_model": "a", "unsafe_model": "u", "target_model": "t"}
    resta = script._variant_job("resta", {"beta": 1.0}, roles, "base", 128, tmp_path / "r")
    assert (resta.method, resta.params, resta.roles()) == ("resta", {"beta": 1.0}, roles)
    lssf = script._variant_job("lssf", {"alpha": 2.0}, roles, "base", 64, tmp_path / "l")
    assert (lssf.n_anchors, lssf.roles()) == (64, roles)
    free = script._variant_job("lssf", {"safety_vector": "aligned_minus_base"}, roles, "base", 128, tmp_path / "f")
    assert free.roles() == {"base_model": "base", "aligned_model": "a", "target_model": "t"}


def test_a_misspelt_variant_setting_fails_before_any_step(script, tmp_path):
    from safetypatch.errors import ConfigError

    roles = {"aligned_model": "a", "unsafe_model": "u", "target_model": "t"}
    with pytest.raises(ConfigError, match="alpah"):
        script._variant_job("lssf", {"alpah": 2.0}, roles, "base", 128, tmp_path / "l")


@pytest.mark.parametrize(("argv", "expected"), [
    ([], ("full", 100, 5.0, 5e-5)),  # the unalignment default of docs/methods.md §2.1
    (["--unsafe-mode", "lora"], ("lora", 200, 2.0, 3e-4)),
    (["--unsafe-mode", "lora", "--n-harmful", "50", "--unsafe-epochs", "1"], ("lora", 50, 1.0, 3e-4)),
])
def test_the_unsafe_fine_tune_follows_its_mode_unless_told(script, tmp_path, monkeypatch, argv, expected):
    monkeypatch.setattr("sys.argv", ["restoration_experiment.py", "--patch", "p", *argv])
    job = script._unsafe_job(script._parser().parse_args(), tmp_path / "aligned", tmp_path / "unsafe")
    recipe = job.recipe_overrides
    assert (job.mode, job.n, recipe["num_train_epochs"], recipe["learning_rate"]) == expected
    assert (job.dataset, job.model, job.output) == ("harmful-qa", str(tmp_path / "aligned"), tmp_path / "unsafe")
    assert recipe["max_length"] == 1280 and recipe["per_device_train_batch_size"] == 1
