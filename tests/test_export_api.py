"""``safetypatch export`` / ``api.export`` on a tiny llama GGUF (docs/gguf.md): the merged F16 file reads back through
the project's GGUF loader as the patched model (the logits within F16's tolerance), the adapter and the merged file
carry provenance, the base GGUF must be the patch's base, and the CLI writes what it says."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.api.export import EXPORT_RECORD
from safetypatch.cli import app
from safetypatch.errors import ConfigError, ModelMismatchError, OutputExistsError
from safetypatch.models.loading import load_model
from safetypatch.patch import PatchManifest, load_patch, merge_patch, save_patch
from safetypatch.patch.probe import probe_input_ids, probe_logits
from safetypatch.utils.hashing import sha256_file
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model
from tests.tiny_gguf import write_tiny_gguf
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)

F16_LOGIT_ATOL = 2e-3
"""A merged F16 file against the fp32 merge, on the tiny llama's probe batch: its weights are rounded to 11 bits
(relative 2^-12), which moves these logits by about 1e-4; the patch itself moves them by about 1."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama written as an F32 GGUF (the base), the same weights under another name (another sha256), another
    model's GGUF, and two patch folders trained, so to speak, on the base GGUF as ``load_model`` reads it."""
    root = tmp_path_factory.mktemp("export-api")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SAFETYPATCH_HOME", str(root / "home"))
        model, tokenizer = build_tiny_model("llama")
        other, _ = build_tiny_model("llama", seed=1)
        files = {"base": write_tiny_gguf(model, tokenizer, root / "base.gguf"),
                 "renamed": write_tiny_gguf(model, tokenizer, root / "renamed.gguf", name="renamed"),
                 "other": write_tiny_gguf(other, tokenizer, root / "other.gguf")}
        loaded = load_model(str(files["base"]), device="cpu", dtype="float32")
        manifest = PatchManifest(method="test", base_model=loaded.provenance())
        modules = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
        for name, seed in (("p1", 0), ("p2", 1)):
            files[name] = root / name
            save_patch(random_patch(loaded.model, modules=modules, seed=seed, scale=0.3), files[name], manifest,
                       model=loaded.model)
        yield files


def test_a_merged_f16_export_reads_back_through_the_gguf_loader_as_the_patched_model(tiny, tmp_path):
    result = api.export(api.ExportConfig(patches=[tiny["p1"]], format="merged", type="f16",
                                         output=tmp_path / "out"))
    assert result.merged == tmp_path / "out" / "model-f16.gguf" and result.adapter is None
    assert result.base == tiny["base"] and result.base_check == "gguf_sha256"
    exported = load_model(str(result.merged), device="cpu", dtype="float32")
    reference = load_model(str(tiny["base"]), device="cpu", dtype="float32")
    ids = probe_input_ids(reference.model)
    before = probe_logits(reference.model, ids)
    merge_patch(reference.model, load_patch(tiny["p1"]))
    expected, got = probe_logits(reference.model, ids), probe_logits(exported.model, ids)
    assert float((got - expected).abs().max()) < F16_LOGIT_ATOL
    assert float((expected - before).abs().max()) > 100 * F16_LOGIT_ATOL  # the patch shows, so the check can fail
    assert exported.tokenizer.chat_template == reference.tokenizer.chat_template


