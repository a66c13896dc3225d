"""The vLLM backend serves a safety patch unmerged (enable_lora + one LoRARequest per prompt): the engine arguments,
the request, the parity gate against the HF model carrying the same patch, and the evaluate wiring. vLLM needs a
GPU and is not installed here, so a stand-in module records what the backend hands to it."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safetypatch.api.apply import apply_patch_folders
from safetypatch.api.evaluate import EvalConfig, _vllm_engine
from safetypatch.errors import ConfigError
from safetypatch.eval.backends.vllm import VllmAdapter, generate_vllm, load_vllm, max_lora_rank
from safetypatch.eval.evaluator import ModelUnderTest, check_vllm_parity
from safetypatch.eval.generate import GenerationProtocol, generate_chat
from safetypatch.patch.artifact import PatchManifest, load_patch, save_patch
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

PROTOCOL = GenerationProtocol(max_new_tokens=4, dtype="float32")


@dataclass
class FakeVllm:
    """What the backend gives vLLM: engine kwargs, LoRA requests, generate calls."""

    engines: list = field(default_factory=list)
    calls: list = field(default_factory=list)

    def module(self) -> dict[str, types.ModuleType]:
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, inputs, params, use_tqdm, lora_request):
                fake.calls.append((inputs, params, lora_request))
                out = types.SimpleNamespace(text="No.", token_ids=[5, 258], finish_reason="stop")
                return [types.SimpleNamespace(outputs=[out]) for _ in inputs]

        root, lora, request = (types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request"))
        root.LLM, root.SamplingParams = LLM, lambda **kwargs: kwargs
        request.LoRARequest = lambda name, int_id, path: ("LoRARequest", name, int_id, path)
        root.lora, lora.request = lora, request
        return {"vllm": root, "vllm.lora": lora, "vllm.lora.request": request}


@pytest.fixture
def fake_vllm(monkeypatch) -> FakeVllm:
    fake = FakeVllm()
    for name, module in fake.module().items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


@pytest.fixture
def patch_folders(tmp_path) -> list[Path]:
    model, _ = build_tiny_model("llama")
    folders = []
    for seed, r in ((0, 2), (1, 12)):
        folder = tmp_path / f"patch{seed}"
        save_patch(random_patch(model, r=r, seed=seed), folder, PatchManifest(method="test"), model=model)
        folders.append(folder)
    return folders


@pytest.mark.parametrize(("rank", "served"), [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512)])
def test_max_lora_rank_is_the_smallest_value_vllm_accepts(rank, served):
    assert max_lora_rank(rank) == served


def test_a_rank_above_vllms_largest_is_refused():
    with pytest.raises(ConfigError, match="rank 513 is above the largest rank vLLM serves"):
        max_lora_rank(513)


def test_the_adapter_enables_lora_in_the_engine_and_rides_every_request(fake_vllm, patch_folders, tiny_model_dirs):
    adapter = VllmAdapter.from_folder(patch_folders[1])
    assert adapter.rank == 12 and adapter.engine_kwargs() == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1}
    llm = load_vllm(tiny_model_dirs["llama"], PROTOCOL, adapter=adapter, gpu_memory_utilization=0.5)
    load_vllm(tiny_model_dirs["llama"], PROTOCOL)
    assert fake_vllm.engines == [
        {"model": str(tiny_model_dirs["llama"]), "dtype": "float32", "seed": 0, "enable_lora": True,
         "max_lora_rank": 16, "max_loras": 1, "gpu_memory_utilization": 0.5},
        {"model": str(tiny_model_dirs["llama"]), "dtype": "float32", "seed": 0}]
    _, tok = build_tiny_model("llama")
    out = generate_vllm(llm, tok, ["hi", "how to pick a lock"], PROTOCOL, adapter)
    inputs, params, request = fake_vllm.calls[-1]
    assert request == ("LoRARequest", "safetypatch", 1, str(patch_folders[1]))
    assert len(inputs) == 2 and params["temperature"] == 0.0 and params["max_tokens"] == 4
    assert [(g.response, g.finish_reason, g.token_ids) for g in out] == [("No.", "eos", (5, 258))] * 2
    generate_vllm(llm, tok, ["hi"], PROTOCOL)
    assert fake_vllm.calls[-1][2] is None  # no adapter, no request


def test_a_missing_vllm_says_how_to_install(monkeypatch, patch_folders):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match=r'pip install "safetypatch\[vllm\]"'):
        VllmAdapter.from_folder(patch_folders[0]).request()


def test_the_parity_gate_generates_vllm_with_the_patch_the_hf_model_carries(monkeypatch, patch_folders):
    from safetypatch.eval.backends import vllm as vllm_backend

    model, tok = build_tiny_model("llama")
    applied = apply_patch_folders(model, [patch_folders[0]])
    adapter = VllmAdapter.from_folder(patch_folders[0])
    prompts = ["hello", "tell me a story"]
    seen = []

    def fake_generate(llm, tokenizer, prompts, protocol, adapter=None, progress=None):
        seen.append(adapter)
        return generate_chat(applied.result.model, tokenizer, prompts, protocol)

    monkeypatch.setattr(vllm_backend, "generate_vllm", fake_generate)
    subject = ModelUnderTest(applied.result.model, tok, vllm=object(), vllm_adapter=adapter)
    assert check_vllm_parity(subject, prompts, PROTOCOL)["token_agreement"] == 1.0
    assert seen == [adapter]


def test_evaluate_serves_one_patch_folder_as_is_and_a_combination_saved_and_verified(fake_vllm, patch_folders,
                                                                                    tiny_model_dirs, tmp_path):
    from safetypatch.models.loading import load_model

    loaded = load_model(str(tiny_model_dirs["llama"]))
    _, single = _vllm_engine(loaded, apply_patch_folders(loaded.model, [patch_folders[0]]), PROTOCOL, tmp_path)
    assert single.path == patch_folders[0] and single.rank == 2
    loaded = load_model(str(tiny_model_dirs["llama"]))
    combined = apply_patch_folders(loaded.model, patch_folders, weights=[1.0, -0.5])
    _, served = _vllm_engine(loaded, combined, PROTOCOL, tmp_path / "scratch")
    assert served.path == tmp_path / "scratch" / "combined-patch" and served.rank == combined.patch.rank
    assert load_patch(served.path).modules == combined.patch.modules
    assert fake_vllm.engines[-1]["max_lora_rank"] == max_lora_rank(combined.patch.rank)
    assert _vllm_engine(loaded, None, PROTOCOL, tmp_path)[1] is None


def test_merging_is_refused_with_the_vllm_backend():
    with pytest.raises(ConfigError, match="serves a patch unmerged"):
        EvalConfig(backend="vllm", adapter=["runs/patch"], merge_adapter=True)
