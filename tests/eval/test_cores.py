"""Batches side by side on CPU cores (eval.cores): results in order, torch's threads restored, and generation and
multiple-choice scoring give the very same numbers as one batch at a time."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safetypatch.eval import cores
from safetypatch.eval.cores import cpu_workers, map_on_cores, side_by_side
from safetypatch.eval.generate import GenerationProtocol, generate_chat
from safetypatch.eval.multiple_choice import score_multiple_choice
from tests.tiny import ARCHS, build_tiny_model


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_map_on_cores_keeps_order_uses_threads_and_restores_torch_threads(two_threads):
    names = []

    def work(x: int) -> int:
        names.append(threading.current_thread().name)
        assert torch.get_num_threads() == 1
        return x * x

    assert list(map_on_cores(work, list(range(7)), workers=2)) == [x * x for x in range(7)]
    assert all(name.startswith("safetypatch-core") for name in names)
    assert torch.get_num_threads() == 2
    names.clear()
    serial = map_on_cores(lambda x: names.append(threading.current_thread().name) or x, [1, 2], workers=1)
    assert list(serial) == [1, 2] and names == [threading.current_thread().name] * 2
    assert cpu_workers("cpu") == 2 and cpu_workers(torch.device("meta")) == 1


def test_side_by_side_only_where_the_items_balance(two_threads):
    assert side_by_side([10, 10, 9, 8], 2) and side_by_side([64, 61], 2)
    assert not side_by_side([64, 11], 2)  # one worker would wait on the large item: intra-op threads do better
    assert not side_by_side([5], 2) and not side_by_side([5, 5], 1)
    main = threading.current_thread().name
    names = []
    unbalanced = map_on_cores(lambda x: names.append(threading.current_thread().name) or x, [1, 2], 2, [64, 11])
    assert list(unbalanced) == [1, 2] and names == [main, main] and torch.get_num_threads() == 2


def test_map_on_cores_restores_threads_when_work_fails(two_threads):
    def fail(x: int) -> int:
        raise ValueError(x)

    with pytest.raises(ValueError):
        list(map_on_cores(fail, [1, 2, 3], workers=2))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_side_by_side_gives_the_same_tokens(arch, monkeypatch):
    decided = []
    decide = cores.side_by_side
    monkeypatch.setattr(cores, "side_by_side", lambda costs, workers: decided.append(decide(costs, workers)) or
                        decided[-1])
    model, tok = build_tiny_model(arch)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    model.train()
    prompts = [f"prompt {i} " + "x" * (i * 13 % 90) for i in range(24)]
    protocol = GenerationProtocol(max_new_tokens=8, dtype="float32", batch_size=6)
    one = generate_chat(model, tok, prompts, protocol, workers=1)
    calls = []
    two = generate_chat(model, tok, prompts, protocol, progress=lambda *a: calls.append(a), workers=2)
    assert decided == [True]  # the groups did run side by side
    assert [g.token_ids for g in two] == [g.token_ids for g in one]
    assert calls[-1] == (24, 24) and len(calls) >= 4
    assert model.training and all(m.training for m in model.modules())  # dropout stayed off while generating


def test_multiple_choice_side_by_side_gives_the_same_scores(two_threads):
    model, tok = build_tiny_model("llama")
    contexts = [f"Question: item {i} " + "y" * (i % 9) + "\nAnswer:" for i in range(10)]
    choices = [(" yes", " no", " maybe " + "z" * (i % 4)) for i in range(10)]
    torch.set_num_threads(1)
    one = score_multiple_choice(model, tok, contexts, choices, batch_size=3)
    torch.set_num_threads(2)
    two = score_multiple_choice(model, tok, contexts, choices, batch_size=3)
    assert [s.loglikelihoods for s in two] == [s.loglikelihoods for s in one]
