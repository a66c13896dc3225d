"""The checks that need a GPU, in one command: the demo, every benchmark, and ``safetypatch train`` through the
shipped accelerate presets, each in its own process, logged, timed, and summarised with the device name.

Run it from the repository root of a checkout on a CUDA machine (with ``pip install -e .``, plus ``vllm``,
``flash-attn`` or ``deepspeed`` for the steps that use them; a step whose package is missing is skipped with the
reason)::

    python -m bench.gpu_check --out runs/gpu-check           # about 20-30 min on one recent GPU
    python -m bench.gpu_check --out runs/gpu-check --quick   # smaller sizes: a few minutes

Everything lands in ``--out``: one JSON per benchmark, one log per step, the trained patches, the demo report, and
``gpu_check.json`` (machine, and per step: command, exit code, seconds, outputs). Copy the figures into
docs/performance.md together with that file's machine block.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import free_port, machine

_TRAIN = ["-m", "safetypatch.cli", "train", "--n-harmful", "8", "--set", "retain_count=16,max_steps=8",
          "--overwrite"]


@dataclass(frozen=True)
class Step:
    """One check: its name, its command (after ``python``), and what it needs."""

    name: str
    args: list[str]
    needs: tuple[str, ...] = ()
    gpus: int = 1
    timeout_s: int = 3600


def steps(out: Path, quick: bool, gpus: int) -> list[Step]:
    """The checks, in order (each writes under ``out``). FSDP and ZeRO also run on one GPU: one process still takes
    their save path (weights gathered by Trainer, the patch checked on a fresh base)."""
    from safetypatch.train.distributed import accelerate_preset

    size = "0.5" if quick else "3"

    def train(preset: str, processes: int) -> list[str]:
        return ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_preset(preset).path),
                "--num_processes", str(processes), "--main_process_port", str(free_port()), *_TRAIN,
                "-o", str(out / f"patch-{preset}")]

    demo = ["-m", "safetypatch.cli", "demo", "--output-dir", str(out / "demo"), "--overwrite"]
    return [
        Step("env", ["-m", "safetypatch.cli", "env"], gpus=0),
        Step("train_single_gpu", train("single_gpu", 1)),
        Step("train_multi_gpu", train("multi_gpu", gpus), gpus=2),
        Step("train_fsdp", train("fsdp", gpus)),
        Step("train_zero2", train("zero2", gpus), needs=("deepspeed",)),
        Step("train_zero3", train("zero3", gpus), needs=("deepspeed",)),
        Step("train_bench", ["-m", "bench.train_bench", "--profile", "--json", str(out / "train.json"),
                             "--overwrite", *(["--examples", "64"] if quick else [])]),
        Step("generate_bench", ["-m", "bench.generate_bench", "--json", str(out / "generate.json"), "--overwrite",
                                "--backends", "hf,vllm" if importlib.util.find_spec("vllm") else "hf",
                                *(["--prompts", "32"] if quick else [])]),
        Step("restore_bench", ["-m", "bench.restore_bench", "--size-gb", size, "--json", str(out / "restore.json"),
                               "--overwrite"]),
        Step("stream_bench", ["-m", "bench.stream_bench", "--size-gb", size, "--json", str(out / "stream.json"),
                              "--overwrite"]),
        Step("demo", [*demo, *(["--limit", "8"] if quick else [])]),
    ]


def run_step(step: Step, out: Path, gpus: int) -> dict[str, Any]:
    """Run one check, its output in ``out/<name>.log``; skipped when a package or GPUs are missing."""
    missing = [name for name in step.needs if importlib.util.find_spec(name) is None]
    if missing or gpus < step.gpus:
        reason = f"needs {', '.join(missing)}" if missing else f"needs {step.gpus} GPUs, {gpus} visible"
        return {"skipped": reason}
    command = [sys.executable, *step.args]
    start = time.perf_counter()
    with open(out / f"{step.name}.log", "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=step.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"command": " ".join(command), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "log": str(out / f"{step.name}.log")}


def main(argv: list[str] | None = None) -> int:
    """Run every check and write ``gpu_check.json``; the exit code is 1 if a check that ran failed."""
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--out", type=Path, required=True, help="folder for every output (created)")
    arguments.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    arguments.add_argument("--only", default=None, help="comma-separated step names to run")
    args = arguments.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"machine": machine(), "quick": args.quick, "steps": {}}
    chosen = set(args.only.split(",")) if args.only else None
    for step in steps(args.out, args.quick, max(gpus, 1)):
        if chosen is None or step.name in chosen:
            summary["steps"][step.name] = run_step(step, args.out, gpus)
            (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"{step.name}: {summary['steps'][step.name]}", flush=True)
    return int(any(s.get("rc") not in (None, 0) for s in summary["steps"].values()))


if __name__ == "__main__":
    sys.exit(main())
