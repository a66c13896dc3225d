"""Attaching and merging patches: compatibility and effect checks (docs/methods.md §3.3, §5.8) and test (h)."""

from __future__ import annotations

import logging

import pytest
import torch

from safetypatch.errors import ConfigError, ModelMismatchError, PatchError
from safetypatch.patch.apply import attach_patch, merge_patch
from safetypatch.patch.probe import detach_peft, peft_attached, probe_input_ids, probe_logits
from safetypatch.patch.reduce import OverlapReduction
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

BASE = {"base_model": {"model": "tiny", "fingerprint": "f" * 64, "arch": {"model_type": "llama"}}}


def test_attach_changes_logits_and_records_applied_to(caplog):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model, manifest=BASE)
    ids = probe_input_ids(model)
    before = probe_logits(model, ids)
    with caplog.at_level(logging.WARNING):
        result = attach_patch(model, patch, fingerprint="0" * 64)
    assert result.mode == "attach" and result.max_logit_change > 1e-2
    assert result.applied_to == {"fingerprint": "0" * 64, "patch_base_fingerprint": "f" * 64,
                                 "same_as_patch_base": False}
    assert "not the patch base" in caplog.text and result.warnings
    assert float((probe_logits(result.model, ids) - before).abs().max()) == pytest.approx(result.max_logit_change)
    assert detach_peft(result.model) is model
    torch.testing.assert_close(probe_logits(model, ids), before, rtol=0, atol=0)
    assert attach_patch(model, patch, fingerprint="f" * 64).applied_to["same_as_patch_base"] is True


def test_a_patch_for_another_architecture_is_refused():
    model, _ = build_tiny_model("llama")
    patch = random_patch(model, manifest={"base_model": {"arch": {"model_type": "qwen2", "architectures": ["Q"]}}})
    with pytest.raises(ModelMismatchError, match="trained for a qwen2 model"):
        attach_patch(model, patch)


def test_missing_modules_and_other_shapes_are_named():
    deeper, _ = build_tiny_model("llama", num_layers=6)
    model, _ = build_tiny_model("llama")
    with pytest.raises(ModelMismatchError, match=r"model\.layers\.4\.mlp\.up_proj"):
        merge_patch(model, random_patch(deeper))
    gemma, _ = build_tiny_model("gemma3")
    patch = random_patch(gemma, modules=("q_proj",))
    wide = patch.with_factors({m: type(f)(A=f.A, B=torch.randn(96, f.B.shape[1])) for m, f in patch.factors.items()})
    with pytest.raises(ModelMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(96, 64\)"):
        attach_patch(gemma, wide)


def test_zero_and_negligible_patches_are_flagged():
    model, _ = build_tiny_model("llama")
    patch = random_patch(model)
    zero = patch.with_factors({m: type(f)(A=f.A, B=torch.zeros_like(f.B)) for m, f in patch.factors.items()})
    with pytest.raises(PatchError, match="zero in every one of its 4 modules"):
        attach_patch(model, zero)
    tiny = random_patch(model, scale=1e-3)  # ‖ΔW‖/‖W‖ ≈ 1e-6: above zero, below any visible effect
    with pytest.raises(PatchError, match="has no effect"):
        attach_patch(model, tiny)
    assert not hasattr(model, "peft_config")
    with pytest.raises(PatchError, match="has no effect"):
        merge_patch(model, tiny)


def test_merge_equals_attach_and_warns_above_one(caplog):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model, scale=0.3)
    ids = probe_input_ids(model)
    with peft_attached(model, patch) as attached:
        expected = probe_logits(attached, ids)
    result = merge_patch(model, patch)
    assert result.mode == "merge" and len(result.modules) == 4 and result.modules[0].cast_error < 1e-6
    torch.testing.assert_close(probe_logits(model, ids), expected, rtol=0, atol=1e-5)
    with caplog.at_level(logging.WARNING):
        assert merge_patch(model, patch, gamma=1.5).warnings
    assert "gamma=1.5 > 1" in caplog.text
    with pytest.raises(ConfigError, match="gamma=0"):
        merge_patch(model, patch, gamma=0.0)


@pytest.mark.parametrize("side", ["column", "row", "both"])
def test_h_merged_reduced_patch_equals_the_peft_model_with_the_reduced_adapter(side):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model, modules=("up_proj", "o_proj"), scale=0.3)
    config = OverlapReduction(side=side, k=8, retention=0.25)
    reference, _ = build_tiny_model("llama")
    result = merge_patch(model, patch, reduction=config, reference=reference)
    reduced = result.reduction.patch
    assert reduced.rank == patch.rank and reduced.scaling == patch.scaling
    ids = probe_input_ids(model)
    merged_logits = probe_logits(model, ids)
    with peft_attached(reference, reduced) as attached:
        adapter_logits = probe_logits(attached, ids)
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)
    assert all(m.self_test_error < 1e-5 for m in result.reduction.modules)


def test_quantized_weights_are_refused():
    model, _ = build_tiny_model("llama")
    patch = random_patch(model)
    with torch.no_grad():
        layer = model.model.layers[0].mlp.up_proj
        layer.weight = torch.nn.Parameter(layer.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(PatchError, match="quantized"):
        merge_patch(model, patch)
