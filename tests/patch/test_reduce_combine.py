"""Merge-time overlap reduction (docs/methods.md §3.3 tests (a)-(d)) and ΔW-space combination (tests (e)-(g)), all
checked on the product ΔW = s·B·A, never on A and B separately."""

from __future__ import annotations

import math

import pytest
import torch

from safetypatch.errors import ConfigError, PatchError
from safetypatch.patch.combine import combine_patches
from safetypatch.patch.factors import LoraFactors
from safetypatch.patch.reduce import OverlapReduction, reduce_overlap
from safetypatch.weights.linalg import orthonormal_basis
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

K = 8


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")[0]


def svd_of(model, name):
    weight = dict(model.named_modules())[name].weight.detach().float()
    U, _, Vh = torch.linalg.svd(weight, full_matrices=False)
    return U[:, :K], Vh[:K].T


def reduce(model, patch, **kwargs):
    return reduce_overlap(patch, model, OverlapReduction(k=K, svd_method="exact", **kwargs)).patch


def test_a_projection_annihilates_and_is_idempotent(model):
    patch = random_patch(model, modules=("up_proj", "o_proj"))
    name = "model.layers.1.mlp.up_proj"
    U, V = svd_of(model, name)
    column = reduce(model, patch)
    assert float((U.T @ column.delta(name)).abs().max()) < 1e-5
    row = reduce(model, patch, side="row")
    assert float((row.delta(name) @ V).abs().max()) < 1e-5
    twice = reduce(model, column)
    torch.testing.assert_close(twice.delta(name), column.delta(name), rtol=1e-5, atol=1e-5)


def test_b_reduction_plus_removed_part_is_the_original(model):
    patch = random_patch(model)
    name = "model.layers.2.mlp.up_proj"
    U, _ = svd_of(model, name)
    delta = patch.delta(name)
    torch.testing.assert_close(reduce(model, patch).delta(name) + U @ (U.T @ delta), delta, rtol=1e-5, atol=1e-5)


def test_c_identity_settings_and_full_removal(model):
    patch = random_patch(model, modules=("down_proj",))
    for config in (OverlapReduction(k=0), OverlapReduction(k=K, retention=1.0)):
        result = reduce_overlap(patch, model, config)
        assert result.patch is patch and result.modules == ()
    full = reduce_overlap(patch, model, OverlapReduction(k=64))  # down_proj is 64 × 128: U_64 spans the output
    for name in full.patch.modules:
        assert float(full.patch.delta(name).norm()) < 1e-5 * float(patch.delta(name).norm())
    assert all(m.retained_energy < 1e-5 for m in full.modules)


@pytest.mark.parametrize("side", ["column", "row", "both"])
@pytest.mark.parametrize("retention", [0.0, 0.4])
def test_d_low_rank_form_equals_the_dense_operator(model, side, retention):
    patch = random_patch(model, modules=("gate_proj",), r=3)
    name = "model.layers.0.mlp.gate_proj"
    U, V = svd_of(model, name)
    P_out = torch.eye(U.shape[0]) - (1 - retention) * U @ U.T
    P_in = torch.eye(V.shape[0]) - (1 - retention) * V @ V.T
    delta = patch.delta(name)
    expected = {"column": P_out @ delta, "row": delta @ P_in, "both": P_out @ delta @ P_in}[side]
    result = reduce_overlap(patch, model, OverlapReduction(k=K, side=side, retention=retention, svd_method="exact"))
    torch.testing.assert_close(result.patch.delta(name), expected, rtol=1e-5, atol=1e-5)
    assert result.patch.rank == 3 and result.patch.scaling == patch.scaling
    report = {m.module: m for m in result.modules}[name]
    if side == "column" and retention == 0.0:
        assert report.overlap_after < 1e-5
        assert report.retained_energy == pytest.approx(math.sqrt(1 - report.overlap_before**2), rel=1e-4)


