"""Compare evaluation runs on the rows they all answered, from their per-sample files.

Runs evaluated with different row limits (e.g. one under the ``standard`` preset, one under ``standard`` with
``--limits harmbench=100,...``) share a subset of rows when both limits sample the same evaluation half. This reads
each run's ``samples_<task>_*.jsonl``, keeps per task the rows (prompt and choices) present in every run, and prints
one Markdown table: refusal or over-refusal per judge for generation tasks, ``acc`` for multiple-choice tasks, with
the number of shared rows.

    python examples/compare_on_shared_rows.py base=runs/eval-base lora=runs/eval-lora full=runs/eval-full
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

JUDGES = ("keyword_v2_w256", "embedding_minilm_t0.279+keyword_v2_w256")


def main() -> None:
    runs = dict(arg.split("=", 1) for arg in sys.argv[1:])
    if len(runs) < 2:
        raise SystemExit(__doc__)
    samples = {label: _samples(Path(folder)) for label, folder in runs.items()}
    tasks = [t for t in next(iter(samples.values())) if all(t in s for s in samples.values())]
    print("| task | rows | metric | " + " | ".join(runs) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    for task in tasks:
        shared = set.intersection(*(set(s[task]) for s in samples.values()))
        first = next(iter(samples.values()))[task][next(iter(shared))]
        if "verdicts" not in first and "acc" not in first:
            continue  # drift: compare its results file instead
        metrics = [f"refusal {j.split('_')[0]}" for j in JUDGES if j in first.get("verdicts", {})] if (
            "verdicts" in first) else ["acc"]
        for metric in metrics:
            values = [_mean([_value(s[task][key], metric) for key in shared]) for s in samples.values()]
            print(f"| {task} | {len(shared)} | {metric} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


def _samples(folder: Path) -> dict[str, dict[tuple, dict]]:
    found: dict[str, dict[tuple, dict]] = {}
    for path in sorted(folder.rglob("samples_*.jsonl")):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        found[task] = {(r["prompt"], tuple(r.get("choices") or ())): r for r in rows}
    return found


def _value(row: dict, metric: str) -> float:
    if metric == "acc":
        return float(row["acc"])
    judge = next(j for j in JUDGES if j.startswith(metric.split()[1]))
    return float(bool(row["verdicts"][judge]["refused"]))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
