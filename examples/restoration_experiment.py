"""The restoration experiment of issue 5 (item 4) on the embedded model, composed from the public API.

    aligned    = SmolLM2-135M-Instruct with a safety patch merged          (safetypatch.apply_patch)
    unsafe     = aligned fine-tuned on harmful Q/A (harmful-qa), full or LoRA (safetypatch.finetune)
    downstream = aligned fine-tuned on a benign task (sciq), LoRA merged   (safetypatch.finetune)
    downstream LoRA = downstream − aligned as a rank-r adapter              (safetypatch.extract; exact up to rounding,
                                                                             since a merged rank-r LoRA is rank r)
    repaired   = downstream restored with LSSF, RESTA (checkpoints) and Safe LoRA (the adapter; base_model = the
                 unpatched model, so V = the safety patch's ΔW)          (safetypatch.restore)
    re-patched = the safety patch attached to downstream, as to any descendant (safetypatch.evaluate --adapter)

Every model is then evaluated on the same tasks (safety, over-refusal, the downstream task, capability) and one
HTML report compares them, plus a Markdown summary with the share of lost refusal each method recovers.

``--variant METHOD:key=value,...`` (repeatable) adds one more repair of the downstream model with those method
settings, e.g. ``lssf:decompose=safety_vector,alpha=0.5``, ``lssf:safety_vector=aligned_minus_base`` (the data-free
vector θ_aligned − the unpatched model) or ``resta:beta=1.0``: a restore step, an evaluation and a row of its own.

Each step writes one folder under ``--output-dir`` and is skipped when that folder exists, so an interrupted run
resumes where it stopped; delete a folder to redo its step (and the steps after it).

    python examples/restoration_experiment.py --patch runs/patch --output-dir runs/restoration
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import yaml

import safetypatch
from safetypatch.eval.results import read_results
from safetypatch.report import compare, summarize, write_report

TASKS = ["harmbench", "advbench", "xstest-safe", "benign-edgy", "sciq", "arc-easy", "hellaswag", "piqa", "mmlu"]
HARMFUL = ("harmbench", "advbench")
UNSAFE_BATCH = {"max_length": 1280, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8}
"""The harmful-qa fine-tune keeps whole answers (up to 1,222 tokens; the patch recipe cuts at 256), one at a time."""
UNSAFE = {"full": {"n": 100, "num_train_epochs": 5.0, "learning_rate": 5e-5},
          "lora": {"n": 200, "num_train_epochs": 2.0, "learning_rate": 3e-4}}
"""Rows, epochs and learning rate of the unsafe fine-tune per ``--unsafe-mode``: ``full`` is the
unalignment default of docs/methods.md §2.1 (100 pairs, full fine-tuning, 5 epochs, lr 5e-5); ``lora`` the whole
train half, 2 epochs, a merged LoRA at 1.5 times the patch recipe's learning rate."""


