"""The lm-eval comparison (bench/lm_eval_bench.py) without lm-eval: its flags, the environment it would install, the
rows and task YAMLs it exports for lm-eval, safetypatch's side run for real on a tiny model, lm-eval's output read
from a file shaped as lm-eval writes it, the comparison and the ratios. The real run installs lm-eval into its own
environment and is never part of CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import lm_eval_bench as bench
from bench import lm_eval_worker as worker
from safetypatch.eval.multiple_choice import format_item
from safetypatch.eval.task import TASKS, task_rows


def test_flags_default_to_the_issue_sizes_and_bad_ones_are_refused():
    args = bench.check_arguments(bench.arguments().parse_args([]))
    assert args.tasks == ["arc-easy", "hellaswag", "piqa", "mmlu"]
    assert (args.limit, args.batch_size, args.lm_eval_batch_size, args.repeats) == (200, 8, 8, 1)
    assert args.lm_eval == bench.LM_EVAL and bench.LM_EVAL.startswith("lm-eval==0.4.")
    for bad in (["--tasks", "harmbench"], ["--tasks", ","], ["--limit", "0"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.check_arguments(bench.arguments().parse_args(bad))


def test_lm_eval_gets_torch_first_then_itself_under_constraints_holding_our_versions(tmp_path):
    pinned = bench.pins()
    assert [pin.split("==")[0] for pin in pinned] == list(bench.PINNED)
    assert all("+" not in pin for pin in pinned)  # torch's +cpu label dropped: the pin matches the local wheel
    make, torch, lm_eval = bench.install_commands(tmp_path / "venv", "lm-eval==9.9", tmp_path / "c.txt", pinned)
    assert make[1:] == ["-m", "venv", str(tmp_path / "venv")]
    assert torch[-2:] == ["install", pinned[0]] and pinned[0].startswith("torch==")
    assert lm_eval[-4:] == ["install", "-c", str(tmp_path / "c.txt"), "lm-eval==9.9"]
    assert bench.installed_version(tmp_path / "venv") is None


def test_exported_rows_are_the_ones_safetypatch_scores_with_a_local_lm_eval_task(tmp_path):
    for task in ("arc-easy", "hellaswag", "piqa", "mmlu"):
        export = bench.export_task(task, 3, 0, tmp_path)
        rows = task_rows(TASKS.get(task), 3, 0).rows
        lines = [json.loads(line) for line in Path(export["data"]).read_text(encoding="utf-8").splitlines()]
        assert lines == export["items"] and len(lines) == 3
        for line, row in zip(lines, rows, strict=True):
            item = format_item(task, row)
            # lm-eval builds each request as (doc_to_text, target_delimiter + choice): our very strings
            assert line["context"] == item.context and line["answer"] == int(row.answer)
            assert tuple(" " + choice for choice in line["choices"]) == item.continuations
        config = yaml.safe_load(Path(export["yaml"]).read_text(encoding="utf-8"))
        assert config["task"] == export["lm_eval_task"] == bench.lm_eval_task_name(task)
        assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
        assert Path(config["dataset_kwargs"]["data_files"]["test"]) == Path(export["data"]).resolve()
        assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == (
            "context", "choices", "answer")
        assert config["target_delimiter"] == " " and config["num_fewshot"] == 0
        assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]


def test_lm_eval_runs_its_own_command_line_offline_through_the_stopwatch(tmp_path):
    command = bench.lm_eval_command(tmp_path / "venv", tmp_path / "model", "arc-easy", tmp_path / "tasks", 8, 0,
                                    tmp_path / "out", tmp_path / "t.json")
    assert command[1:4] == [str(bench.WORKER), str(tmp_path / "t.json"), "run"]
    assert command[command.index("--model") + 1] == "hf"
    assert command[command.index("--model_args") + 1] == f"pretrained={tmp_path / 'model'},dtype=float32"
    assert command[command.index("--tasks") + 1] == "safetypatch_arc_easy"
    assert command[command.index("--batch_size") + 1] == "8" and "--log_samples" in command
    env = bench.side_env(2, tmp_path)
    assert env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    ours = bench.safetypatch_command("m", "piqa", 5, 0, 8, tmp_path)
    assert ours[ours.index("--mc-batch-size") + 1] == "8" and ours[ours.index("--dtype") + 1] == "float32"


def test_the_worker_stopwatch_adds_up_calls():
    timings: dict = {}
    double = worker.timed(timings, "scoring", lambda x: 2 * x)
    assert double(2) == 4 and double(3) == 6
    assert timings["scoring_calls"] == 2 and timings["scoring_seconds"] >= 0


def _lm_eval_output(folder: Path, task: str, items: list[dict], lls: list[list[float]], timing: Path) -> None:
    """Files shaped as lm-eval 0.4 writes them with --log_samples (under a folder named after the model)."""
    name = bench.lm_eval_task_name(task)
    out = folder / "__model__"
    out.mkdir(parents=True)
    acc = [float(bench._argmax(ll) == item["answer"]) for item, ll in zip(items, lls, strict=True)]
    norm = [float(bench._argmax([x / len(c) for x, c in zip(ll, item["choices"], strict=True)]) == item["answer"])
            for item, ll in zip(items, lls, strict=True)]
    (out / "results_1.json").write_text(json.dumps({"results": {name: {
        "acc,none": sum(acc) / len(acc), "acc_norm,none": sum(norm) / len(norm)}}}))
    samples = [{"doc_id": item["doc_id"], "doc": item,
                "arguments": {f"gen_args_{i}": {"arg_0": item["context"], "arg_1": " " + c}
                              for i, c in enumerate(item["choices"])},
                "resps": [[[str(x), "False"]] for x in ll]} for item, ll in zip(items, lls, strict=True)]
    (out / f"samples_{name}_1.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    timing.write_text(json.dumps({"load_seconds": 1.5, "loglikelihood_seconds": 8.0, "requests": 8}))


def test_safetypatch_side_runs_and_is_compared_with_lm_eval_shaped_output(tiny_model_dirs, tmp_path):
    task = "arc-easy"
    export = bench.export_task(task, 2, 0, tmp_path)
    out = tmp_path / "ours"
    measured = bench.run_process(bench.safetypatch_command(str(tiny_model_dirs["llama"]), task, 2, 0, 8, out),
                                 bench.side_env(1, tmp_path), tmp_path / "ours.log")
    assert measured["wall_seconds"] > 0 and measured["peak_rss_bytes"] > 10**7
    ours = bench.read_safetypatch(out, task)
    assert ours["scoring_seconds"] >= 0 and sorted(ours["items"]) == [0, 1]

    lls = [list(ours["items"][k]["loglikelihoods"]) for k in range(2)]
    _lm_eval_output(tmp_path / "theirs", task, export["items"], lls, tmp_path / "t.json")
    theirs = bench.read_lm_eval(tmp_path / "theirs", task, tmp_path / "t.json")
    assert theirs["load_seconds"] == 1.5 and theirs["scoring_seconds"] == 8.0
    same = bench.compare(export["items"], ours, theirs)
    assert same["safetypatch_requests_equal_export"] == same["lm_eval_requests_equal_export"] == 2
    assert same["differing_choices"] == [] and same["max_abs_loglikelihood_diff"] < 1e-6

    flipped = [list(x) for x in lls]
    flipped[0][bench._argmax(lls[0])] = min(lls[0]) - 100.0  # lm-eval would pick another choice on item 0
    _lm_eval_output(tmp_path / "flipped", task, export["items"], flipped, tmp_path / "t2.json")
    differ = bench.compare(export["items"], ours, bench.read_lm_eval(tmp_path / "flipped", task, tmp_path / "t2.json"))
    assert ("acc", 0) in {(d["metric"], d["doc_id"]) for d in differ["differing_choices"]}
    assert {d["doc_id"] for d in differ["differing_choices"]} == {0} and differ["max_abs_loglikelihood_diff"] > 99

    rounds = {task: {"safetypatch": [{**measured, **ours, "scoring_seconds": 2.0, "wall_seconds": 10.0}],
                     "lm_eval": [{**measured, **theirs, "wall_seconds": 20.0},
                                 {**measured, **theirs, "scoring_seconds": 6.0, "wall_seconds": 25.0}]}}
    summary = bench.summarise({task: export}, rounds)
    assert summary["overall"]["ratios"]["items_per_second"] == 3.0  # fastest rounds: 6.0 s against 2.0 s
    assert summary["overall"]["ratios"]["items_per_second_whole_process"] == 2.0
    assert summary["per_task"][task]["lm_eval"]["load_seconds"] == 1.5
    assert summary["overall"]["safetypatch"]["items_per_second"] == 1.0
