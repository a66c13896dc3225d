"""The §3.8 metric invariants (docs/methods.md §3.8 *Tested invariants*) on matrices with a known SVD: Mou's
similarity and the principal angles of ΔW against W_0, Xue's overlaps, the spectral metrics, LoX's R-metrics and the
random baseline (the subspace primitives themselves: tests/weights/test_subspace.py)."""

from __future__ import annotations

import math

import pytest
import torch

from safetypatch.analysis.baseline import analytic_rms, module_generator, random_baseline
from safetypatch.analysis.metrics import Delta, lox_metrics, spectral_metrics, subspace_metrics
from safetypatch.patch.reduce import reduce_factors
from safetypatch.weights.linalg import lora_delta, top_singular
from tests.analysis.helpers import dense, known_weight, reference, settings


def test_delta_in_the_top_input_subspace_has_similarity_one_and_in_its_complement_zero():
    W, _, V = known_weight()
    cfg = settings(rank=4)
    ref = reference(W, cfg)
    g = torch.Generator().manual_seed(3)
    inside = torch.randn(48, 4, generator=g) @ V[:, :4].T  # row space = span(V_0,4)
    outside = torch.randn(48, 4, generator=g) @ V[:, 10:14].T  # row space ⟂ span(V_0,4)
    m_in = subspace_metrics(ref, dense(inside, cfg), cfg)
    m_out = subspace_metrics(ref, dense(outside, cfg), cfg)
    assert m_in["mou_norm"] == pytest.approx(1.0, abs=1e-5)
    assert m_in["mou_fro"] == pytest.approx(2.0, abs=1e-5)  # √r
    assert m_in["angle_row_min_deg"] == pytest.approx(0.0, abs=0.05)
    assert m_out["mou_norm"] == pytest.approx(0.0, abs=1e-5)
    assert m_out["mou_max"] == pytest.approx(0.0, abs=1e-5)
    assert m_out["angles_row_deg"] == pytest.approx([90.0] * 4, abs=1e-3)


