"""The attention kernel is chosen when a model is loaded (FlashAttention-2 on a GPU that has it, else transformers'
default, SDPA for the shipped architectures) and recorded with the model's provenance."""

from __future__ import annotations

import pytest

from safetypatch.errors import ModelError
from safetypatch.models import loading
from safetypatch.models.loading import load_model, pick_attention


@pytest.mark.parametrize(("device", "dtype", "flash", "expected"), [
    ("cpu", "float32", True, None), ("cuda", "bfloat16", True, "flash_attention_2"),
    ("cuda:1", "float16", True, "flash_attention_2"), ("cuda", "float32", True, None),
    ("cuda", "bfloat16", False, None),
])
def test_auto_picks_flash_attention_only_on_a_gpu_in_half_precision_with_flash_attn(monkeypatch, device, dtype, flash,
                                                                                    expected):
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: flash)
    assert pick_attention("auto", device, dtype) == expected
    assert pick_attention("eager", device, dtype) == "eager"


def test_the_kernel_is_recorded_and_an_explicit_one_is_honoured(tiny_model_dirs):
    folder = str(tiny_model_dirs["qwen2"])
    assert load_model(folder).provenance()["attn_implementation"] == "sdpa"
    eager = load_model(folder, attn_implementation="eager")
    assert eager.attn_implementation == eager.model.config._attn_implementation == "eager"


def test_a_missing_kernel_is_an_error_when_asked_for_and_a_fallback_under_auto(tiny_model_dirs, monkeypatch):
    folder = str(tiny_model_dirs["llama"])
    with pytest.raises(ModelError, match="attn_implementation='flash_attention_2'"):
        load_model(folder, attn_implementation="flash_attention_2")  # flash-attn is not installed here
    monkeypatch.setattr(loading, "pick_attention", lambda requested, device, dtype: "flash_attention_2")
    assert load_model(folder).attn_implementation == "sdpa"  # what a GPU without flash-attn support gets
