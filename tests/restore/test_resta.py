"""RESTA (docs/methods.md §3.5 *Tested invariants*, (a)–(e))."""

from __future__ import annotations

import pytest
import torch

from safetypatch.restoration import RestoreContext
from safetypatch.restoration.resta import RESTA, RESTAConfig, tensor_seed
from safetypatch.weights import elementwise
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


# the chunked form the runner uses (restore_chunked): the reference restore_tensor, bit for bit


def chunked(tensors, name=NAME, dtype=torch.float32, **config):
    """(the RestoredTensor, its values as one flat tensor of ``dtype``, its report before the chunks ran)."""
    result = RESTA(RESTAConfig(**config)).restore_chunked(name, tensors, RestoreContext())
    if result.tensor is None:
        return result, None, result.report
    before = dict(result.report)
    return result, torch.cat([chunk.clone() for chunk in result.tensor.chunks(dtype)]), before


@pytest.mark.parametrize("shape", [(40, 30), (7,), (64, 32)])
@pytest.mark.parametrize("config", [{"beta": 0.5}, {"beta": 0.75, "dare": True, "drop_p": 0.3, "seed": 2},
                                    {"beta": 0.0, "dare": True, "drop_p": 0.5}, {"beta": 1.0 / 3.0}])
@pytest.mark.parametrize("chunk", [16, 100, 1 << 20])  # 1200, 7 and 2048 elements: most are no multiple of it
def test_chunked_equals_the_reference_bit_for_bit(monkeypatch, shape, config, chunk):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", chunk)
    stored = {role: t.to(torch.bfloat16) if role == "target_model" else t for role, t in roles(shape).items()}
    reference = restore({role: t.float() for role, t in stored.items()}, **config)
    result, values, before = chunked(stored, **config)
    assert before == {}  # filled while the chunks are computed
    assert torch.equal(values, reference.tensor.reshape(-1))
    assert result.report == reference.report and list(result.report) == list(reference.report)
    _, cast, _ = chunked(stored, dtype=torch.bfloat16, **config)
    assert torch.equal(cast.view(torch.int16), reference.tensor.to(torch.bfloat16).reshape(-1).view(torch.int16))


def test_chunked_identities_skip_before_any_arithmetic(monkeypatch):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 16)
    tensors = roles((40, 30))
    for config, same in (({"beta": 0.0}, tensors), ({}, {**tensors, "unsafe_model": tensors["aligned_model"]}),
                         ({"beta": 0.0, "dare": True, "drop_p": 0.0}, tensors)):
        result, _, _ = chunked(same, **config)
        assert result.tensor is None and result.report == restore(same, **config).report
    late = tensors["aligned_model"].clone()
    late.view(-1)[-1] += 1.0  # δ_safe is zero except in the last element of the last chunk
    result, values, _ = chunked({**tensors, "unsafe_model": late})
    assert torch.equal(values, restore({**tensors, "unsafe_model": late}).tensor.view(-1))


def test_the_report_ratio_is_accurate_for_large_tensors():
    """‖β δ_safe‖ / ‖W_SFT‖ from squares summed per chunk in fp64: within 1e-6 of the fp64 value (an fp32
    ``vector_norm`` of a few M elements on a CPU is off by ~1e-4)."""
    g = torch.Generator().manual_seed(0)
    shape = (1536, 1024)
    tensors = {"aligned_model": torch.randn(shape, generator=g), "unsafe_model": torch.randn(shape, generator=g),
               "target_model": 0.02 * torch.randn(shape, generator=g) + 1.0}
    exact = float((0.5 * (tensors["aligned_model"].double() - tensors["unsafe_model"].double())).norm()
                  / tensors["target_model"].double().norm())
    assert restore(tensors).report["safety_ratio"] == pytest.approx(exact, rel=1e-6)
