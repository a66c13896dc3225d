"""Safe LoRA (docs/methods.md §3.6 *Tested invariants*, (a)–(g)), on LoRA factors and on dense updates."""

from __future__ import annotations

import logging

import pytest
import torch

from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.restoration import LORA_A, LORA_B, RestoreContext
from safetypatch.restoration.safe_lora import SafeLoRA, SafeLoRAConfig, align, projection_cosine
from safetypatch.weights.linalg import lora_delta
from tests.restore.helpers import orthonormal, roles

D_OUT, D_IN, RANK = 12, 10, 2


def lora_module(seed: int, in_alignment: float = 0.0):
    """base/aligned with V = σ Q Rᵀ (σ = 2, m = 3) and a rank-2 adapter whose B mixes range(Q) by ``in_alignment``."""
    g = torch.Generator().manual_seed(seed)
    Q, R = orthonormal(D_OUT, 6, g), orthonormal(D_IN, 3, g)
    base = torch.randn(D_OUT, D_IN, generator=g)
    inside, outside = Q[:, :3] @ torch.randn(3, RANK, generator=g), Q[:, 3:] @ torch.randn(3, RANK, generator=g)
    B = in_alignment * inside + (1 - in_alignment) * outside
    return {"base_model": base, "aligned_model": base + 2.0 * Q[:, :3] @ R.T,
            LORA_B: B, LORA_A: torch.randn(RANK, D_IN, generator=g)}, Q[:, :3]


MODULES = {f"model.layers.{i}.self_attn.q_proj.weight": lora_module(i, a)[0]
           for i, a in enumerate((0.9, 0.1, 0.5, 0.7, 0.3))}


def run(config: SafeLoRAConfig, modules=MODULES, order=None):
    method = SafeLoRA(config)
    names = order or list(modules)
    context = method.prepare(RestoreContext(names=tuple(names),
                                            tensors=lambda: ((n, modules[n]) for n in names)))
    return {n: method.restore_tensor(n, modules[n], context) for n in names}


def test_a_threshold_zero_changes_nothing_bitwise():
    results = run(SafeLoRAConfig(select_layers_type="threshold", threshold=0.0))
    assert all(r.tensor is None for r in results.values())


def test_b_threshold_above_one_projects_all_and_number_mode_bounds():
    assert all(r.report["projected"] for r in run(SafeLoRAConfig(select_layers_type="threshold",
                                                                 threshold=1.01)).values())
    assert all(r.tensor is None for r in run(SafeLoRAConfig(num_proj_layers=0)).values())
    assert all(r.report["projected"] for r in run(SafeLoRAConfig(num_proj_layers=len(MODULES))).values())


def test_c_paper_C_is_symmetric_psd_and_CB_needs_no_C():
    tensors, _ = lora_module(0)
    V = tensors["aligned_model"] - tensors["base_model"]
    C = V @ V.T / torch.linalg.matrix_norm(V)
    torch.testing.assert_close(C, C.T, rtol=0, atol=1e-6)
    assert float(torch.linalg.eigvalsh(C).min()) > -1e-5
    torch.testing.assert_close(align(V, tensors[LORA_B], "paper", 1e-6), C @ tensors[LORA_B], rtol=1e-5, atol=1e-6)


def test_orthonormal_projector_is_idempotent_and_symmetric():
    tensors, _ = lora_module(1)
    V = tensors["aligned_model"] - tensors["base_model"]
    P = align(V, torch.eye(D_OUT), "orthonormal", 1e-6)
    torch.testing.assert_close(P @ P, P, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-6)
    assert abs(float(torch.trace(P)) - 3) < 1e-5


def test_d_cosine_matches_the_dense_product_and_ignores_scaling():
    tensors, _ = lora_module(2, 0.5)
    V = tensors["aligned_model"] - tensors["base_model"]
    B, A = tensors[LORA_B], tensors[LORA_A]
    CB = align(V, B, "paper", 1e-6)
    cosine = projection_cosine(CB, B, A @ A.T)
    dense = (CB @ A).flatten() @ (B @ A).flatten() / ((CB @ A).norm() * (B @ A).norm())
    assert cosine == pytest.approx(float(dense), rel=1e-5)
    for b, a in ((3.0, 1.0), (1.0, 0.2)):
        assert projection_cosine(b * CB, b * B, (a * A) @ (a * A).T) == pytest.approx(cosine, rel=1e-5)


