"""GGUF export of patches (patch.export, models.gguf_layout): the adapter's tensors are the patch's factors in
llama.cpp's layout, the merged file's tensors are W0 + ΔW, and what does not fit is refused with its name. Expected
tensors are built here with llama.cpp's own permutation (tests/tiny_gguf.py), apart from the code under test."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from safetypatch.errors import ConfigError, ModelError, ModelMismatchError
from safetypatch.models.gguf_layout import ARCHITECTURES, permute_rows, read_base_gguf
from safetypatch.patch.export import write_adapter, write_merged
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model
from tests.tiny_gguf import hf_to_file, llama_permute, write_tiny_gguf

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per architecture: the tiny HF model, its F32 and Q8_0 GGUF files, and a patch on every attention and MLP
    module (r=2, alpha=4: s=2, so a forgotten scale shows)."""
    root = tmp_path_factory.mktemp("gguf-export")
    out = {}
    for arch in ("llama", "qwen2", "gemma3"):
        model, tokenizer = build_tiny_model(arch)
        out[arch] = {
            "model": model,
            "f32": write_tiny_gguf(model, tokenizer, root / f"{arch}.gguf"),
            "q8_0": write_tiny_gguf(model, tokenizer, root / f"{arch}-q8_0.gguf", qtype="Q8_0"),
            "patch": random_patch(model, modules=MODULES, r=2, alpha=4.0, scale=0.3,
                                  manifest={"base_model": {"arch": {"model_type": model.config.model_type}}}),
        }
    return out


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


def _values(path: Path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def _file_name(module: str, config) -> str:
    names = gguf.get_tensor_name_map(ARCHITECTURES["gemma3" if "gemma" in config.model_type else
                                                   config.model_type].gguf_arch, config.num_hidden_layers)
    return names.get_name(module + ".weight", try_suffixes=(".weight",))


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))


