"""LoX (docs/methods.md §3.7 *Tested invariants*, (a)–(e))."""

from __future__ import annotations

import pytest
import torch

from safetypatch.config import load_config
from safetypatch.errors import ConfigError
from safetypatch.restoration import RestoreContext
from safetypatch.restoration.lox import LoX, LoXConfig
from tests.restore.helpers import rank_k, roles

NAME = "model.embed_tokens.weight"


def restore(tensors, **config):
    return LoX(LoXConfig(**config)).restore_tensor(NAME, tensors, RestoreContext())


def test_a_coef_zero_is_the_identity():
    assert restore(roles(), coef=0.0).tensor is None


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_b_e_full_rank_and_any_k_at_or_above_the_rank_agree(shape):
    """aligned = base + a rank-2 delta, so k = 2, k ≥ rank and k = 0 (full) all give (1 + c) W_a − c W_b."""
    tensors = roles(shape)
    expected = 1.5 * tensors["aligned_model"] - 0.5 * tensors["base_model"]
    full = restore(tensors, k=0, coef=0.5)
    aligned, base = tensors["aligned_model"], tensors["base_model"]
    assert torch.equal(full.tensor, aligned + 0.5 * (aligned - base))  # k = 0 never goes through an SVD
    torch.testing.assert_close(full.tensor, expected, rtol=1e-5, atol=1e-5)
    for k in (2, 3, 50):
        torch.testing.assert_close(restore(tensors, k=k, coef=0.5).tensor, expected, rtol=1e-5, atol=1e-5)
    assert restore(tensors, k=2).report["r_align"] == pytest.approx(1.0, abs=1e-6)


def test_c_the_change_has_rank_at_most_k_and_keeps_the_top_spectrum():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, 9, generator=g)
    tensors = {"base_model": base, "aligned_model": base + rank_k(10, 9, (5.0, 4.0, 3.0, 2.0, 1.0), g)}
    result = restore(tensors, k=2, coef=1.0)
    assert int(torch.linalg.matrix_rank(result.tensor - tensors["aligned_model"], atol=1e-4)) == 2
    assert result.report["spectrum"] == pytest.approx([5.0, 4.0], rel=1e-5)
    assert result.report["r_align"] == pytest.approx(((25 + 16) / 55) ** 0.5, rel=1e-5)


def test_d_one_dimensional_tensors_are_untouched():
    assert restore(roles((9,))).tensor is None


def test_lowrank_svd_matches_exact_on_an_exact_rank_delta_and_needs_small_k():
    tensors = roles((30, 20))
    torch.testing.assert_close(restore(tensors, k=2, svd="lowrank", seed=3).tensor,
                               restore(tensors, k=2).tensor, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="lowrank"):
        load_config(LoXConfig, overrides={"svd": "lowrank", "k": 0})


def test_apply_to_target_adds_the_same_term_to_the_fine_tune():
    tensors = roles()
    hardened = restore(tensors, k=2)
    on_target = LoX(LoXConfig(k=2, apply_to="target"))
    assert on_target.roles == ("base_model", "aligned_model", "target_model")
    moved = on_target.restore_tensor(NAME, tensors, RestoreContext()).tensor - tensors["target_model"]
    torch.testing.assert_close(moved, hardened.tensor - tensors["aligned_model"], rtol=1e-5, atol=1e-5)
