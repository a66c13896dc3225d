"""bench.mergekit_bench without mergekit (CI never installs it): safetypatch's side end to end at a tiny size, the
install commands' torch pin, and the adapter error computed from the written factors."""

from __future__ import annotations

import json
import sys

import pytest

from bench import mergekit_bench

TINY_GB = "0.001"  # the smallest shape: hidden 64, two layers


def test_install_pins_torch_before_mergekit_and_under_a_constraint(tmp_path):
    commands = mergekit_bench.install_commands(tmp_path / "venv", "mergekit==0.1.5", "torch==2.13.0")
    assert commands[0] == [sys.executable, "-m", "venv", str(tmp_path / "venv")]
    assert commands[1][-1] == "torch==2.13.0" and commands[2][-1] == "mergekit==0.1.5"
    assert all(command[command.index("-c") + 1] == str(tmp_path / "venv" / "constraints.txt")
               for command in commands[1:])
    assert mergekit_bench.torch_requirement().startswith("torch==") and "+" not in mergekit_bench.torch_requirement()
    assert mergekit_bench.alternate(["a", "b"], 0) == ["a", "b"] and mergekit_bench.alternate(["a", "b"], 1) == [
        "b", "a"]


def test_task_arithmetic_config_is_resta(tmp_path):
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(mergekit_bench.merge_config(tmp_path, 0.25).read_text())
    assert config["merge_method"] == "task_arithmetic" and config["base_model"] == str(tmp_path / "base")
    assert [(m["model"], m["parameters"]["weight"]) for m in config["models"]] == [
        (str(tmp_path / "aligned"), 0.25), (str(tmp_path / "target"), 1.0)]
    assert config["parameters"] == {"normalize": False} and config["out_dtype"] == "bfloat16"


def test_safetypatch_side_runs_and_its_errors_match_the_patch_manifest(tmp_path):
    out = tmp_path / "work"
    result = mergekit_bench.main(["--no-mergekit", "--size-gb", TINY_GB, "--extract-size-gb", TINY_GB, "--rank", "4",
                                  "--repeats", "1", "--cold", "fadvise", "--svd-layers", "1", "--out", str(out),
                                  "--keep", "--json", str(tmp_path / "mergekit.json")])
    document = json.loads((tmp_path / "mergekit.json").read_text())
    assert document["command"].startswith("python -m bench.mergekit_bench") and result["acceptance"] is None
    merge = document["merge"]
    assert merge["page_cached"]["summary"]["safetypatch"]["best_seconds"] > 0 and merge["outputs"] is None
    assert merge["cold"]["method"] == ["fadvise"] and merge["cold"]["runs"][0]["peak_rss_bytes"] > 0
    methods = document["methods"]
    assert methods["safe_lora"]["seconds"] > 0
    assert methods["lssf"]["tensors"] == methods["lssf"]["tensors_changed"] == 7  # --svd-layers 1
    errors = document["extract"]["errors"]
    assert errors["modules_compared"] == 7 * document["extract_pair"]["layers"]
    assert errors["tools"]["safetypatch"]["factor_dtype"] == "torch.float32"
    assert 0 < errors["tools"]["safetypatch"]["overall_error"] < 1
    assert (out / "base").is_dir() and not (out / "out_resta").exists()  # checkpoints kept, outputs removed


def test_extraction_errors_come_from_the_product_of_the_factors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from bench.mergekit_bench import PEFT_PREFIX, extraction_errors

    reference, finetuned = tmp_path / "reference", tmp_path / "finetuned"
    weight = torch.zeros(6, 5)
    delta = torch.outer(torch.arange(1.0, 7.0), torch.ones(5)) + torch.eye(6, 5)  # rank 1 plus a diagonal
    for folder, value in ((reference, weight), (finetuned, weight + delta)):
        folder.mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": value}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    U, S, Vh = torch.linalg.svd(delta)
    adapters = {}
    for tool, (scale_a, alpha) in {"exact": (1.0, 2), "scaled": (0.5, 4)}.items():  # s = alpha / r
        adapters[tool] = tmp_path / tool
        adapters[tool].mkdir()
        B = U[:, :2] * S[:2]
        A = Vh[:2] * scale_a
        save_file({f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.lora_A.weight": A.contiguous(),
                   f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.lora_B.weight": B.contiguous()},
                  str(adapters[tool] / "adapter_model.safetensors"))
        (adapters[tool] / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": alpha}))
    result = extraction_errors(adapters, finetuned, reference)
    expected = float(S[2:].norm() / S.norm())
    assert result["tools"]["exact"]["per_module"]["model.layers.0.mlp.up_proj"] == pytest.approx(expected, rel=1e-5)
    assert result["tools"]["scaled"]["overall_error"] == pytest.approx(expected, rel=1e-5)
    assert result["ours_minus_theirs"]["modules_ours_not_higher"] == 1
