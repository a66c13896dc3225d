"""RESTA (METHODS.md §3.5 *How to test on a tiny model*, (a)–(e))."""

from __future__ import annotations

import torch

from safetypatch.restore import RestoreContext
from safetypatch.restore.resta import RESTA, RESTAConfig, tensor_seed
from tests.restore.helpers import roles

NAME = "model.layers.2.mlp.gate_proj.weight"


def restore(tensors, name=NAME, **config):
    return RESTA(RESTAConfig(**config)).restore_tensor(name, tensors, RestoreContext())


def test_a_b_zero_beta_or_zero_safety_vector_is_the_identity():
    tensors = roles()
    assert restore(tensors, beta=0.0).tensor is None
    assert restore({**tensors, "unsafe_model": tensors["aligned_model"]}).tensor is None


def test_adds_beta_times_the_safety_vector_and_c_is_linear_in_beta():
    tensors = roles()
    delta = tensors["aligned_model"] - tensors["unsafe_model"]
    torch.testing.assert_close(restore(tensors, beta=0.5).tensor, tensors["target_model"] + 0.5 * delta)
    torch.testing.assert_close(restore(tensors, beta=1.0).tensor, restore(tensors, beta=0.25).tensor + 0.75 * delta,
                               rtol=1e-5, atol=1e-6)
    assert restore(tensors, beta=1.0).report["safety_ratio"] > 0


def test_d_dare_with_p_zero_is_the_identity():
    assert restore(roles(), beta=0.0, dare=True, drop_p=0.0).tensor is None
    tensors = roles()
    assert torch.equal(restore(tensors, dare=True, drop_p=0.0).tensor, restore(tensors).tensor)


def test_d_dare_keeps_rescaled_entries_drops_the_rest_and_is_seeded_per_tensor():
    tensors = roles((40, 30))
    delta_sft = tensors["target_model"] - tensors["aligned_model"]
    result = restore(tensors, beta=0.0, dare=True, drop_p=0.3, seed=5)
    sparse = result.tensor - tensors["aligned_model"]
    kept = sparse.abs() > 1e-6
    torch.testing.assert_close(sparse[kept], delta_sft[kept] / 0.7, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse[~kept], torch.zeros(int((~kept).sum())), rtol=0, atol=1e-6)
    assert abs(result.report["dare_keep_fraction"] - 0.7) < 0.05
    assert torch.equal(restore(tensors, beta=0.0, dare=True, drop_p=0.3, seed=5).tensor, result.tensor)
    other = restore(tensors, "model.layers.3.mlp.gate_proj.weight", beta=0.0, dare=True, drop_p=0.3, seed=5)
    assert not torch.equal(other.tensor, result.tensor)
    assert tensor_seed(5, NAME) == tensor_seed(5, NAME) != tensor_seed(6, NAME)


def test_d_dare_preserves_the_expected_fine_tuning_delta():
    """E[θ_aligned + DARE(δ_SFT)] = θ_SFT: the mean over 300 seeds is within 4 standard errors everywhere."""
    tensors = roles((6, 5))
    delta_sft = tensors["target_model"] - tensors["aligned_model"]
    runs = torch.stack([restore(tensors, beta=0.0, dare=True, drop_p=0.4, seed=s).tensor for s in range(300)])
    standard_error = delta_sft.abs() * (0.4 / 0.6 / 300) ** 0.5
    assert bool(((runs.mean(0) - tensors["target_model"]).abs() <= 4 * standard_error + 1e-6).all())


def test_e_equals_task_arithmetic_on_any_shape():
    tensors = roles((7,))  # RESTA is element-wise: any tensor shape works
    delta = tensors["aligned_model"] - tensors["unsafe_model"]
    torch.testing.assert_close(restore(tensors, beta=0.75).tensor, tensors["target_model"] + 0.75 * delta)
