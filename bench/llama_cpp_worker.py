"""llama.cpp's side of ``bench/llama_cpp_check.py``, run by the interpreter of the virtual environment that check
builds llama-cpp-python into: ``python bench/llama_cpp_worker.py JOB.json``.

It needs only the standard library, numpy and ``llama_cpp`` (imported when a job runs), never safetypatch or torch.
The job (JSON) names the variants, each a model GGUF with an optional LoRA adapter GGUF, and gives token ids, so
that tokenisation is not part of the comparison:

- ``prompts``: answered greedily (top-k 1, temperature 0, no penalties), at most ``max_new_tokens`` tokens, stopping
  at a token of ``stop`` (not included);
- ``probe``: evaluated once each; the log-probabilities of the next token at every position are kept.

Per variant it writes ``<out>/<name>.json`` (answers, seconds, llama-cpp-python version, the variant's ``key``) and
``<out>/<name>.npz`` (one float32 array [positions, vocabulary] per probe prompt, ``arr_0``, ``arr_1``, ...). The key
is the sha256 of the variant's files, the token ids and the settings; with ``reuse`` in the job a variant whose
``<name>.json`` holds the same key is not run again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax of a [positions, vocabulary] array, in float64, returned as float32."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def greedy(llm: Any, prompt: list[int], max_new_tokens: int, stop: Iterable[int]) -> list[int]:
    """The greedy continuation of ``prompt`` (the stop token left out)."""
    stop = set(stop)
    answer: list[int] = []
    if max_new_tokens <= 0:
        return answer
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if int(token) in stop:
            break
        answer.append(int(token))
        if len(answer) >= max_new_tokens:
            break
    return answer


def next_token_logprobs(llm: Any, prompt: list[int]) -> Any:
    """Log-probabilities of the next token after every prefix of ``prompt``: [len(prompt), vocabulary]."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    return log_softmax(np.asarray(llm.scores[: len(prompt)]))


def variant_key(job: dict[str, Any], variant: dict[str, Any], version: str) -> str:
    """The sha256 of what a variant's outputs depend on: its model and adapter files' bytes, the token ids, the
    settings and llama-cpp-python's version."""
    digest = hashlib.sha256()
    for path in (variant["model"], variant.get("lora")):
        if path is not None and Path(path).is_file():
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    settings = {key: job.get(key) for key in ("prompts", "probe", "max_new_tokens", "stop", "n_ctx", "threads",
                                               "n_gpu_layers", "kv_f32")}
    digest.update(json.dumps([settings, version, variant.get("lora") is not None], sort_keys=True).encode())
    return digest.hexdigest()


def run_job(job: dict[str, Any], llama: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run every variant of ``job`` and write its files; returns {variant name: its JSON record}.

    Args:
        job: ``variants`` ([{name, model, lora}]), ``prompts``, ``probe``, ``max_new_tokens``, ``stop``, ``n_ctx``,
            ``threads``, ``n_gpu_layers`` and ``out`` (a folder); optional ``reuse`` and ``kv_f32`` (the KV cache
            in fp32 instead of llama.cpp's f16).
        llama: the model class (default ``llama_cpp.Llama``; tests pass a stand-in).
    """
    import numpy as np

    module = importlib.import_module("llama_cpp") if llama is None else None
    llama = module.Llama if module is not None else llama
    version = getattr(module, "__version__", "stand-in")
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for variant in job["variants"]:
        key = variant_key(job, variant, version)
        done = out / f"{variant['name']}.json"
        if job.get("reuse") and done.is_file() and (out / f"{variant['name']}.npz").is_file():
            record = json.loads(done.read_text())
            if record.get("key") == key:
                print(f"{variant['name']}: reused", file=sys.stderr, flush=True)
                records[variant["name"]] = record
                continue
        print(f"{variant['name']}: {variant['model']}" + (f" + {variant['lora']}" if variant.get("lora") else ""),
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        options: dict[str, Any] = {"model_path": variant["model"], "n_ctx": job["n_ctx"], "logits_all": True,
                                   "n_threads": job["threads"], "n_threads_batch": job["threads"],
                                   "n_gpu_layers": job["n_gpu_layers"], "seed": 0, "verbose": False}
        if variant.get("lora"):
            options.update(lora_path=variant["lora"], lora_scale=1.0)
        if job.get("kv_f32"):
            options.update(type_k=0, type_v=0)  # GGML_TYPE_F32: the KV cache in fp32 (llama.cpp's default is f16)
        llm = llama(**options)
        if "part" in job:  # one piece of a variant (see merge_parts): prompts[a:b], and the probe when asked
            a, b = job["part"]["prompts"]
            answers = [greedy(llm, prompt, job["max_new_tokens"], job["stop"]) for prompt in job["prompts"][a:b]]
            stem = f"{variant['name']}.part-{a}-{b}"
            if job["part"].get("probe"):
                np.savez(out / f"{stem}.npz", *[next_token_logprobs(llm, prompt) for prompt in job["probe"]])
            records[variant["name"]] = {"answers": answers, "seconds": time.perf_counter() - start, "key": key}
            (out / f"{stem}.json").write_text(json.dumps(records[variant["name"]]) + "\n")
            del llm
            continue
        answers = [greedy(llm, prompt, job["max_new_tokens"], job["stop"]) for prompt in job["prompts"]]
        np.savez(out / f"{variant['name']}.npz", *[next_token_logprobs(llm, prompt) for prompt in job["probe"]])
        records[variant["name"]] = {"answers": answers, "seconds": time.perf_counter() - start,
                                    "llama_cpp_python": version, "model": variant["model"],
                                    "lora": variant.get("lora"), "key": key}
        (out / f"{variant['name']}.json").write_text(json.dumps(records[variant["name"]]) + "\n")
        del llm
    return records


def merge_parts(job: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    """Join the pieces of variant ``name`` (jobs with ``part``, run side by side) into its ``<name>.json`` and
    ``<name>.npz``, under the key of the whole variant, as one run would have written them. The pieces must cover
    the prompts in order (an answer of None: not run) and one of them must hold the probe, or there are no answers
    (``answers`` None) when no piece has any."""
    import shutil

    out = Path(job["out"])
    variant = next(item for item in job["variants"] if item["name"] == name)
    pieces = sorted(out.glob(f"{name}.part-*.json"),
                    key=lambda path: tuple(int(x) for x in path.stem.split(".part-")[1].split("-")))
    answers: list[Any] = []
    covered = 0
    for piece in pieces:
        a, b = (int(x) for x in piece.stem.split(".part-")[1].split("-"))
        if a != covered:
            raise SystemExit(f"{name}: pieces do not cover prompts {covered}-{a}")
        answers += json.loads(piece.read_text())["answers"]
        covered = b
    probe = [path for path in out.glob(f"{name}.part-*.npz")]
    if not probe:
        raise SystemExit(f"{name}: no piece holds the probe")
    if covered not in (0, len(job["prompts"])):
        raise SystemExit(f"{name}: the pieces answer {covered} of {len(job['prompts'])} prompts")
    shutil.copyfile(probe[0], out / f"{name}.npz")
    record = {"answers": answers if covered else None,
              "seconds": sum(json.loads(piece.read_text())["seconds"] for piece in pieces),
              "llama_cpp_python": version, "model": variant["model"], "lora": variant.get("lora"),
              "key": variant_key(job, variant, version), "pieces": [piece.name for piece in pieces]}
    (out / f"{name}.json").write_text(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python bench/llama_cpp_worker.py JOB.json")
    run_job(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
