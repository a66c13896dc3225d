"""``safetypatch restore`` / ``extract`` and their Python API on the synthetic tiny checkpoints of
tests/restore/test_runner.py: LSSF end to end with anchors from HarmBench's train half, the job's validation, the CLI
with a YAML config and flag overrides, and extraction at full rank."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.api.restore import Scope, build_anchors
from safetypatch.cli import app
from safetypatch.errors import ConfigError
from safetypatch.patch import load_patch
from safetypatch.patch.probe import peft_attached, probe_input_ids, probe_logits
from safetypatch.restoration.runner import PROVENANCE_FILE
from safetypatch.weights.stream import CheckpointReader, ParamScope
from tests.restore.test_runner import SAFETY_MODULES, write_roles
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)

N_ANCHORS = 4


@pytest.fixture(scope="module")
def roles(tmp_path_factory) -> dict[str, Path]:
    return write_roles(tmp_path_factory.mktemp("roles"))


def _refs(roles: dict[str, Path], *names: str) -> dict[str, str]:
    return {name: str(roles[name]) for name in names}


def _lssf(roles: dict[str, Path], output: Path, **params) -> api.RestoreResult:
    job = api.RestoreJob(method="lssf", params=params, output=output, n_anchors=N_ANCHORS, anchor_max_new_tokens=8,
                         **_refs(roles, "aligned_model", "unsafe_model", "target_model"))
    return api.restore(job)


def test_lssf_end_to_end_with_harmbench_anchors(roles, tmp_path):
    result = _lssf(roles, tmp_path / "out")
    reader, target = CheckpointReader(tmp_path / "out"), CheckpointReader(roles["target_model"])
    changed = {f"{m}.weight" for m in SAFETY_MODULES}
    for name in reader.names():
        tensor = reader.get(name)
        assert bool(torch.isfinite(tensor).all()), name
        assert torch.equal(tensor, target.get(name)) != (name in changed), name
    rows = [row for row in result.run.report.rows if row["changed"]]
    assert {row["tensor"] for row in rows} == changed
    for row in rows:
        d_out, d_in = reader.shape(row["tensor"])
        assert isinstance(row["rank"], int) and 1 <= row["rank"] <= min(d_out, d_in), row
        assert len(row["spectrum"]) >= row["rank"] and row["entropy_curve"][-1] == pytest.approx(1.0)
    assert result.mean_rank == pytest.approx(sum(row["rank"] for row in rows) / len(rows))
    assert len(result.anchors) == N_ANCHORS and all(anchor.response for anchor in result.anchors)
    anchors = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["meta"]["anchors"]
    assert anchors["dataset"] == "harmbench" and anchors["split"] == "train" and len(anchors["ids"]) == N_ANCHORS
    assert len(anchors["sha256"]) == 64 and anchors["protocol"]["max_new_tokens"] == 8


def test_the_default_anchor_count_fits_harmbench_train_half():
    """148 distinct non-contextual prompts: the §3.4 default of 128 anchors is available, 149 is refused (before any
    model is used)."""
    with pytest.raises(ConfigError, match="n_anchors=149, but the train half of 'harmbench' has 148 distinct"):
        build_anchors(None, "harmbench", 149, 0, 8)


def test_lssf_with_the_identity_projector_reproduces_resta(roles, tmp_path):
    """§3.4 (g) through the whole pipeline: rank_override full, α_1 = 1, α = β."""
    _lssf(roles, tmp_path / "lssf", rank_override="full", alpha=0.5)
    api.restore(api.RestoreJob(method="resta", params={"beta": 0.5}, output=tmp_path / "resta",
                               **_refs(roles, "aligned_model", "unsafe_model", "target_model")))
    lssf, resta = CheckpointReader(tmp_path / "lssf"), CheckpointReader(tmp_path / "resta")
    for name in resta.names():
        torch.testing.assert_close(lssf.get(name), resta.get(name), rtol=1e-5, atol=1e-6)


def test_the_job_refuses_what_it_cannot_run(roles):
    refs = _refs(roles, "aligned_model", "unsafe_model", "target_model")
    with pytest.raises(ConfigError, match="Did you mean 'resta'"):
        api.RestoreJob(method="rest", **refs)
    with pytest.raises(ConfigError, match=r"invalid RESTAConfig .*gamma"):
        api.RestoreJob(method="resta", params={"gamma": 1}, **refs)
    with pytest.raises(ConfigError, match="base_model is missing"):
        api.RestoreJob(method="safe_lora", **_refs(roles, "aligned_model", "target_model"))
    with pytest.raises(ConfigError, match="n_anchors shape LSSF's anchor set"):
        api.RestoreJob(method="resta", n_anchors=8, **refs)
    with pytest.raises(ConfigError, match="give one"):
        api.RestoreJob(method="resta", scope="all_2d", params={"param_scope": "linear"}, **refs)
    assert get_args(Scope) == get_args(ParamScope)


def test_a_dry_run_loads_no_model_and_writes_nothing(roles, tmp_path, monkeypatch):
    module = importlib.import_module("safetypatch.api.restore")  # the package binds the name to the function
    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("a dry run loaded a model"))
    result = api.restore(api.RestoreJob(method="lssf", output=tmp_path / "out", dry_run=True,
                                        **_refs(roles, "aligned_model", "unsafe_model", "target_model")))
    assert result.output is None and result.summary == {} and not (tmp_path / "out").exists()
    assert "tensors streamed: 28" in result.run.describe()


def test_cli_restore_reads_yaml_and_flags_win(roles, tmp_path):
    config = tmp_path / "restore.yaml"
    config.write_text(yaml.safe_dump({"method": "resta", "params": {"beta": 0.5}, "output": str(tmp_path / "x"),
                                      **_refs(roles, "aligned_model", "unsafe_model", "target_model")}))
    runner = CliRunner()
    dry = runner.invoke(app, ["restore", "--config", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "tensors streamed: 28" in dry.output and not (tmp_path / "x").exists()
    done = runner.invoke(app, ["restore", "--config", str(config), "--set", "beta=0.25", "-o", str(tmp_path / "y")])
    assert done.exit_code == 0, done.output
    assert "tensors changed" in done.output and f"{len(SAFETY_MODULES)} of 28" in done.output
    assert json.loads((tmp_path / "y" / PROVENANCE_FILE).read_text())["config"]["beta"] == 0.25
    bad = runner.invoke(app, ["restore", "--config", str(config), "--method", "safe_lora", "--set", "threshold=0.4"])
    assert bad.exit_code == 2 and "base_model is missing" in bad.output and "--base-model" in bad.output


def test_extract_at_full_rank_reproduces_the_target_logits(roles, tmp_path):
    from transformers import AutoModelForCausalLM

    result = api.extract(api.ExtractJob(target=str(roles["unsafe_model"]), reference=str(roles["aligned_model"]),
                                        rank=64, output=tmp_path / "patch"))
    assert result.error < 1e-5 and set(result.errors) == set(SAFETY_MODULES) and len(result.unchanged) == 25
    patch = load_patch(tmp_path / "patch")
    extra = patch.manifest["extra"]
    assert extra["relative_error"] == result.error and extra["errors"] == result.errors
    assert extra["target"]["model"] == str(roles["unsafe_model"]) and patch.manifest["method"] == "extract:svd"
    reference = AutoModelForCausalLM.from_pretrained(roles["aligned_model"]).eval()
    target = AutoModelForCausalLM.from_pretrained(roles["unsafe_model"]).eval()
    ids = probe_input_ids(reference)
    with peft_attached(reference, patch) as patched:
        torch.testing.assert_close(probe_logits(patched, ids), probe_logits(target, ids), rtol=1e-4, atol=1e-5)


def test_cli_extract_reports_the_truncation_error(roles, tmp_path):
    done = CliRunner().invoke(app, ["extract", "--target", str(roles["target_model"]), "--reference",
                                    str(roles["aligned_model"]), "--rank", "2", "-o", str(tmp_path / "p")])
    assert done.exit_code == 0, done.output
    error = load_patch(tmp_path / "p").manifest["extra"]["relative_error"]
    assert 0 < error < 1 and not math.isnan(error) and "relative error" in done.output
