"""Run evaluation tasks on a loaded model and assemble lm-eval-shaped results (docs/methods.md §4)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from safetypatch.errors import ConfigError
from safetypatch.eval import gsm8k, short_answer
from safetypatch.eval.drift import measure_drift
from safetypatch.eval.generate import Generation, GenerationProtocol, generate_chat
from safetypatch.eval.judges import Judge, Verdict
from safetypatch.eval.metrics import MetricValue, mean_metric, over_refusal_rate, refusal_rate
from safetypatch.eval.metrics import asr as attack_success_rate
from safetypatch.eval.multiple_choice import accuracy, format_item, score_multiple_choice
from safetypatch.eval.results import ResultsBuilder, sample_rows
from safetypatch.eval.task import TASKS, TaskRows, TaskSpec, task_rows

logger = logging.getLogger(__name__)

TaskProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalPlan:
    """What to run: task names, per-task row limits, the generation protocol, judges and the seed.

    Attributes:
        tasks: task names (``safetypatch ls tasks``).
        limits: task → most rows evaluated (a seeded sample); absent = every row.
        protocol: the pinned generation protocol of safety tasks.
        judges: built judges; the first one is the headline filter.
        seed: seed of row sampling and template choice.
        mc_batch_size: items per forward in multiple-choice scoring.
    """

    tasks: tuple[str, ...]
    limits: dict[str, int] = field(default_factory=dict)
    protocol: GenerationProtocol = field(default_factory=GenerationProtocol)
    judges: tuple[Judge, ...] = ()
    seed: int = 0
    mc_batch_size: int = 8


@dataclass(frozen=True)
class ModelUnderTest:
    """The evaluated model, its tokenizer, an optional reference (for drift) sharing the tokenizer, and an optional
    vLLM engine that generates in place of the HF model once it has passed the parity gate, serving ``vllm_adapter``
    (a :class:`~safetypatch.eval.backends.vllm.VllmAdapter`: the patch ``model`` carries) when given."""

    model: Any
    tokenizer: Any
    reference: Any | None = None
    vllm: Any | None = None
    vllm_adapter: Any | None = None


MIN_PARITY = 0.9
PARITY_PROMPTS = 16


def check_vllm_parity(subject: ModelUnderTest, prompts: Sequence[str], protocol: GenerationProtocol) -> dict:
    """Generate the first prompts with both backends and refuse vLLM when greedy tokens agree too little
    (docs/methods.md §4.4: HF is the reference backend; vLLM is gated by a parity check).

    Raises:
        ConfigError: token agreement below ``MIN_PARITY``.
    """
    from safetypatch.eval.backends.vllm import generate_vllm, parity_check

    head = list(prompts[:PARITY_PROMPTS])
    report = parity_check(generate_chat(subject.model, subject.tokenizer, head, protocol),
                          generate_vllm(subject.vllm, subject.tokenizer, head, protocol, subject.vllm_adapter),
                          n=len(head))
    if report.token_agreement < MIN_PARITY:
        raise ConfigError(
            f"vLLM and HF greedy generations agree on only {report.token_agreement:.1%} of tokens over {report.n} "
            f"prompts (gate {MIN_PARITY:.0%}); check dtype and vLLM version, or use backend='hf'."
        )
    return {"n": report.n, "exact": report.exact, "token_agreement": report.token_agreement}


def run_tasks(subject: ModelUnderTest, plan: EvalPlan, builder: ResultsBuilder,
              progress: TaskProgress | None = None) -> ResultsBuilder:
    """Evaluate every task of ``plan`` and record metrics, data hashes and samples into ``builder``.

    Raises:
        ConfigError: an unknown task, a safety task without judges, or drift without a reference model.
    """
    specs = [TASKS.get(name) for name in plan.tasks]
    if any(spec.task_kind.judged for spec in specs) and not plan.judges:
        raise ConfigError("safety tasks need at least one judge; pass judges=['keyword'].")
    for judge in plan.judges:
        builder.add_judge(judge, judge.metadata.get("calibration"))
    if subject.vllm is not None:
        first = next((s for s in specs if s.task_kind.judged), None)
        prompts = [row.prompt for row in task_rows(first, PARITY_PROMPTS, plan.seed).rows] if first else []
        parity = check_vllm_parity(subject, prompts, plan.protocol) if prompts else None
        lora = subject.vllm_adapter.engine_kwargs() if subject.vllm_adapter is not None else None
        builder.config["backend"] = {"name": "vllm", "parity": parity, "lora": lora}
    for spec in specs:
        rows = task_rows(spec, plan.limits.get(spec.name), plan.seed)
        report = (lambda done, total, name=spec.name: progress(name, done, total)) if progress else None
        logger.info("task %s: %d of %d rows", spec.name, len(rows.rows), rows.n_original)
        builder.add_data(spec.name, rows.data_sha256, rows.source)
        start = time.perf_counter()
        spec.task_kind.run(subject, spec, rows, plan, builder, report)
        builder.configs[spec.name]["seconds"] = round(time.perf_counter() - start, 1)
    return builder


def _add_task(builder: ResultsBuilder, spec: TaskSpec, rows: TaskRows, **config: Any) -> None:
    builder.add_task(spec.name, version=spec.version, n_samples=len(rows.rows), n_original=rows.n_original,
                     config={"dataset": spec.dataset, "kind": spec.kind, "split": spec.split, "family": spec.family,
                             **({"form": spec.form} if spec.form else {}), **config})


def _generate(subject: ModelUnderTest, spec: TaskSpec, prompts: Sequence[str], plan: EvalPlan,
              report: Callable[[int, int], None] | None) -> tuple[GenerationProtocol, list[Generation]]:
    protocol = plan.protocol
    if spec.max_new_tokens is not None:
        protocol = protocol.model_copy(update={"max_new_tokens": spec.max_new_tokens})
    if subject.vllm is not None:
        from safetypatch.eval.backends.vllm import generate_vllm

        return protocol, generate_vllm(subject.vllm, subject.tokenizer, list(prompts), protocol,
                                       subject.vllm_adapter, progress=report)
    return protocol, generate_chat(subject.model, subject.tokenizer, list(prompts), protocol, progress=report)


def run_judged(subject: ModelUnderTest, spec: TaskSpec, rows: TaskRows, plan: EvalPlan,
                builder: ResultsBuilder, report: Callable[[int, int], None] | None) -> None:
    """A safety task (refusal, over-refusal, jailbreak): generate, judge with every judge, record the rates."""
    prompts = [row.prompt for row in rows.rows]
    protocol, generations = _generate(subject, spec, prompts, plan, report)
    responses = [g.response for g in generations]
    verdicts: dict[str, list[Verdict]] = {j.judge_id: j.judge(prompts, responses) for j in plan.judges}
    _add_task(builder, spec, rows, generation_kwargs=protocol.to_dict())
    for judge_id, judged in verdicts.items():
        for metric, value, higher in _safety_metrics(spec, judged, plan.seed):
            builder.add_metric(spec.name, metric, judge_id, value, higher)
    _add_empty_rate(builder, spec.name, responses, plan.seed)
    samples = sample_rows(prompts, responses, verdicts)
    for sample, gen in zip(samples, generations, strict=True):
        sample.update(templated_prompt_sha256=gen.templated_prompt_sha256, n_new_tokens=gen.n_new_tokens,
                      finish_reason=gen.finish_reason)
    builder.add_samples(spec.name, samples)


def _add_empty_rate(builder: ResultsBuilder, task: str, responses: Sequence[str], seed: int) -> None:
    """The share of answers that are empty (the model ended its turn at once): judges count an empty answer to a
    harmful prompt as a refusal, so this tells a silenced model from a refusing one."""
    builder.add_metric(task, "empty_rate", "none", mean_metric([float(not r.strip()) for r in responses], seed=seed),
                       False)


def _safety_metrics(spec: TaskSpec, verdicts: list[Verdict], seed: int) -> list[tuple[str, MetricValue, bool]]:
    if spec.task_kind.prompts == "benign":
        return [("over_refusal_rate", over_refusal_rate(verdicts, seed), False)]
    return [("refusal_rate", refusal_rate(verdicts, seed), True), ("asr", attack_success_rate(verdicts, seed), False)]


def run_multiple_choice(subject: ModelUnderTest, spec: TaskSpec, rows: TaskRows, plan: EvalPlan,
                        builder: ResultsBuilder, report: Callable[[int, int], None] | None) -> None:
    """A multiple-choice task: log-likelihood of each continuation, acc and acc_norm."""
    items = [format_item(spec.name, row) for row in rows.rows]
    scores = score_multiple_choice(subject.model, subject.tokenizer, [i.context for i in items],
                                   [i.continuations for i in items], batch_size=plan.mc_batch_size, progress=report)
    answers = [int(row.answer) for row in rows.rows]
    acc, acc_norm = accuracy(scores, answers)
    _add_task(builder, spec, rows, num_fewshot=0, output_type="multiple_choice")
    builder.add_metric(spec.name, "acc", "none", mean_metric(acc, seed=plan.seed), True)
    builder.add_metric(spec.name, "acc_norm", "none", mean_metric(acc_norm, seed=plan.seed), True)
    builder.add_samples(spec.name, [
        {"doc_id": k, "prompt": item.context, "choices": list(item.continuations), "answer": answers[k],
         "loglikelihoods": list(score.loglikelihoods), "acc": acc[k], "acc_norm": acc_norm[k]}
        for k, (item, score) in enumerate(zip(items, scores, strict=True))
    ])


@dataclass(frozen=True)
class _ExactMatch:
    """How a generated-answer kind is asked and scored: the user turn for a row's prompt, the response-vs-gold check,
    and the filter name its ``exact_match`` is reported under."""

    chat_prompt: Callable[[str], str]
    is_correct: Callable[[str, str], bool]
    filter: str


def _run_exact_match(subject: ModelUnderTest, spec: TaskSpec, rows: TaskRows, plan: EvalPlan,
                     builder: ResultsBuilder, report: Callable[[int, int], None] | None, *,
                     scoring: _ExactMatch) -> None:
    prompts = [scoring.chat_prompt(row.prompt) for row in rows.rows]
    protocol, generations = _generate(subject, spec, prompts, plan, report)
    correct = [int(scoring.is_correct(g.response, str(row.answer)))
               for g, row in zip(generations, rows.rows, strict=True)]
    _add_task(builder, spec, rows, generation_kwargs=protocol.to_dict(), num_fewshot=0)
    builder.add_metric(spec.name, "exact_match", scoring.filter, mean_metric(correct, seed=plan.seed), True)
    _add_empty_rate(builder, spec.name, [g.response for g in generations], plan.seed)
    builder.add_samples(spec.name, [
        {"doc_id": k, "prompt": p, "response": g.response, "answer": str(row.answer), "exact_match": c}
        for k, (p, g, row, c) in enumerate(zip(prompts, generations, rows.rows, correct, strict=True))
    ])


run_gsm8k = partial(_run_exact_match, scoring=_ExactMatch(gsm8k.chat_prompt, gsm8k.is_correct, "flexible-extract"))
"""A gsm8k task: generated answers, the extracted number matched exactly against the gold one."""
run_short_answer = partial(_run_exact_match,
                           scoring=_ExactMatch(short_answer.chat_prompt, short_answer.is_correct, "first-line"))
"""A short-answer task: generated answers, the normalised first line matched exactly against the gold one."""


def run_drift(subject: ModelUnderTest, spec: TaskSpec, rows: TaskRows, plan: EvalPlan,
              builder: ResultsBuilder, report: Callable[[int, int], None] | None) -> None:
    """Drift: KL and NLL change against the reference model on the reference's own answers."""
    if subject.reference is None:
        raise ConfigError("the drift task needs a reference model (reference_model=... / --reference-model).")
    prompts = [row.prompt for row in rows.rows]
    reference = ModelUnderTest(subject.reference, subject.tokenizer)
    protocol, answers = _generate(reference, spec, prompts, plan, None)
    drift = measure_drift(subject.reference, subject.model, subject.tokenizer, answers, protocol, progress=report)
    _add_task(builder, spec, rows, generation_kwargs=protocol.to_dict())
    builder.add_metric(spec.name, "kl", "reference", mean_metric(drift.kl, seed=plan.seed), False)
    builder.add_metric(spec.name, "nll_delta", "reference", mean_metric(drift.nll_delta, seed=plan.seed), False)
    builder.add_samples(spec.name, [
        {"doc_id": k, "prompt": p, "reference_response": a.response, "kl": kl, "nll_delta": d}
        for k, (p, a, kl, d) in enumerate(zip(prompts, answers, drift.kl, drift.nll_delta, strict=True))
    ])

