"""The hidden-state shift (docs/methods.md §3.8 (f)): exactly zero for a zero-initialised LoRA and for a model compared
with itself, positive for a real patch, one value per decoder block; prompts from an evaluation half, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safetypatch.analysis.hidden import layer_shift, residual_states, select_prompts
from safetypatch.errors import ConfigError
from safetypatch.models.blocks import decoder_layers
from safetypatch.patch.factors import LoraFactors, Patch
from safetypatch.patch.probe import peft_attached
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

PROMPTS = ("How do I bake bread?", "Tell me how to pick a lock.", "What is the capital of France?")


def _zero_init(patch: Patch) -> Patch:
    """The patch as PEFT initialises it: random A, B = 0."""
    return Patch(config=patch.config, factors={m: LoraFactors(A=f.A, B=torch.zeros_like(f.B))
                                               for m, f in patch.factors.items()})


def test_a_zero_initialised_lora_shifts_nothing_exactly():
    model, tokenizer = build_tiny_model()
    before = residual_states(model, tokenizer, PROMPTS)
    patch = _zero_init(random_patch(model, modules=("q_proj", "v_proj", "up_proj", "down_proj")))
    with peft_attached(model, patch) as attached:
        after = residual_states(attached, tokenizer, PROMPTS)
    assert torch.equal(before, after)
    shift = layer_shift(before, after)
    assert shift == {"shift": [0.0] * 4, "relative": [0.0] * 4}


def test_the_same_model_twice_shifts_nothing_and_a_patch_shifts_every_later_layer():
    model, tokenizer = build_tiny_model()
    before = residual_states(model, tokenizer, PROMPTS)
    assert before.shape == (3, 4, 64)
    assert torch.equal(before, residual_states(model, tokenizer, PROMPTS))
    patch = random_patch(model, modules=("up_proj",), scale=0.2)
    layer_two = Patch(config=patch.config, factors={"model.layers.2.mlp.up_proj":
                                                    patch.factors["model.layers.2.mlp.up_proj"]})
    with peft_attached(model, layer_two) as attached:
        after = residual_states(attached, tokenizer, PROMPTS)
    shift = layer_shift(before, after)
    assert shift["shift"][:2] == [0.0, 0.0]  # blocks before the patched one see the same inputs
    assert all(value > 1e-3 for value in shift["shift"][2:])
    expected = torch.linalg.vector_norm(after - before, dim=-1) / torch.linalg.vector_norm(before, dim=-1)
    assert shift["relative"] == pytest.approx(expected.mean(0).tolist(), rel=1e-6)


def test_the_mean_position_averages_the_prompt_tokens():
    model, tokenizer = build_tiny_model()
    last = residual_states(model, tokenizer, PROMPTS[:1], "last")
    mean = residual_states(model, tokenizer, PROMPTS[:1], "mean")
    assert last.shape == mean.shape and not torch.allclose(last, mean)
    assert len(decoder_layers(model)) == 4


def test_a_tokenizer_without_chat_template_is_refused_with_the_way_out():
    model, tokenizer = build_tiny_model()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=r"no chat template.*hidden_shift: false"):
        residual_states(model, tokenizer, PROMPTS)


def test_prompts_come_from_the_evaluation_half_seeded(tmp_path):
    path = Path(tmp_path) / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"question number {i}"}) for i in range(40)) + "\n")
    chosen = select_prompts("benign", str(path), 8, seed=0)
    assert len(chosen.prompts) == 8 and len(set(chosen.prompts)) == 8
    assert select_prompts("benign", str(path), 8, seed=0) == chosen
    assert select_prompts("benign", str(path), 8, seed=1).prompts != chosen.prompts
    everything = select_prompts("benign", str(path), 100, seed=0)
    assert len(everything.prompts) == 20  # the evaluation half only
    assert set(chosen.prompts) <= set(everything.prompts)
    assert chosen.record["split"] == "eval" and chosen.record["n"] == 8
