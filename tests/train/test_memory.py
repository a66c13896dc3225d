"""The memory-saving paths of training (the lean LoRA and gated-MLP forwards, the chunked loss at supervised
positions) against the computation they replace, on the tiny models: the same loss and gradients within a stated
tolerance, fewer bytes kept for the backward pass, and the modules they may not touch left alone."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import get_peft_model

import safetypatch.train.loss as loss_module
import safetypatch.train.trainer as trainer_module
from safetypatch.train.lean import lean_forward
from safetypatch.train.recipes import get_recipe
from safetypatch.train.refusal_sft import lora_config, train_refusal_patch
from tests.tiny import ARCHS, build_tiny_model
from tests.train.test_refusal_sft import refusal_data

# The stated tolerance: the loss to 1e-6 of itself, every gradient to 1e-5 of its largest element. The paths repeat
# the replaced operations on the same values, so on the test machine the differences are 0 under bf16 autocast and,
# in fp32, ~2e-7 (the chunked LM head's matrix products have fewer rows, which changes the BLAS blocking).
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-6, 1e-5


def _peft(arch: str, dropout: float = 0.0):
    model, _ = build_tiny_model(arch)
    if arch == "gemma3":
        model.config.get_text_config().final_logit_softcapping = 30.0  # the soft-capped head too
    peft = get_peft_model(model, lora_config(get_recipe("mou", lora_dropout=dropout), 4))
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide every error in the gradient of A and of x
            torch.nn.init.normal_(param, std=0.05)
    return peft.train()


def _batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 40), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0
    labels = ids.clone()
    labels[:, :20] = -100
    labels[1, 30:] = -100
    return {"input_ids": ids, "attention_mask": attention}, labels


def _loss_and_grads(peft, lean: bool, precision: str):
    """The default recipe's loss (per-example weights, lead tokens, unlikelihood) and the LoRA gradients, through
    the memory-saving paths (lean) or the computation they replace."""
    inputs, labels = _batch()
    peft.zero_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    chunked = contextlib.nullcontext() if lean else _unchunked()
    with lean_forward(peft) if lean else contextlib.nullcontext(0) as patched, chunked, autocast:
        loss, _ = loss_module.completion_loss(peft, dict(inputs), labels, torch.tensor([1.0, 2.0, 0.5]),
                                              lead_tokens=3, lead_weight=3.0,
                                              unlikely=torch.tensor([True, False, True]), openings=[40, 41],
                                              unlikelihood_weight=5.0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in peft.named_parameters() if p.grad is not None}
    return patched, loss.detach(), grads


@contextlib.contextmanager
def _unchunked():
    """completion_loss with the whole supervised logits (the computation before ChunkedNLL)."""
    before = loss_module._chunked_nll
    loss_module._chunked_nll = lambda *args: None
    try:
        yield
    finally:
        loss_module._chunked_nll = before


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_memory_paths_keep_loss_and_gradients(arch, precision, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 320 * 7)  # chunks of 7 rows: several per batch
    peft = _peft(arch)
    _, plain_loss, plain = _loss_and_grads(peft, lean=False, precision=precision)
    patched, lean_loss, lean = _loss_and_grads(peft, lean=True, precision=precision)
    assert patched == 4 * 7  # every adapted linear module of the 4 blocks
    assert abs(float(lean_loss - plain_loss)) <= LOSS_TOLERANCE * abs(float(plain_loss))
    assert lean.keys() == plain.keys() and len(plain) == 2 * 4 * 7
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        assert float((lean[name] - grad).abs().max()) <= GRAD_TOLERANCE * float(grad.abs().max()), name


def _saved_bytes(peft, lean: bool) -> int:
    """Bytes of the distinct new storages that one bf16 forward keeps for the backward pass (parameters excluded)."""
    inputs, labels = _batch()
    params = {p.untyped_storage().data_ptr() for p in peft.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    chunked = contextlib.nullcontext() if lean else _unchunked()
    with lean_forward(peft) if lean else contextlib.nullcontext(), chunked, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss_module.completion_loss(peft, dict(inputs), labels)
    return sum(kept.values())


def test_memory_paths_keep_fewer_bytes_for_backward():
    peft = _peft("llama")
    plain, lean = _saved_bytes(peft, lean=False), _saved_bytes(peft, lean=True)
    assert lean < 0.8 * plain, (lean, plain)


def test_lean_lora_leaves_dropout_and_restores_forward():
    with_dropout = _peft("llama", dropout=0.1)
    with lean_forward(with_dropout) as patched:
        assert patched == 0  # PEFT's own forward draws the dropout masks
    peft = _peft("llama")
    with lean_forward(peft) as patched:
        assert patched == 28 and all("forward" in vars(m) for m in peft.modules() if hasattr(m, "lora_A"))
    assert not any("forward" in vars(m) for m in peft.modules())  # LoRA modules and MLPs are restored
    inputs, _ = _batch()
    with lean_forward(peft), torch.no_grad():  # outside autocast the module's own forward runs: the same logits
        inside = peft(**inputs).logits
    with torch.no_grad():
        assert torch.equal(inside, peft(**inputs).logits)
    with lean_forward(peft), peft.disable_adapter(), torch.no_grad():
        assert torch.equal(peft(**inputs).logits, peft.get_base_model()(**inputs).logits)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_loss_curve_is_the_same_through_the_memory_paths(tmp_path, monkeypatch, checkpointing):
    """Three bf16 steps of the default recipe (activation checkpointing recomputes through the lean forward too)."""
    histories = []
    for lean in (True, False):
        model, tok = build_tiny_model("llama")
        recipe = get_recipe("mou", max_steps=3, learning_rate=1e-2, per_device_train_batch_size=2, precision="bf16",
                            gradient_checkpointing=checkpointing)
        if not lean:
            monkeypatch.setattr(trainer_module, "lean_forward", lambda model: contextlib.nullcontext(0))
            monkeypatch.setattr(loss_module, "_chunked_nll", lambda *args: None)
        result = train_refusal_patch(model, tok, refusal_data(tok), recipe, tmp_path / str(lean))
        histories.append([loss for _, loss in result.loss_history])
        assert not any("forward" in vars(m) for m in result.model.modules()
                       if hasattr(m, "lora_A") or hasattr(m, "gate_proj"))
    lean_history, plain_history = histories
    assert len(lean_history) == 3
    assert lean_history == pytest.approx(plain_history, rel=1e-5)
