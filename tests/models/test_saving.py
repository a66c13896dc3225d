"""save_model_folder on tiny local models: an exact round trip with tied weights, a corrupted write caught by
name and leaving nothing behind, a sidecar that records the fingerprint, and the no-overwrite rule."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from safetypatch.errors import ConfigError, ModelError, OutputExistsError
from safetypatch.models.fingerprint import fingerprint_folder, safetensors_files
from safetypatch.models.loading import load_model
from safetypatch.models.saving import save_model_folder
from tests.tiny import build_tiny_model
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)


def test_tied_weights_round_trip_exactly_across_shards(tmp_path):
    model, tokenizer = build_tiny_model("gemma3")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    folder = tmp_path / "gemma3"
    fingerprint = save_model_folder(model, tokenizer, folder, max_shard_size="40KB")
    files = safetensors_files(folder)
    assert len(files) > 1 and (folder / "model.safetensors.index.json").is_file()
    stored = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            stored |= set(fh.keys())
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored  # tied: written once
    assert fingerprint == fingerprint_folder(folder)
    reloaded = load_model(str(folder), device="cpu")
    assert reloaded.fingerprint.sha256 == fingerprint.sha256
    assert reloaded.tokenizer.chat_template == tokenizer.chat_template
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in reloaded.model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3"]


def test_a_corrupted_write_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model("llama")
    original = type(model).save_pretrained

    def save_wrong(self, folder, **kwargs):
        state = dict(self.state_dict())
        state["model.norm.weight"] = state["model.norm.weight"] + 0.5
        original(self, folder, state_dict=state, **kwargs)

    monkeypatch.setattr(type(model), "save_pretrained", save_wrong)
    folder = tmp_path / "broken"
    with pytest.raises(ModelError, match=r"broken/model\.safetensors: tensor model\.norm\.weight reads back different "
                                         r"from the model in memory \(max \|Δ\| 0\.5\)"):
        save_model_folder(model, tokenizer, folder, sidecars={"never.json": "{}"})
    assert list(tmp_path.iterdir()) == []


def test_a_missing_untied_tensor_is_refused(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model("llama")
    assert not model.config.tie_word_embeddings
    original = type(model).save_pretrained

    def save_without_head(self, folder, **kwargs):
        original(self, folder, state_dict={k: v for k, v in self.state_dict().items() if k != "lm_head.weight"},
                 **kwargs)

    monkeypatch.setattr(type(model), "save_pretrained", save_without_head)
    with pytest.raises(ModelError, match=r"lack 1 tensors of the model \(e\.g\. lm_head\.weight\), which its config "
                                         "does not tie"):
        save_model_folder(model, tokenizer, tmp_path / "headless")
    assert list(tmp_path.iterdir()) == []


def test_a_sidecar_records_the_fingerprint_of_the_written_weights(tmp_path):
    model, tokenizer = build_tiny_model("qwen2")
    folder = tmp_path / "model"
    fingerprint = save_model_folder(model, tokenizer, folder, sidecars={
        "record.json": lambda sha256: json.dumps({"output_fingerprint": sha256}), "NOTE.txt": "plain text"})
    assert json.loads((folder / "record.json").read_text()) == {"output_fingerprint": fingerprint.sha256}
    assert (folder / "NOTE.txt").read_text() == "plain text"
    assert fingerprint_folder(folder).sha256 == fingerprint.sha256  # sidecars are not part of the fingerprint


def test_existing_folders_and_bad_sidecar_names_are_refused(tmp_path):
    model, tokenizer = build_tiny_model("llama")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="model already exists; pass overwrite=True"):
        save_model_folder(model, tokenizer, folder)
    with pytest.raises(OutputExistsError, match="model is a folder that safetypatch did not write"):
        save_model_folder(model, tokenizer, folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
    (folder / "mine.txt").unlink()  # an empty folder may be replaced, and so may an output this tool wrote
    save_model_folder(model, tokenizer, folder, overwrite=True)
    written = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ConfigError, match=r"sidecar 'config\.json' .* would replace the file"):
        save_model_folder(model, tokenizer, folder, sidecars={"config.json": "{}"}, overwrite=True)
    with pytest.raises(ConfigError, match=r"sidecar '\.\./escape\.json' .* is not a plain file name"):
        save_model_folder(model, tokenizer, folder, sidecars={"../escape.json": "{}"}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == written and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"]
    save_model_folder(model, tokenizer, folder, sidecars={"NOTE.txt": "again"}, overwrite=True)
    assert (folder / "config.json").is_file() and (folder / "NOTE.txt").read_text() == "again"
