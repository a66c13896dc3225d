"""Weight arithmetic against mergekit (issue 30): ``safetypatch restore --method resta`` against ``mergekit-yaml``'s
``task_arithmetic``, and ``safetypatch extract`` against ``mergekit-extract-lora`` at the same rank.

    python -m bench.mergekit_bench --size-gb 3 --out runs/mergekit-bench --keep --json runs/bench/mergekit.json

RESTA repairs ``target`` as ``target + β·(aligned − unsafe)`` (docs/methods.md §3.5), which is task arithmetic:
mergekit's ``task_arithmetic`` with base model ``unsafe``, ``aligned`` at weight β and ``target`` at weight 1
(``normalize: false``; computed in fp32, written in the checkpoints' dtype). Steps:

1. **mergekit** (``--mergekit``, pinned: :data:`MERGEKIT`) is installed into a virtual environment of its own
   (``--venv``, default ``runs/mergekit-venv``; reused when it already has that version). torch is installed first,
   pinned to ``--torch`` (default: the version safetypatch runs on), and every later install runs under a
   constraint file holding that pin, so pip never picks another torch build. mergekit (LGPL-3.0) is not a
   dependency of safetypatch, none of its code is in this repository, and CI never runs this script
   (``--no-mergekit`` runs safetypatch's side alone, as the smoke test does).
2. **Checkpoints**: the three llama-shaped checkpoints of :mod:`bench.stream_bench` (``base`` plays the unsafe
   model, ``aligned`` = base + noise, ``target`` = aligned + noise; ``--size-gb`` each), reused from ``--out`` when
   they are there with the same shape; and for extraction a smaller pair (``--extract-size-gb``):
   ``reference`` (a fresh base) and ``finetuned`` = reference + a rank-:data:`DELTA_RANK` update with a decaying
   spectrum on every linear weight (what a fine-tune's ΔW looks like: most of its energy in a few directions), with
   a word-level tokenizer so that ``safetypatch extract`` can load the reference.
3. **RESTA against task_arithmetic**, each run a command in a fresh process (wall time and peak RSS of the process
   and its children from ``wait4``), the tools alternating, ``--repeats`` times each: page-cached (every input file
   read once right before each run) and cold (the inputs dropped from the page cache before each run:
   ``/proc/sys/vm/drop_caches`` where it can be written, which drops every clean page of the machine, libraries
   included; else ``posix_fadvise(DONTNEED)`` on each input file after a ``sync``; ``--cold`` picks; which one ran
   and the resident fraction of the inputs after it are recorded). The load average goes with every timing. The
   two outputs are compared tensor by tensor (names, dtypes, bytes).
4. **The other restoration methods' costs** on the same checkpoints, page-cached, once: Safe LoRA (``safetypatch
   restore --method safe_lora``, base / aligned / target, the dense variant) and LSSF through the runner
   (``run_restore``) with anchor moments given (random positive semi-definite moments of the right sizes: these
   checkpoints have no model to run anchors through; the anchor refusals and moments, a generation and a forward
   pass over 128 prompts on the aligned model, are not in the figure). ``--svd-layers N`` limits both to the first
   N decoder layers (their per-layer work does not depend on the layer), for a short run.
5. **Extraction**: ``safetypatch extract --rank r`` against ``mergekit-extract-lora --max-rank r`` (linear modules
   only, ``--include-regex``), page-cached, alternating, ``--repeats`` times. Both adapters are read back and each
   module's relative Frobenius error ‖ΔW − s·B·A‖_F / ‖ΔW‖_F is computed here from the written factors (with each
   adapter's own scale s = lora_alpha / r), against ΔW = finetuned − reference in fp32.

Acceptance (``acceptance``; time ratios of each side's fastest run, peak-RSS ratios of each side's largest):
RESTA ≤ :data:`TIME_RATIO_GOAL` × mergekit's wall time and ≤ :data:`RSS_RATIO_GOAL` × its peak RSS, page-cached and
cold, with identical outputs; extraction at most mergekit-extract-lora's time with an equal or lower error on every
module (within :data:`ERROR_SLACK`) and overall.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    GB,
    emit,
    ensure_tool,
    in_fresh_process,
    parse,
    peak_rss_bytes,
    run_measured,
    venv_python,
    venv_version,
)
from bench.stream_bench import (
    checkpoint_arguments,
    drop_page_cache,
    generate_base,
    generate_phase,
    resident_fraction,
    settle,
    shape_for,
)

MERGEKIT = "mergekit==0.1.5"
"""The PyPI release the bench installs (pinned: its CLI flags and config schema are the ones used here)."""
TIME_RATIO_GOAL = 0.35
RSS_RATIO_GOAL = 0.3
ERROR_SLACK = 1e-6
DELTA_RANK = 64
"""Rank of the extraction pair's ΔW; its singular values fall by :data:`DELTA_DECAY` per direction."""
DELTA_DECAY = 0.9
DELTA_SCALE = 0.05
"""‖ΔW‖_F / ‖W‖_F of the extraction pair."""
MERGE_ROLES = ("base", "aligned", "target")
LINEAR_MODULES = r"\.(q|k|v|o|gate|up|down)_proj$"
"""The linear modules of a llama decoder layer (mergekit-extract-lora's ``--include-regex``)."""
_LINEAR_TENSOR = r"model\.layers\.({layers})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight"
PEFT_PREFIX = "base_model.model."


