"""Pinned chat generation (docs/methods.md §4.4) on tiny local models: batching never changes greedy tokens; the vLLM
backend's missing-extra error and parity helper."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError

from safetypatch.errors import ConfigError, DataError
from safetypatch.eval.backends.vllm import ParityReport, generate_vllm, load_vllm, parity_check
from safetypatch.eval.generate import (
    Generation,
    GenerationProtocol,
    encode_prompt,
    generate_chat,
    generation_batches,
    length_groups,
    render_prompt,
    shared_prefix,
    stop_token_ids,
)
from tests.tiny import ARCHS, build_tiny_model

PROMPTS = ["hi", "tell me a story about a cat", "2+2?", "a" * 30, "why is the sky blue"]
END = 258  # <|im_end|> in the tiny tokenizer


def protocol(**overrides) -> GenerationProtocol:
    return GenerationProtocol(**{"max_new_tokens": 10, "dtype": "float32", **overrides})


def direct_greedy(model, tok, prompt: str, max_new_tokens: int = 10) -> list[int]:
    """Unpadded batch-1 reference straight from transformers."""
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[END],
                             pad_token_id=256)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(END) + 1] if END in new else new


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_unpadded_single(arch):
    model, tok = build_tiny_model(arch)
    batched = generate_chat(model, tok, PROMPTS, protocol(batch_size=3))
    single = generate_chat(model, tok, PROMPTS, protocol(batch_size=1))
    assert [g.prompt for g in batched] == PROMPTS
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.response for g in batched] == [g.response for g in single]
    for prompt, gen in zip(PROMPTS, batched, strict=True):
        assert list(gen.token_ids) == direct_greedy(model, tok, prompt)
        assert gen.n_new_tokens == len(gen.token_ids)


# A long tail of prompt lengths, as in HarmBench (contextual behaviours): one batch of 8 that grouped batching splits;
# every prompt shares the chat template's user header, run once per group.
TAILED = ["hi", "2+2?", "why is the sky blue", "a cat", "tell me a story about a cat", "b" * 90,
          "summarise this: " + "lorem ipsum " * 30, "c" * 240]


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_batching_keeps_every_answer(arch):
    """Length groups and the shared prefix change which numbers meet in a forward, never a greedy token: both
    batchings equal unpadded batch-size-1 generation (and so each other) token for token."""
    model, tok = build_tiny_model(arch)
    grouped = protocol(batch_size=8, max_new_tokens=12)
    lengths = [len(encode_prompt(tok, render_prompt(tok, p, grouped), grouped)) for p in TAILED]
    assert len(generation_batches(lengths, 8)) == 1
    assert len(length_groups(sorted(lengths, reverse=True), 12)) >= 3  # the batch is split, not generated whole
    encoded = [encode_prompt(tok, render_prompt(tok, p, grouped), grouped) for p in TAILED]
    assert shared_prefix(encoded) == len(encode_prompt(tok, "<|im_start|>user\n", grouped))
    new = generate_chat(model, tok, TAILED, grouped)
    old = generate_chat(model, tok, TAILED, grouped.model_copy(update={"batching": "whole"}))
    assert [g.token_ids for g in new] == [g.token_ids for g in old]
    assert [(g.response, g.finish_reason) for g in new] == [(g.response, g.finish_reason) for g in old]
    for prompt, gen in zip(TAILED, new, strict=True):
        assert list(gen.token_ids) == direct_greedy(model, tok, prompt, max_new_tokens=12)


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert shared_prefix([[1, 2], [3, 4]]) == 0 and shared_prefix([[1, 2, 3]]) == 0


def test_length_groups_split_a_long_tail_and_keep_similar_lengths_whole():
    harmbench_head = [1025, 994, 814, 719, 717, 652, 599, 533, 499, 430, 411, 280, 263, 122] + [64] + [52] * 49
    sizes = length_groups(harmbench_head, 48)
    assert sum(sizes) == 64 and len(sizes) > 2
    assert sizes[-1] >= 49 and harmbench_head[64 - sizes[-1]] <= 122  # the short prompts are not padded to 1025
    assert length_groups([59, 55] + [45] * 62, 48) == [64]
    assert length_groups([46] * 30 + [41] * 34, 48) == [64]
    assert length_groups([800] + [10] * 16, 48) == [1, 16]
    assert length_groups([300, 10], 0) == [1, 1] and length_groups([300, 290], 48) == [2]
    assert length_groups([], 48) == []
    with pytest.raises(ValueError, match="longest first"):
        length_groups([10, 300], 48)


def test_stops_at_generation_config_eos_and_drops_padding():
    model, tok = build_tiny_model("llama")
    first = generate_chat(model, tok, PROMPTS[:2], protocol())
    assert all(g.finish_reason == "length" and g.n_new_tokens == 10 for g in first)
    stop = first[0].token_ids[3]
    cut = first[0].token_ids.index(stop)
    model.generation_config.eos_token_id = [END, stop]
    again = generate_chat(model, tok, PROMPTS[:2], protocol(batch_size=2))
    assert again[0].finish_reason == "eos"
    assert again[0].token_ids == first[0].token_ids[: cut + 1]
    assert again[0].response == tok.decode(list(first[0].token_ids[:cut]), skip_special_tokens=True)
    if stop not in first[1].token_ids:
        assert again[1].token_ids == first[1].token_ids and again[1].finish_reason == "length"


def test_stop_ids_merge_generation_config_tokenizer_and_end_of_turn():
    _, tok = build_tiny_model("llama")
    assert stop_token_ids(tok, None) == (END,)
    assert stop_token_ids(tok, 7) == (7, END)
    assert stop_token_ids(tok, [9, END]) == (9, END)


def test_system_prompt_recorded_verbatim_in_hash():
    model, tok = build_tiny_model("llama")
    gen = generate_chat(model, tok, ["hi"], protocol(system_prompt="Be brief.", max_new_tokens=2))[0]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert gen.templated_prompt_sha256 == hashlib.sha256(text.encode()).hexdigest()
    plain = generate_chat(model, tok, ["hi"], protocol(max_new_tokens=2))[0]
    assert plain.templated_prompt_sha256 != gen.templated_prompt_sha256


def test_no_chat_template_needs_raw_mode():
    model, tok = build_tiny_model("llama")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="template='none'"):
        generate_chat(model, tok, ["hi"], protocol())
    raw = generate_chat(model, tok, ["hi there"], protocol(template="none", max_new_tokens=3))[0]
    assert raw.templated_prompt_sha256 == hashlib.sha256(b"hi there").hexdigest()
    with pytest.raises(ConfigError, match="system_prompt"):
        render_prompt(tok, "hi", protocol(template="none", system_prompt="x"))


def test_caller_state_untouched_and_progress_reported():
    model, tok = build_tiny_model("qwen2")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
    model.train()
    tok.padding_side = "right"
    calls = []
    generate_chat(model, tok, PROMPTS, protocol(batch_size=2, max_new_tokens=2), progress=lambda *a: calls.append(a))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert tok.padding_side == "right" and tok.pad_token_id == 256
    assert model.training and all(m.training for m in model.modules())


def test_protocol_validation_and_record():
    p = protocol()
    assert p.to_dict() == {
        "max_new_tokens": 10, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "system_prompt": None, "template": "chat", "batch_size": 64, "batching": "grouped", "seed": 0,
        "dtype": "float32",
    }
    with pytest.raises(ConfigError, match="temperature"):
        protocol(temperature=0.7)
    assert protocol(do_sample=True, temperature=0.6, top_p=0.95).top_p == 0.95
    with pytest.raises(ValidationError):
        GenerationProtocol(max_tokens=5)
    with pytest.raises(ValidationError):
        p.batch_size = 2
    model, tok = build_tiny_model("llama")
    with pytest.raises(ConfigError, match="float32"):
        generate_chat(model, tok, ["hi"], GenerationProtocol())


def test_vllm_backend_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where vLLM is installed
    with pytest.raises(ConfigError, match=r'pip install "safetypatch\[vllm\]"'):
        load_vllm("some/model", protocol())
    _, tok = build_tiny_model("llama")
    with pytest.raises(ConfigError, match="safetypatch\\[vllm\\]"):
        generate_vllm(object(), tok, ["hi"], protocol())


def test_parity_check_reports_token_agreement():
    def gen(ids: tuple[int, ...], prompt: str = "p") -> Generation:
        return Generation(prompt, "", len(ids), "length", prompt * 64, token_ids=ids)

    hf = [gen((1, 2, 3, 4)), gen((5, 6)), gen((7, 8, 9)), gen((1,))]
    other = [gen((1, 2, 9, 9)), gen((5, 6)), gen((7, 8)), gen((1,))]
    report = parity_check(hf, other, n=16)
    assert report == ParityReport(n=4, exact=2, token_agreement=(2 + 2 + 2 + 1) / (4 + 2 + 3 + 1),
                                  first_divergence=(2, None, 2, None))
    assert parity_check(hf, other, n=2).n == 2
    with pytest.raises(DataError, match="different templated prompts"):
        parity_check([gen((1,), "a")], [gen((1,), "b")])
    with pytest.raises(DataError, match="token_ids"):
        parity_check([gen(())], [gen((1,))])
    with pytest.raises(DataError, match="1 HF and 2 vLLM"):
        parity_check(hf[:1], other[:2])
