"""Wall time of ``safetypatch analyze`` on the embedded SmolLM2-135M-Instruct (30 layers × 7 linear modules;
docs/methods.md §3.8, issue 6 acceptance: minutes on 2 CPU cores).

Role: builds the two inputs without training, then times the real CLI in fresh processes:

- ``patch``: a random rank-8 LoRA on every linear module (A ~ N(0, 1/d_in), B ~ N(0, 0.01²), alpha 16), saved as a
  verified patch folder;
- ``checkpoints``: SmolLM2 with Gaussian noise of 2% of each linear weight's RMS added, saved as a model folder
  through ``models.saving`` (ΔW = that folder − SmolLM2, full rank).

Each is analysed twice: with an empty W_0 SVD cache (``cold``) and again with it filled (``warm``). It prints one
JSON object of seconds per run plus the thread count. Usage::

    python -m bench.analysis_bench --out /tmp/analysis-bench [--no-hidden-shift]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from safetypatch.utils.paths import home as safetypatch_home

MODEL = "smollm2-135m-instruct"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_inputs(out: Path, seed: int = 0) -> dict[str, Path]:
    """The random rank-8 patch folder and the perturbed model folder under ``out`` (kept when already there)."""
    from peft import LoraConfig

    from safetypatch import load_model
    from safetypatch.models.saving import save_model_folder
    from safetypatch.patch import LoraFactors, Patch, PatchManifest, save_patch

    paths = {"patch": out / "patch-r8", "checkpoints": out / "perturbed"}
    if all(path.exists() for path in paths.values()):
        return paths
    loaded = load_model(MODEL, dtype="float32")
    generator = torch.Generator().manual_seed(seed)
    linear = [(name, m) for name, m in loaded.model.named_modules() if name.rsplit(".", 1)[-1] in LINEAR]
    factors = {}
    for name, module in linear:
        d_out, d_in = module.weight.shape
        factors[name] = LoraFactors(A=torch.randn(8, d_in, generator=generator) / d_in**0.5,
                                    B=0.01 * torch.randn(d_out, 8, generator=generator))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(LINEAR), task_type="CAUSAL_LM").to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    save_patch(Patch(config=config, factors=factors), paths["patch"], overwrite=True, model=loaded.model,
               manifest=PatchManifest(method="random:benchmark", base_model=loaded.provenance()))
    with torch.no_grad():
        for _, module in linear:
            weight = module.weight
            weight.add_(0.02 * weight.pow(2).mean().sqrt() * torch.randn(weight.shape, generator=generator))
    save_model_folder(loaded.model, loaded.tokenizer, paths["checkpoints"], overwrite=True)
    return paths


def time_analyze(args: list[str], home: Path) -> float:
    """Seconds of one ``safetypatch analyze`` run in a fresh process, with ``$SAFETYPATCH_HOME`` = ``home``."""
    env = {**os.environ, "SAFETYPATCH_HOME": str(home)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from safetypatch.cli import main; main()", "analyze", *args], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the inputs and the analyses.")
    parser.add_argument("--no-hidden-shift", action="store_true", help="Time the weight metrics only.")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(options.out)
    # A private home whose W_0 SVD cache starts empty; the converted model and the data wheels are shared.
    home = options.out / "home"
    shutil.rmtree(home / "analysis", ignore_errors=True)
    home.mkdir(exist_ok=True)
    for shared in ("models", "wheels", "assets", "datasets"):
        if (safetypatch_home() / shared).exists() and not (home / shared).exists():
            (home / shared).symlink_to(safetypatch_home() / shared)
    extra = ["--no-hidden-shift"] if options.no_hidden_shift else []
    seconds = {}
    for kind, flag in (("patch", "--patch"), ("checkpoints", "--target")):
        for cache in ("cold", "warm"):
            output = options.out / f"analysis-{kind}-{cache}"
            run = [flag, str(inputs[kind]), "--model", MODEL, "-o", str(output), "--overwrite", *extra]
            seconds[f"{kind}_{cache}"] = round(time_analyze(run, home), 1)
        shutil.rmtree(home / "analysis", ignore_errors=True)
    print(json.dumps({"model": MODEL, "modules": 30 * 7, "hidden_shift": not options.no_hidden_shift,
                      "threads": torch.get_num_threads(), "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