def test_delta_equal_to_the_weight_gives_the_identity_similarity():
    W, _, _ = known_weight()
    cfg = settings(rank=5)
    ref = reference(W, cfg)
    delta = dense(W, cfg)
    S = delta.svd.V[:, :5].T @ ref.svd.V[:, :5]
    torch.testing.assert_close(S.abs(), torch.eye(5), atol=1e-5, rtol=0)
    metrics = subspace_metrics(ref, delta, cfg)
    assert metrics["mou_top1"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mou_norm"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["sin_theta_row"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["sin_theta_col"] == pytest.approx(0.0, abs=1e-4)


def test_xue_overlap_bounds_and_its_exact_cases():
    W, U, _ = known_weight()
    cfg = settings(k=8)
    ref = reference(W, cfg)
    g = torch.Generator().manual_seed(1)
    inside = U[:, :8] @ torch.randn(8, 40, generator=g)  # ΔW = U_k M
    outside = U[:, 8:20] @ torch.randn(12, 40, generator=g)  # U_kᵀΔW = 0
    random = torch.randn(48, 40, generator=g)
    assert subspace_metrics(ref, dense(inside, cfg), cfg)["overlap"] == pytest.approx(1.0, abs=1e-6)
    assert subspace_metrics(ref, dense(outside, cfg), cfg)["overlap"] == pytest.approx(0.0, abs=1e-5)
    value = subspace_metrics(ref, dense(random, cfg), cfg)
    assert 0.0 < value["overlap"] < 1.0 and 0.0 < value["overlap_row"] < 1.0 and 0.0 < value["overlap_weighted"] < 1
    wide, _, _ = known_weight(d_out=32, d_in=40)  # k = d_out needs d_out left singular vectors: d_out ≤ d_in
    full = settings(k=32)
    update = dense(random[:32], full)
    assert subspace_metrics(reference(wide, full), update, full)["overlap"] == pytest.approx(1.0, abs=1e-6)


def test_overlap_of_a_patch_after_the_column_reduction_is_zero():
    W, _, _ = known_weight()
    cfg = settings(k=8)
    ref = reference(W, cfg)
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(48, 3, generator=g), torch.randn(3, 40, generator=g)
    before = subspace_metrics(ref, Delta.from_factors(B, A, 2.0), cfg)["overlap"]
    B_red, A_red = reduce_factors(B, A, top_singular(W, 8, "exact"), "column", retention=0.0)
    after = subspace_metrics(ref, Delta.from_factors(B_red, A_red, 2.0), cfg)
    assert before > 0.2
    assert after["overlap"] == pytest.approx(0.0, abs=1e-5)
    assert after["enrichment"] == pytest.approx(0.0, abs=1e-8)


def test_spectral_metrics_of_a_lora_update():
    W, _, _ = known_weight()
    cfg = settings()
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(48, 3, generator=g), torch.randn(3, 40, generator=g)
    metrics = spectral_metrics(reference(W, cfg), Delta.from_factors(B, A, 0.5), eta=0.9)
    product = lora_delta(B, A, 0.5)
    assert metrics["norm"] == pytest.approx(float(torch.linalg.matrix_norm(product)), rel=1e-5)
    assert metrics["relative_norm"] == pytest.approx(metrics["norm"] / float(torch.linalg.matrix_norm(W)), rel=1e-6)
    assert metrics["stable_rank"] == pytest.approx(float(torch.linalg.matrix_norm(product) ** 2
                                                         / torch.linalg.matrix_norm(product, ord=2) ** 2), rel=1e-4)
    assert len(metrics["spectrum"]) == 3 and metrics["entropy_curve"][-1] == pytest.approx(1.0)
    assert 1 <= metrics["entropy_rank"] <= 3


def test_lox_r_align_is_one_at_full_rank_and_r_ft_equals_it_without_fine_tuning():
    g = torch.Generator().manual_seed(9)
    align = torch.randn(30, 3, generator=g) @ torch.randn(3, 25, generator=g)
    same = lox_metrics(align, torch.zeros(30, 25), k=3, method="exact", seed=0)
    assert same["r_align"] == pytest.approx(1.0, abs=1e-6)
    assert same["r_ft"] == pytest.approx(same["r_align"], abs=1e-6)
    truncated = lox_metrics(align, torch.randn(30, 25, generator=g), k=1, method="exact", seed=0)
    S = torch.linalg.svdvals(align)
    assert truncated["r_align"] == pytest.approx(float(S[0] / S.norm()), rel=1e-5)
    assert 0.0 <= truncated["r_ft"] < truncated["r_align"] < 1.0


def test_the_random_baseline_matches_the_exact_expectations():
    W, _, _ = known_weight(d_out=40, d_in=32)
    cfg = settings(rank=2, k=6, baseline_draws=400)
    ref = reference(W, cfg)
    g = torch.Generator().manual_seed(10)
    delta = Delta.from_factors(torch.randn(40, 2, generator=g), torch.randn(2, 32, generator=g), 1.0)
    baseline = random_baseline(ref, delta, cfg, module_generator(0, "m"))
    assert baseline["overlap"]["rms"] ** 2 == pytest.approx(6 / 40, abs=0.015)
    assert baseline["overlap_row"]["rms"] ** 2 == pytest.approx(6 / 32, abs=0.015)
    assert baseline["overlap_weighted"]["rms"] ** 2 == pytest.approx(1 / 40, abs=0.004)
    assert baseline["mou_norm"]["rms"] ** 2 == pytest.approx(2 / 32, abs=0.01)
    assert baseline["enrichment"]["mean"] == pytest.approx(1.0, abs=0.1)
    assert baseline["overlap"]["analytic_rms"] == pytest.approx(math.sqrt(6 / 40))
    assert analytic_rms(ref, delta, cfg)["mou_fro"] == pytest.approx(2 / math.sqrt(32))
    for stats in baseline.values():
        assert stats["mean"] <= stats["quantile"]


def test_the_baseline_is_seeded_per_module_name():
    W, _, _ = known_weight()
    cfg = settings(baseline_draws=3)
    ref = reference(W, cfg)
    g = torch.Generator().manual_seed(11)
    delta = Delta.from_factors(torch.randn(48, 4, generator=g), torch.randn(4, 40, generator=g), 1.0)
    first = random_baseline(ref, delta, cfg, module_generator(0, "a"))
    assert random_baseline(ref, delta, cfg, module_generator(0, "a")) == first
    assert random_baseline(ref, delta, cfg, module_generator(0, "b")) != first
    assert random_baseline(ref, delta, cfg, module_generator(1, "a")) != first