def test_e_known_alignment_subspace_gives_cosine_one_or_zero():
    inside, Q = lora_module(3, in_alignment=1.0)
    V = inside["aligned_model"] - inside["base_model"]
    B, A = inside[LORA_B], inside[LORA_A]
    C = V @ V.T / torch.linalg.matrix_norm(V)
    torch.testing.assert_close(C, 2.0 / 3**0.5 * Q @ Q.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(align(V, B, "paper", 1e-6) @ A, 2.0 / 3**0.5 * B @ A, rtol=1e-5, atol=1e-5)
    assert projection_cosine(align(V, B, "paper", 1e-6), B, A @ A.T) == pytest.approx(1.0, abs=1e-5)
    outside, _ = lora_module(3, in_alignment=0.0)
    assert projection_cosine(align(V, outside[LORA_B], "paper", 1e-6), outside[LORA_B], A @ A.T) < 1e-5
    result = run(SafeLoRAConfig(select_layers_type="threshold", threshold=0.0), {"m.weight": outside})
    assert result["m.weight"].tensor is None


def test_f_number_mode_selects_by_cosine_whatever_the_iteration_order():
    forward = run(SafeLoRAConfig(num_proj_layers=2))
    backward = run(SafeLoRAConfig(num_proj_layers=2), order=list(reversed(MODULES)))
    chosen = {n for n, r in forward.items() if r.report["projected"]}
    assert chosen == {n for n, r in backward.items() if r.report["projected"]}
    cosines = sorted((r.report["cosine"], n) for n, r in forward.items())
    assert chosen == {n for _, n in cosines[:2]}
    assert all(forward[n].tensor is None for n in set(MODULES) - chosen)


def test_g_projected_adapter_equals_C_applied_to_the_product_delta():
    name = next(iter(MODULES))
    tensors = MODULES[name]
    new_B = run(SafeLoRAConfig(num_proj_layers=5))[name].tensor
    V = tensors["aligned_model"] - tensors["base_model"]
    C = V @ V.T / torch.linalg.matrix_norm(V)
    torch.testing.assert_close(lora_delta(new_B, tensors[LORA_A], 2.0),
                               C @ lora_delta(tensors[LORA_B], tensors[LORA_A], 2.0), rtol=1e-5, atol=1e-5)


def test_full_fine_tune_variant_projects_the_dense_delta():
    tensors = roles()
    method = SafeLoRA(SafeLoRAConfig(select_layers_type="threshold", threshold=1.01))
    result = method.restore_tensor("w.weight", tensors, RestoreContext())
    V = tensors["aligned_model"] - tensors["base_model"]
    delta = tensors["target_model"] - tensors["aligned_model"]
    expected = tensors["aligned_model"] + V @ V.T @ delta / torch.linalg.matrix_norm(V)
    torch.testing.assert_close(result.tensor, expected, rtol=1e-5, atol=1e-5)


def test_zero_alignment_matrix_is_skipped_with_a_warning(caplog):
    tensors, _ = lora_module(4)
    tensors = {**tensors, "aligned_model": tensors["base_model"]}
    with caplog.at_level(logging.WARNING, logger="safetypatch.restoration.safe_lora"):
        result = run(SafeLoRAConfig(select_layers_type="threshold", threshold=2.0), {"z.weight": tensors})
    assert result["z.weight"].tensor is None and "W_aligned = W_base for z.weight" in caplog.text


def test_errors_name_the_module():
    name = next(iter(MODULES))
    with pytest.raises(ConfigError, match=f"tensor {name} was not ranked"):
        SafeLoRA().restore_tensor(name, MODULES[name], RestoreContext())
    with pytest.raises(ConfigError, match=r"context\.tensors"):
        SafeLoRA().prepare(RestoreContext())
    bad = {**MODULES[name], LORA_A: torch.zeros(RANK, D_IN + 1)}
    with pytest.raises(ModelMismatchError, match=name):
        SafeLoRA(SafeLoRAConfig(select_layers_type="threshold")).restore_tensor(name, bad, RestoreContext())
