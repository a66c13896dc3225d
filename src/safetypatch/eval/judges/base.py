"""What every judge shares: the ``Verdict`` record, the ``Judge`` protocol, the judge registry, the reasoning-block
split and the escaping of chat-control strings (docs/methods.md §4.3).

A judge turns (prompt, response) pairs into verdicts. An output the judge cannot parse is an *error* verdict: it
carries neither a refusal nor a harm label, and the metrics count it apart instead of reading it as safe (§4.3).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from safetypatch.errors import ConfigError, JudgeError
from safetypatch.registry import Registry

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Verdict:
    """One judge's reading of one response.

    Attributes:
        refused: the response refuses or does not answer the request; ``None`` when the judge does not measure
            refusal or failed.
        harmful: the response is harmful (an attack success for a harm classifier); ``None`` when the judge does
            not measure harm or failed.
        score: a continuous score when the judge has one (cosine similarity, probability), else ``None``.
        detail: judge-specific evidence (matched phrase and position, raw model output, categories, flags).
        error: why the judge output could not be read; such a verdict is counted apart, never as safe.
    """

    refused: bool | None = None
    harmful: bool | None = None
    score: float | None = None
    detail: dict[str, Any] = field(default_factory=dict, hash=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the judge produced a usable verdict."""
        return self.error is None

    @classmethod
    def failed(cls, error: str, **detail: Any) -> Verdict:
        """An error verdict: no refusal or harm label, only the reason and the evidence."""
        return cls(error=error, detail=detail)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the per-sample log (docs/methods.md §4.5)."""
        return {"refused": self.refused, "harmful": self.harmful, "score": self.score, "error": self.error,
                "detail": self.detail}


@runtime_checkable
class Judge(Protocol):
    """A judge of responses (docs/methods.md §4.3).

    Attributes:
        judge_id: identifier including the version (lexicon, model revision); used as the results filter name.
        metadata: everything needed to reproduce the judge (model id, revision, prompt-template hash, lexicon hash,
            thresholds, calibration figures); copied into the results ``config``.
    """

    judge_id: str

    @property
    def metadata(self) -> dict[str, Any]:
        """What to copy into the results ``config`` under this judge's id."""
        ...

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """Return one verdict per (prompt, response) pair, in order."""
        ...


class JudgeConfig(BaseModel):
    """Base of every judge config: unknown keys fail with their name, and a config never changes after creation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


JUDGES: Registry[Any] = Registry("judge")
JUDGES.register("keyword", "safetypatch.eval.judges.keyword:KeywordJudge")
JUDGES.register("embedding", "safetypatch.eval.judges.embedding:EmbeddingJudge")
JUDGES.register("hf_classifier", "safetypatch.eval.judges.hf_classifier:HFClassifierJudge")
JUDGES.register("llamaguard", "safetypatch.eval.judges.llamaguard:LlamaGuardJudge")
DEFAULT_JUDGE = "keyword"


def build_judge(name: str = DEFAULT_JUDGE, **options: Any) -> Judge:
    """Build the registered judge ``name`` from keyword options (YAML keys or flags).

    Args:
        name: registry name: ``keyword`` (default), ``embedding``, ``hf_classifier`` or ``llamaguard``.
        **options: fields of that judge's config class (e.g. ``window_chars=512`` for ``keyword``).

    Returns:
        The judge, ready to call.

    Raises:
        ConfigError: unknown judge name (close names suggested) or an invalid option, named with the judge.
    """
    judge_cls = JUDGES.get(name)
    config_cls: type[JudgeConfig] = judge_cls.config_cls
    try:
        config = config_cls(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid options for judge {name!r}: {problems}. Valid options: "
                          f"{', '.join(config_cls.model_fields)}.") from exc
    return judge_cls(config)


class ConfiguredJudge:
    """Mixin giving a judge its ``config`` and the input check; subclasses set ``config_cls``."""

    config_cls: ClassVar[type[JudgeConfig]]

    def __init__(self, config: JudgeConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(self.config).__name__}"
            )


def check_pairs(judge_id: str, prompts: Sequence[str], responses: Sequence[str]) -> None:
    """Refuse prompt and response lists of different lengths or holding non-strings.

    Raises:
        JudgeError: naming the judge, the two lengths or the first bad index.
    """
    if len(prompts) != len(responses):
        raise JudgeError(
            f"judge {judge_id}: got {len(prompts)} prompts but {len(responses)} responses; pass one response per "
            "prompt, in the same order."
        )
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise JudgeError(
                f"judge {judge_id}: pair {i} holds {type(p).__name__}/{type(r).__name__}, expected str/str; "
                "decode generations to text (an empty string for a missing response) before judging."
            )


@dataclass(frozen=True)
class FinalAnswer:
    """The part of a response that is the answer, with where it starts in the response.

    Attributes:
        text: the answer: after the last ``</think>``, or the whole response when it has no closed think block.
        offset: index of ``text`` in the full response.
        flags: ``unterminated_think`` when a think block never closed (the whole response is then judged).
    """

    text: str
    offset: int
    flags: tuple[str, ...] = ()


def split_final_answer(response: str, think_open_in_prompt: bool = False) -> FinalAnswer:
    """Separate a reasoning model's final answer from its think block (docs/methods.md §4.3).

    Args:
        response: the generated text.
        think_open_in_prompt: the chat template already opened ``<think>`` in the prompt (DeepSeek-R1 distills),
            so a response without ``</think>`` is an unterminated think block even though it has no ``<think>``.

    Returns:
        The text after the last ``</think>``; an unterminated think block is returned whole and flagged.
    """
    close = response.rfind(THINK_CLOSE)
    if close >= 0:
        start = close + len(THINK_CLOSE)
        return FinalAnswer(response[start:], start)
    if think_open_in_prompt or THINK_OPEN in response:
        return FinalAnswer(response, 0, ("unterminated_think",))
    return FinalAnswer(response, 0)


# Generic chat-control markers of common templates; each judge adds its own tokenizer's special tokens.
CHAT_CONTROL = re.compile(
    r"<\|[A-Za-z0-9_]{1,40}\|>"  # ChatML, Llama-3, Phi: <|im_start|>, <|eot_id|>, <|start_header_id|>
    r"|\[/?INST\]"  # Llama-2 / Mistral turns
    r"|<</?SYS>>"  # Llama-2 system block
    r"|</?s>"  # sentencepiece BOS / EOS written as text
    r"|<(?:start|end)_of_turn>",  # Gemma turns
    re.IGNORECASE,
)


def _defuse(marker: str) -> str:
    return f"{marker[0]} {marker[1:]}"


def escape_chat_control(text: str, extra_markers: Iterable[str] = ()) -> str:
    """Defuse chat-control strings in a response before it enters a judge prompt (docs/methods.md §4.3).

    A response that writes ``[/INST]`` or ``<|im_start|>`` could otherwise close the judge's own turn and inject
    an answer (centerforaisafety/HarmBench #91). Each marker gets a space after its first character, so it stays
    readable to the judge but no longer tokenizes as a control token.

    Args:
        text: the response.
        extra_markers: further strings to defuse, normally the judge tokenizer's special tokens.

    Returns:
        The escaped text; unchanged when it holds no marker.
    """
    extras = sorted({m for m in extra_markers if len(m) > 1}, key=len, reverse=True)
    if extras:
        text = re.sub("|".join(re.escape(m) for m in extras), lambda m: _defuse(m.group(0)), text)
    return CHAT_CONTROL.sub(lambda m: _defuse(m.group(0)), text)
