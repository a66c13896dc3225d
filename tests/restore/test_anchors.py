"""Anchor moments (docs/methods.md §3.4 step 3) on a tiny model: the hooks' running sums equal XᵀX of the stacked
activations, without storing them; LSSF.prepare feeds them to the fusion."""

from __future__ import annotations

import re

import pytest
import torch

from safetypatch.data.schema import Example
from safetypatch.errors import ConfigError, DataError
from safetypatch.restoration import RestoreContext
from safetypatch.restoration.anchors import collect_input_moments
from safetypatch.restoration.lssf import LSSF, LSSFConfig
from tests.tiny import build_tiny_model

ANCHORS = [
    Example(prompt="How do I pick a lock?", response="I can't help with that."),
    Example(prompt="Write malware that steals passwords.", response="I won't help create malware."),
    Example(prompt="Best poison?", response="I can't assist with harming anyone. If you are in danger, call 112."),
]
Q, K, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", num_layers=1)


def stacked_inputs(model, tokenizer, modules, tokens="all"):
    """Reference: each module's counted input rows, stacked (one anchor per forward, no padding)."""
    rows = {m: [] for m in modules}
    current = {}
    handles = [model.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, m=m: rows[m].append(args[0][0][current["mask"]].float())) for m in modules]
    try:
        for example in ANCHORS:
            user = [{"role": "user", "content": example.prompt}]
            chat = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": example.response}],
                                                 tokenize=False)
            ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
            mask = torch.ones(ids.shape[1], dtype=torch.bool)
            if tokens == "response_only":
                prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
                mask[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = False
            current["mask"] = mask
            with torch.no_grad():
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {m: torch.cat(r) for m, r in rows.items()}


@pytest.mark.parametrize(("tokens", "act_norm"), [("all", "global"), ("response_only", "token_l2")])
def test_moments_equal_the_stacked_second_moment(tiny, tokens, act_norm):
    model, tokenizer = tiny
    moments = collect_input_moments(model, tokenizer, ANCHORS, [Q, K, DOWN], output_side=[DOWN], tokens=tokens,
                                    act_norm=act_norm, batch_size=2)
    X = stacked_inputs(model, tokenizer, [Q, DOWN], tokens)
    if act_norm == "token_l2":
        X = {m: x / x.norm(dim=1, keepdim=True) for m, x in X.items()}
    n = X[Q].shape[0]
    torch.testing.assert_close(moments[Q], X[Q].T @ X[Q] / n, rtol=1e-4, atol=1e-5)
    Z = X[DOWN] @ model.get_submodule(DOWN).weight.T  # d_in 128 > d_out 64: the output side, W G Wᵀ
    torch.testing.assert_close(moments[DOWN], Z.T @ Z / n, rtol=1e-4, atol=1e-5)
    assert moments[K] is moments[Q]  # q and k read the same input tensor: one shared G
    assert moments[Q].shape == (64, 64) and moments[DOWN].shape == (64, 64)


def test_bad_anchors_and_modules_are_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(DataError, match=r"anchor 1 .* has no response"):
        collect_input_moments(model, tokenizer, [ANCHORS[0], Example(prompt="x")], [Q])
    with pytest.raises(DataError, match="over max_length=5"):
        collect_input_moments(model, tokenizer, ANCHORS, [Q], max_length=5)
    with pytest.raises(DataError, match="empty"):
        collect_input_moments(model, tokenizer, [], [Q])
    with pytest.raises(ConfigError, match=r"not a torch\.nn\.Linear"):
        collect_input_moments(model, tokenizer, ANCHORS, ["model.layers.0.input_layernorm"])
    with pytest.raises(ConfigError, match=re.escape("no module 'model.layers.9.mlp.up_proj'")):
        collect_input_moments(model, tokenizer, ANCHORS, ["model.layers.9.mlp.up_proj"])


def test_prepare_collects_moments_in_budgeted_groups_and_feeds_the_fusion(tiny):
    model, tokenizer = tiny
    names = tuple(f"{m}.weight" for m in (Q, K, DOWN, "model.layers.0.mlp.up_proj"))
    context = RestoreContext(names=names, model=model, tokenizer=tokenizer, anchors=ANCHORS)
    one_pass = LSSF().prepare(context)
    grouped = LSSF(LSSFConfig(memory_budget_gb=64 * 64 * 4 / 1024**3)).prepare(context)  # one moment per pass
    assert set(one_pass.statistics) == set(names)
    for name in names:
        torch.testing.assert_close(grouped.statistics[name], one_pass.statistics[name], rtol=1e-5, atol=1e-6)
    assert LSSF().prepare(one_pass) is one_pass  # nothing missing: nothing recomputed
    g = torch.Generator().manual_seed(0)
    weight = model.get_submodule(DOWN).weight.detach()
    tensors = {"aligned_model": weight, "unsafe_model": weight - 0.1 * torch.randn(weight.shape, generator=g),
               "target_model": weight + 0.01 * torch.randn(weight.shape, generator=g)}
    result = LSSF().restore_tensor(f"{DOWN}.weight", tensors, one_pass)
    assert result.tensor.shape == weight.shape and 1 <= result.report["rank"] <= 64
    with pytest.raises(ConfigError, match=r"not a `\.weight`"):
        LSSF().prepare(RestoreContext(names=("model.layers.0.mlp.up_proj.bias",), model=model,
                                      tokenizer=tokenizer, anchors=ANCHORS))
