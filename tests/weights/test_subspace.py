"""weights.subspace: the SVD of a LoRA update from its factors, principal angles, stable rank and Haar frames
(docs/methods.md §3.8 *Tested invariants* (b), (d))."""

from __future__ import annotations

import math

import pytest
import torch

from safetypatch.errors import PatchError
from safetypatch.weights.linalg import lora_delta, top_singular
from safetypatch.weights.subspace import haar_frame, lora_svd, principal_angles, stable_rank


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def test_principal_angles_of_a_subspace_with_itself_its_complement_and_a_rotated_basis():
    Q = orthonormal(30, 30, seed=5)
    A, B = Q[:, :6], Q[:, 6:12]
    R = orthonormal(6, 6, seed=6)
    assert torch.rad2deg(principal_angles(A, A)).max() < 1e-3
    torch.testing.assert_close(torch.rad2deg(principal_angles(A, B)), torch.full((6,), 90.0), atol=1e-3, rtol=0)
    mixed = torch.cat([A[:, :3], B[:, :3]], dim=1)
    torch.testing.assert_close(principal_angles(mixed, A), principal_angles(mixed @ R, A @ R), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.rad2deg(principal_angles(mixed, A)), torch.tensor([0.0, 0, 0, 90, 90, 90]),
                               atol=1e-3, rtol=0)
    at_30 = torch.stack([A[:, 0], math.cos(math.pi / 6) * A[:, 0] + math.sin(math.pi / 6) * B[:, 0]], dim=1)
    assert float(torch.rad2deg(principal_angles(at_30[:, :1], at_30[:, 1:]))[0]) == pytest.approx(30.0, abs=1e-3)


def test_principal_angles_refuse_bases_of_different_spaces():
    with pytest.raises(PatchError, match=r"\(10, 2\) and \(12, 2\)"):
        principal_angles(torch.zeros(10, 2), torch.zeros(12, 2))


def test_stable_rank_of_rank_one_identity_and_a_scaled_matrix():
    assert stable_rank(torch.linalg.svdvals(torch.outer(torch.arange(1.0, 6), torch.ones(4)))) == pytest.approx(1.0)
    assert stable_rank(torch.ones(7)) == pytest.approx(7.0)  # sr(I_7)
    M = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    S = torch.linalg.svdvals(M)
    assert stable_rank(S) == pytest.approx(stable_rank(S * 37.0), rel=1e-6)
    assert 1.0 <= stable_rank(S) <= 12
    assert stable_rank(torch.zeros(3)) == 0.0


def test_lora_factor_svd_equals_an_explicit_svd_of_the_product():
    g = torch.Generator().manual_seed(7)
    B, A = torch.randn(50, 4, generator=g), torch.randn(4, 33, generator=g)
    svd = lora_svd(B, A, 2.0)
    explicit = top_singular(lora_delta(B, A, 2.0), 4, "exact")
    torch.testing.assert_close(svd.S, explicit.S, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(svd.U, explicit.U, rtol=0, atol=1e-4)  # same sign convention
    torch.testing.assert_close(svd.V, explicit.V, rtol=0, atol=1e-4)
    torch.testing.assert_close((svd.U * svd.S) @ svd.V.T, lora_delta(B, A, 2.0), rtol=0, atol=1e-4)


def test_a_rank_deficient_lora_update_keeps_a_complete_spectrum_with_zeros():
    g = torch.Generator().manual_seed(8)
    B = torch.randn(30, 1, generator=g).repeat(1, 3)
    svd = lora_svd(B, torch.randn(3, 20, generator=g), 1.0)
    assert svd.k == 3 and float(svd.S[1]) < 1e-4 * float(svd.S[0])


def test_haar_frames_are_orthonormal_and_refuse_too_many_columns():
    Q = haar_frame(12, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(Q.T @ Q, torch.eye(5), atol=1e-5, rtol=0)
    with pytest.raises(PatchError, match="k=13, d=12"):
        haar_frame(12, 13, torch.Generator())