def test_the_q_k_permutation_is_llama_cpps():
    rows = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    for n_head in (1, 2, 4, 8):
        assert torch.equal(permute_rows(rows, n_head), torch.from_numpy(llama_permute(rows.numpy(), n_head, None)))
    assert not torch.equal(permute_rows(rows, 4), rows)
    with pytest.raises(ModelMismatchError, match="not a multiple of 2·5"):
        permute_rows(rows, 5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_the_adapter_holds_a_and_scaled_b_in_llama_cpp_layout(tiny, arch, tmp_path):
    model, patch = tiny[arch]["model"], tiny[arch]["patch"]
    base = read_base_gguf(tiny[arch]["f32"])
    export = write_adapter(patch, base, tmp_path / "adapter.gguf", metadata={"safetypatch.base_fingerprint": "abc"})
    values, tensors = _values(export.path), _tensors(export.path)
    assert values["general.architecture"] == ARCHITECTURES[arch].name
    assert values["general.type"] == "adapter" and values["adapter.type"] == "lora"
    assert values["adapter.lora.alpha"] == patch.rank  # alpha / r = 1: the scale is in lora_b
    assert values["safetypatch.base_fingerprint"] == "abc"
    assert len(tensors) == 2 * len(patch.factors) == export.tensors
    for module, factors in patch.factors.items():
        name = _file_name(module, model.config)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        d_out, d_in = factors.shape
        assert [int(n) for n in a.shape] == [d_in, patch.rank] and [int(n) for n in b.shape] == [patch.rank, d_out]
        np.testing.assert_array_equal(np.asarray(a.data), factors.A.numpy())
        expected_b = hf_to_file(arch, model.config, module + ".weight", patch.scaling * factors.B.numpy())
        np.testing.assert_allclose(np.asarray(b.data), expected_b, rtol=1e-6, atol=0)
    q = next(m for m in patch.factors if m.endswith("layers.1.self_attn.q_proj"))
    permuted = not np.array_equal(np.asarray(tensors[_file_name(q, model.config) + ".lora_b"].data),
                                  patch.scaling * patch.factors[q].B.numpy())
    assert permuted == (arch == "llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_the_merged_f32_file_holds_w0_plus_delta_and_the_base_metadata(tiny, arch, tmp_path):
    model, patch = tiny[arch]["model"], tiny[arch]["patch"]
    base_path = tiny[arch]["f32"]
    export = write_merged(patch, read_base_gguf(base_path), tmp_path / "merged.gguf", qtype="f32",
                          metadata={"safetypatch.patch_sha256": ["0" * 64]})
    merged, original = _tensors(export.path), _tensors(base_path)
    assert list(merged) == list(original)
    weights = model.state_dict()
    for module in patch.factors:
        name = _file_name(module, model.config)
        expected = hf_to_file(arch, model.config, module + ".weight",
                              weights[module + ".weight"].numpy() + patch.delta(module).numpy())
        np.testing.assert_allclose(np.asarray(merged[name].data), expected, rtol=1e-6, atol=1e-6)
        assert merged[name].tensor_type == gguf.GGMLQuantizationType.F32
    untouched = [name for name in original if name.endswith("norm.weight") or name == "token_embd.weight"]
    for name in untouched:
        np.testing.assert_array_equal(np.asarray(merged[name].data), np.asarray(original[name].data))
    values, base_values = _values(export.path), _values(base_path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", f"{ARCHITECTURES[arch].name}.block_count"):
        assert values[key] == base_values[key]
    assert values["safetypatch.patch_sha256"] == ["0" * 64]
    assert values["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert export.update_error < 1e-6 and not export.warnings


def test_a_merged_q8_0_file_is_w0_plus_delta_on_the_q8_0_grid_with_its_error_reported(tiny, tmp_path):
    model, patch = tiny["llama"]["model"], tiny["llama"]["patch"]
    base_path = tiny["llama"]["q8_0"]
    base = read_base_gguf(base_path)
    export = write_merged(patch, base, tmp_path / "merged.gguf", qtype="base")
    merged, original = _tensors(export.path), _tensors(base_path)
    for module in patch.factors:
        name = _file_name(module, model.config)
        w0 = gguf.quants.dequantize(original[name].data, original[name].tensor_type).reshape(_hf_shape(original[name]))
        delta = hf_to_file("llama", model.config, module + ".weight", patch.delta(module).numpy())
        expected = gguf.quants.quantize(w0 + delta, gguf.GGMLQuantizationType.Q8_0)
        assert merged[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        np.testing.assert_array_equal(np.asarray(merged[name].data), expected)
    np.testing.assert_array_equal(np.asarray(merged["token_embd.weight"].data),
                                  np.asarray(original["token_embd.weight"].data))  # unpatched: copied
    assert 0 < export.update_error < 0.05
    assert all(0 < m.update_error < 0.1 for m in export.modules)
    f16 = write_merged(patch, base, tmp_path / "merged-f16.gguf", qtype="f16")
    assert f16.update_error < export.update_error and f16.file_type == "MOSTLY_F16"
    assert all(_tensors(f16.path)[name].tensor_type == gguf.GGMLQuantizationType.F16
               for name in merged if not name.endswith("norm.weight"))


def test_a_merge_whose_rounding_is_as_large_as_the_update_is_warned_about(tiny, tmp_path):
    model = tiny["llama"]["model"]
    patch = random_patch(model, modules=("up_proj",), r=2, alpha=4.0, scale=0.01)
    export = write_merged(patch, read_base_gguf(tiny["llama"]["q8_0"]), tmp_path / "merged.gguf", qtype="q4_1")
    assert export.update_error > 0.5
    assert any("Q4_1 rounding" in w and "The adapter next to the base keeps ΔW exactly" in w for w in export.warnings)


def test_a_patch_that_does_not_fit_the_base_is_refused_naming_the_tensor(tiny, tmp_path):
    patch = tiny["llama"]["patch"]
    base = read_base_gguf(tiny["llama"]["f32"])
    module = next(iter(patch.factors))
    factors = dict(patch.factors)
    factors[module] = type(factors[module])(A=torch.zeros(2, 32), B=factors[module].B)
    with pytest.raises(ModelMismatchError, match=r"blk\.0\.\w+\.weight of .*llama\.gguf is \("):
        write_adapter(patch.with_factors(factors), base, tmp_path / "a.gguf")
    deeper = patch.with_factors({"model.layers.7.mlp.up_proj": patch.factors["model.layers.0.mlp.up_proj"]})
    with pytest.raises(ModelMismatchError, match=r"model\.layers\.7\.mlp\.up_proj.*no tensor"):
        write_merged(deeper, base, tmp_path / "m.gguf")
    qwen = tiny["qwen2"]["patch"]
    with pytest.raises(ModelMismatchError, match=r"trained on a qwen2 model, but .*llama\.gguf is a llama GGUF"):
        write_adapter(qwen, base, tmp_path / "q.gguf")
    assert not any(tmp_path.iterdir())


def test_a_lora_on_a_tied_output_layer_is_refused(tiny, tmp_path):
    gemma = tiny["gemma3"]
    head = gemma["patch"].with_factors({"lm_head": type(next(iter(gemma["patch"].factors.values())))(
        A=torch.ones(2, 64), B=torch.ones(gemma["model"].config.vocab_size, 2))})
    with pytest.raises(ModelMismatchError, match=r"output\.weight.*tied to token_embd"):
        write_adapter(head, read_base_gguf(gemma["f32"]), tmp_path / "a.gguf")


def test_unknown_architectures_adapters_and_unquantisable_types_are_refused(tiny, tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi3")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"phi\.gguf is a GGUF of architecture 'phi3'.*supported: gemma3, llama"):
        read_base_gguf(tmp_path / "phi.gguf")
    adapter = write_adapter(tiny["llama"]["patch"], read_base_gguf(tiny["llama"]["f32"]), tmp_path / "lora.gguf")
    with pytest.raises(ModelError, match="is a GGUF adapter, not a model"):
        read_base_gguf(adapter.path)
    with pytest.raises(ModelError, match="does not exist"):
        read_base_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="merged type 'q4_k'"):
        write_merged(tiny["llama"]["patch"], read_base_gguf(tiny["llama"]["f32"]), tmp_path / "m.gguf", qtype="q4_k")
