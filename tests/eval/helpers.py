"""Running one generated-answer task through the evaluator on a tiny random model, or on scripted replies."""

from __future__ import annotations

from safetypatch.eval import evaluator
from safetypatch.eval.evaluator import EvalPlan, ModelUnderTest, run_tasks
from safetypatch.eval.generate import Generation, GenerationProtocol
from safetypatch.eval.results import Results, ResultsBuilder, read_results
from safetypatch.eval.task import TASKS, task_rows
from tests.tiny import build_tiny_model

PROTOCOL = GenerationProtocol(max_new_tokens=8, dtype="float32", batch_size=4)


def run_task(tmp_path, task: str, limit: int) -> tuple[Results, list[dict]]:
    """The results and the samples of ``task`` on ``limit`` rows, answered by a tiny llama."""
    model, tok = build_tiny_model("llama")
    builder = ResultsBuilder("tiny-llama", generation_kwargs=PROTOCOL.to_dict())
    run_tasks(ModelUnderTest(model, tok), EvalPlan((task,), {task: limit}, PROTOCOL), builder)
    results = read_results(builder.write(tmp_path))
    return results, results.samples(task)


def run_task_with_replies(tmp_path, monkeypatch, task: str, replies, prompt_prefix: str = ""):
    """:func:`run_task` on ``len(replies)`` rows where row ``i`` is answered ``replies[i](its gold answer)``; the
    task sends each row's prompt as ``prompt_prefix + prompt``."""
    rows = task_rows(TASKS.get(task), len(replies)).rows
    gold = {prompt_prefix + row.prompt: row.answer for row in rows}

    def oracle(model, tokenizer, prompts, protocol, progress=None):
        return [Generation(p, reply(gold[p]), 4, "eos", "0" * 64) for p, reply in zip(prompts, replies, strict=True)]

    monkeypatch.setattr(evaluator, "generate_chat", oracle)
    return run_task(tmp_path, task, len(replies))
