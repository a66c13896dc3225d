"""Loading and greedy prompting of a causal-LM judge (Llama-Guard, HarmBench classifier) with transformers
(docs/methods.md §4.3, §5.9).

Judge weights do not ship offline (no PyPI package carries them): users load them by Hub id (gated licences need a
logged-in account) or from a local folder; tests use tiny random models. Every judge records the requested revision,
the resolved commit and a hash of its prompt template, so a number can be traced to the exact judge.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from safetypatch.errors import JudgeError
from safetypatch.eval.judges.base import ConfiguredJudge, JudgeConfig, Verdict, check_pairs, escape_chat_control

logger = logging.getLogger(__name__)


class HFJudgeConfig(JudgeConfig):
    """Options shared by transformers model judges.

    Attributes:
        model: Hub id (``meta-llama/Llama-Guard-3-8B``) or a local folder.
        revision: Hub branch, tag or commit; pin a commit for reproducible numbers.
        dtype: weight dtype; ``auto`` is bfloat16 on CUDA and float32 on CPU.
        device: torch device; ``None`` picks CUDA when available.
        batch_size: prompts per ``generate`` call (left padding).
        max_new_tokens: greedy generation budget of the judge.
    """

    model: str = Field(description="Hub id or local folder of the judge model")
    revision: str | None = Field(None, description="Hub revision; pin a commit for reproducibility")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weight dtype")
    device: str | None = Field(None, description="torch device (default: cuda if available, else cpu)")
    batch_size: int = Field(8, gt=0, description="prompts per generate call")
    max_new_tokens: int = Field(16, gt=0, description="greedy generation budget")


@dataclass
class JudgeModel:
    """A loaded judge: model, tokenizer, and where they came from.

    Attributes:
        model: the causal LM, in eval mode on its device.
        tokenizer: its tokenizer, padding on the left.
        model_id: what was requested (Hub id or path).
        revision: the requested revision.
        commit: the commit transformers resolved from the Hub, if any.
    """

    model: Any
    tokenizer: Any
    model_id: str
    revision: str | None
    commit: str | None

    @property
    def version(self) -> str:
        """Short version tag for a judge id: the commit, else the requested revision, else ``local``."""
        return (self.commit or "")[:12] or self.revision or "local"

    def special_tokens(self) -> list[str]:
        """Every special token of the tokenizer, escaped in responses before judging."""
        added = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        return sorted(set(self.tokenizer.all_special_tokens) | set(added))

    def escape(self, text: str) -> str:
        """``escape_chat_control`` with this tokenizer's special tokens added."""
        return escape_chat_control(text, self.special_tokens())


def load_judge_model(config: HFJudgeConfig) -> JudgeModel:
    """Load a judge model and tokenizer by Hub id or local folder.

    Args:
        config: model, revision, dtype and device.

    Returns:
        The ``JudgeModel``.

    Raises:
        JudgeError: the model cannot be found, is gated, or fails to load; the message names it and the fixes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, revision=config.revision)
        model = AutoModelForCausalLM.from_pretrained(config.model, revision=config.revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        local = Path(config.model).expanduser().exists()
        hint = ("the folder needs config.json, weights and a tokenizer" if local else
                "check the Hub id and revision; for a gated model (Llama-Guard) accept its licence on the Hub and "
                "log in with `hf auth login`; offline, download it elsewhere and pass the local folder")
        raise JudgeError(f"cannot load judge model {config.model!r} (revision {config.revision}): {exc}. "
                         f"Fix: {hint}.") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    commit = getattr(model.config, "_commit_hash", None)
    logger.info("loaded judge %s (revision %s, commit %s) on %s in %s", config.model, config.revision, commit,
                device, dtype)
    return JudgeModel(model.to(device).eval(), tokenizer, config.model, config.revision, commit)


def greedy_generate(judge: JudgeModel, texts: list[str], max_new_tokens: int, batch_size: int,
                    add_special_tokens: bool) -> list[str]:
    """Generate greedily from fully rendered prompts and return only the new text of each.

    Args:
        judge: the loaded judge.
        texts: rendered prompts (chat template or prompt template already applied).
        max_new_tokens: generation budget.
        batch_size: prompts per ``generate`` call.
        add_special_tokens: let the tokenizer add BOS (``False`` when a chat template already wrote it).

    Returns:
        The decoded continuations, special tokens skipped, in the order of ``texts``.
    """
    import torch

    tok, model = judge.tokenizer, judge.model
    outputs: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=add_special_tokens).to(model.device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
            outputs.extend(tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def text_sha256(text: str) -> str:
    """Hex sha256 of a prompt or chat template, recorded as the judge's prompt hash."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def judge_slug(prefix: str, judge: JudgeModel) -> str:
    """``<prefix>_<model name>_<version>``: a judge id safe to use as a results filter name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(judge.model_id.rstrip("/")).name)
    return f"{prefix}_{name}_{judge.version}"


class GenerativeJudge(ConfiguredJudge):
    """A judge that renders (prompt, response) pairs into judge prompts, generates greedily and parses each answer;
    subclasses set ``render``, ``parse`` and whether the tokenizer adds special tokens."""

    config: HFJudgeConfig
    judge_model: JudgeModel
    add_special_tokens: bool = False

    def render(self, prompts: list[str], responses: list[str]) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def parse(output: str) -> Verdict:
        raise NotImplementedError

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """Judge each pair; unparseable answers become error verdicts.

        Raises:
            JudgeError: the two lists differ in length or hold non-strings.
        """
        check_pairs(self.judge_id, prompts, responses)
        outputs = greedy_generate(self.judge_model, self.render(prompts, responses), self.config.max_new_tokens,
                                  self.config.batch_size, add_special_tokens=self.add_special_tokens)
        return [self.parse(o) for o in outputs]
