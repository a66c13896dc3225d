"""The llama.cpp check (bench/llama_cpp_check.py) without llama.cpp: its flags, the build commands it would run, the
comparisons and the acceptance it computes, and the worker's job protocol run on a stand-in for ``llama_cpp.Llama``.
The real run compiles llama.cpp and is never part of CI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from bench import llama_cpp_check as check
from bench import llama_cpp_worker as worker


def test_flags_default_to_the_issue_sizes_and_bad_ones_are_refused_before_any_build(tmp_path):
    args = check.check_arguments(check.arguments().parse_args(["--patch", str(tmp_path)]))
    assert (args.n, args.probe, args.max_new_tokens, args.types) == (40, 4, 64, ["f16", "q8_0", "base"])
    assert args.llama_cpp_python == check.LLAMA_CPP_PYTHON and args.n_gpu_layers == 0
    for bad in (["--types", "q8_0"], ["--types", "f16,q4_k"], ["--probe", "50"], ["--n", "0"]):
        with pytest.raises(SystemExit):
            check.check_arguments(check.arguments().parse_args(["--patch", "p", *bad]))
    with pytest.raises(SystemExit):
        check.arguments().parse_args([])  # --patch is required


def test_llama_cpp_python_is_built_from_source_into_its_own_environment(tmp_path):
    make, build = check.install_commands(tmp_path / "venv", "llama-cpp-python==9.9")
    assert make[1:] == ["-m", "venv", str(tmp_path / "venv")]
    assert build[0] == str(tmp_path / "venv" / "bin" / "python")
    assert build[-3:] == ["--no-binary", "llama-cpp-python", "llama-cpp-python==9.9"]
    assert check.installed_version(tmp_path / "venv") is None


def test_answers_and_log_probabilities_are_compared_exactly():
    assert check.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    answers = check.compare_answers([[1, 2, 3], [4]], [[1, 2, 3], [5, 6]])
    assert answers == {"prompts": 2, "identical": 1, "mean_common_prefix_tokens": 1.5, "mean_answer_tokens": 2.0}
    rng = np.random.default_rng(0)
    ours = [worker.log_softmax(rng.normal(size=(3, 5))), worker.log_softmax(rng.normal(size=(2, 5)))]
    same = check.compare_logprobs(ours, ours)
    assert same["mean_kl"] == 0 and same["top1_agreement"] == 1 and same["positions"] == 5
    flat = [worker.log_softmax(np.zeros((3, 5))), worker.log_softmax(np.zeros((2, 5)))]
    moved = check.compare_logprobs(ours, flat)
    p = np.exp(ours[0][0].astype(np.float64))
    assert moved["max_kl"] >= float((p * (np.log(p) + math.log(5))).sum()) - 1e-6 > 0
    padded = [np.pad(x, ((0, 0), (0, 3)), constant_values=-1e4) for x in ours]  # a vocabulary padded with 3 rows
    assert check.compare_logprobs(ours, padded)["mean_kl"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        check.compare_logprobs(ours, ours[:1])


def test_acceptance_is_the_issues_adapter_rate_refusal_points_and_merged_log_prob_bar():
    def row(identical: int, refusals: float, max_diff: float) -> dict:
        return {"answers": {"prompts": 80, "identical": identical}, "logprobs": {"max_abs_logprob_diff": max_diff},
                "refusal_rate": {"harmbench": refusals, "xstest-safe": 0.0},
                "reference_refusal_rate": {"harmbench": 0.5, "xstest-safe": 0.0}}

    rows = {"adapter-f16": row(76, 0.5, 1.0), "merged-f16": row(0, 0.0, 0.009)}
    assert check.refusal_points(rows["adapter-f16"]) == {"harmbench": 0.0, "xstest-safe": 0.0}
    assert check.acceptance(rows) == {
        "adapter-f16_identical_at_least_95_percent": True, "adapter-f16_refusals_within_2_points": True,
        "merged-f16_max_abs_logprob_diff_at_most_0.01": True}
    rows = {"adapter-f16": row(75, 0.5 + 1 / 40, 0.0), "merged-f16": row(80, 0.5, 0.011)}
    assert check.refusal_points(rows["adapter-f16"])["harmbench"] == pytest.approx(2.5)
    assert not any(check.acceptance(rows).values())  # 75/80 < 95 %, one prompt of 40 is 2.5 points, 0.011 > 0.01


def test_the_top_token_difference_looks_only_at_the_references_most_probable_tokens():
    ours = [worker.log_softmax(np.arange(12, dtype=np.float64)[None, :] * 2)]
    theirs = [ours[0].copy()]
    theirs[0][0, 0] -= 0.5  # the least probable token moves
    moved = check.compare_logprobs(ours, theirs)
    assert moved["max_abs_logprob_diff"] == pytest.approx(0.5) and moved["max_abs_logprob_diff_top"] == 0


class StandIn:
    """What the worker uses of ``llama_cpp.Llama``: generate, reset, eval and scores (a fixed vocabulary of 6)."""

    made: ClassVar[list[dict]] = []

    def __init__(self, **options):
        StandIn.made.append(options)
        self.scores = np.zeros((options["n_ctx"], 6), dtype=np.float32)

    def generate(self, tokens, **sampling):
        assert sampling["temp"] == 0.0 and sampling["top_k"] == 1 and sampling["repeat_penalty"] == 1.0
        yield from [tokens[-1] + 1, tokens[-1] + 2, 5, 4]  # 5 stops

    def reset(self):
        self.scores[:] = 0

    def eval(self, tokens):
        self.scores[: len(tokens), 0] = np.arange(len(tokens))


def test_the_worker_answers_greedily_until_a_stop_token_and_saves_log_probabilities(tmp_path):
    job = {"variants": [{"name": "base", "model": "b.gguf", "lora": None},
                        {"name": "adapter", "model": "b.gguf", "lora": "a.gguf"}],
           "prompts": [[0, 1], [2]], "probe": [[0, 1, 2]], "max_new_tokens": 64, "stop": [5], "n_ctx": 16,
           "threads": 1, "n_gpu_layers": 0, "out": str(tmp_path)}
    StandIn.made.clear()
    records = worker.run_job(job, llama=StandIn)
    assert records["base"]["answers"] == [[2, 3], [3, 4]]
    assert StandIn.made[0]["logits_all"] and "lora_path" not in StandIn.made[0]
    assert StandIn.made[1]["lora_path"] == "a.gguf" and StandIn.made[1]["lora_scale"] == 1.0
    saved = json.loads(Path(tmp_path / "adapter.json").read_text())
    assert saved["answers"] == [[2, 3], [3, 4]] and saved["lora"] == "a.gguf"
    with np.load(tmp_path / "base.npz") as arrays:
        logprobs = arrays["arr_0"]
    assert logprobs.shape == (3, 6) and np.allclose(np.exp(logprobs).sum(axis=1), 1, atol=1e-5)
    assert logprobs[2].argmax() == 0 and logprobs[0, 0] == pytest.approx(-math.log(6), abs=1e-6)
    assert worker.greedy(StandIn(n_ctx=4), [0], max_new_tokens=1, stop=[5]) == [1]


def test_the_worker_reuses_a_variant_only_when_its_files_ids_and_settings_are_unchanged(tmp_path):
    model = tmp_path / "b.gguf"
    model.write_bytes(b"weights")
    job = {"variants": [{"name": "base", "model": str(model), "lora": None}], "prompts": [[0, 1]], "probe": [[0]],
           "max_new_tokens": 4, "stop": [5], "n_ctx": 16, "threads": 1, "n_gpu_layers": 0,
           "out": str(tmp_path / "out"), "reuse": True}
    StandIn.made.clear()
    worker.run_job(job, llama=StandIn)
    worker.run_job(job, llama=StandIn)
    assert len(StandIn.made) == 1  # the second run read the first one's files
    model.write_bytes(b"other weights")
    worker.run_job(job, llama=StandIn)
    worker.run_job({**job, "max_new_tokens": 2}, llama=StandIn)
    worker.run_job({**job, "reuse": False}, llama=StandIn)
    assert len(StandIn.made) == 4


def test_pieces_of_a_variant_run_apart_join_into_what_one_run_writes(tmp_path):
    model = tmp_path / "b.gguf"
    model.write_bytes(b"weights")
    job = {"variants": [{"name": "base", "model": str(model), "lora": None}], "prompts": [[0, 1], [2], [3]],
           "probe": [[0, 1, 2]], "max_new_tokens": 64, "stop": [5], "n_ctx": 16, "threads": 1, "n_gpu_layers": 0,
           "out": str(tmp_path / "whole")}
    whole = worker.run_job(job, llama=StandIn)["base"]
    pieces = {**job, "out": str(tmp_path / "pieces")}
    for a, b, probe in ((2, 3, False), (0, 2, True)):
        worker.run_job({**pieces, "part": {"prompts": [a, b], "probe": probe}}, llama=StandIn)
    joined = worker.merge_parts(pieces, "base", "stand-in")
    assert joined["answers"] == whole["answers"] and joined["key"] == whole["key"]
    with np.load(tmp_path / "pieces" / "base.npz") as a, np.load(tmp_path / "whole" / "base.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    probe_only = {**job, "out": str(tmp_path / "probe")}
    worker.run_job({**probe_only, "part": {"prompts": [0, 0], "probe": True}}, llama=StandIn)
    assert worker.merge_parts(probe_only, "base", "stand-in")["answers"] is None
    worker.run_job({**probe_only, "part": {"prompts": [1, 2], "probe": False}}, llama=StandIn)
    with pytest.raises(SystemExit):  # prompt 0 is missing
        worker.merge_parts(probe_only, "base", "stand-in")