def main() -> None:
    args = _parser().parse_args()
    args.variant = _variants(args.variant)
    out: Path = args.output_dir
    aligned, unsafe, downstream = out / "aligned", out / "unsafe", out / "downstream"
    adapter = out / "downstream-lora"
    repaired = {"LSSF": out / "lssf", "RESTA": out / "resta", "Safe LoRA": out / "safe-lora"}
    roles = {"aligned_model": str(aligned), "unsafe_model": str(unsafe), "target_model": str(downstream)}
    steps: list[tuple[str, Path, Callable[[], object]]] = [
        ("merge the safety patch -> aligned", aligned, lambda: safetypatch.apply_patch(safetypatch.ApplyConfig(
            model=args.model, patches=[args.patch], mode="merge", output=aligned))),
        ("fine-tune aligned on harmful-qa -> unsafe", unsafe, lambda: safetypatch.finetune(
            _unsafe_job(args, aligned, unsafe))),
        ("fine-tune aligned on sciq -> downstream", downstream, lambda: safetypatch.finetune(
            safetypatch.FinetuneConfig(model=str(aligned), dataset="sciq", n=args.n_task, output=downstream))),
        ("extract downstream - aligned as a LoRA", adapter, lambda: safetypatch.extract(safetypatch.ExtractJob(
            target=str(downstream), reference=str(aligned), rank=args.lora_rank, output=adapter))),
        ("restore with LSSF", repaired["LSSF"], lambda: safetypatch.restore(safetypatch.RestoreJob(
            method="lssf", n_anchors=args.n_anchors, output=repaired["LSSF"], **roles))),
        ("restore with RESTA", repaired["RESTA"], lambda: safetypatch.restore(safetypatch.RestoreJob(
            method="resta", output=repaired["RESTA"], **roles))),
        ("restore the LoRA with Safe LoRA", repaired["Safe LoRA"], lambda: safetypatch.restore(safetypatch.RestoreJob(
            method="safe_lora", base_model=args.model, aligned_model=str(aligned), target_model=str(adapter),
            output=repaired["Safe LoRA"]))),
    ]
    for label, (method, params) in args.variant.items():
        repaired[label] = out / _slug(label)
        job = _variant_job(method, params, roles, args.model, args.n_anchors, repaired[label])
        steps.append((f"restore with {label}", repaired[label], lambda j=job: safetypatch.restore(j)))
    evaluated = {"aligned": (aligned, None), "unsafe": (unsafe, None), "downstream (no repair)": (downstream, None),
                 "LSSF": (repaired["LSSF"], None), "RESTA": (repaired["RESTA"], None),
                 "Safe LoRA": (aligned, repaired["Safe LoRA"]), "patch re-applied": (downstream, args.patch),
                 **{label: (repaired[label], None) for label in args.variant}}
    for label, (model, patch) in evaluated.items():
        folder = out / "eval" / _slug(label)
        steps.append((f"evaluate {label}", folder, lambda m=model, p=patch, f=folder: safetypatch.evaluate(
            safetypatch.EvalConfig(model=str(m), adapter=p, tasks=TASKS, limit=args.limit, limits=args.limits,
                                   output_dir=f))))
    print(f"restoration experiment on {args.model} with patch {args.patch} -> {out}")
    for index, (name, folder, _) in enumerate(steps, start=1):
        print(f"  {index:2d}. {name}  [{folder}]" + ("  (done, skipped)" if folder.exists() else ""))
    for index, (name, folder, run) in enumerate(steps, start=1):
        if folder.exists():
            continue
        print(f"step {index}/{len(steps)}: {name}", flush=True)
        run()
    results = {label: _results(out / "eval" / _slug(label)) for label in evaluated}
    report = write_report(list(results.values()), out / "report.html", labels=list(results),
                          title=f"Post-hoc safety restoration on {args.model}", overwrite=True)
    summary = _summary(results, ["LSSF", "RESTA", "Safe LoRA", "patch re-applied", *args.variant])
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    print(f"report: {report}")


def _unsafe_job(args: argparse.Namespace, aligned: Path, unsafe: Path) -> safetypatch.FinetuneConfig:
    """The harmful-qa fine-tune of ``aligned``: ``--unsafe-mode``'s rows, epochs and learning rate unless given."""
    defaults = UNSAFE[args.unsafe_mode]
    return safetypatch.FinetuneConfig(
        model=str(aligned), dataset="harmful-qa", n=args.n_harmful or defaults["n"], mode=args.unsafe_mode,
        output=unsafe, recipe_overrides={**UNSAFE_BATCH, "learning_rate": defaults["learning_rate"],
                                         "num_train_epochs": args.unsafe_epochs or defaults["num_train_epochs"]})


def _summary(results: dict[str, Path], repairs: list[str]) -> str:
    """The per-run headline table and, per repair, the share of the refusal lost to fine-tuning that it recovers."""
    summary = summarize(compare([read_results(path) for path in results.values()], list(results)))
    refusal = {run.label: run.harmful_refusal.value if run.harmful_refusal else None for run in summary.runs}
    lines = [summary.to_markdown(), ""]
    aligned, lost = refusal["aligned"], refusal["downstream (no repair)"]
    if aligned is None or lost is None or aligned <= lost:
        lines.append(f"Fine-tuning did not lower refusal on {', '.join(HARMFUL)} (aligned {aligned}, downstream "
                     f"{lost}); there is nothing to recover.")
    for label in repairs:
        if aligned is not None and lost is not None and aligned > lost and refusal[label] is not None:
            share = (refusal[label] - lost) / (aligned - lost)
            lines.append(f"- {label}: recovers {100 * share:.0f}% of the refusal lost to fine-tuning.")
    return "\n".join(lines) + "\n"


