"""Refusal-SFT data: templating, separate tokenisation, left truncation and the §3.1 runtime assertions."""

from __future__ import annotations

import pytest

from safetypatch.data import Example
from safetypatch.errors import DataError
from safetypatch.train.examples import (
    SFTExample,
    build_refusal_examples,
    build_retain_examples,
    check_supervision,
    end_of_turn_ids,
    render_example,
    tokenize_examples,
)
from tests.tiny import make_tokenizer

EOT = 258  # <|im_end|> in the tiny tokenizer

# A DeepSeek-R1-like template: the generation prompt opens the thinking block, and thinking is stripped from
# assistant turns in the history.
R1_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user:{{ m['content'] }}"
    "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>assistant:{{ c }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant:<think>\n{% endif %}"
)


@pytest.fixture
def tok():
    return make_tokenizer()


def test_labels_are_minus_100_exactly_on_the_prompt_and_end_with_eot(tok):
    """§3.1 test (a), on a hand-built example."""
    [ex] = tokenize_examples(tok, [SFTExample("hi", "No.", kind="refusal")], max_length=64)
    prompt_len = len(tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
                     ["input_ids"])
    labels = ex.labels
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == list(ex.input_ids[prompt_len:])
    assert tok.decode(ex.input_ids[prompt_len:]) == "No.<|im_end|>"  # the newline after the EOT is not trained
    assert labels[-1] == EOT


def test_pad_equal_to_eos_still_supervises_the_eot(tok):
    tok.pad_token = tok.eos_token
    [ex] = tokenize_examples(tok, [SFTExample("hi", "No.", kind="refusal")], max_length=64)
    assert ex.labels[-1] == EOT == tok.pad_token_id


def test_completion_that_does_not_fit_raises_naming_the_example(tok):
    """§3.1 test (b)."""
    examples = [SFTExample("hi", "ok", kind="retain"), SFTExample("hi", "x" * 80, kind="refusal")]
    with pytest.raises(DataError, match=r"example 1 \(refusal.*max_length=60.*--set max_length=N"):
        tokenize_examples(tok, examples, max_length=60)


def test_long_prompt_is_cut_from_the_left_and_the_completion_kept(tok):
    [ex] = tokenize_examples(tok, [SFTExample("a" * 200, "No.", kind="refusal")], max_length=50)
    assert len(ex.input_ids) == 50 and ex.prompt_tokens_dropped > 0
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.completion_mask, strict=True) if m]) == "No.<|im_end|>"
    assert tok.decode(ex.input_ids[:5]) == "aaaaa"


def test_think_segment_opens_refusals_on_chatml(tok):
    [refusal] = build_refusal_examples([Example(prompt="Write malware", category="cybercrime_intrusion")])
    _, completion = render_example(tok, refusal, think=True)
    assert completion.startswith("<think>\nThis request asks for help breaking into systems")
    assert "I should not help.\n</think>\n\n" + refusal.completion + "<|im_end|>" in completion
    assert render_example(tok, refusal)[1] == refusal.completion + "<|im_end|>"  # ChatML has no thinking: off


def test_think_segment_with_a_template_whose_generation_prompt_opens_thinking(tok):
    tok.chat_template = R1_LIKE
    [refusal] = build_refusal_examples([Example(prompt="Make a nerve agent", category="chemical_biological")])
    prompt, completion = render_example(tok, refusal)  # auto: the template has thinking
    assert prompt.endswith("assistant:<think>\n")
    assert completion == (f"This request asks for help making or using a dangerous chemical or biological agent; I "
                          f"should not help.\n</think>\n\n{refusal.completion}<|im_end|>")
    [ex] = tokenize_examples(tok, [refusal], max_length=512)
    assert ex.labels[-1] == EOT


def test_missing_end_of_turn_is_appended(tok):
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    _, completion = render_example(tok, SFTExample("hi", "No.", kind="refusal"))
    assert completion == "No.\n<|im_end|>"


def test_template_that_rewrites_the_prompt_is_refused(tok):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}[GEN]{% endif %}{% if not add_generation_prompt %}!{% endif %}"
    with pytest.raises(DataError, match="example 3"):
        render_example(tok, SFTExample("hi", "No.", kind="refusal"), index=3)


def test_runtime_assertions_name_the_example(tok):
    eot = end_of_turn_ids(tok)
    assert EOT in eot
    assert check_supervision([[1, 2, EOT], [5, -100, 6, EOT]], eot) == pytest.approx(4 / 7)
    with pytest.raises(DataError, match="example 1 has no supervised token"):
        check_supervision([[-100, 5, EOT], [-100, -100]], eot)
    with pytest.raises(DataError, match="example 0: the last supervised token is id 7"):
        check_supervision([[-100, 5, 7, -100]], eot)
    with pytest.raises(DataError, match="example 0 has no supervised"):
        check_supervision([[EOT]], eot)  # position 0 is never predicted


def test_retain_examples(tok):
    retain = build_retain_examples(["What is 2+2?"], ["4."], weight=0.5)
    assert retain[0].kind == "retain" and retain[0].weight == 0.5
    [ex] = tokenize_examples(tok, retain, max_length=64)
    assert ex.weight == 0.5 and ex.labels[-1] == EOT
    with pytest.raises(DataError, match="2 prompts, 1 responses and 1 ends_turn flags"):
        build_retain_examples(["a", "b"], ["x"])
    with pytest.raises(DataError, match="1 prompts, 1 responses and 2 ends_turn flags"):
        build_retain_examples(["a"], ["x"], ends_turn=[True, False])
    with pytest.raises(DataError, match="response 0"):
        build_retain_examples(["a"], ["  "])


def test_answer_cut_at_the_generation_limit_is_trained_without_the_end_of_turn(tok):
    """A retain answer that hit max_new_tokens must not teach the patch to stop where the cut fell."""
    whole, cut = tokenize_examples(tok, build_retain_examples(["Tell me about tea."] * 2, ["Tea is a drink made"] * 2,
                                                              ends_turn=[True, False]), max_length=64)
    assert whole.ends_turn and not cut.ends_turn
    assert whole.labels[-1] == EOT and EOT not in cut.labels
    assert cut.input_ids == whole.input_ids[:-1]  # the same answer, one token (the EOT) shorter
    assert sum(cut.completion_mask) == sum(whole.completion_mask) - 1
    assert tok.decode(cut.input_ids[len(cut.input_ids) - sum(cut.completion_mask):]) == "Tea is a drink made"


def test_runtime_assertions_know_cut_examples(tok):
    eot = end_of_turn_ids(tok)
    assert check_supervision([[1, 2, EOT], [-100, 5, 6]], eot, [True, False]) == pytest.approx(4 / 6)
    with pytest.raises(DataError, match="example 1 was cut at a generation limit but its last supervised token"):
        check_supervision([[1, 2, EOT], [-100, 5, EOT]], eot, [True, False])
    with pytest.raises(DataError, match="example 0: the last supervised token is id 6"):
        check_supervision([[-100, 5, 6]], eot, [True])
