"""Multiple-choice scoring: ``safetypatch eval`` against lm-eval's HF scorer (``lm-eval --model hf``) on the very
same items (issue 30; goal: ≥ 1.5× lm-eval's items per second at equal accuracy).

    python -m bench.lm_eval_bench --limit 200 --repeats 2 --json runs/bench/lm_eval.json

Steps:

1. **lm-eval** (:data:`LM_EVAL`, pinned, ``--lm-eval``) is installed into a virtual environment of its own
   (``--venv``, default ``runs/lm-eval-venv``; reused when it already imports that version): first torch, the
   version of safetypatch's own environment (on this project's machines a CPU wheel on local disk; any other
   resolution would download a multi-GB CUDA build), then lm-eval under a pip constraint file holding that torch,
   transformers and tokenizers, so both sides run the same model and tokenizer code. It is not a dependency of
   safetypatch, nothing is installed into safetypatch's environment, and CI never runs this script.
2. **Rows**: for each of ``--tasks`` (default ARC-Easy, HellaSwag, PIQA, MMLU) the rows ``safetypatch eval --limit
   N --seed S`` scores (a seeded sample), formatted as safetypatch formats them
   (:func:`safetypatch.eval.multiple_choice.format_item`: lm-eval's zero-shot prompts), are written to
   ``<work>/data/<task>.jsonl`` (``context``, ``choices`` without the one-space target delimiter, ``answer``) with
   a task YAML of lm-eval's (``dataset_path: json``, ``dataset_kwargs.data_files``, ``doc_to_text: context``,
   ``doc_to_choice: choices``, ``doc_to_target: answer``, ``target_delimiter: " "``, acc and acc_norm) in
   ``<work>/tasks``. No Hub: lm-eval reads the local JSONL (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``).
3. **Model**: the HF folder safetypatch loads (for the embedded model, the one converted from its GGUF into
   safetypatch's model cache, ``$SAFETYPATCH_HOME/models/<name>``) is lm-eval's ``pretrained=``, fp32 on both sides.
4. **Runs**: one fresh process per side and task, the sides alternating (``--repeats`` rounds, the side that goes
   first swapped every round), ``--threads`` on both (``OMP_NUM_THREADS``), batch ``--batch-size`` on both
   (safetypatch's ``--mc-batch-size`` counts items, each scoring all of its choices against one context pass;
   lm-eval's ``--batch_size`` counts (context, continuation) requests; ``--lm-eval-batch-size`` gives lm-eval
   another one). safetypatch: ``python -m safetypatch.cli eval --tasks T --limit N``; its scoring time is the
   task's ``seconds`` in the results file (formatting, tokenising, scoring, metrics). lm-eval:
   ``bench/lm_eval_worker.py`` runs lm-eval's own command line in its environment, with a stopwatch on
   ``HFLM.__init__`` (model load) and ``HFLM.loglikelihood`` (tokenising and scoring every request). Each process's
   wall time and peak RSS (``wait4``'s ``ru_maxrss``) are recorded, with the load average when it started.
   ``--budget-seconds`` starts no round that would end past it (judged by the rounds before).
5. **Comparison**: lm-eval's logged requests (context and continuation strings) must equal the exported ones, so both
   scored the same problem; per task ``acc`` and ``acc_norm`` of both sides, the items whose chosen answer differs
   (with both sides' log-likelihoods and the margin between the top two choices), and the largest log-likelihood
   difference. Items per second over the scoring alone (each side's fastest round) and over whole processes; their
   ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import ensure_tool, run_measured, venv_python, venv_version

LM_EVAL = "lm-eval==0.4.13"
"""The lm-eval the bench installs (0.4.9.1, which the log-likelihood check of docs/evaluation.md used, does not import
under transformers 5)."""
GOAL_ITEMS_PER_SECOND = 1.5
TASKS = ("arc-easy", "hellaswag", "piqa", "mmlu")
WORKER = Path(__file__).with_name("lm_eval_worker.py")
PINNED = ("torch", "transformers", "tokenizers")
"""Packages lm-eval's environment gets at safetypatch's versions (the model and tokenizer code of both sides)."""
SIDES = ("safetypatch", "lm_eval")


def arguments() -> argparse.ArgumentParser:
    """The bench's flags (and the benchmarks' ``--json`` / ``--overwrite``)."""
    from bench.common import parser

    out = parser("Multiple-choice scoring: safetypatch eval against lm-eval's HF scorer on the same items.")
    out.add_argument("--model", default="smollm2-135m-instruct", help="model both sides score (catalog name, folder)")
    out.add_argument("--tasks", default=",".join(TASKS), help="multiple-choice tasks, comma-separated")
    out.add_argument("--limit", type=int, default=200, help="items per task (safetypatch's seeded sample)")
    out.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    out.add_argument("--batch-size", type=int, default=8, help="batch of both sides (safetypatch: items)")
    out.add_argument("--lm-eval-batch-size", type=int, default=None, help="lm-eval's batch (default: --batch-size)")
    out.add_argument("--threads", type=int, default=None, help="CPU threads of both sides (default: all cores)")
    out.add_argument("--repeats", type=int, default=1, help="rounds; each side's fastest is its time")
    out.add_argument("--budget-seconds", type=float, default=None,
                     help="start no further round that would end past this many seconds (by the rounds so far)")
    out.add_argument("--work", type=Path, default=Path("runs/lm-eval-bench"), help="rows, task YAMLs, outputs")
    out.add_argument("--venv", type=Path, default=Path("runs/lm-eval-venv"), help="lm-eval's environment")
    out.add_argument("--lm-eval", default=LM_EVAL, help="pip requirement of lm-eval")
    return out


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse flags that cannot work before anything is installed or run."""
    from safetypatch.eval.multiple_choice import FORMATS

    tasks = [item.strip() for item in args.tasks.split(",") if item.strip()]
    unknown = [task for task in tasks if task not in FORMATS.names()]
    if not tasks or unknown:
        raise SystemExit(f"--tasks {args.tasks}: give multiple-choice tasks from {', '.join(FORMATS.names())}.")
    if min(args.limit, args.batch_size, args.repeats, args.lm_eval_batch_size or 1) < 1:
        raise SystemExit("--limit, --batch-size, --lm-eval-batch-size and --repeats must be at least 1.")
    args.tasks = tasks
    args.lm_eval_batch_size = args.lm_eval_batch_size or args.batch_size
    return args


