"""Each benchmark runs end to end at a tiny size and writes its JSON (the real sizes run on a quiet machine:
bench/README.md). The figures are not checked here, only that every measurement, ratio and record is produced."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check, restore_bench, stream_bench, train_bench
from bench.generate_bench import main as generate_main
from safetypatch.errors import OutputExistsError

TINY_GB = "0.01"  # checkpoints of ~10 MB: the smallest hidden size with two layers and the 32k vocabulary


def _read(path) -> dict:
    document = json.loads(path.read_text())
    assert document["machine"]["versions"]["torch"] and document["command"].startswith("python -m bench.")
    return document


def test_stream_and_restore_benchmarks_measure_streaming_against_reading_and_loading_whole(tmp_path):
    stream_bench.main(["--size-gb", TINY_GB, "--json", str(tmp_path / "stream.json")])
    stream = _read(tmp_path / "stream.json")
    assert stream["max_abs_error_spot_check"] == 0.0 and stream["time_ratio"] > 0
    assert stream["cold"]["time_ratio"] > 0 and len(stream["cold"]["resident_fraction_after_drop"]) == 2
    restore_bench.main(["--size-gb", TINY_GB, "--out", str(tmp_path / "work"), "--json",
                        str(tmp_path / "restore.json")])
    restore = _read(tmp_path / "restore.json")
    assert restore["max_abs_difference_streamed_vs_in_memory"] == 0.0
    assert restore["streamed"]["tensors_changed"] == restore["in_memory"]["tensors_changed"] > 0
    assert set(restore["ratios"]) == {"streamed_over_read_time", "cold_streamed_over_cold_read_time",
                                      "streamed_over_in_memory_time", "streamed_over_in_memory_peak_rss"}
    assert restore["write_one_seconds"] > 0 and stream["write_one_seconds"] > 0
    cold = restore["cold"]
    assert cold["read_three_seconds"] > 0 and cold["streamed"]["tensors_changed"] > 0
    assert isinstance(cold["evicted"], bool) and len(cold["resident_fraction_after_drop"]) == 2
    assert set(restore["acceptance"]) == {"checkpoint_at_least_3GB", "streamed_peak_rss_under_2GB",
                                          "streamed_time_at_most_2x_read"}
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []  # checkpoints removed without --keep
    with pytest.raises(OutputExistsError):
        restore_bench.main(["--size-gb", TINY_GB, "--json", str(tmp_path / "restore.json")])


def test_train_benchmark_runs_both_trainers_on_the_same_data(tiny_model_dirs, tmp_path):
    tiny = ["--model", str(tiny_model_dirs["llama"]), "--examples", "8", "--batch-size", "4", "--max-length", "192",
            "--threads", "1"]
    train_bench.main([*tiny, "--json", str(tmp_path / "train.json")])
    result = _read(tmp_path / "train.json")
    ours, stock = result["safetypatch"], result["stock_trl"]
    assert ours["tokens"] == stock["tokens"] > 0 and ours["steps"] == stock["steps"] == 2
    assert ours["final_loss"] == pytest.approx(stock["final_loss"], rel=1e-3)  # the same objective
    assert set(result["ratios"]) == {"peak_rss", "peak_rss_above_model", "peak_rss_above_baseline",
                                     "tokens_per_second"}
    assert 0 < result["baseline"]["peak_rss_bytes"] <= ours["peak_rss_bytes"]  # the fixed part alone (a tiny
    # model trains in the pages its load already touched, so the two peaks may be equal)
    setup = train_bench.Setup(model=str(tiny_model_dirs["llama"]), examples=8, batch_size=4, max_length=192,
                              threads=1, max_steps=1)
    train_bench.side_phase("stock_trl", setup, str(tmp_path / "profile.txt"))
    assert "Self CPU" in (tmp_path / "profile.txt").read_text()


def test_generate_benchmark_compares_batched_and_single_prompt_generation(tiny_model_dirs, tmp_path):
    generate_main(["--model", str(tiny_model_dirs["llama"]), "--prompts", "6", "--max-new-tokens", "4",
                   "--batch-size", "3", "--threads", "1", "--json", str(tmp_path / "generate.json")])
    result = _read(tmp_path / "generate.json")
    assert result["hf_batch_1"]["new_tokens"] == result["hf_batch_3"]["new_tokens"] > 0
    assert result["hf_batch_3"]["identical_to_batch_1"] == 6 and "hf_batch_3_over_batch_1" in result["ratios"]
    assert result["model"]["attn_implementation"] == "sdpa"


def test_generate_benchmark_times_whole_batches_against_grouped_ones_on_eval_prompts(tiny_model_dirs, tmp_path):
    generate_main(["--model", str(tiny_model_dirs["llama"]), "--tasks", "harmbench,xstest-safe", "--limit", "5",
                   "--max-new-tokens", "4", "--batch-size", "4", "--repeats", "2", "--threads", "1",
                   "--json", str(tmp_path / "batching.json")])
    result = _read(tmp_path / "batching.json")
    assert set(result["tasks"]) == {"harmbench", "xstest-safe"} and result["answers"] == 10
    assert result["identical_answers"] == 10 and result["ratio_whole_over_grouped"] > 0
    harmbench = result["tasks"]["harmbench"]
    assert len(harmbench["seconds"]["whole"]) == len(harmbench["seconds"]["grouped"]) == 2


def test_compare_samples_finds_the_answer_that_changed(tiny_model_dirs, tmp_path):
    from safetypatch import api

    runs = {}
    for name, batching in (("old", "whole"), ("new", "grouped")):
        runs[name] = tmp_path / name
        api.evaluate(api.EvalConfig(model=str(tiny_model_dirs["qwen2"]), tasks=["harmbench", "arc-easy"],
                                    limits={"harmbench": 4, "arc-easy": 3}, judges=["keyword"], max_new_tokens=5,
                                    batching=batching, output_dir=runs[name]))
    generate_main(["--compare-samples", str(runs["old"]), str(runs["new"]), "--json", str(tmp_path / "same.json")])
    same = _read(tmp_path / "same.json")
    assert same["answers"] == same["identical_answers"] == 4
    arc = same["tasks"]["arc-easy"]
    assert (arc["samples"], arc["compared"], arc["identical"], arc["first_differing_doc_ids"]) == (
        3, ["loglikelihoods"], 3, [])
    assert arc["seconds"]["old"] >= 0 and same["task_seconds"]["new"] >= 0
    samples = next(runs["new"].rglob("samples_harmbench_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    rows[2]["n_new_tokens"] -= 1  # one answer a token shorter
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    generate_main(["--compare-samples", str(runs["old"]), str(runs["new"]), "--json", str(tmp_path / "diff.json")])
    differ = _read(tmp_path / "diff.json")
    assert differ["identical_answers"] == 3 and differ["tasks"]["harmbench"]["first_differing_doc_ids"] == [2]


def test_gpu_check_lists_every_check_and_runs_what_this_machine_can(tmp_path):
    names = [step.name for step in gpu_check.steps(tmp_path, quick=True, gpus=1)]
    assert names == ["env", "train_single_gpu", "train_multi_gpu", "train_fsdp", "train_zero2", "train_zero3",
                     "train_bench", "generate_bench", "restore_bench", "stream_bench", "demo"]
    assert gpu_check.main(["--out", str(tmp_path), "--only", "env,train_zero3"]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["steps"]["env"]["rc"] == 0 and "skipped" in summary["steps"]["train_zero3"]
    assert "versions" in summary["machine"]
