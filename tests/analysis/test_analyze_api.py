"""``safetypatch analyze`` end to end on a tiny model: the CLI writes analysis.json and the PNGs and refuses to
overwrite, the JSON records provenance and its aggregates, a target equal to the model moves nothing, LoX's R-metrics
appear with a base model, and ``safetypatch report --analysis`` renders the analysis from the file alone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.analysis import ANALYSIS_FILE, read_analysis
from safetypatch.cli import app
from safetypatch.config import load_config
from safetypatch.errors import ConfigError, DataError, ModelError, PatchError
from safetypatch.models.fingerprint import fingerprint_folder
from safetypatch.patch import PatchManifest, save_patch
from safetypatch.report import write_report
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import MARKER
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The tiny model folder, a rank-2 all-linear patch saved on it, an unaligned base, and two prompt files."""
    root = tmp_path_factory.mktemp("analyze")
    model, tokenizer = build_tiny_model()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_patch(random_patch(model, modules=LINEAR, r=2, scale=0.2), root / "patch", PatchManifest(method="test"),
               model=model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for kind in ("benign", "harmful"):
        rows = [json.dumps({"prompt": f"{kind} question {i}: how does this work?"}) for i in range(12)]
        (root / f"{kind}.jsonl").write_text("\n".join(rows) + "\n")
    return {"model": root / "model", "patch": root / "patch", "base": root / "base",
            "benign": root / "benign.jsonl", "harmful": root / "harmful.jsonl"}


def _flags(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["--model", str(inputs["model"]), "--benign-set", str(inputs["benign"]), "--harmful-set",
            str(inputs["harmful"]), "--n-prompts", "3", "--baseline-draws", "2", "--k", "16", "-o", str(out)]


def test_the_cli_writes_the_json_and_figures_and_refuses_to_overwrite(inputs, tmp_path, isolated_home):
    out = tmp_path / "analysis"
    run = CliRunner().invoke(app, ["analyze", "--patch", str(inputs["patch"]), *_flags(inputs, out)])
    assert run.exit_code == 0, run.output
    assert "Mou" in run.output and "hidden-state shift on harmful prompts" in run.output
    doc = read_analysis(out)
    assert len(doc.rows) == 4 * 7 and {row["r"] for row in doc.rows} == {2}
    assert doc.modules()[0] == "self_attn.q_proj" and doc.layers() == [0, 1, 2, 3]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([MARKER, ANALYSIS_FILE, "baseline.png", "hidden_shift.png", "heatmap_mou_norm.png",
                            "heatmap_overlap.png", "heatmap_enrichment.png", "heatmap_stable_rank.png",
                            "heatmap_relative_norm.png", "heatmap_entropy_rank.png"])
    assert all((out / name).read_bytes().startswith(PNG) for name in names if name.endswith(".png"))
    provenance = doc.data["provenance"]
    assert provenance["models"]["model"]["fingerprint"] == fingerprint_folder(inputs["model"]).sha256
    assert provenance["patch"]["manifest_sha256"] == sha256_file(inputs["patch"] / "safety_patch.json")
    assert provenance["svd_cache"]["misses"] == 28 and doc.data["config"]["seed"] == 0
    shift = doc.hidden_shift
    assert shift["sets"]["benign"]["n"] == 3 and len(shift["layers"]) == 4
    assert all(layer["harmful_shift"] > 0 for layer in shift["layers"])
    q_proj = doc.aggregates["by_module"]["self_attn.q_proj"]
    values = [row["mou_norm"] for row in doc.rows if row["module"] == "self_attn.q_proj"]
    assert q_proj["n"] == 4 and q_proj["median"]["mou_norm"] == pytest.approx(statistics.median(values))
    before = (out / ANALYSIS_FILE).read_bytes()
    again = CliRunner().invoke(app, ["analyze", "--patch", str(inputs["patch"]), *_flags(inputs, out)])
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    assert (out / ANALYSIS_FILE).read_bytes() == before
    replaced = CliRunner().invoke(app, ["analyze", "--patch", str(inputs["patch"]), "--no-hidden-shift",
                                        "--overwrite", *_flags(inputs, out)])
    assert replaced.exit_code == 0, replaced.output
    assert read_analysis(out).hidden_shift is None and not (out / "hidden_shift.png").exists()
    assert read_analysis(out).data["provenance"]["svd_cache"]["hits"] == 28  # the W_0 SVDs were cached


def test_a_target_equal_to_the_model_moves_nothing(inputs, tmp_path, isolated_home):
    config = api.AnalyzeConfig(model=str(inputs["model"]), target=str(inputs["model"]), output_dir=tmp_path / "a",
                               benign_set=str(inputs["benign"]), harmful_set=str(inputs["harmful"]), n_prompts=2,
                               cache=False)
    result = api.analyze(config)
    assert all(row["zero"] and row["norm"] == 0.0 for row in result.document.rows)
    assert result.document.aggregates["overall"]["zero"] == 28
    assert all(v == 0.0 for layer in result.document.hidden_shift["layers"] for k, v in layer.items() if k != "layer")
    assert [p.name for p in result.figures] == ["heatmap_relative_norm.png", "hidden_shift.png"]


def test_lox_metrics_with_a_base_model_and_a_yaml_config(inputs, tmp_path, isolated_home):
    cfg = tmp_path / "analyze.yaml"
    cfg.write_text(yaml.safe_dump({"patch": str(inputs["patch"]), "base_model": str(inputs["base"]), "lox_k": 4,
                                   "hidden_shift": False, "rank": 1}))
    out = tmp_path / "lox"
    run = CliRunner().invoke(app, ["analyze", "--config", str(cfg), "--rank", "2", *_flags(inputs, out)])
    assert run.exit_code == 0, run.output
    doc = read_analysis(out)
    assert doc.data["config"]["rank"] == 2 and doc.data["config"]["lox_k"] == 4  # the flag beat the file
    assert all(0.0 <= row["r_ft"] <= 1.0 and 0.0 < row["r_align"] <= 1.0 for row in doc.rows)
    assert (out / "heatmap_r_ft.png").is_file()


def test_the_config_needs_exactly_one_update():
    with pytest.raises(ConfigError, match="exactly one of patch"):
        api.AnalyzeConfig()
    with pytest.raises(ConfigError, match="exactly one of patch"):
        api.AnalyzeConfig(patch=Path("p"), target="t")
    with pytest.raises(ConfigError, match="unknown_key: Extra inputs are not permitted"):
        load_config(api.AnalyzeConfig, overrides={"patch": "p", "unknown_key": 1})


def test_missing_or_wrong_folders_are_named_with_the_fix(inputs, tmp_path, isolated_home):
    config = api.AnalyzeConfig(model=str(inputs["model"]), patch=tmp_path / "no-patch", output_dir=tmp_path / "o")
    with pytest.raises(PatchError, match=r"patch folder .*no-patch does not exist.*adapter_config\.json"):
        api.analyze(config)
    model_as_patch = config.model_copy(update={"patch": inputs["base"]})
    with pytest.raises(PatchError, match=r"is a model folder, not a LoRA adapter.*--target <folder> --model"):
        api.analyze(model_as_patch)
    no_model = config.model_copy(update={"model": str(tmp_path / "no-model"), "patch": inputs["patch"]})
    with pytest.raises(ModelError, match=r"^model '.*no-model': "):
        api.analyze(no_model)
    assert not (tmp_path / "o").exists()


def test_the_report_renders_an_analysis_from_its_file(inputs, tmp_path, isolated_home):
    out = tmp_path / "analysis"
    assert CliRunner().invoke(app, ["analyze", "--patch", str(inputs["patch"]), *_flags(inputs, out)]).exit_code == 0
    page = tmp_path / "report.html"
    run = CliRunner().invoke(app, ["report", "--analysis", str(out / ANALYSIS_FILE), "-o", str(page)])
    assert run.exit_code == 0, run.output
    html = page.read_text()
    assert "Subspace analysis: patch" in html and html.count("<img") == 8
    assert fingerprint_folder(inputs["model"]).sha256 in html
    with pytest.raises(ConfigError, match="nothing to report"):
        write_report([], tmp_path / "empty.html")


def test_reading_something_that_is_not_an_analysis_says_so(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": {}}))
    with pytest.raises(DataError, match=r"results\.json is not a safetypatch analysis file"):
        read_analysis(path)
    with pytest.raises(DataError, match="does not exist"):
        read_analysis(tmp_path / "missing.json")
