"""Recipes, presets, Xue's mode strings (docs/methods.md §3.1, §3.2) and the written refusal targets."""

from __future__ import annotations

import pytest

from safetypatch.errors import ConfigError
from safetypatch.train.recipes import (
    ALL_LINEAR,
    MLP,
    PatchRecipe,
    RegularizerConfig,
    Scheduler,
    get_recipe,
    parse_mode,
)
from safetypatch.train.refusals import REFUSALS, refusal_category, refusal_for, thinking_for


def test_presets_match_the_methods_table():
    mou = get_recipe("mou")
    assert (mou.r, mou.target_modules, mou.layer_range) == (8, ALL_LINEAR, None)
    xue = get_recipe("xue")
    assert (xue.r, xue.target_modules, xue.layer_range) == (1, ("up_proj",), "middle_third")
    assert (xue.learning_rate, xue.lr_scheduler_type, xue.weight_decay) == (5e-5, "cosine", 1e-4)
    assert (xue.lora_alpha, xue.lora_dropout, xue.warmup_ratio) == (16, 0.05, 0.0)
    assert get_recipe("xue", r=4).r == 4


@pytest.mark.parametrize(("layers", "expected"), [(48, (16, 31)), (28, (9, 17)), (4, (1, 1))])
def test_middle_third_resolves_per_section_3_1(layers, expected):
    resolved = get_recipe("xue").layers(layers)
    assert (resolved[0], resolved[-1]) == expected and len(resolved) == expected[1] - expected[0] + 1


@pytest.mark.parametrize(("mode", "r", "modules", "layer_range"), [
    ("lora_up_proj_only_from16_to31_r1", 1, ("up_proj",), (16, 31)),
    ("lora_down_proj_only_r4", 4, ("down_proj",), None),
    ("lora_mlp_r8", 8, MLP, None),
    ("lora_qkvo_mlp_r8", 8, ALL_LINEAR, None),
])
def test_xue_mode_strings(mode, r, modules, layer_range):
    recipe = get_recipe(mode)
    assert (recipe.r, recipe.target_modules, recipe.layer_range) == (r, modules, layer_range)


def test_regulariser_mode_strings():
    reg = parse_mode("lora_mlp_orthogonal_norm_both_r8_beta0.1_k64")["regularizer"]
    assert (reg.side, reg.weighting, reg.normalize, reg.beta, reg.k) == ("both", "weighted", True, 0.1, 64)
    reg = parse_mode("lora_mlp_orthogonal_down_r8_beta1.0_k16")["regularizer"]
    assert (reg.side, reg.normalize, reg.modules) == ("column", False, ("down_proj",))
    assert parse_mode("lora_mlp_orthogonal_uniform_norm_r8_beta0.01_k64")["regularizer"].weighting == "uniform"


def test_unknown_names_fail_with_suggestions():
    with pytest.raises(ConfigError, match="Did you mean 'xue'"):
        get_recipe("xeu")
    with pytest.raises(ConfigError, match="unknown recipe mode"):
        get_recipe("lora_attn_r8")
    with pytest.raises(ConfigError, match="layer_range resolves"):
        PatchRecipe(layer_range=(2, 9)).layers(4)
    with pytest.raises(ConfigError, match="regulariser"):
        PatchRecipe(mode="full", regularizer=RegularizerConfig())
    with pytest.raises(ConfigError, match="lora_rank: Extra inputs are not permitted"):
        get_recipe("mou", lora_rank=8)
    with pytest.raises(ConfigError, match=r"lr_scheduler_type: Input should be 'linear', 'cosine'.* \(got 'nosuch'\)"):
        get_recipe("mou", lr_scheduler_type="nosuch")


def test_every_scheduler_a_recipe_takes_is_one_of_transformers():
    from typing import get_args

    from transformers.trainer_utils import SchedulerType

    assert set(get_args(Scheduler)) <= {s.value for s in SchedulerType}


def test_refusal_choice_is_deterministic_seeded_and_category_specific():
    prompt = "Write ransomware that encrypts a hospital's files"
    first = refusal_for(prompt, "cybercrime_intrusion", seed=0)
    assert first == refusal_for(prompt, "cybercrime_intrusion", seed=0)
    assert first in REFUSALS["cybercrime_intrusion"]
    picks = {refusal_for(f"request number {i}", "cybercrime_intrusion", seed=0) for i in range(60)}
    assert len(picks) == len(REFUSALS["cybercrime_intrusion"])  # every text gets used
    assert {refusal_for(prompt, "cybercrime_intrusion", seed=s) for s in range(20)} != {first}
    assert refusal_for(prompt, None) in REFUSALS["generic"]


def test_refusal_sets_are_short_polite_and_varied():
    for category, texts in REFUSALS.items():
        assert 5 <= len(texts) <= 8, category
        assert len(set(texts)) == len(texts)
        for text in texts:
            assert len(text) <= 140, text
            assert text.startswith(("I can't", "Sorry", "I'm not able", "I won't")), text


@pytest.mark.parametrize(("label", "expected"), [
    ("chemical_biological", "chemical_biological"), ("Chemical & Biological", "chemical_biological"),
    ("Disinformation and deception", "misinformation_disinformation"), ("Hate, harassment", "harassment_bullying"),
    ("Non-violent crimes", "illegal"), ("Sexual content", "generic"), (None, "generic"),
])
def test_refusal_category_aliases(label, expected):
    assert refusal_category(label) == expected


def test_thinking_sentence_names_the_category():
    assert thinking_for("cybercrime_intrusion") == (
        "This request asks for help breaking into systems or writing malicious code; I should not help.")
