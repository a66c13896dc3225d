"""Patch folders: atomic save, manifest and model card, reload checks of docs/methods.md §5.4, refusal of variants."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import yaml
from peft import get_peft_model

from safetypatch.errors import OutputExistsError, PatchError
from safetypatch.patch.artifact import PatchManifest, chat_template_sha256, load_patch, save_patch, verify_patch_folder
from safetypatch.patch.factors import patch_from_peft
from safetypatch.train.recipes import get_recipe
from safetypatch.train.refusal_sft import lora_config
from safetypatch.utils.io import MARKER
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

MANIFEST = PatchManifest(method="refusal_sft", base_model={"model": "tiny-llama", "fingerprint": "abc"}, seed=0,
                         recipe={"r": 2}, contamination={"harmbench": 0})


@pytest.fixture
def trained_peft():
    """A PEFT model whose LoRA B factors are non-zero, as after training."""
    model, tok = build_tiny_model("llama")
    peft = get_peft_model(model, lora_config(get_recipe("lora_mlp_r2"), 4))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return peft, tok


def test_save_from_peft_writes_a_verified_folder_with_manifest_and_card(trained_peft, tmp_path):
    peft, tok = trained_peft
    folder = tmp_path / "patch"
    loaded = save_patch(peft, folder, MANIFEST)
    assert sorted(p.name for p in folder.iterdir()) == [
        MARKER, "README.md", "adapter_config.json", "adapter_model.safetensors", "safety_patch.json"]
    original = patch_from_peft(peft)
    assert loaded.modules == original.modules and len(loaded.modules) == 12
    for m in loaded.modules:
        assert torch.equal(loaded.delta(m), original.delta(m))
    manifest = json.loads((folder / "safety_patch.json").read_text())
    assert manifest["method"] == "refusal_sft" and manifest["contamination"] == {"harmbench": 0}
    assert manifest["adapter"]["r"] == 2 and manifest["adapter"]["scaling"] == 8.0
    assert manifest["base_model"]["arch"]["model_type"] == "llama"
    assert manifest["library_versions"]["peft"]
    front = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front == {"base_model": "tiny-llama", "library_name": "peft", "tags": ["safetypatch", "safety"]}
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert chat_template_sha256(tok) and len(chat_template_sha256(tok)) == 64


def test_saving_keeps_the_peft_model_usable(trained_peft, tmp_path):
    peft, _ = trained_peft
    save_patch(peft, tmp_path / "p", MANIFEST)
    assert list(peft.peft_config) == ["default"] and peft.active_adapter == "default"
    assert any(p.requires_grad for n, p in peft.named_parameters() if "lora_" in n)


def test_in_memory_patch_is_saved_and_checked_on_its_base(tmp_path):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model)
    loaded = save_patch(patch, tmp_path / "p", MANIFEST, model=model)
    assert not hasattr(model, "peft_config")  # the check unwrapped the base again
    assert all(torch.equal(loaded.factors[m].B, patch.factors[m].B) for m in patch.modules)
    with pytest.raises(PatchError, match="pass model=<base>"):
        save_patch(patch, tmp_path / "q", MANIFEST)
    with pytest.raises(PatchError, match="save_full_model_patch"):
        save_patch(model, tmp_path / "q", MANIFEST)


def test_no_overwrite_without_permission(tmp_path):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model)
    save_patch(patch, tmp_path / "p", MANIFEST, model=model)
    with pytest.raises(OutputExistsError):
        save_patch(patch, tmp_path / "p", MANIFEST, model=model)
    save_patch(random_patch(model, seed=1), tmp_path / "p", MANIFEST, model=model, overwrite=True)
    assert torch.equal(load_patch(tmp_path / "p").factors["model.layers.0.mlp.up_proj"].A,
                       random_patch(model, seed=1).factors["model.layers.0.mlp.up_proj"].A)


def test_an_emptied_adapter_file_is_caught_and_nothing_is_left_behind(monkeypatch, tmp_path):
    """§5.4: a save that writes an empty adapter (as ZeRO-3 has) fails the check; the folder never appears."""
    model, _ = build_tiny_model("llama")
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata=None: open(path, "wb").close())
    with pytest.raises(PatchError, match="missing or empty"):
        save_patch(random_patch(model), tmp_path / "p", MANIFEST, model=model)
    assert not (tmp_path / "p").exists()


def test_partial_zeroed_or_altered_adapters_are_caught(tmp_path):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model)
    folder = tmp_path / "p"
    save_patch(patch, folder, MANIFEST, model=model)
    weights = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))

    del tensors["base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"]
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(PatchError, match=r"layers\.3\.mlp\.up_proj has only lora_A"):
        load_patch(folder)

    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in patch.state_dict().items()}
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(PatchError, match="every lora_B is zero"):
        verify_patch_folder(folder, model, patch)

    tensors = {k: (v * 1.01 if k.endswith("layers.2.mlp.up_proj.lora_B.weight") else v)
               for k, v in patch.state_dict().items()}
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(PatchError, match="logits differ"):
        verify_patch_folder(folder, model, patch)

    smaller = {k: v for k, v in patch.state_dict().items() if "layers.0." not in k}
    safetensors.torch.save_file(smaller, str(weights))
    with pytest.raises(PatchError, match="lacks"):
        verify_patch_folder(folder, model, patch)


def test_dora_and_unknown_tensors_are_refused(tmp_path):
    model, _ = build_tiny_model("llama")
    folder = tmp_path / "p"
    save_patch(random_patch(model), folder, MANIFEST, model=model)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PatchError, match="use_dora"):
        load_patch(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.ones(128)
    safetensors.torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(PatchError, match="lora_magnitude_vector"):
        load_patch(folder)


def test_malformed_json_sidecars_name_the_file_and_the_field(tmp_path):
    """A manifest of [] used to read as "no manifest", which turned the base-fingerprint check off."""
    model, _ = build_tiny_model("llama")
    folder = tmp_path / "p"
    save_patch(random_patch(model), folder, MANIFEST, model=model)
    config, manifest = (json.loads((folder / name).read_text()) for name in ("adapter_config.json",
                                                                              "safety_patch.json"))
    cases = [
        ("adapter_config.json", '{"r": 2', r"adapter_config\.json is not valid JSON"),
        ("adapter_config.json", "[]", r"adapter_config\.json holds a JSON list, but the PEFT adapter config must"),
        ("adapter_config.json", json.dumps({**config, "r": "2"}), r"adapter_config\.json: field 'r' .*\(got '2'\)"),
        ("safety_patch.json", "[]", r"safety_patch\.json holds a JSON list, but the patch manifest must"),
        ("safety_patch.json", json.dumps({**manifest, "base_model": {"fingerprint": 5}}),
         r"safety_patch\.json: field 'base_model\.fingerprint' of the patch manifest"),
    ]
    for name, text, message in cases:
        original = (folder / name).read_text()
        (folder / name).write_text(text)
        with pytest.raises(PatchError, match=message):
            load_patch(folder)
        (folder / name).write_text(original)
    with pytest.raises(PatchError, match=r"patch folder .*nope does not exist"):
        load_patch(tmp_path / "nope")
    with pytest.raises(PatchError, match=r"adapter_config\.json is not a folder"):
        load_patch(folder / "adapter_config.json")