def test_e_linear_combination_with_negative_weights_and_mixed_ranks(model):
    p1 = random_patch(model, r=2, alpha=4, seed=1)
    p2 = random_patch(model, r=3, alpha=16, seed=2, use_rslora=True)
    result = combine_patches([p1, p2], [0.7, -0.3])
    combined = result.patch
    assert (combined.rank, combined.config["lora_alpha"], combined.scaling) == (5, 5, 1.0)
    for name in p1.modules:
        expected = 0.7 * p1.delta(name) - 0.3 * p2.delta(name)
        assert float((combined.delta(name) - expected).norm() / expected.norm()) < 1e-6
    swapped = combine_patches([p2, p1], [-0.3, 0.7]).patch  # order-independent in ΔW
    for name in p1.modules:
        torch.testing.assert_close(swapped.delta(name), combined.delta(name), rtol=1e-5, atol=1e-6)


def test_f_identity_self_test_one_patch_weight_one(model):
    patch = random_patch(model, r=2, alpha=16, use_rslora=True)
    for method in ("linear", "svd"):
        combined = combine_patches([patch], method=method).patch
        for name in patch.modules:
            torch.testing.assert_close(combined.delta(name), patch.delta(name), rtol=1e-5, atol=1e-5)


def test_g_orthogonal_makes_the_safety_update_orthogonal_to_the_task_columns(model):
    task = random_patch(model, r=2, seed=3)
    safety = random_patch(model, r=2, seed=4)
    combined = combine_patches([task, safety], method="orthogonal").patch
    for name in task.modules:
        Q = orthonormal_basis(task.factors[name].B)
        safe_part = combined.delta(name) - task.delta(name)
        assert float((Q.T @ safe_part).abs().max()) < 1e-5 * float(safety.delta(name).abs().max())
        assert float(safe_part.norm()) > 0.5 * float(safety.delta(name).norm())


def test_svd_combination_reports_the_truncation_error(model):
    p1, p2 = random_patch(model, r=2, seed=5), random_patch(model, r=2, seed=6)
    result = combine_patches([p1, p2], [1.0, 1.0], method="svd")
    name = p1.modules[0]
    delta = p1.delta(name) + p2.delta(name)
    S = torch.linalg.svdvals(delta)
    expected = math.sqrt(float((S[2:] ** 2).sum() / (S**2).sum()))
    assert result.patch.rank == 2 and result.errors[name] == pytest.approx(expected, rel=1e-3)
    exact = combine_patches([p1, p2], method="svd", svd_rank=4)
    assert max(exact.errors.values()) < 1e-5
    torch.testing.assert_close(exact.patch.delta(name), delta, rtol=1e-4, atol=1e-4)


def test_modules_of_only_one_patch_are_kept_exactly(model):
    up, attn = random_patch(model, modules=("up_proj",)), random_patch(model, modules=("q_proj",), r=1)
    combined = combine_patches([up, attn], [0.5, 2.0]).patch
    assert len(combined.modules) == 8 and combined.rank == 3
    torch.testing.assert_close(combined.delta("model.layers.0.mlp.up_proj"),
                               0.5 * up.delta("model.layers.0.mlp.up_proj"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combined.delta("model.layers.3.self_attn.q_proj"),
                               2.0 * attn.delta("model.layers.3.self_attn.q_proj"), rtol=1e-5, atol=1e-6)


def test_combination_errors(model):
    patch = random_patch(model)
    other = patch.with_factors({m: LoraFactors(A=torch.randn(2, 32), B=f.B) for m, f in patch.factors.items()})
    with pytest.raises(PatchError, match="cannot be combined"):
        combine_patches([patch, other])
    with pytest.raises(ConfigError, match="2 patches but 1 weights"):
        combine_patches([patch, patch], [1.0])
    with pytest.raises(ConfigError, match="unknown combination"):
        combine_patches([patch], method="ties")  # type: ignore[arg-type]
    with pytest.raises(PatchError, match="use_dora"):
        random_patch(model, use_dora=True)
