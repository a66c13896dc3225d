"""LSSF (docs/methods.md §3.4 *Tested invariants*, (a)–(j)) on synthetic tensors with known deltas."""

from __future__ import annotations

import pytest
import torch

from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.restoration import RestoreContext
from safetypatch.restoration.lssf import (
    LSSF,
    LSSFConfig,
    direction_weights,
    fusion_factors,
    moment_side,
    safety_subspace,
)
from safetypatch.restoration.resta import RESTA, RESTAConfig
from safetypatch.weights.linalg import entropy_ratios
from tests.restore.helpers import activations, moment_for, roles

NAME = "model.layers.1.self_attn.o_proj.weight"
SHAPES = [(12, 8), (8, 12)]


def context_for(tensors, decompose="weight", X=None):
    aligned = tensors["aligned_model"]
    X = activations(aligned.shape[1]) if X is None else X
    return RestoreContext(names=(NAME,), statistics={NAME: moment_for(aligned, X, decompose)})


def subspace(tensors, side=None, X=None):
    aligned = tensors["aligned_model"]
    X = activations(aligned.shape[1]) if X is None else X
    side = side or moment_side(tuple(aligned.shape), "weight")
    G = X @ X.T / X.shape[1]
    return safety_subspace(aligned, G if side == "input" else aligned @ G @ aligned.T, side)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_projector_is_symmetric_idempotent_with_trace_r(shape):
    U, _ = subspace(roles(shape))
    for r in (1, 3, min(shape)):
        P = U[:, :r] @ U[:, :r].T
        torch.testing.assert_close(P @ P, P, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(P, P.T, rtol=0, atol=0)
        assert abs(float(torch.trace(P)) - r) < 1e-5


def test_b_direction_weights_fall_linearly_from_alpha_1_to_one():
    torch.testing.assert_close(direction_weights(torch.tensor([3.0, 2.0, 1.0, 0.5]), 3, 2.0),
                               torch.tensor([2.0, 1.5, 1.0]))
    assert torch.equal(direction_weights(torch.tensor([3.0, 2.0]), 1, 2.0), torch.tensor([2.0]))  # σ_1 = σ_r
    assert torch.equal(direction_weights(torch.tensor([3.0, 2.0, 1.0]), 3, 1.0), torch.ones(3))


def test_b_j_factors_equal_the_dense_weighted_projector_and_alpha_1_one_gives_P():
    tensors = roles()
    U, sigma = subspace(tensors)
    delta = tensors["aligned_model"] - tensors["unsafe_model"]
    Ur, w = U[:, :4], direction_weights(sigma, 4, 2.0)
    B, A = fusion_factors(delta, Ur, w, 0.7)
    P_weighted = Ur @ torch.diag(w**2) @ Ur.T
    torch.testing.assert_close(B @ A, 0.7 * P_weighted @ delta, rtol=1e-5, atol=1e-6)
    assert B.shape == (12, 4) and A.shape == (4, 8)  # the rank-r patch form of §3.4 step 8
    B1, A1 = fusion_factors(delta, Ur, direction_weights(sigma, 4, 1.0), 1.0)
    torch.testing.assert_close(B1 @ A1, Ur @ Ur.T @ delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_d_entropy_rank_is_monotone_in_eta(shape):
    tensors = roles(shape, seed=3)
    context = context_for(tensors)
    ranks = [LSSF(LSSFConfig(eta=eta)).restore_tensor(NAME, tensors, context).report["rank"]
             for eta in torch.linspace(0.05, 1.0, 20).tolist()]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # random spectra, straight through the entropy rank with LSSF's clamps
        sigma = torch.rand(10, generator=generator).sort(descending=True).values
        method_ranks = [LSSF(LSSFConfig(eta=eta, r_min=2, r_max=8))._rank(sigma, 10) for eta in (0.1, 0.5, 0.8, 1)]
        assert method_ranks == sorted(method_ranks) and method_ranks[0] >= 2 and method_ranks[-1] <= 8


@pytest.mark.parametrize("shape", SHAPES)
def test_e_scaling_the_activations_changes_neither_U_nor_p_nor_r(shape):
    tensors = roles(shape)
    X = activations(shape[1])
    U1, s1 = subspace(tensors, X=X)
    U2, s2 = subspace(tensors, X=7.5 * X)
    torch.testing.assert_close(U1[:, :3], U2[:, :3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy_ratios(s1), entropy_ratios(s2), rtol=1e-5, atol=1e-6)
    rank = [LSSF().restore_tensor(NAME, tensors, context_for(tensors, X=c * X)).report["rank"] for c in (1, 7.5)]
    assert rank[0] == rank[1]


def test_f_zero_alpha_or_zero_safety_vector_is_the_identity():
    tensors = roles()
    assert LSSF(LSSFConfig(alpha=0)).restore_tensor(NAME, tensors, RestoreContext()).tensor is None
    same = {**tensors, "unsafe_model": tensors["aligned_model"].clone()}
    assert LSSF().restore_tensor(NAME, same, RestoreContext()).tensor is None


@pytest.mark.parametrize("decompose", ["weight", "safety_vector"])
@pytest.mark.parametrize("shape", SHAPES)
def test_g_full_rank_with_alpha_1_one_reproduces_resta_with_beta_alpha(shape, decompose):
    tensors = roles(shape)
    lssf = LSSF(LSSFConfig(rank_override="full", alpha_1=1.0, alpha=0.8, decompose=decompose))
    fused = lssf.restore_tensor(NAME, tensors, context_for(tensors, decompose))
    resta = RESTA(RESTAConfig(beta=0.8)).restore_tensor(NAME, tensors, RestoreContext())
    assert fused.report["rank"] == shape[0]
    torch.testing.assert_close(fused.tensor, resta.tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [LSSFConfig(), LSSFConfig(alpha_1=2.0, alpha=1.5, eta=0.6),
                                    LSSFConfig(decompose="safety_vector", safety_vector="aligned_minus_base")])
@pytest.mark.parametrize("shape", SHAPES)
def test_h_the_change_lies_in_the_rank_r_subspace(shape, config):
    tensors = roles(shape)
    result = LSSF(config).restore_tensor(NAME, tensors, context_for(tensors, config.decompose))
    matrix = tensors["aligned_model"] if config.decompose == "weight" else \
        tensors["aligned_model"] - tensors[LSSF(config).roles[1]]
    X = activations(shape[1])
    G = X @ X.T / X.shape[1]
    U, *_ = torch.linalg.svd(matrix @ torch.linalg.cholesky(G), full_matrices=False)  # Z Zᵀ = M G Mᵀ
    Ur = U[:, : result.report["rank"]]
    change = result.tensor - tensors["target_model"]
    torch.testing.assert_close(change - Ur @ (Ur.T @ change), torch.zeros(shape), rtol=0, atol=1e-5)
    assert result.report["fused_ratio"] > 0 and 0 <= result.report["residual_ratio"] <= 1


@pytest.mark.parametrize("shape", SHAPES)
def test_i_gram_paths_and_a_direct_svd_of_Z_give_one_projector(shape):
    tensors = roles(shape)
    W = tensors["aligned_model"]
    X = activations(shape[1])
    Z = W @ (X / X.shape[1] ** 0.5)
    U_direct, S_direct, _ = torch.linalg.svd(Z, full_matrices=False)
    r = 3
    for side in ("input", "output"):
        U, sigma = subspace(tensors, side=side, X=X)
        torch.testing.assert_close(U[:, :r] @ U[:, :r].T, U_direct[:, :r] @ U_direct[:, :r].T, rtol=0, atol=1e-4)
        n = min(shape)  # rank(Z) ≤ min(d_out, d_in); beyond it √(rounded eigenvalues) is noise
        torch.testing.assert_close(sigma[:n], S_direct[:n], rtol=1e-4, atol=1e-4)


def test_data_free_variant_reads_the_base_model():
    tensors = roles()
    method = LSSF(LSSFConfig(safety_vector="aligned_minus_base"))
    assert method.roles == ("aligned_model", "base_model", "target_model")
    without_unsafe = {k: v for k, v in tensors.items() if k != "unsafe_model"}
    assert method.restore_tensor(NAME, without_unsafe, context_for(tensors)).tensor is not None
    with pytest.raises(ConfigError, match="unsafe_model"):
        LSSF().restore_tensor(NAME, without_unsafe, context_for(tensors))


def test_rank_override_and_clamps():
    tensors = roles()
    context = context_for(tensors)
    assert LSSF(LSSFConfig(rank_override=2)).restore_tensor(NAME, tensors, context).report["rank"] == 2
    assert LSSF(LSSFConfig(rank_override=50)).restore_tensor(NAME, tensors, context).report["rank"] == 8  # min(d)
    assert LSSF(LSSFConfig(eta=0.01, r_min=4)).restore_tensor(NAME, tensors, context).report["rank"] == 4
    assert LSSF(LSSFConfig(eta=1.0, r_max=2)).restore_tensor(NAME, tensors, context).report["rank"] == 2
    with pytest.raises(ValueError, match="r_max"):
        LSSFConfig(r_min=3, r_max=2)


def test_missing_or_misfit_moments_are_errors_naming_the_tensor():
    tensors = roles()
    with pytest.raises(ConfigError, match=f"no anchor moment for tensor {NAME}"):
        LSSF().restore_tensor(NAME, tensors, RestoreContext())
    wrong = RestoreContext(statistics={NAME: torch.eye(5)})
    with pytest.raises(ModelMismatchError, match=NAME):
        LSSF().restore_tensor(NAME, tensors, wrong)
    with pytest.raises(ConfigError, match="aligned model, its tokenizer and the anchor set"):
        LSSF().prepare(RestoreContext(names=(NAME,)))