def arguments() -> Any:
    """The bench's flags (and the checkpoint benches' ``--size-gb``, ``--out``, ``--keep``, ``--dtype``, ...)."""
    out = checkpoint_arguments("Weight arithmetic against mergekit: RESTA against task_arithmetic, extract against "
                               "mergekit-extract-lora.")
    out.add_argument("--venv", type=Path, default=Path("runs/mergekit-venv"), help="mergekit's own environment")
    out.add_argument("--mergekit", default=MERGEKIT, help="pip requirement of mergekit")
    out.add_argument("--torch", default=None, help="torch requirement of mergekit's environment (default: the "
                                                    "version running here)")
    out.add_argument("--no-mergekit", action="store_true", help="measure safetypatch's side only (no install)")
    out.add_argument("--prepare-only", action="store_true", help="install mergekit and write the checkpoints, "
                                                                  "then stop (use with --out and --keep)")
    out.add_argument("--repeats", type=int, default=2, help="runs of each tool per phase (alternating)")
    out.add_argument("--beta", type=float, default=0.5, help="RESTA's β (mergekit: aligned's weight)")
    out.add_argument("--threads", type=int, default=None, help="mergekit's -j (default: all cores)")
    out.add_argument("--cold", choices=("auto", "drop_caches", "fadvise", "none"), default="auto",
                     help="how inputs leave the page cache before a cold run (auto: drop_caches, else fadvise)")
    out.add_argument("--svd-layers", type=int, default=None,
                     help="Safe LoRA and LSSF over the first N decoder layers only (default: all)")
    out.add_argument("--methods", default="safe_lora,lssf", help="other restoration methods to time ('' for none)")
    out.add_argument("--extract-size-gb", type=float, default=0.5, help="size of the extraction pair (GB)")
    out.add_argument("--rank", type=int, default=16, help="LoRA rank of both extractions")
    out.add_argument("--parts", default="merge,extract,methods",
                     help="what to run, in this order: merge (RESTA against task_arithmetic), extract, methods "
                          "(Safe LoRA's and LSSF's costs)")
    return out


# ---- mergekit's environment -----------------------------------------------------------------------------------


def venv_tool(venv: Path, name: str) -> Path:
    """A console script of ``venv``."""
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def torch_requirement() -> str:
    """``torch==<the version running here>`` without a local tag (pip's find-links resolve the local build)."""
    import torch

    return f"torch=={torch.__version__.split('+', 1)[0]}"