# --- lm-eval's environment -------------------------------------------------------------------------------------


def pins() -> list[str]:
    """``name==version`` of :data:`PINNED` as installed here (a local version label such as ``+cpu`` dropped)."""
    return [f"{name}=={metadata.version(name).split('+', 1)[0]}" for name in PINNED]


def install_commands(venv: Path, requirement: str, constraints: Path, pinned: list[str]) -> list[list[str]]:
    """The commands that make ``venv``, install torch first (the pinned one: a CPU wheel where one is on disk), then
    ``requirement`` under ``constraints`` (the file holding ``pinned``)."""
    python = str(venv_python(venv))
    torch = next(pin for pin in pinned if pin.startswith("torch=="))
    return [[sys.executable, "-m", "venv", str(venv)],
            [python, "-m", "pip", "install", torch],
            [python, "-m", "pip", "install", "-c", str(constraints), requirement]]


def installed_version(venv: Path) -> str | None:
    """lm-eval's version in ``venv``, or None when it does not import there (with its HF model)."""
    return venv_version(venv, "from importlib.metadata import version; import lm_eval.models.huggingface; "
                              "print(version('lm_eval'))")


def ensure_lm_eval(venv: Path, requirement: str) -> str:
    """Install ``requirement`` into ``venv`` unless it is there already; returns the installed version."""
    pinned = pins()
    constraints = venv.parent / f"{venv.name}-constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("".join(f"{pin}\n" for pin in pinned))
    return ensure_tool(venv, requirement, install_commands(venv, requirement, constraints, pinned),
                       lambda: installed_version(venv))


# --- the rows, as safetypatch scores them, for lm-eval -----------------------------------------------------------


def lm_eval_task_name(task: str) -> str:
    """The name of ``task``'s exported copy in lm-eval (distinct from lm-eval's own tasks)."""
    return "safetypatch_" + task.replace("-", "_")


