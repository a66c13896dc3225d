"""Xue's overlap regulariser: docs/methods.md §3.2 tests (a)-(g) on a W_0 with a known SVD and on a tiny PEFT model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from safetypatch.errors import ConfigError
from safetypatch.train.loss import completion_loss
from safetypatch.train.recipes import RegularizerConfig, get_recipe
from safetypatch.train.refusal_sft import lora_config
from safetypatch.train.regularizer import OverlapPenalty, OverlapRegularizer
from tests.tiny import build_tiny_model

SIGMAS = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3])
K = 3


@pytest.fixture
def w0():
    """W_0 = U diag(σ) Vᵀ, 12 × 10, full rank with distinct singular values."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 10, generator=g))
    V, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    return U @ torch.diag(SIGMAS) @ V.T, U, V


def penalty(W, side="column", weighting="weighted", normalize=False, k=K, method="exact"):
    cfg = RegularizerConfig(k=k, side=side, weighting=weighting, normalize=normalize, svd_method=method)
    return OverlapPenalty(W, cfg)


def explicit(W, B, A, side, weighting, normalize, k=K):
    U, S, Vh = torch.linalg.svd(W)
    Uk, Sk, Vk = U[:, :k], torch.diag(S[:k]), Vh[:k].T
    Mc = Sk @ Uk.T if weighting == "weighted" else Uk.T
    Mr = Vk @ Sk if weighting == "weighted" else Vk
    if normalize:
        Mc, Mr = Mc / Mc.norm(), Mr / Mr.norm()
    delta = B @ A
    value = {"column": Mc @ delta, "row": delta @ Mr, "both": Mc @ delta @ Mr}[side].square().sum()
    return value / (delta.square().sum() + 1e-8) if normalize else value


def test_a_zero_when_the_update_avoids_the_top_k_subspace(w0):
    W, U, V = w0
    g = torch.Generator().manual_seed(1)
    B_out = U[:, K:] @ torch.randn(10 - K, 2, generator=g)  # columns in span(U_{k+1:})
    A_out = torch.randn(2, 10 - K, generator=g) @ V[:, K:].T  # rows in span(V_{k+1:})
    B_any, A_any = torch.randn(12, 2, generator=g), torch.randn(2, 10, generator=g)
    assert float(penalty(W, "column")(B_out, A_any)) == pytest.approx(0, abs=1e-6)
    assert float(penalty(W, "row")(B_any, A_out)) == pytest.approx(0, abs=1e-6)
    assert float(penalty(W, "both")(B_out, A_any)) == pytest.approx(0, abs=1e-6)
    assert float(penalty(W, "both")(B_any, A_out)) == pytest.approx(0, abs=1e-6)
    assert float(penalty(W, "column")(B_any, A_any)) > 1e-2


def test_b_weighted_unnormalised_rank_one_value(w0):
    W, U, _ = w0
    e = torch.randn(1, 10, generator=torch.Generator().manual_seed(2))
    value = penalty(W, "column")(U[:, :1], e)
    assert float(value) == pytest.approx(float(SIGMAS[0] ** 2 * e.square().sum()), rel=1e-5)


def test_c_normalised_values_and_bounds(w0):
    W, _, _ = w0
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(12, 2, generator=g), torch.randn(2, 10, generator=g)
    U, _, _ = torch.linalg.svd(W)
    delta = B @ A
    expected = (U[:, :K].T @ delta).square().sum() / (K * (delta.square().sum() + 1e-8))
    assert float(penalty(W, "column", "uniform", True)(B, A)) == pytest.approx(float(expected), rel=1e-5)
    bound = float(SIGMAS[0] ** 2 / SIGMAS[:K].square().sum())
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        value = float(penalty(W, "column", "weighted", True)(torch.randn(12, 2, generator=g),
                                                            torch.randn(2, 10, generator=g)))
        assert 0 <= value <= bound + 1e-6


@pytest.mark.parametrize("side", ["column", "row", "both"])
@pytest.mark.parametrize("weighting", ["weighted", "uniform"])
@pytest.mark.parametrize("normalize", [False, True])
def test_d_trace_form_equals_explicit_form(w0, side, weighting, normalize):
    W, _, _ = w0
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)
    value = penalty(W, side, weighting, normalize)(B, A)
    assert float(value) == pytest.approx(float(explicit(W, B, A, side, weighting, normalize)), rel=1e-5)


def test_g_lowrank_and_exact_svd_agree_for_exact_rank_k():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, K, generator=g) @ torch.randn(K, 30, generator=g)  # exact rank k
    B, A = torch.randn(40, 2, generator=g), torch.randn(2, 30, generator=g)
    exact = penalty(W, "column", "uniform", True, method="exact")(B, A)
    low = penalty(W, "column", "uniform", True, method="lowrank")(B, A)
    assert float(low) == pytest.approx(float(exact), rel=1e-4)


@pytest.fixture
def peft_model():
    model, tok = build_tiny_model("llama")
    peft = get_peft_model(model, lora_config(get_recipe("lora_mlp_r2"), 4)).eval()  # eval: no dropout
    with torch.no_grad():  # non-zero B so that R and its gradients are non-trivial
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return peft, tok


def _batch(tok):
    ids = torch.tensor([tok("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>",
                            add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[:, :20] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def test_e_beta_zero_gives_the_plain_ce_gradients(peft_model):
    peft, tok = peft_model
    reg = OverlapRegularizer(peft, RegularizerConfig(k=8))
    inputs, labels = _batch(tok)
    grads = []
    for beta in (None, 0.0):
        peft.zero_grad()
        loss, _ = completion_loss(peft, dict(inputs), labels)
        if beta is not None:
            loss = loss + beta * reg()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_f_buffers_and_frozen_weights_get_no_gradient(peft_model):
    peft, _ = peft_model
    reg = OverlapRegularizer(peft, RegularizerConfig(k=8, side="both"))
    assert len(reg.penalties) == 12  # gate, up, down in 4 layers
    reg().backward()
    assert all(not b.requires_grad for b in reg.buffers())
    for name, p in peft.named_parameters():
        if "lora_" in name and "mlp" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    names = {f"model.layers.{i}.mlp.{m}" for i in range(4) for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(reg.per_module()) == names


def test_no_matching_module_is_an_error(peft_model):
    peft, _ = peft_model
    with pytest.raises(ConfigError, match="q_proj"):
        OverlapRegularizer(peft, RegularizerConfig(modules=("q_proj",)))