def test_the_adapter_and_the_merged_file_carry_the_patch_and_base_provenance(tiny, tmp_path):
    result = api.export(api.ExportConfig(patches=[tiny["p1"], tiny["p2"]], weights=[1.0, 0.5], format="both",
                                         type="q8_0", output=tmp_path / "out"))
    record = json.loads((result.output / EXPORT_RECORD).read_text())
    assert record["combination"] == "linear" and record["weights"] == [1.0, 0.5]
    assert record["base"]["sha256"] == sha256_file(tiny["base"]) and record["base"]["check"] == "gguf_sha256"
    assert set(record["files"]) == {"adapter.gguf", "model-q8_0.gguf"}
    assert record["files"]["model-q8_0.gguf"]["file_type"] == "MOSTLY_Q8_0"
    assert record["files"]["adapter.gguf"]["sha256"] == sha256_file(result.adapter)
    manifest_sha = [sha256_file(tiny[name] / "safety_patch.json") for name in ("p1", "p2")]
    for path in (result.adapter, result.merged):
        fields = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
        assert fields["safetypatch.patch_sha256"] == manifest_sha
        assert fields["safetypatch.weights"] == [1.0, 0.5]
        assert fields["safetypatch.base_gguf_sha256"] == sha256_file(tiny["base"])
        assert fields["safetypatch.base_fingerprint"] == [load_patch(tiny["p1"]).manifest["base_model"]
                                                          ["fingerprint"]] * 2
    assert (result.output / "Modelfile.adapter").read_text().splitlines()[1:] == [
        f"FROM {tiny['base'].resolve()}", "ADAPTER ./adapter.gguf"]
    assert "FROM ./model-q8_0.gguf" in (result.output / "Modelfile.merged").read_text()
    assert (result.output / ".safetypatch-output").is_file()
    with pytest.raises(OutputExistsError):
        api.export(api.ExportConfig(patches=[tiny["p1"]], output=result.output))


def test_a_base_gguf_that_is_not_the_patch_base_is_refused(tiny, tmp_path):
    with pytest.raises(ModelMismatchError, match=r"other\.gguf is not the model patch .*p1 was trained on.*"
                                                 r"--allow-other-base"):
        api.export(api.ExportConfig(patches=[tiny["p1"]], base=str(tiny["other"]), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    accepted = api.export(api.ExportConfig(patches=[tiny["p1"]], base=str(tiny["other"]), allow_other_base=True,
                                           output=tmp_path / "out"))
    assert accepted.base_check == "other base" and any("Accepted" in w for w in accepted.warnings)
    same_weights = api.export(api.ExportConfig(patches=[tiny["p1"]], base=str(tiny["renamed"]),
                                               output=tmp_path / "renamed"))
    assert same_weights.base_check == "fingerprint"  # another file (sha256), the same weights


def test_options_that_the_format_does_not_use_are_refused():
    with pytest.raises(ConfigError, match="type set, but format is adapter"):
        api.ExportConfig(patches=[Path("p")], type="q8_0")
    with pytest.raises(ConfigError, match="2 patches but 1 weights"):
        api.ExportConfig(patches=[Path("p"), Path("q")], weights=[1.0], format="both")


def test_the_cli_exports_and_reports_errors_in_one_paragraph(tiny, tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["export", "-p", str(tiny["p1"]), "--format", "both", "--type", "q4_1", "-o",
                               str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "adapter.gguf").is_file() and (tmp_path / "out" / "model-q4_1.gguf").is_file()
    assert "--lora" in done.output and "ollama create" in done.output
    refused = runner.invoke(app, ["export", "-p", str(tiny["p1"]), "--base", str(tiny["other"]), "-o",
                                  str(tmp_path / "refused")])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "is not the model patch" in said and "--allow-other-base" in said
    assert "Traceback" not in refused.output


def test_the_export_verb_is_built_from_export_config():
    import typer

    command = typer.main.get_command(app).commands["export"]  # type: ignore[attr-defined]
    assert command.config_class is api.ExportConfig


def test_a_patch_whose_base_has_no_gguf_file_asks_for_one(tmp_path):
    model, _ = build_tiny_model("llama")
    folder = tmp_path / "hf-patch"
    save_patch(random_patch(model), folder, PatchManifest(method="test", base_model={"model": "org/some-model"}),
               model=model)
    with pytest.raises(ConfigError, match=r"base of patch .*hf-patch is 'org/some-model'.*Give that model's GGUF file "
                                          r"with --base \(convert_hf_to_gguf\.py"):
        api.export(api.ExportConfig(patches=[folder], output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