def export_items(task: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """The items ``safetypatch eval --tasks task --limit limit --seed seed`` scores: ``doc_id``, ``context``,
    ``choices`` (the continuations without lm-eval's one-space target delimiter) and ``answer``."""
    from safetypatch.eval.multiple_choice import TARGET_DELIMITER, format_item
    from safetypatch.eval.task import TASKS as SPECS
    from safetypatch.eval.task import task_rows

    rows = task_rows(SPECS.get(task), limit, seed).rows
    items = []
    for k, row in enumerate(rows):
        item = format_item(task, row)
        if not all(c.startswith(TARGET_DELIMITER) for c in item.continuations):
            raise SystemExit(f"{task} item {k}: a continuation lacks the target delimiter {TARGET_DELIMITER!r}; "
                             "lm-eval could not be given the same strings.")
        items.append({"doc_id": k, "context": item.context,
                      "choices": [c[len(TARGET_DELIMITER):] for c in item.continuations], "answer": int(row.answer)})
    return items


def task_config(task: str, data_file: Path) -> dict[str, Any]:
    """lm-eval's task YAML (as a dict) for the exported rows of ``task`` in ``data_file``: zero-shot, the context as
    it is, the choices behind a one-space delimiter, acc and acc_norm."""
    from safetypatch.eval.multiple_choice import TARGET_DELIMITER

    return {"task": lm_eval_task_name(task), "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "answer", "target_delimiter": TARGET_DELIMITER, "num_fewshot": 0,
            "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True}
                            for name in ("acc", "acc_norm")],
            "metadata": {"version": 1.0, "source": f"safetypatch task {task}"}}


def export_task(task: str, limit: int | None, seed: int, work: Path) -> dict[str, Any]:
    """Write ``task``'s items to ``work/data/<task>.jsonl`` and its lm-eval YAML to ``work/tasks``; return the items
    and the paths."""
    import yaml

    items = export_items(task, limit, seed)
    data = work / "data" / f"{task}.jsonl"
    config = work / "tasks" / f"{lm_eval_task_name(task)}.yaml"
    for folder in (data.parent, config.parent):
        folder.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    config.write_text(yaml.safe_dump(task_config(task, data), sort_keys=False, allow_unicode=True),
                      encoding="utf-8")
    return {"task": task, "lm_eval_task": lm_eval_task_name(task), "items": items, "data": str(data),
            "yaml": str(config)}


# --- the two sides -----------------------------------------------------------------------------------------------


def side_env(threads: int, work: Path) -> dict[str, str]:
    """The environment of both sides' processes: the thread count, no Hub, Hugging Face caches under ``work``."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str((work / "hf-home").resolve()), "TOKENIZERS_PARALLELISM": "false"}


def safetypatch_command(model: str, task: str, limit: int, seed: int, batch_size: int, out: Path) -> list[str]:
    """``safetypatch eval`` on ``task``'s seeded sample, fp32, multiple-choice batch ``batch_size``."""
    return [sys.executable, "-m", "safetypatch.cli", "eval", "--model", model, "--tasks", task, "--limit",
            str(limit), "--seed", str(seed), "--mc-batch-size", str(batch_size), "--dtype", "float32",
            "--output-dir", str(out)]


def lm_eval_command(venv: Path, folder: Path, task: str, tasks_dir: Path, batch_size: int, seed: int,
                    out: Path, timing: Path) -> list[str]:
    """lm-eval's ``run --model hf`` on the exported copy of ``task`` (through the stopwatch worker)."""
    return [str(venv_python(venv)), str(WORKER), str(timing), "run", "--model", "hf", "--model_args",
            f"pretrained={folder},dtype=float32", "--tasks", lm_eval_task_name(task), "--include_path",
            str(tasks_dir), "--batch_size", str(batch_size), "--device", "cpu", "--num_fewshot", "0", "--seed",
            str(seed), "--output_path", str(out), "--log_samples"]


