"""``safetypatch apply`` / ``safetypatch.apply_patch`` on tiny local models (docs/methods.md §3.3, §5.1, §5.8): merges
are checked on the product ΔW = s·B·A in fp32, adapters by reloading them with PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.api.apply import APPLIED_RECORD
from safetypatch.cli import app
from safetypatch.errors import ConfigError, ModelMismatchError, OutputExistsError, PatchError
from safetypatch.models.fingerprint import fingerprint_folder
from safetypatch.models.loading import LoadedModel, load_model
from safetypatch.patch import Patch, PatchManifest, load_patch, save_patch
from safetypatch.patch.factors import module_weight
from safetypatch.patch.probe import is_peft_model, probe_input_ids, probe_logits
from safetypatch.utils.hashing import sha256_file
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)


def _save(loaded: LoadedModel, folder: Path, patch: Patch) -> Path:
    save_patch(patch, folder, PatchManifest(method="test", base_model=loaded.provenance()), model=loaded.model)
    return folder


@pytest.fixture(scope="module")
def folders(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """Patch folders for the tiny llama (p1, p2 on partly different modules, one too small to matter, one for a
    deeper llama), one for the tiny qwen2, and a fine-tuned descendant of the tiny llama."""
    root = tmp_path_factory.mktemp("apply")
    llama = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    qwen = load_model(str(tiny_model_dirs["qwen2"]), device="cpu")
    deeper, _ = build_tiny_model("llama", num_layers=6)
    save_patch(random_patch(deeper), root / "deeper", PatchManifest(method="test"), model=deeper)
    descendant, tokenizer = build_tiny_model("llama")  # the same weights as tiny_model_dirs["llama"], then tuned
    with torch.no_grad():
        for layer in descendant.model.layers:
            layer.mlp.down_proj.weight.add_(0.01 * torch.randn_like(layer.mlp.down_proj.weight))
    descendant.save_pretrained(root / "descendant")
    tokenizer.save_pretrained(root / "descendant")
    return {
        "llama": tiny_model_dirs["llama"], "descendant": root / "descendant", "deeper": root / "deeper",
        "p1": _save(llama, root / "p1", random_patch(llama.model, modules=("up_proj", "o_proj"), seed=0, scale=0.3)),
        "p2": _save(llama, root / "p2", random_patch(llama.model, modules=("up_proj", "down_proj"), seed=1,
                                                     scale=0.3)),
        "small": _save(llama, root / "small", random_patch(llama.model, scale=1e-3)),
        "qwen2": _save(qwen, root / "qwen2", random_patch(qwen.model, seed=2, scale=0.3)),
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in load_file(str(folder / "model.safetensors")).items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_merge_with_scale_onto_a_descendant_writes_w_plus_half_delta(folders, tmp_path):
    out = tmp_path / "merged"
    cfg = api.ApplyConfig(model=str(folders["descendant"]), patches=folders["p1"], mode="merge", scale=0.5,
                          output=out)
    result = api.apply_patch(cfg)
    assert (result.mode, result.scale, result.output) == ("merge", 0.5, out)
    assert result.applied_to["same_as_patch_base"] is False and "not the patch base" in result.warnings[0]
    before, after = _weights(folders["descendant"]), _weights(out)
    patch = load_patch(folders["p1"])
    for name in patch.factors:
        assert _relative(after[f"{name}.weight"] - before[f"{name}.weight"], 0.5 * patch.delta(name)) < 1e-6, name
    untouched = before.keys() - {f"{name}.weight" for name in patch.factors}
    assert untouched and all(torch.equal(before[key], after[key]) for key in untouched)
    reloaded = load_model(str(out), device="cpu")
    ids = probe_input_ids(reloaded.model)
    torch.testing.assert_close(probe_logits(reloaded.model, ids), probe_logits(result.model, ids), rtol=0, atol=0)
    assert reloaded.tokenizer.chat_template == result.tokenizer.chat_template
    record = json.loads((out / APPLIED_RECORD).read_text())
    assert record["scale"] == 0.5 and record["max_logit_change"] == result.max_logit_change
    assert record["paths"] == [str(folders["p1"])]
    assert record["manifest_sha256"] == [sha256_file(folders["p1"] / "safety_patch.json")]
    assert record["target"]["fingerprint"] == result.applied_to["fingerprint"] != record["output_fingerprint"]
    assert record["output_fingerprint"] == reloaded.fingerprint.sha256 == fingerprint_folder(out).sha256
    assert record["warnings"] == list(result.warnings) and record["reduction"] is None


def test_two_patches_stack_exactly_and_independently_of_their_order(folders):
    base = _weights(folders["llama"])
    p1, p2 = load_patch(folders["p1"]), load_patch(folders["p2"])
    results = [api.apply_patch(api.ApplyConfig(model=str(folders["llama"]), patches=order, mode="merge"))
               for order in ([folders["p1"], folders["p2"]], [folders["p2"], folders["p1"]])]
    modules = sorted(set(p1.factors) | set(p2.factors))
    assert len(modules) == 12  # up_proj in both, o_proj only in p1, down_proj only in p2
    for name in modules:
        expected = sum(p.delta(name) for p in (p1, p2) if name in p.factors)
        merged = [module_weight(r.model, name).detach() - base[f"{name}.weight"] for r in results]
        assert _relative(merged[0], expected) < 1e-6 and _relative(merged[1], merged[0]) < 1e-6, name
    record = results[0].record
    assert record["combination"] == "linear" and record["rank"] == 4 and record["modules"] == 12
    assert record["applied_to"]["same_as_patch_base"] is True


def test_attach_writes_an_adapter_folder_that_peft_loads_with_the_same_logits(folders, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    cfg = api.ApplyConfig(model=str(folders["llama"]), patches=[folders["p1"], folders["p2"]], weights=[1.0, -0.5],
                          output=out)
    result = api.apply_patch(cfg)
    assert result.mode == "attach" and is_peft_model(result.model) and result.max_logit_change > 1e-2
    fresh = load_model(str(folders["llama"]), device="cpu").model
    ids = probe_input_ids(fresh, seed=3)
    expected = probe_logits(result.model, ids)
    torch.testing.assert_close(probe_logits(PeftModel.from_pretrained(fresh, str(out)), ids), expected,
                               rtol=0, atol=1e-5)
    manifest = json.loads((out / "safety_patch.json").read_text())
    assert manifest["method"] == "combine:linear" and manifest["extra"]["weights"] == [1.0, -0.5]
    assert manifest["extra"]["applied"]["paths"] == [str(folders["p1"]), str(folders["p2"])]
    assert manifest["adapter"]["r"] == 4


def test_an_existing_output_is_refused_and_left_untouched(folders, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    cfg = api.ApplyConfig(model=str(folders["llama"]), patches=folders["p1"], mode="merge", output=out)
    with pytest.raises(OutputExistsError, match="merged already exists"):
        api.apply_patch(cfg)
    with pytest.raises(OutputExistsError, match="merged is a folder that safetypatch did not write"):
        api.apply_patch(cfg.model_copy(update={"overwrite": True}))  # refused before the model is loaded
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    api.apply_patch(cfg.model_copy(update={"overwrite": True}))  # an empty folder, and then this tool's output
    api.apply_patch(cfg.model_copy(update={"overwrite": True}))
    assert (out / APPLIED_RECORD).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_patch_for_another_model_is_refused_naming_the_architecture_or_module(folders):
    with pytest.raises(ModelMismatchError, match=r"trained for a qwen2 model.*but the model is llama"):
        api.apply_patch(api.ApplyConfig(model=str(folders["llama"]), patches=folders["qwen2"], mode="merge"))
    with pytest.raises(ModelMismatchError, match=r"module 'model\.layers\.4\.mlp\.up_proj'"):
        api.apply_patch(api.ApplyConfig(model=str(folders["llama"]), patches=folders["deeper"]))


def test_a_patch_that_changes_nothing_is_flagged(folders):
    with pytest.raises(PatchError, match="has no effect"):
        api.apply_patch(api.ApplyConfig(model=str(folders["llama"]), patches=folders["small"]))


def test_merge_time_reduction_removes_the_top_k_output_subspace(folders):
    base = _weights(folders["llama"])
    cfg = api.ApplyConfig(model=str(folders["llama"]), patches=folders["p1"], mode="merge", reduce_k=8,
                          reduce_retention=0.0)
    result = api.apply_patch(cfg)
    summary = result.record["reduction"]
    assert (summary["k"], summary["side"], summary["modules"]) == (8, "column", 8)
    assert summary["mean_overlap_after"] < 1e-5 < summary["mean_overlap_before"]
    for name in load_patch(folders["p1"]).factors:
        weight = base[f"{name}.weight"]
        U_k = torch.linalg.svd(weight, full_matrices=False).U[:, :8]
        merged = module_weight(result.model, name).detach() - weight
        assert float((U_k.T @ merged).norm() / merged.norm()) < 1e-5, name


def test_cli_apply_reads_a_yaml_config_and_flags_win(folders, tmp_path):
    config = tmp_path / "apply.yaml"
    config.write_text(yaml.safe_dump({"model": str(folders["llama"]), "patches": [str(folders["p2"])],
                                      "mode": "merge", "scale": 0.5, "output": str(tmp_path / "from-yaml")}))
    out = tmp_path / "merged"
    run = CliRunner().invoke(app, ["apply", "--config", str(config), "--scale", "0.25", "-o", str(out),
                                   "--patch", f"{folders['p1']},{folders['p2']}"])
    assert run.exit_code == 0, run.output
    record = json.loads((out / APPLIED_RECORD).read_text())
    assert (record["mode"], record["scale"], record["name"]) == ("merge", 0.25, "p1+p2")
    assert not (tmp_path / "from-yaml").exists()
    assert "max logit change" in run.output and "same as the patch base" in run.output
    bad = CliRunner().invoke(app, ["apply", "--config", str(config), "--mode", "attach"])
    assert bad.exit_code == 2 and "mode is attach" in bad.output and "Traceback" not in bad.output


def test_configs_name_the_fields_that_conflict():
    assert api.ApplyConfig(patches="p").patches == [Path("p")]
    with pytest.raises(ConfigError, match="scale act on merged weights, but mode is attach"):
        api.ApplyConfig(patches="p", scale=0.5)
    with pytest.raises(ConfigError, match="reduce_k act on merged weights"):
        api.ApplyConfig(patches="p", reduce_k=4)
    with pytest.raises(ConfigError, match="reduce_side set but reduce_k is 0"):
        api.ApplyConfig(patches="p", mode="merge", reduce_side="row")
    with pytest.raises(ConfigError, match="2 patches but 1 weights"):
        api.ApplyConfig(patches=["a", "b"], weights=[1.0])
    assert api.EvalConfig(adapter="p").adapter == [Path("p")]
    with pytest.raises(ConfigError, match="merge_adapter is false"):
        api.EvalConfig(adapter="p", merge_scale=0.5)


def test_evaluate_merges_several_adapters_with_a_scale(folders, tmp_path):
    cfg = api.EvalConfig(model=str(folders["llama"]), adapter=[folders["p1"], folders["p2"]], merge_adapter=True,
                         merge_scale=0.5, tasks=["harmbench"], limits={"harmbench": 2}, judges=["keyword"],
                         max_new_tokens=4, output_dir=tmp_path / "out")
    adapter = json.loads(api.evaluate(cfg).path.read_text())["config"]["adapter"]
    assert (adapter["mode"], adapter["scale"], adapter["combination"], adapter["name"]) == (
        "merge", 0.5, "linear", "p1+p2")
    assert adapter["manifest_sha256"] == [sha256_file(folders[p] / "safety_patch.json") for p in ("p1", "p2")]
