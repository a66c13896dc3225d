"""Running one generated-answer task through the evaluator on a tiny random model."""

from __future__ import annotations

from safetypatch.eval.evaluator import EvalPlan, ModelUnderTest, run_tasks
from safetypatch.eval.generate import GenerationProtocol
from safetypatch.eval.results import Results, ResultsBuilder, read_results
from tests.tiny import build_tiny_model

PROTOCOL = GenerationProtocol(max_new_tokens=8, dtype="float32", batch_size=4)


def run_task(tmp_path, task: str, limit: int) -> tuple[Results, list[dict]]:
    """The results and the samples of ``task`` on ``limit`` rows, answered by a tiny llama."""
    model, tok = build_tiny_model("llama")
    builder = ResultsBuilder("tiny-llama", generation_kwargs=PROTOCOL.to_dict())
    run_tasks(ModelUnderTest(model, tok), EvalPlan((task,), {task: limit}, PROTOCOL), builder)
    results = read_results(builder.write(tmp_path))
    return results, results.samples(task)