def install_commands(venv: Path, requirement: str, torch_pin: str) -> list[list[str]]:
    """Make ``venv``, install ``torch_pin`` into it, then ``requirement`` under a constraint that holds the pin."""
    python = str(venv_python(venv))
    constraints = str(venv / "constraints.txt")
    return [[sys.executable, "-m", "venv", str(venv)],
            [python, "-m", "pip", "install", "-c", constraints, torch_pin],
            [python, "-m", "pip", "install", "-c", constraints, requirement]]


def installed_version(venv: Path) -> str | None:
    """mergekit's version in ``venv``, or None when it is not installed there."""
    return venv_version(venv, "import importlib.metadata as m; print(m.version('mergekit'))")


def ensure_mergekit(venv: Path, requirement: str, torch_pin: str) -> str:
    """Install ``requirement`` into ``venv`` (torch pinned to ``torch_pin``) unless it is there; its version."""
    venv.mkdir(parents=True, exist_ok=True)
    (venv / "constraints.txt").write_text(torch_pin + "\n")  # pip reads it while installing (python -m venv keeps it)
    return ensure_tool(venv, requirement, install_commands(venv, requirement, torch_pin),
                       lambda: installed_version(venv))


# ---- checkpoints --------------------------------------------------------------------------------------------


def _has_checkpoint(folder: Path, shape: Any) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("hidden_size") == shape.hidden and config.get("num_hidden_layers") == shape.layers
            and config.get("architectures") == ["LlamaForCausalLM"] and any(folder.glob("*.safetensors")))


def ensure_merge_checkpoints(root: Path, size_gb: float, dtype: str, shard_gb: float) -> dict[str, Any]:
    """``base``, ``aligned`` and ``target`` under ``root`` (:func:`bench.stream_bench.generate_phase`), reused when
    all three are there with this shape."""
    import torch

    shape = shape_for(size_gb * GB, getattr(torch, dtype))
    if all(_has_checkpoint(root / sub, shape) for sub in MERGE_ROLES):
        return {"generated": False, "shape": shape}
    for sub in MERGE_ROLES:
        shutil.rmtree(root / sub, ignore_errors=True)
    made = in_fresh_process(generate_phase, root, shape, dtype, int(shard_gb * GB))
    return {"generated": True, "generate_seconds": round(made["seconds"], 3), "shape": shape}


def _generator(name: str, seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))


