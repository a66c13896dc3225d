from __future__ import annotations

import zipfile

import pytest

from safetypatch.errors import AssetError, ModelError
from safetypatch.models.catalog import EMBEDDED_MODELS, EmbeddedModel
from safetypatch.models.gguf import assemble_embedded
from safetypatch.models.loading import load_model
from safetypatch.models.resolve import list_catalog, resolve_model
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.wheels import WheelAsset


def test_unknown_name_suggests_catalog_names():
    with pytest.raises(ModelError, match=r"Did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2-135m")


@pytest.mark.parametrize("ref", ["./no/such/folder", "/tmp/definitely-missing-model-dir", "missing.gguf"])
def test_missing_paths_are_named(ref):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(ref)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match=r"without config\.json"):
        resolve_model(tmp_path)


def test_revision_only_for_hub_ids(tiny_model_dirs):
    with pytest.raises(ModelError, match="not a Hub id"):
        resolve_model(tiny_model_dirs["llama"], revision="main")


def test_unreachable_hub_id_explains(monkeypatch, isolated_home):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(isolated_home / "hf"))
    with pytest.raises(ModelError, match="Hugging Face Hub") as info:
        resolve_model("some-org/some-model", revision="v1")
    assert "catalog name" in str(info.value)


def test_corrupt_gguf_is_a_model_error_naming_the_file(tmp_path, isolated_home):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match=r"broken\.gguf could not be read"):
        resolve_model(bad)
    assert not any((isolated_home / "models").glob("gguf-*/config.json"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_load_local_folder(tiny_model_dirs, arch):
    loaded = load_model(str(tiny_model_dirs[arch]), device="cpu")
    assert loaded.resolved.kind == "local"
    assert loaded.dtype == "float32"
    assert loaded.fingerprint.arch["model_type"] == ("gemma3_text" if arch == "gemma3" else arch)
    assert loaded.tokenizer.pad_token is not None
    assert loaded.provenance()["fingerprint"] == loaded.fingerprint.sha256
    assert not loaded.model.training


def test_catalog_lists_both_models():
    names = [row.name for row in list_catalog()]
    assert names == ["gemma3-270m", "smollm2-135m-instruct"]
    for row in list_catalog():
        assert row.revision.startswith("pypi:")


def _fake_wheel(folder, payloads: dict[str, bytes]):
    path = folder / "fakeparts-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in payloads.items():
            zf.writestr(name, data)
    return path


def test_multi_part_gguf_is_assembled_and_checked(tmp_path, isolated_home, monkeypatch):
    house = tmp_path / "house"
    house.mkdir()
    wheel = _fake_wheel(house, {"fakeparts/a.part00": b"abc", "fakeparts/a.part01": b"def"})
    monkeypatch.setenv("SAFETYPATCH_WHEELHOUSE", str(house))
    asset = WheelAsset("fakeparts==0.1.0", sha256_file(wheel), "MIT")
    whole = tmp_path / "whole"
    whole.write_bytes(b"abcdef")
    spec = EmbeddedModel("fake", "", "x/y", "MIT", ((asset, "fakeparts/a.part00"), (asset, "fakeparts/a.part01")),
                         sha256_file(whole), chat=False)
    assembled = assemble_embedded(spec, tmp_path / "work")
    assert assembled.read_bytes() == b"abcdef"

    wrong = EmbeddedModel("fake2", "", "x/y", "MIT", spec.parts, "0" * 64, chat=False)
    with pytest.raises(AssetError, match="fake2"):
        assemble_embedded(wrong, tmp_path / "work")
    assert not (tmp_path / "work" / "fake2.gguf").exists()


def test_catalog_registry_rejects_duplicates():
    with pytest.raises(Exception, match="registered twice"):
        EMBEDDED_MODELS.register("gemma3-270m", EMBEDDED_MODELS.get("gemma3-270m"))


def test_a_model_folder_without_a_tokenizer_is_refused_with_what_to_copy(tiny_model_dirs, tmp_path):
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            path.unlink()
    with pytest.raises(ModelError, match=r"no tokenizer transformers can load.*Copy the tokenizer files"):
        load_model(str(folder))