def run_process(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``command`` (output to ``log``, :func:`bench.common.run_measured`); its wall seconds, peak RSS and the
    load average when it started."""
    ran = run_measured(command, log, env=env)
    return {"wall_seconds": round(ran["seconds"], 2), "peak_rss_bytes": ran["peak_rss_bytes"],
            "load_average_at_start": ran["load_average_before"]}


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} under {folder}, found {len(found)}")
    return found[0]


def read_safetypatch(out: Path, task: str) -> dict[str, Any]:
    """Scoring seconds, accuracies and per-item requests and log-likelihoods from a ``safetypatch eval`` folder."""
    results = json.loads(_one(out, "results_*.json").read_text())
    samples = [json.loads(line) for line in _one(out, f"samples_{task}_*.jsonl").read_text().splitlines() if line]
    metrics = results["results"][task]
    return {"scoring_seconds": results["configs"][task]["seconds"], "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"],
            "items": {s["doc_id"]: {"context": s["prompt"], "continuations": list(s["choices"]),
                                    "loglikelihoods": list(s["loglikelihoods"])} for s in samples}}


def read_lm_eval(out: Path, task: str, timing: Path) -> dict[str, Any]:
    """The same from an lm-eval output folder and the worker's stopwatch file."""
    name = lm_eval_task_name(task)
    results = json.loads(_one(out, "results_*.json").read_text())
    samples = [json.loads(line) for line in _one(out, f"samples_{name}_*.jsonl").read_text().splitlines() if line]
    clock = json.loads(timing.read_text())
    metrics = results["results"][name]
    items = {}
    for sample in samples:
        requests = [(args["arg_0"], args["arg_1"]) for _, args in sorted(sample["arguments"].items(),
                                                                        key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
        items[sample["doc"]["doc_id"]] = {"context": requests[0][0], "contexts": [ctx for ctx, _ in requests],
                                   "continuations": [cont for _, cont in requests],
                                   "loglikelihoods": [float(resp[0][0]) for resp in sample["resps"]]}
    return {"scoring_seconds": round(clock["loglikelihood_seconds"], 2),
            "load_seconds": round(clock["load_seconds"], 2), "requests": clock.get("requests"),
            "torch_threads": clock.get("torch_threads"), "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"], "items": items}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def compare(exported: list[dict[str, Any]], ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Both sides against the exported items: same requests, same answers, log-likelihood differences; each item
    whose chosen answer (``acc`` or ``acc_norm``) differs, with why (the margin between its top two choices)."""
    same_ours = same_theirs = 0
    largest = 0.0
    differing = []
    for item in exported:
        k = item["doc_id"]
        continuations = [" " + c for c in item["choices"]]
        a, b = ours["items"][k], theirs["items"][k]
        same_ours += a["context"] == item["context"] and a["continuations"] == continuations
        same_theirs += (all(ctx == item["context"] for ctx in b["contexts"]) and b["continuations"] == continuations)
        diffs = [abs(x - y) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)]
        largest = max(largest, *diffs)
        lengths = [len(c) for c in item["choices"]]
        for metric, scale in (("acc", [1] * len(lengths)), ("acc_norm", lengths)):
            x = [ll / max(n, 1) for ll, n in zip(a["loglikelihoods"], scale, strict=True)]
            y = [ll / max(n, 1) for ll, n in zip(b["loglikelihoods"], scale, strict=True)]
            if _argmax(x) != _argmax(y):
                top = sorted(x, reverse=True)
                differing.append({"doc_id": k, "metric": metric, "answer": item["answer"], "ours": _argmax(x),
                                  "lm_eval": _argmax(y), "our_margin": top[0] - top[1],
                                  "max_abs_loglikelihood_diff": max(diffs),
                                  "loglikelihoods": {"ours": a["loglikelihoods"], "lm_eval": b["loglikelihoods"]}})
    n = len(exported)
    return {"items": n, "safetypatch_requests_equal_export": same_ours, "lm_eval_requests_equal_export": same_theirs,
            "acc_equal": ours["acc"] == theirs["acc"], "acc_norm_equal": ours["acc_norm"] == theirs["acc_norm"],
            "max_abs_loglikelihood_diff": largest, "differing_choices": differing}


def _best(rounds: list[dict[str, Any]], key: str) -> float:
    return min(r[key] for r in rounds)


def summarise(exports: dict[str, dict[str, Any]], rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> dict:
    """Per task and over all tasks: each side's fastest scoring and whole-process time, items/s, peak RSS; ratios."""
    per_task, totals = {}, {side: {"scoring_seconds": 0.0, "wall_seconds": 0.0, "peak_rss_bytes": 0}
                            for side in SIDES}
    items = 0
    for task, export in exports.items():
        n = len(export["items"])
        items += n
        row = {"items": n}
        for side in SIDES:
            runs = rounds[task][side]
            scoring, wall = _best(runs, "scoring_seconds"), _best(runs, "wall_seconds")
            peak = max(r["peak_rss_bytes"] for r in runs)
            row[side] = {"scoring_seconds": scoring, "wall_seconds": wall, "items_per_second": round(n / scoring, 3),
                         "items_per_second_whole_process": round(n / wall, 3), "peak_rss_bytes": peak,
                         "setup_seconds": round(wall - scoring, 2), "acc": runs[0]["acc"],
                         "acc_norm": runs[0]["acc_norm"]}
            if side == "lm_eval":
                row[side]["load_seconds"] = min(r["load_seconds"] for r in runs)
            totals[side]["scoring_seconds"] += scoring
            totals[side]["wall_seconds"] += wall
            totals[side]["peak_rss_bytes"] = max(totals[side]["peak_rss_bytes"], peak)
        row["ratios"] = _ratios(row["safetypatch"], row["lm_eval"], n)
        per_task[task] = row
    for side in SIDES:
        totals[side]["items_per_second"] = round(items / totals[side]["scoring_seconds"], 3)
        totals[side]["items_per_second_whole_process"] = round(items / totals[side]["wall_seconds"], 3)
    overall = {"items": items, **totals, "ratios": _ratios(totals["safetypatch"], totals["lm_eval"], items)}
    return {"per_task": per_task, "overall": overall}


def _ratios(ours: dict[str, Any], theirs: dict[str, Any], n: int) -> dict[str, float]:
    return {"items_per_second": round(theirs["scoring_seconds"] / ours["scoring_seconds"], 3),
            "items_per_second_whole_process": round(theirs["wall_seconds"] / ours["wall_seconds"], 3),
            "peak_rss": round(ours["peak_rss_bytes"] / theirs["peak_rss_bytes"], 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.common import emit, parse
    from safetypatch.models.resolve import resolve_model

    args = check_arguments(parse(arguments(), argv))
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    work = args.work.resolve()
    exports = {task: export_task(task, args.limit, args.seed, work) for task in args.tasks}
    folder = resolve_model(args.model).path  # the HF folder safetypatch itself loads
    version = ensure_lm_eval(args.venv, args.lm_eval)
    env = side_env(threads, work)
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {task: {side: [] for side in SIDES} for task in args.tasks}
    comparisons: dict[str, Any] = {}
    start = time.perf_counter()
    for r in range(args.repeats):
        elapsed = time.perf_counter() - start
        if r and args.budget_seconds is not None and elapsed * (r + 1) / r > args.budget_seconds:
            print(f"round {r} not started: {elapsed:.0f} s so far, budget {args.budget_seconds:.0f} s",
                  file=sys.stderr, flush=True)
            break
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for task in args.tasks:
            for side in order:
                out = work / "runs" / f"{task}-{side}-{r}"
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                if side == "safetypatch":
                    command = safetypatch_command(args.model, task, args.limit, args.seed, args.batch_size, out)
                    measured = run_process(command, env, out / "log.txt")
                    record = read_safetypatch(out, task)
                else:
                    timing = out / "timing.json"
                    command = lm_eval_command(args.venv, folder, task, work / "tasks", args.lm_eval_batch_size,
                                              args.seed, out, timing)
                    measured = run_process(command, env, out / "log.txt")
                    record = read_lm_eval(out, task, timing)
                print(f"round {r} {task} {side}: {measured['wall_seconds']} s wall, "
                      f"{record['scoring_seconds']} s scoring, load {measured['load_average_at_start']}",
                      file=sys.stderr, flush=True)
                rounds[task][side].append({**measured, **record, "round": r})
        for task in args.tasks:
            comparisons[task] = compare(exports[task]["items"], rounds[task]["safetypatch"][-1],
                                        rounds[task]["lm_eval"][-1])
    summary = summarise(exports, rounds)
    equal = all(c["acc_equal"] and c["acc_norm_equal"] for c in comparisons.values())
    same_problem = all(c["safetypatch_requests_equal_export"] == c["lm_eval_requests_equal_export"] == c["items"]
                       for c in comparisons.values())
    ratio = summary["overall"]["ratios"]["items_per_second"]
    result = {
        "benchmark": "lm_eval_bench", "lm_eval": version, "model": args.model, "model_folder": str(folder),
        "tasks": args.tasks, "limit": args.limit, "seed": args.seed, "batch_size": args.batch_size,
        "lm_eval_batch_size": args.lm_eval_batch_size, "threads": threads, "repeats": args.repeats,
        "rounds_done": len(next(iter(rounds.values()))["safetypatch"]), "dtype": "float32",
        "nice": os.nice(0),
        "rows": {task: {"items": len(e["items"]), "data": e["data"], "yaml": e["yaml"]}
                 for task, e in exports.items()},
        **summary, "comparison": comparisons,
        "rounds": {task: {side: [{k: v for k, v in run.items() if k != "items"} for run in sides[side]]
                          for side in SIDES} for task, sides in rounds.items()},
        "acceptance": {f"items_per_second_at_least_{GOAL_ITEMS_PER_SECOND}x": ratio >= GOAL_ITEMS_PER_SECOND,
                       "accuracies_equal": equal, "same_requests_on_both_sides": same_problem},
    }
    return emit(result, args, argv, "bench.lm_eval_bench")


if __name__ == "__main__":
    main()