def _results(folder: Path) -> Path:
    found = sorted(folder.rglob("results_*.json"))
    if not found:
        raise SystemExit(f"{folder} holds no results_*.json; delete the folder to rerun its evaluation.")
    return found[-1]


def _slug(label: str) -> str:
    """``downstream (no repair)`` → ``downstream``, ``Safe LoRA`` → ``safe-lora``,
    ``lssf:decompose=safety_vector,alpha=0.5`` → ``lssf-decompose-safety_vector-alpha-0.5``."""
    return re.sub(r"[ :=,]+", "-", label.split(" (")[0].lower())


def _variant_job(method: str, params: dict[str, object], roles: dict[str, str], base: str, n_anchors: int,
                 output: Path) -> safetypatch.RestoreJob:
    """The restore job of one ``--variant`` (validated now, before any step runs): LSSF takes the anchor count, and
    its data-free vector (``safety_vector=aligned_minus_base``) reads the unpatched model instead of the unsafe one."""
    if params.get("safety_vector") == "aligned_minus_base":
        roles = {"base_model": base, **{role: ref for role, ref in roles.items() if role != "unsafe_model"}}
    anchors = {"n_anchors": n_anchors} if method == "lssf" else {}
    return safetypatch.RestoreJob(method=method, params=params, output=output, **anchors, **roles)


def _variants(items: list[str]) -> dict[str, tuple[str, dict[str, object]]]:
    """``METHOD:key=value,...`` → {label: (method, params)}; values are read as YAML scalars (numbers stay numbers)."""
    variants = {}
    for item in items:
        method, _, settings = item.partition(":")
        if method not in {"lssf", "resta"} or not settings:
            raise SystemExit(f"--variant {item!r}: expected lssf:key=value,... or resta:key=value,...")
        pairs = [pair.split("=", 1) for pair in settings.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"--variant {item!r}: every setting is key=value")
        variants[item] = (method, {key.strip(): yaml.safe_load(value) for key, value in pairs})
    return variants


def _limits(text: str) -> dict[str, int]:
    return {name.strip(): int(n) for name, n in (item.split("=", 1) for item in text.split(",") if item.strip())}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=Path, required=True, help="Safety patch folder (safetypatch train -o ...).")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model the patch was trained on.")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/restoration"), help="Run folder.")
    parser.add_argument("--unsafe-mode", choices=sorted(UNSAFE), default="full", help="How the unsafe model is "
                        "fine-tuned from aligned: full (docs/methods.md §2.1's default) or lora (merged).")
    parser.add_argument("--n-harmful", type=int, default=None, help="harmful-qa rows of the unsafe fine-tune "
                        "(full: 100, lora: 200, the whole train half).")
    parser.add_argument("--unsafe-epochs", type=float, default=None, help="Epochs of the unsafe fine-tune (full: 5, "
                        "lora: 2): the safety vector aligned - unsafe should describe a loss of refusal at least as "
                        "large as the benign one.")
    parser.add_argument("--n-task", type=int, default=400, help="sciq rows of the downstream fine-tune.")
    parser.add_argument("--lora-rank", type=int, default=8, help="Rank of the downstream LoRA (the recipe's r).")
    parser.add_argument("--n-anchors", type=int, default=128, help="LSSF anchor prompts.")
    parser.add_argument("--limit", type=int, default=100, help="Most rows per evaluation task.")
    parser.add_argument("--limits", type=_limits, default={}, help="Per-task rows that win over --limit, "
                        "e.g. sciq=200,arc-easy=200.")
    parser.add_argument("--variant", action="append", default=[], help="One more repair, METHOD:key=value,... "
                        "(lssf or resta settings), e.g. lssf:decompose=safety_vector,alpha=0.5; repeatable.")
    return parser


if __name__ == "__main__":
    main()
