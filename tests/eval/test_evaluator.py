"""The evaluation pipeline end to end on a tiny random model: tasks, judges, metrics, results, samples."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from safetypatch.errors import ConfigError
from safetypatch.eval.evaluator import EvalPlan, ModelUnderTest, run_tasks
from safetypatch.eval.generate import GenerationProtocol
from safetypatch.eval.judges import build_judge
from safetypatch.eval.results import ResultsBuilder, read_results, read_samples
from safetypatch.eval.task import TASKS, load_preset, task_rows
from tests.tiny import build_tiny_model

PROTOCOL = GenerationProtocol(max_new_tokens=8, dtype="float32", batch_size=4)


def _plan(tasks, **limits):
    return EvalPlan(tuple(tasks), limits, PROTOCOL, (build_judge("keyword"),), seed=0, mc_batch_size=4)


def test_every_task_file_and_preset_is_valid():
    assert {"harmbench", "xstest-safe", "arc-easy", "piqa", "hellaswag", "mmlu", "gsm8k", "arith", "sciq",
            "drift"} <= set(TASKS)
    for name in ("demo", "quick", "standard", "generalization", "dev", "full"):
        preset = load_preset(name)
        assert set(preset.tasks) <= set(TASKS)
        assert set(preset.limits) <= set(preset.tasks)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("fast")


def test_the_generalization_tasks_read_the_held_out_halves():
    names = ("contrast-harmful", "contrast-benign", "everyday-requests", "public-knowledge")
    assert set(names) <= set(load_preset("generalization").tasks)
    rows = {name: task_rows(TASKS.get(name)) for name in names}
    assert {name: r.n_original for name, r in rows.items()} == {
        "contrast-harmful": 75, "contrast-benign": 75, "everyday-requests": 320, "public-knowledge": 120}
    assert (TASKS.get("contrast-harmful").kind, TASKS.get("contrast-benign").kind) == ("refusal", "over_refusal")
    assert len({r.data_sha256 for r in rows.values()}) == 4


def test_the_generalization_preset_puts_each_harmful_and_benign_family_side_by_side():
    """In-family and out-of-family tasks of both kinds, and the dev preset reads development rows only."""
    tasks = [TASKS.get(name) for name in load_preset("generalization").tasks]
    kinds = {(t.family, t.kind) for t in tasks if t.kind in ("refusal", "over_refusal", "jailbreak")}
    assert {("in", "refusal"), ("in", "over_refusal"), ("out", "refusal"), ("out", "over_refusal"),
            ("out", "jailbreak")} == kinds
    assert {TASKS.get(name).family for name in load_preset("dev").tasks} == {"dev"}


def test_task_rows_are_seeded_held_out_and_hashed():
    spec = TASKS.get("harmbench")
    first, again, other = task_rows(spec, 10, seed=0), task_rows(spec, 10, seed=0), task_rows(spec, 10, seed=1)
    assert first.rows == again.rows and first.data_sha256 == again.data_sha256
    assert first.rows != other.rows
    assert first.n_original == 200 and len(first.rows) == 10
    jail = task_rows(TASKS.get("jailbreak"), 3)
    for row in jail.rows:
        assert row.meta["behavior"] in row.prompt and "[INSERT PROMPT HERE]" not in row.prompt


_RUNNER_CALLS: list[tuple[str, int]] = []


def _count_rows(subject, spec, rows, plan, builder, report):
    _RUNNER_CALLS.append((spec.name, len(rows.rows)))
    builder.add_task(spec.name, version=spec.version, n_samples=len(rows.rows), n_original=rows.n_original)


def test_a_task_kind_registers_its_runner_and_the_task_files_name_only_registered_kinds(monkeypatch):
    from pydantic import ValidationError

    from safetypatch.eval.task import TASK_KINDS, TaskKind, TaskSpec

    assert {TASKS.get(name).kind for name in TASKS} <= set(TASK_KINDS)
    assert all(callable(TASK_KINDS.get(kind).run) for kind in TASK_KINDS)
    assert sorted(k for k in TASK_KINDS if TASK_KINDS.get(k).judged) == ["jailbreak", "over_refusal", "refusal"]
    monkeypatch.setitem(TASK_KINDS._entries, "count", TaskKind(f"{__name__}:_count_rows"))
    spec = TaskSpec(name="counted", dataset="harmbench", kind="count", split="eval", version=1, description="rows")
    monkeypatch.setitem(TASKS._entries, "counted", spec)
    _RUNNER_CALLS.clear()
    builder = run_tasks(ModelUnderTest(None, None), EvalPlan(("counted",), {"counted": 3}), ResultsBuilder("m"))
    assert _RUNNER_CALLS == [("counted", 3)] and "seconds" in builder.configs["counted"]
    with pytest.raises(ValidationError, match="unknown task kind 'refusals'\\. Did you mean 'refusal'"):
        TaskSpec(name="x", dataset="harmbench", kind="refusals", split="eval", version=1, description="x")


def test_run_tasks_writes_consistent_results(tmp_path):
    model, tok = build_tiny_model("llama")
    builder = ResultsBuilder("tiny-llama", fingerprint="f" * 64, generation_kwargs=PROTOCOL.to_dict())
    run_tasks(ModelUnderTest(model, tok), _plan(["harmbench", "xstest-safe", "arc-easy"], harmbench=4,
                                                **{"xstest-safe": 4, "arc-easy": 6}), builder)
    path = builder.write(tmp_path)
    results = read_results(path)
    judge_id = "keyword_v2_w256"
    refusal = results.metric("harmbench", "refusal_rate", judge_id)
    asr = results.metric("harmbench", "asr", judge_id)
    assert refusal.n == 4 and refusal.value + asr.value == pytest.approx(1.0)
    samples = read_samples(path.parent / next(p.name for p in path.parent.glob("samples_harmbench_*.jsonl")))
    refused = [s["verdicts"][judge_id]["refused"] for s in samples]
    assert refusal.value == pytest.approx(sum(refused) / 4)
    assert all("templated_prompt_sha256" in s and s["finish_reason"] in ("eos", "length") for s in samples)
    empty = results.metric("harmbench", "empty_rate", "none")
    assert empty.n == 4 and empty.value == pytest.approx(sum(not s["response"].strip() for s in samples) / 4)
    acc = results.metric("arc-easy", "acc", "none")
    arc = read_samples(next(path.parent.glob("samples_arc-easy_*.jsonl")))
    assert acc.n == 6 and acc.value == pytest.approx(sum(s["acc"] for s in arc) / 6)
    data = json.loads(path.read_text())
    assert data["n-samples"]["arc-easy"] == {"original": 570, "effective": 6}
    assert set(data["config"]["data"]) == {"harmbench", "xstest-safe", "arc-easy"}
    assert data["higher_is_better"]["xstest-safe"] == {"over_refusal_rate": False, "empty_rate": False}
    assert judge_id in data["config"]["judges"]


def test_drift_is_zero_against_itself_and_positive_against_a_perturbed_copy(tmp_path):
    model, tok = build_tiny_model("llama")
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(0.05 * torch.randn_like(param))
    values = {}
    for name, reference in (("same", model), ("moved", perturbed)):
        builder = ResultsBuilder("tiny", generation_kwargs=PROTOCOL.to_dict())
        run_tasks(ModelUnderTest(model, tok, reference), _plan(["drift"], drift=3), builder)
        values[name] = read_results(builder.write(tmp_path / name)).metric("drift", "kl", "reference").value
    assert values["same"] == pytest.approx(0.0, abs=1e-6)
    assert values["moved"] > 1e-3


def test_drift_without_reference_and_safety_without_judges_are_refused():
    model, tok = build_tiny_model("llama")
    with pytest.raises(ConfigError, match="reference model"):
        run_tasks(ModelUnderTest(model, tok), _plan(["drift"], drift=2), ResultsBuilder("tiny"))
    plan = EvalPlan(("harmbench",), {"harmbench": 2}, PROTOCOL, ())
    with pytest.raises(ConfigError, match="judge"):
        run_tasks(ModelUnderTest(model, tok), plan, ResultsBuilder("tiny"))


def test_vllm_parity_gate(monkeypatch):
    """The gate compares real HF generations with what the engine returns; the engine itself needs a GPU."""
    import dataclasses

    from safetypatch.eval.backends import vllm as vllm_backend
    from safetypatch.eval.evaluator import check_vllm_parity
    from safetypatch.eval.generate import generate_chat

    model, tok = build_tiny_model("llama")
    prompts = ["hello", "how are you", "tell me a story"]
    reference = generate_chat(model, tok, prompts, PROTOCOL)
    monkeypatch.setattr(vllm_backend, "generate_vllm", lambda *a, **k: reference)
    subject = ModelUnderTest(model, tok, vllm=object())
    assert check_vllm_parity(subject, prompts, PROTOCOL) == {"n": 3, "exact": 3, "token_agreement": 1.0}
    shifted = [dataclasses.replace(g, token_ids=tuple((t + 1) % 256 for t in g.token_ids)) for g in reference]
    monkeypatch.setattr(vllm_backend, "generate_vllm", lambda *a, **k: shifted)
    with pytest.raises(ConfigError, match="agree on only"):
        check_vllm_parity(subject, prompts, PROTOCOL)