def finetune_delta(name: str, shape: tuple[int, int], weight_norm: float, seed: int = 3) -> Any:
    """A fine-tune-like ΔW for one weight: rank :data:`DELTA_RANK`, singular values falling by
    :data:`DELTA_DECAY` per direction, ‖ΔW‖_F = :data:`DELTA_SCALE` × ``weight_norm``."""
    import torch

    d_out, d_in = shape
    k = min(DELTA_RANK, d_out, d_in)
    generator = _generator(name, seed)
    left = torch.randn(d_out, k, generator=generator) / math.sqrt(d_out)
    right = torch.randn(k, d_in, generator=generator) / math.sqrt(d_in)
    sigma = DELTA_DECAY ** torch.arange(k, dtype=torch.float32)
    sigma *= DELTA_SCALE * weight_norm / float(torch.linalg.vector_norm(sigma))
    return (left * sigma) @ right


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` tokens (``t3`` … plus ``<unk>``, ``<s>``, ``</s>``): enough for the
    loaders that want one next to a checkpoint; never used to encode text here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)


def extract_pair_phase(folder: Path, size_gb: float, dtype: str, shard_bytes: int) -> dict[str, Any]:
    """Write ``reference`` and ``finetuned`` = reference + :func:`finetune_delta` on every linear weight."""
    import torch

    from safetypatch.weights.stream import CheckpointReader, CheckpointWriter, select_names

    start = time.perf_counter()
    shape = shape_for(size_gb * GB, getattr(torch, dtype))
    shutil.rmtree(folder, ignore_errors=True)
    reference, finetuned = folder / "reference", folder / "finetuned"
    generate_base(reference, shape, getattr(torch, dtype), shard_bytes)
    reader = CheckpointReader(reference)
    with CheckpointWriter(finetuned, template=reference, max_shard_bytes=shard_bytes, overwrite=True) as writer:
        for name in select_names(reader, "linear"):
            weight = reader.get(name).float()
            delta = finetune_delta(name, tuple(weight.shape), float(torch.linalg.matrix_norm(weight)))
            writer.add(name, weight.add_(delta))
        writer.finish()
    for sub in (reference, finetuned):
        write_tokenizer(sub, shape.vocab)
    return {"seconds": time.perf_counter() - start, "hidden": shape.hidden, "layers": shape.layers}


def ensure_extract_pair(root: Path, size_gb: float, dtype: str, shard_gb: float) -> dict[str, Any]:
    """The extraction pair under ``root/extract``, reused when it is there with this shape."""
    import torch

    shape = shape_for(size_gb * GB, getattr(torch, dtype))
    folder = root / "extract"
    if all(_has_checkpoint(folder / sub, shape) and (folder / sub / "tokenizer.json").is_file()
           for sub in ("reference", "finetuned")):
        return {"generated": False, "hidden": shape.hidden, "layers": shape.layers}
    made = in_fresh_process(extract_pair_phase, folder, size_gb, dtype, int(shard_gb * GB))
    return {"generated": True, "generate_seconds": round(made["seconds"], 3), "hidden": made["hidden"],
            "layers": made["layers"]}


# ---- measuring a command -------------------------------------------------------------------------------------


def _files(folders: Sequence[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(folder.iterdir()) if f.is_file()]


def warm(folders: Sequence[Path]) -> float | None:
    """Read every file of ``folders`` once (into the page cache); the resident fraction afterwards."""
    buffer = bytearray(16 * 2**20)
    for path in _files(folders):
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    settle()
    return resident_fraction(folders)


def drop(folders: Sequence[Path], how: str) -> dict[str, Any]:
    """Drop the inputs from the page cache (``how``: auto, drop_caches, fadvise); what was done and the resident
    fraction of ``folders`` afterwards."""
    settle()
    used = "fadvise"
    if how in ("auto", "drop_caches"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as handle:
                handle.write("1\n")
            used = "drop_caches"
        except OSError:
            if how == "drop_caches":
                raise
    if used == "fadvise":
        drop_page_cache(folders)
    return {"method": used, "resident_fraction": resident_fraction(folders)}


def alternate(tools: Sequence[str], repeat: int) -> list[str]:
    """The tools' order in round ``repeat``: as given, then reversed, and so on."""
    return list(tools) if repeat % 2 == 0 else list(reversed(tools))


# ---- the comparisons -----------------------------------------------------------------------------------------


def compare_checkpoints(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor by tensor: the same names, dtypes, shapes and bytes?"""
    import torch

    from safetypatch.weights.stream import CheckpointReader

    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    names_a, names_b = set(a.names()), set(b.names())
    identical, differing, worst = 0, [], 0.0
    for name in sorted(names_a & names_b):
        x, y = a.get(name), b.get(name)
        if x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y):
            identical += 1
            continue
        if x.shape == y.shape:
            worst = max(worst, float((x.float() - y.float()).abs().max()))
        differing.append(f"{name} ({x.dtype}, {y.dtype})")
    return {"tensors": len(names_a), "identical": identical, "differing": differing[:10],
            "only_ours": sorted(names_a - names_b)[:10], "only_theirs": sorted(names_b - names_a)[:10],
            "max_abs_difference": worst,
            "all_identical": names_a == names_b and identical == len(names_a)}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def adapter_products(folder: Path) -> dict[str, Any]:
    """Module → s·B·A (fp32) of a PEFT LoRA adapter folder, s from its config (lora_alpha / r, or / √r with
    rsLoRA; ``rank_pattern`` and ``alpha_pattern`` honoured)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors: dict[str, Any] = {}
    for file in sorted(folder.glob("adapter_model*.safetensors")):
        tensors |= load_file(str(file))
    factors: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(PEFT_PREFIX))
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = value
    out = {}
    for module, ab in factors.items():
        r = _pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[module] = scale * (ab["B"].float() @ ab["A"].float())
    return {"products": out, "rank": config["r"], "dtype": str(next(iter(tensors.values())).dtype)}


def extraction_errors(adapters: dict[str, Path], finetuned: Path, reference: Path) -> dict[str, Any]:
    """Each adapter's relative Frobenius error ‖ΔW − s·B·A‖_F / ‖ΔW‖_F per module and overall, ΔW = finetuned −
    reference in fp32; and the comparison of the first adapter with the others, module by module."""
    import torch

    from safetypatch.weights.stream import CheckpointReader

    a, b = CheckpointReader(finetuned), CheckpointReader(reference)
    read = {tool: adapter_products(folder) for tool, folder in adapters.items()}
    modules = sorted(set.intersection(*(set(r["products"]) for r in read.values())))
    per_module: dict[str, dict[str, float]] = {tool: {} for tool in adapters}
    sums = {tool: [0.0, 0.0] for tool in adapters}
    for module in modules:
        delta = a.get(module + ".weight").float() - b.get(module + ".weight").float()
        norm = float(torch.linalg.matrix_norm(delta))
        for tool, r in read.items():
            residual = float(torch.linalg.matrix_norm(delta - r["products"][module]))
            per_module[tool][module] = residual / norm if norm > 0 else 0.0
            sums[tool][0] += residual**2
            sums[tool][1] += norm**2
    tools = list(adapters)
    result: dict[str, Any] = {"modules_compared": len(modules), "tools": {}}
    for tool in tools:
        errors = list(per_module[tool].values())
        result["tools"][tool] = {
            "modules": len(read[tool]["products"]), "rank": read[tool]["rank"], "factor_dtype": read[tool]["dtype"],
            "overall_error": math.sqrt(sums[tool][0] / sums[tool][1]) if sums[tool][1] else 0.0,
            "mean_error": sum(errors) / max(len(errors), 1), "max_error": max(errors, default=0.0),
            "per_module": per_module[tool]}
    if len(tools) > 1:
        ours, theirs = tools[0], tools[1]
        gaps = [per_module[ours][m] - per_module[theirs][m] for m in modules]
        result["ours_minus_theirs"] = {"max": max(gaps, default=0.0), "min": min(gaps, default=0.0),
                                       "modules_ours_not_higher": sum(g <= ERROR_SLACK for g in gaps)}
    return result


# ---- the methods timed in-process (fresh process) --------------------------------------------------------------


def svd_module_map(layers: int | None) -> dict[str, str] | None:
    """A ``module_map`` that keeps the linear weights of the first ``layers`` decoder layers (None: all)."""
    if layers is None:
        return None
    return {"llama": _LINEAR_TENSOR.format(layers="|".join(str(i) for i in range(layers)))}


def _moment(size: int, seed: int) -> Any:
    """A random positive semi-definite d × d second moment X Xᵀ / n of 2d Gaussian activations."""
    import torch

    x = torch.randn(size, 2 * size, generator=torch.Generator().manual_seed(seed))
    return (x @ x.T) / (2 * size)


def lssf_phase(root: Path, out: Path, module_map: dict[str, str] | None) -> dict[str, Any]:
    """LSSF through :func:`~safetypatch.restoration.runner.run_restore` (aligned, unsafe = base, target), with
    random anchor moments of the right size for every tensor (:func:`_moment`)."""
    from safetypatch.restoration import METHODS, RestoreContext
    from safetypatch.restoration.lssf import moment_side
    from safetypatch.restoration.runner import run_restore
    from safetypatch.weights.stream import CheckpointReader, select_names

    method = METHODS.get("lssf")()
    reader = CheckpointReader(root / "target")
    names = select_names(reader, "linear", module_map)
    moments: dict[int, Any] = {}
    statistics = {}
    for name in names:
        d_out, d_in = reader.shape(name)
        size = d_in if moment_side((d_out, d_in), method.config.decompose) == "input" else d_out
        statistics[name] = moments.setdefault(size, _moment(size, size))
    start = time.perf_counter()
    run = run_restore(method, {"aligned_model": root / "aligned", "unsafe_model": root / "base",
                               "target_model": root / "target"}, out, module_map=module_map,
                      context=RestoreContext(statistics=statistics), overwrite=True)
    return {"run_seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": peak_rss_bytes(),
            "tensors": len(names), "tensors_changed": run.report.summary()["changed"]}


# ---- the benchmark --------------------------------------------------------------------------------------------


def safetypatch_cli() -> Path:
    """The ``safetypatch`` console script next to this interpreter."""
    return Path(sys.executable).parent / "safetypatch"


def merge_config(root: Path, beta: float) -> Path:
    """mergekit's task_arithmetic equal to RESTA: base ``base`` (unsafe), ``aligned`` at β, ``target`` at 1."""
    text = (f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
            f"  - model: {root / 'aligned'}\n    parameters:\n      weight: {beta}\n"
            f"  - model: {root / 'target'}\n    parameters:\n      weight: 1.0\n"
            "parameters:\n  normalize: false\ndtype: float32\nout_dtype: bfloat16\n")
    path = root / "task_arithmetic.yml"
    path.write_text(text)
    return path


def merge_commands(args: Any, root: Path, with_mergekit: bool) -> dict[str, tuple[list[Any], Path]]:
    """Tool → (command, output folder) of the RESTA / task_arithmetic comparison."""
    out = {"safetypatch": ([safetypatch_cli(), "restore", "--method", "resta", "--aligned-model", root / "aligned",
                            "--unsafe-model", root / "base", "--target-model", root / "target", "--set",
                            f"beta={args.beta}", "-o", root / "out_resta", "--overwrite"], root / "out_resta")}
    if with_mergekit:
        config = merge_config(root, args.beta)
        out["mergekit"] = ([venv_tool(args.venv, "mergekit-yaml"), config, root / "out_mergekit", "--lazy-unpickle",
                            "--out-shard-size", "1B", "-j", str(args.threads), "--no-copy-tokenizer"],
                           root / "out_mergekit")
    return out


def extract_commands(args: Any, pair: Path, with_mergekit: bool) -> dict[str, tuple[list[Any], Path]]:
    """Tool → (command, output folder) of the extraction comparison."""
    out = {"safetypatch": ([safetypatch_cli(), "extract", "--target", pair / "finetuned", "--reference",
                            pair / "reference", "--rank", str(args.rank), "-o", pair / "out_safetypatch",
                            "--overwrite"], pair / "out_safetypatch")}
    if with_mergekit:
        out["mergekit"] = ([venv_tool(args.venv, "mergekit-extract-lora"), "--model", pair / "finetuned",
                            "--base-model", pair / "reference", "--out-path", pair / "out_mergekit", "--max-rank",
                            str(args.rank), "--include-regex", LINEAR_MODULES, "--lazy-unpickle", "-j",
                            str(args.threads), "--no-copy-tokenizer"], pair / "out_mergekit")
    return out


def run_rounds(commands: dict[str, tuple[list[Any], Path]], inputs: Sequence[Path], repeats: int, cold: str | None,
               log: Path) -> list[dict[str, Any]]:
    """``repeats`` rounds of every tool (alternating order), each run after a warm read of ``inputs`` (``cold``
    None) or after they were dropped from the page cache (``cold``: how)."""
    rows = []
    for repeat in range(repeats):
        for tool in alternate(list(commands), repeat):
            command, output = commands[tool]
            shutil.rmtree(output, ignore_errors=True)
            state = {"resident_fraction": warm(inputs)} if cold is None else drop(inputs, cold)
            rows.append({"tool": tool, "repeat": repeat, "cache": state, **run_measured(command, log)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per tool: every run's seconds and peak RSS, the fastest and the largest."""
    out: dict[str, Any] = {}
    for row in rows:
        entry = out.setdefault(row["tool"], {"seconds": [], "peak_rss_bytes": []})
        entry["seconds"].append(row["seconds"])
        entry["peak_rss_bytes"].append(row["peak_rss_bytes"])
    for entry in out.values():
        entry["best_seconds"] = min(entry["seconds"])
        entry["max_peak_rss_bytes"] = max(entry["peak_rss_bytes"])
    return out


def ratios(summary: dict[str, Any]) -> dict[str, float] | None:
    """safetypatch over mergekit: fastest time over fastest time, largest peak RSS over largest peak RSS."""
    if "mergekit" not in summary:
        return None
    ours, theirs = summary["safetypatch"], summary["mergekit"]
    return {"time": round(ours["best_seconds"] / theirs["best_seconds"], 3),
            "peak_rss": round(ours["max_peak_rss_bytes"] / theirs["max_peak_rss_bytes"], 3)}


def run_benchmark(args: Any, root: Path) -> dict[str, Any]:
    """Everything the module docstring lists, under ``root``."""
    with_mergekit = not args.no_mergekit
    version = ensure_mergekit(args.venv, args.mergekit, args.torch or torch_requirement()) if with_mergekit else None
    args.threads = args.threads or len(os.sched_getaffinity(0))
    checkpoints = ensure_merge_checkpoints(root, args.size_gb, args.dtype, args.shard_gb)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - {"merge", "extract", "methods"})
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; the parts are merge, extract, methods.")
    pair = ensure_extract_pair(root, args.extract_size_gb, args.dtype, args.shard_gb) if "extract" in parts else None
    shape = checkpoints.pop("shape")
    result: dict[str, Any] = {
        "benchmark": "mergekit_bench", "mergekit": version, "beta": args.beta, "threads": args.threads,
        "checkpoints": {**checkpoints, "hidden": shape.hidden, "layers": shape.layers, "vocab": shape.vocab,
                        "dtype": args.dtype,
                        "bytes_each": sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))},
        "extract_pair": pair}
    if args.prepare_only:
        return {**result, "prepared_only": True}
    log = root / "commands.log"
    for part in parts:
        if part == "merge":
            result["merge"] = merge_comparison(args, root, with_mergekit, log)
        elif part == "extract":
            result["extract"] = extract_comparison(args, root / "extract", with_mergekit, log)
        else:
            result["methods"] = methods_costs(args, root, log)
    result["acceptance"] = acceptance(result)
    return result


def merge_comparison(args: Any, root: Path, with_mergekit: bool, log: Path) -> dict[str, Any]:
    """RESTA against task_arithmetic: page-cached rounds, the outputs compared, cold rounds."""
    inputs = [root / sub for sub in MERGE_ROLES]
    merge = merge_commands(args, root, with_mergekit)
    cached = run_rounds(merge, inputs, args.repeats, None, log)
    identity = compare_checkpoints(merge["safetypatch"][1], merge["mergekit"][1]) if with_mergekit else None
    cold = run_rounds(merge, inputs, args.repeats, args.cold, log) if args.cold != "none" else []
    cached_summary, cold_summary = summarise(cached), summarise(cold)
    return {"commands": {tool: " ".join(map(str, command)) for tool, (command, _) in merge.items()},
            "page_cached": {"runs": cached, "summary": cached_summary, "ratio": ratios(cached_summary)},
            "cold": {"runs": cold, "summary": cold_summary, "ratio": ratios(cold_summary) if cold else None,
                     "method": sorted({row["cache"]["method"] for row in cold})},
            "outputs": identity}


def methods_costs(args: Any, root: Path, log: Path) -> dict[str, Any]:
    """Safe LoRA (the CLI) and LSSF (the runner, given moments) on the merge checkpoints, page-cached, once."""
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    module_map = svd_module_map(args.svd_layers)
    inputs = [root / sub for sub in MERGE_ROLES]
    out: dict[str, Any] = {"layers": args.svd_layers}
    if "safe_lora" in wanted:
        command = [safetypatch_cli(), "restore", "--method", "safe_lora", "--base-model", root / "base",
                   "--aligned-model", root / "aligned", "--target-model", root / "target", "-o",
                   root / "out_safe_lora", "--overwrite"]
        if module_map:
            command += ["--module-map", f"llama={module_map['llama']}"]
        warm(inputs)
        out["safe_lora"] = {"command": " ".join(map(str, command)), **run_measured(command, log)}
        report = json.loads((root / "out_safe_lora" / "restore.json").read_text())
        out["safe_lora"]["tensors_changed"] = report["summary"]["changed"]
    if "lssf" in wanted:
        warm(inputs)
        load_before = os.getloadavg()
        start = time.perf_counter()
        row = in_fresh_process(lssf_phase, root, root / "out_lssf", module_map)
        out["lssf"] = {"seconds": round(time.perf_counter() - start, 3), **row,
                       "load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()],
                       "anchors": "random moments given; anchor refusals and moments not timed"}
    return out


def extract_comparison(args: Any, pair: Path, with_mergekit: bool, log: Path) -> dict[str, Any]:
    """Both extractions, alternating, page-cached; then the errors from the written adapters."""
    commands = extract_commands(args, pair, with_mergekit)
    rows = run_rounds(commands, [pair / "reference", pair / "finetuned"], args.repeats, None, log)
    summary = summarise(rows)
    errors = extraction_errors({tool: output for tool, (_, output) in commands.items()}, pair / "finetuned",
                               pair / "reference")
    return {"rank": args.rank, "commands": {tool: " ".join(map(str, c)) for tool, (c, _) in commands.items()},
            "runs": rows, "summary": summary, "ratio": ratios(summary), "errors": errors}


def acceptance(result: dict[str, Any]) -> dict[str, bool] | None:
    """The issue's acceptance lines (module docstring) of the parts that ran; None without mergekit."""
    if not result["mergekit"]:
        return None
    out = {}
    merge = result.get("merge")
    if merge is not None:
        for phase in ("page_cached", "cold"):
            ratio = merge[phase]["ratio"]
            if ratio is not None:
                out[f"resta_time_at_most_{TIME_RATIO_GOAL}x_mergekit_{phase}"] = ratio["time"] <= TIME_RATIO_GOAL
                out[f"resta_peak_rss_at_most_{RSS_RATIO_GOAL}x_mergekit_{phase}"] = (
                    ratio["peak_rss"] <= RSS_RATIO_GOAL)
        out["outputs_identical"] = bool(merge["outputs"]["all_identical"])
    extract = result.get("extract")
    if extract is not None and extract["ratio"] is not None:
        errors = extract["errors"]
        tools = errors["tools"]
        out["extract_time_at_most_1x_mergekit"] = extract["ratio"]["time"] <= 1.0
        out["extract_error_equal_or_lower_every_module"] = (
            errors["ours_minus_theirs"]["modules_ours_not_higher"] == errors["modules_compared"] > 0)
        out["extract_error_equal_or_lower_overall"] = (
            tools["safetypatch"]["overall_error"] <= tools["mergekit"]["overall_error"] + ERROR_SLACK)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the benchmark, print (and with ``--json`` write) its JSON; outputs and (unless
    ``--keep``) checkpoints are removed afterwards."""
    args = parse(arguments(), argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1.")
    root = (args.out or Path("runs/mergekit-bench")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(args, root)
    finally:
        for sub in ("out_resta", "out_mergekit", "out_safe_lora", "out_lssf", "extract/out_safetypatch",
                    "extract/out_mergekit"):
            shutil.rmtree(root / sub, ignore_errors=True)
        if not args.keep and not args.prepare_only:
            for sub in (*MERGE_ROLES, "extract"):
                shutil.rmtree(root / sub, ignore_errors=True)
    return emit({**result, "folder": str(root)}, args, argv, "bench.mergekit_bench")


if __name__ == "__main__":
    main()
