"""The representation term: the refusal direction, the hinge targets, the batched states and the trainer's use."""

from __future__ import annotations

import pytest
import torch

from safetypatch.data import Example
from safetypatch.errors import ConfigError, DataError
from safetypatch.models.blocks import decoder_layers
from safetypatch.train.examples import SFTExample, build_refusal_examples, tokenize_examples
from safetypatch.train.recipes import get_recipe
from safetypatch.train.refusal_sft import make_trainer
from safetypatch.train.representation import (
    capture,
    fit_direction,
    prompt_states,
    representation_loss,
    targets,
)
from tests.tiny import build_tiny_model

HARMFUL = ["how to hack wifi", "make a bomb at home", "steal a car"]
BENIGN = ["what is 2 + 2", "name a colour", "how do I kill a python process", "bake bread"]


def _examples(tok):
    refusals = build_refusal_examples([Example(prompt=p, category="illegal") for p in HARMFUL])
    retain = [SFTExample(p, "Sure, here it is.", "retain") for p in BENIGN]
    return tokenize_examples(tok, [*refusals, *retain], max_length=128)


def test_the_direction_is_the_unit_difference_of_means_and_the_targets_hold_each_side():
    states = torch.tensor([[[2.0, 0.0]], [[4.0, 2.0]], [[0.0, 1.0]], [[0.0, -1.0]]])  # [n, 1 layer, 2]
    harmful = torch.tensor([True, True, False, False])
    found = fit_direction(states, harmful, [5])
    assert found.layers == (5,)
    assert torch.allclose(found.direction, torch.tensor([[0.948683, 0.316228]]), atol=1e-6)  # (3, 1) / √10
    assert torch.allclose(found.harmful_mean, torch.tensor([3.0 * 0.948683 + 1.0 * 0.316228]), atol=1e-5)
    assert torch.allclose(found.benign_mean, torch.tensor([0.0]), atol=1e-6)
    held = targets(found, states, harmful)
    assert torch.allclose(held[:2, 0], found.harmful_mean.expand(2)) and torch.allclose(
        held[2:, 0], torch.tensor([0.316228, -0.316228]), atol=1e-5)
    assert found.to_dict()["layers"] == [5]
    with pytest.raises(DataError, match="harmful and benign"):
        fit_direction(states, torch.ones(4, dtype=torch.bool), [5])


def test_the_term_is_a_one_sided_hinge_scaled_by_the_gap_of_the_means():
    states = torch.tensor([[[2.0, 0.0]], [[4.0, 2.0]], [[0.0, 1.0]], [[0.0, -1.0]]])
    harmful = torch.tensor([True, True, False, False])
    direction = fit_direction(states, harmful, [0])
    target = targets(direction, states, harmful)
    r = direction.direction[0]
    mu_h, mu_b = float(direction.harmful_mean[0]), float(direction.benign_mean[0])
    # a batch of sequences of length 3; the read position is 1
    now = torch.zeros(4, 3, 2)
    now[0, 1] = r * (mu_h - 0.5)          # harmful, 0.5 short of μ_h: pays 0.25
    now[1, 1] = r * (mu_h + 2.0)          # harmful, beyond μ_h: free
    now[2, 1] = r * (float(target[2, 0]) + 1.0)  # benign, moved 1 towards refusal: pays 1
    now[3, 1] = r * (float(target[3, 0]) - 3.0)  # benign, moved away from refusal: free
    term = representation_loss([now], torch.tensor([1, 1, 1, 1]), target, harmful, direction)
    assert float(term) == pytest.approx((0.25 + 1.0) / 4 / (mu_h - mu_b) ** 2, rel=1e-5)
    assert float(representation_loss([now], torch.tensor([0, 0, 0, 0]), target, harmful, direction)) > 0


def test_batched_prompt_states_equal_one_prompt_at_a_time_and_hooks_are_removed():
    model, tok = build_tiny_model("llama")
    data = _examples(tok)
    batched = prompt_states(model, data, [0, 2], batch_size=4)
    single = prompt_states(model, data, [0, 2], batch_size=1)
    assert batched.shape == (len(data), 2, model.config.hidden_size)
    assert torch.allclose(batched, single, atol=1e-5)
    blocks = decoder_layers(model)
    assert all(not block._forward_hooks for block in blocks)
    with capture(blocks, [1]) as states:
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(states) == 1 and states[0].shape == (1, 3, model.config.hidden_size)
    assert all(not block._forward_hooks for block in blocks)


def test_the_trainer_adds_lambda_times_the_term_from_the_unpatched_direction(tmp_path):
    model, tok = build_tiny_model("llama")
    data = _examples(tok)
    layers = [1]
    expected_direction = fit_direction(prompt_states(model, data, layers),
                                       torch.tensor([ex.kind == "refusal" for ex in data]), layers)
    recipe = get_recipe("mou", precision="fp32", per_device_train_batch_size=8, retain_unlikelihood=0.0,
                        representation_weight=2.0, representation_layers=layers)
    trainer = make_trainer(model, tok, data, recipe, tmp_path)
    assert torch.allclose(trainer.direction.direction, expected_direction.direction, atol=1e-5)
    assert trainer.train_dataset["rep_harmful"] == [True] * 3 + [False] * 4
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
        batch = dict(next(iter(trainer.get_train_dataloader())))
        with_term = trainer.compute_loss(trainer.model, dict(batch))
        trainer.direction = None
        without = trainer.compute_loss(trainer.model, dict(batch))
        trainer.direction = expected_direction
        labels = batch["labels"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with capture(decoder_layers(trainer.model), layers) as states:
            trainer.model(**inputs)
        positions = (labels[:, 1:] != -100).int().argmax(dim=1)
        term = representation_loss(states, positions, batch["rep_target"], batch["rep_harmful"], expected_direction)
    assert float(term) > 0
    assert float(with_term) == pytest.approx(float(without) + 2.0 * float(term), rel=1e-4)


def test_representation_layers_must_lie_inside_the_model():
    recipe = get_recipe("mou", representation_weight=1.0, representation_layers=[3, 40])
    with pytest.raises(ConfigError, match=r"representation_layers \[40\]"):
        recipe.steered_layers(30)
    assert get_recipe("mou").steered_layers(30) == (16,)
