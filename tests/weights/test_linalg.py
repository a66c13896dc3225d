"""weights.linalg: the one ΔW, scaling from configs, sign-fixed truncated SVD, projections (docs/methods.md §2.2,
§2.3)."""

from __future__ import annotations

import math

import pytest
import torch

from safetypatch.errors import PatchError
from safetypatch.weights.linalg import (
    cumulative_entropy,
    dare,
    entropy_rank,
    entropy_ratios,
    fix_column_signs,
    fix_signs,
    lora_delta,
    lora_scaling,
    low_rank_factors,
    orthonormal_basis,
    project_columns,
    project_rows,
    psd_eigh,
    top_singular,
)


def known_svd_matrix(d_out=12, d_in=10, sigmas=(9.0, 6.0, 4.0, 2.0, 1.0, 0.5), seed=0):
    """W = U diag(σ) Vᵀ with orthonormal U, V drawn from a seeded QR; returns W, U, S, V."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, len(sigmas), generator=g))
    V, _ = torch.linalg.qr(torch.randn(d_in, len(sigmas), generator=g))
    S = torch.tensor(sigmas)
    return U @ torch.diag(S) @ V.T, U, S, V


def test_lora_scaling_reads_alpha_over_r_and_rslora():
    assert lora_scaling({"r": 8, "lora_alpha": 16}) == 2.0
    assert lora_scaling({"r": 4, "lora_alpha": 16, "use_rslora": True}) == 8.0
    assert lora_scaling({"r": 1, "lora_alpha": 16, "peft_type": "LORA"}) == 16.0


@pytest.mark.parametrize("flag", ["use_dora", "lora_bias", "use_qalora", "fan_in_fan_out"])
def test_lora_scaling_refuses_variants_whose_delta_is_not_sBA(flag):
    with pytest.raises(PatchError, match=flag):
        lora_scaling({"r": 8, "lora_alpha": 16, flag: True})


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern", "modules_to_save"])
def test_lora_scaling_refuses_per_module_patterns_and_saved_modules(key):
    with pytest.raises(PatchError, match=key):
        lora_scaling({"r": 8, "lora_alpha": 16, key: {"q_proj": 4} if "pattern" in key else ["lm_head"]})


def test_lora_scaling_refuses_other_peft_types_and_bad_rank():
    with pytest.raises(PatchError, match="IA3"):
        lora_scaling({"peft_type": "IA3", "r": 8, "lora_alpha": 16})
    with pytest.raises(PatchError, match="r=0"):
        lora_scaling({"r": 0, "lora_alpha": 16})


def test_lora_delta_is_s_B_A_in_fp32():
    B = torch.randn(6, 2, dtype=torch.bfloat16)
    A = torch.randn(2, 5, dtype=torch.bfloat16)
    delta = lora_delta(B, A, 2.0)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, 2.0 * B.float() @ A.float(), rtol=1e-6, atol=0)
    with pytest.raises(PatchError, match="do not multiply"):
        lora_delta(torch.zeros(6, 2), torch.zeros(3, 5), 1.0)


def test_fix_signs_makes_largest_entry_positive_and_keeps_the_product():
    W, *_ = known_svd_matrix()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Uf, Vf = fix_signs(-U, -Vh.T)
    peak = Uf.gather(0, Uf.abs().argmax(0, keepdim=True))
    assert bool((peak > 0).all())
    torch.testing.assert_close(Uf @ torch.diag(S) @ Vf.T, W, rtol=1e-5, atol=1e-5)


def test_top_singular_recovers_known_svd_with_fixed_signs():
    W, U, S, _ = known_svd_matrix()
    svd = top_singular(W, 3, "exact")
    torch.testing.assert_close(svd.S, S[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(svd.U @ svd.U.T, U[:, :3] @ U[:, :3].T, rtol=1e-5, atol=1e-6)
    # flipping W's sign flips the singular vectors; the fixed convention makes U identical again
    assert torch.equal(top_singular(-W, 3, "exact").U, svd.U)
    assert top_singular(W, 99, "exact").k == 6 + 4  # clamped to min(d_out, d_in) = 10


def test_lowrank_and_exact_svd_give_the_same_projector_for_exact_rank_k():
    """§3.2 test (g): W_0 of exact rank k → svd_lowrank and exact SVD agree on U_kU_kᵀ."""
    W, *_ = known_svd_matrix(d_out=40, d_in=30, sigmas=(5.0, 3.0, 2.0, 1.0))
    exact = top_singular(W, 4, "exact")
    low = top_singular(W, 4, "lowrank", seed=3)
    assert low.method == "lowrank"
    torch.testing.assert_close(low.U @ low.U.T, exact.U @ exact.U.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(low.V @ low.V.T, exact.V @ exact.V.T, rtol=0, atol=1e-5)


def test_lowrank_svd_is_seeded_and_leaves_the_global_rng_alone():
    W = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = top_singular(W, 5, "lowrank", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = top_singular(W, 5, "lowrank", seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


def test_top_singular_k_zero_and_errors():
    svd = top_singular(torch.randn(5, 4), 0)
    assert svd.U.shape == (5, 0) and svd.V.shape == (4, 0)
    with pytest.raises(PatchError, match="2-D"):
        top_singular(torch.randn(3), 1)
    with pytest.raises(PatchError, match="unknown SVD method"):
        top_singular(torch.randn(3, 3), 1, "fast")  # type: ignore[arg-type]


def test_projections_annihilate_and_are_idempotent():
    _, U, _, V = known_svd_matrix()
    M = torch.randn(12, 7)
    P = project_columns(M, U[:, :3])
    torch.testing.assert_close(U[:, :3].T @ P, torch.zeros(3, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(project_columns(P, U[:, :3]), P, rtol=1e-5, atol=1e-6)
    N = torch.randn(4, 10)
    Q = project_rows(N, V[:, :2])
    torch.testing.assert_close(Q @ V[:, :2], torch.zeros(4, 2), rtol=0, atol=1e-5)
    # partial strength keeps (1 - strength) of the in-span part
    half = project_columns(M, U[:, :3], 0.5)
    torch.testing.assert_close(U[:, :3].T @ half, 0.5 * U[:, :3].T @ M, rtol=1e-5, atol=1e-5)


def test_orthonormal_basis_spans_the_columns():
    B = torch.randn(9, 2) @ torch.randn(2, 4)  # rank 2
    Q = orthonormal_basis(B)
    assert Q.shape == (9, 2)
    torch.testing.assert_close(Q.T @ Q, torch.eye(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(Q @ (Q.T @ B), B, rtol=1e-4, atol=1e-5)
    assert orthonormal_basis(torch.zeros(5, 3)).shape == (5, 0)


def test_low_rank_factors_exact_and_truncated_error():
    W, _, S, _ = known_svd_matrix()
    exact = low_rank_factors(W, 6)
    assert exact.error < 1e-5
    cut = low_rank_factors(W, 2)
    expected = math.sqrt(float((S[2:] ** 2).sum() / (S**2).sum()))
    assert cut.error == pytest.approx(expected, rel=1e-4)
    assert cut.B.shape == (12, 2) and cut.A.shape == (2, 10)
    padded = low_rank_factors(W, 20)  # more than min(d_out, d_in): zero columns keep the requested rank
    assert padded.B.shape == (12, 20) and padded.error < 1e-5
    assert low_rank_factors(torch.zeros(3, 3), 1).error == 0.0


def test_fix_column_signs_matches_fix_signs_on_the_left_vectors():
    U = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    fixed = fix_column_signs(-U)
    assert torch.equal(fixed, fix_signs(-U, U)[0])
    assert bool((fixed.gather(0, fixed.abs().argmax(0, keepdim=True)) > 0).all())


def test_psd_eigh_is_descending_clamped_and_reconstructs():
    X = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    G = X @ X.T  # rank 3: three eigenvalues are zero up to rounding
    evals, Q = psd_eigh(G)
    assert bool((evals[:-1] >= evals[1:]).all()) and bool((evals >= 0).all())
    torch.testing.assert_close(Q @ torch.diag(evals) @ Q.T, G, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Q.T @ Q, torch.eye(6), rtol=0, atol=1e-5)
    assert torch.equal(psd_eigh(G)[1], fix_column_signs(Q))
    with pytest.raises(PatchError, match="square"):
        psd_eigh(torch.zeros(2, 3))


def test_entropy_curve_and_rank_match_the_worked_example():
    """docs/methods.md §3.4 test (c): σ = (2, 1, 1) → p = (2/3, 1/6, 1/6), H_ρ/H_n = (0.31157, 0.65579, 1)."""
    S = torch.tensor([2.0, 1.0, 1.0])
    p = torch.tensor([2 / 3, 1 / 6, 1 / 6])
    H = cumulative_entropy(S)
    torch.testing.assert_close(H[-1], -(p * p.log()).sum(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(entropy_ratios(S), torch.tensor([0.31157, 0.65579, 1.0]), rtol=0, atol=1e-5)
    assert [entropy_rank(S, eta) for eta in (0.3, 0.5, 0.9, 1.0)] == [1, 2, 3, 3]


def test_entropy_rank_conventions_and_errors():
    assert entropy_rank(torch.tensor([3.0, 0.0, 0.0]), 0.99) == 1  # H_n = 0 → r = 1
    assert entropy_rank(torch.zeros(4), 0.5) == 1
    assert entropy_ratios(torch.tensor([1.0, 1.0, 0.0]))[-2] == 1.0  # 0·log 0 = 0: the trailing zero adds nothing
    with pytest.raises(PatchError, match="eta"):
        entropy_rank(torch.ones(3), 0.0)
    with pytest.raises(PatchError, match="at least one"):
        entropy_rank(torch.zeros(0), 0.5)


def test_dare_keeps_rescaled_entries_is_seeded_and_unbiased():
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(5))
    out, kept = dare(delta, 0.3, seed=11)
    kept_mask = out != 0
    torch.testing.assert_close(out[kept_mask], delta[kept_mask] / 0.7, rtol=1e-6, atol=0)
    assert abs(kept - 0.7) < 0.01 and kept == int(kept_mask.sum()) / kept_mask.numel()  # the exact fraction
    assert torch.equal(dare(delta, 0.3, seed=11)[0], out)
    assert not torch.equal(dare(delta, 0.3, seed=12)[0], out)
    # E[δ̃] = δ: averaged over seeds, the estimate's error shrinks like √(p / ((1 − p)·n))
    mean = torch.stack([dare(delta[:20, :20], 0.3, seed)[0] for seed in range(400)]).mean(0)
    tolerance = 4 * math.sqrt(0.3 / 0.7 / 400) * float(delta[:20, :20].abs().max())
    assert float((mean - delta[:20, :20]).abs().max()) < tolerance
    zero, kept = dare(delta, 0.0, seed=1)
    assert torch.equal(zero, delta) and kept == 1.0
    with pytest.raises(PatchError, match="drop_p"):
        dare(delta, 1.0, seed=0)
