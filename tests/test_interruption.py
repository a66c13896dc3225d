"""Interrupting a verb never leaves a folder at its output path that looks complete and is not (issue 28).

Each verb that writes a model or patch folder (train, apply --mode merge, restore, extract, finetune) runs as
``python -m safetypatch.cli`` on the tiny models of ``tests/tiny.py`` and is stopped at seeded points: SIGKILL the
moment its temporary output appears beside the output path (mid-write), SIGINT (Ctrl-C) a random time after it
started working, SIGKILL a random time after it started. After every stop the output path holds nothing or a complete
output (the marker, the manifest, files that load back); after SIGINT the verb exited with code 130 and said in one
line what it did not write (and, for train, which checkpoint --resume continues from), printed no traceback and left
no temporary behind. The next run (with --overwrite where an output is already there; train always with
--checkpoint-every and --resume) starts cleanly, and a last one completes, resumes train from the checkpoint the
runs before left, and leaves the output alone in its folder, with the weights of every complete output an earlier
run left (the runs are deterministic, a resumed one included).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from safetypatch.models.loading import load_model
from safetypatch.patch import PatchManifest, load_patch, save_patch
from safetypatch.train.checkpoints import checkpoint_folder, last_checkpoint
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import MARKER
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")},
       "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TIMEOUT = 240.0


@dataclass(frozen=True)
class Stop:
    """How a run is stopped: ``signal`` sent as soon as the temporary output appears (``writing``), or a random time
    after the start (SIGINT: not before the verb's first line, when its guard is in place)."""

    signal: int
    writing: bool = False


STOPS = (Stop(signal.SIGKILL, writing=True), Stop(signal.SIGINT), Stop(signal.SIGKILL))


@dataclass(frozen=True)
class Verb:
    """A verb's command (``{name}`` placeholders are input paths; the output option comes last), its weights file,
    its manifest, how long a run takes on two busy cores (the range of the random stops), how an output folder is
    read back, the stops of its runs before the last, and whether it resumes from training checkpoints kept beside
    the output (train with --checkpoint-every and --resume)."""

    command: tuple[str, ...]
    weights: str
    manifest: str
    seconds: float
    reads_back: Callable[[Path], object]
    stops: tuple[Stop, ...] = STOPS
    resumes: bool = False


def _model(folder: Path) -> object:
    return load_model(str(folder), device="cpu", dtype="float32")


VERBS = {
    "train": Verb(("train", "--model", "{llama}", "--harmful", "harmbench", "--n-harmful", "4", "--retain",
                   "everyday-requests", "--retain-max-new-tokens", "4", "--set",
                   "retain_count=4,max_steps=6,per_device_train_batch_size=2", "--checkpoint-every", "2",
                   "--resume"),
                  "adapter_model.safetensors", "safety_patch.json", 9.0, load_patch, resumes=True),
    "apply-merge": Verb(("apply", "--model", "{llama}", "--patch", "{patch}", "--mode", "merge"), "model.safetensors",
                        "safety_patch_applied.json", 5.0, _model),
    "restore": Verb(("restore", "--method", "resta", "--aligned-model", "{llama}", "--unsafe-model", "{tuned}",
                     "--target-model", "{tuned}"), "model.safetensors", "restore.json", 2.0, _model,
                    (*STOPS, Stop(signal.SIGINT, writing=True))),
    "extract": Verb(("extract", "--target", "{tuned}", "--reference", "{llama}", "--rank", "2"),
                    "adapter_model.safetensors", "safety_patch.json", 5.0, load_patch),
    "finetune": Verb(("finetune", "--model", "{llama}", "--dataset", "{rows}", "--set", "max_steps=4"),
                     "model.safetensors", "finetune.json", 6.0, _model),
}


@pytest.fixture(scope="module")
def inputs(tiny_model_dirs, tmp_path_factory) -> dict[str, str]:
    """The tiny llama, a fine-tuned descendant of it (``tuned``), a LoRA patch on it and a few prompt/response rows."""
    root = tmp_path_factory.mktemp("interruption-inputs")
    llama = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    save_patch(random_patch(llama.model, modules=("up_proj", "o_proj"), scale=0.3), root / "patch",
               PatchManifest(method="test", base_model=llama.provenance()), model=llama.model)
    tuned, tokenizer = build_tiny_model("llama")
    with torch.no_grad():
        for layer in tuned.model.layers:
            layer.mlp.down_proj.weight.add_(0.01 * torch.randn_like(layer.mlp.down_proj.weight))
    tuned.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."}) + "\n"
                            for i in range(6)))
    return {"llama": str(tiny_model_dirs["llama"]), "tuned": str(root / "tuned"), "patch": str(root / "patch"),
            "rows": str(rows)}


@dataclass(frozen=True)
class Ran:
    pid: int
    returncode: int
    stderr: str
    seconds: float
    stopped_writing: bool  # the signal was sent while the temporary output existed


def _temporaries(output: Path, pid: int | None = None) -> list[str]:
    """The temporary outputs beside ``output`` (of process ``pid`` only, if given)."""
    prefix = f".{output.name}.{'' if pid is None else f'{pid}.'}"
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp"))


def _run(command: list[str], output: Path, stop: Stop | None, delay: float) -> Ran:
    """Run the CLI, stopped as ``stop`` says (``delay``: seconds after the start), and wait for it to end."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "safetypatch.cli", *command], env=ENV, cwd=output.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    writing = False
    if stop is not None:
        if stop.writing:
            while proc.poll() is None and not _temporaries(output, proc.pid) and time.monotonic() - start < TIMEOUT:
                time.sleep(0.002)
            time.sleep(delay)
        else:
            if stop.signal == signal.SIGINT:
                started.wait(TIMEOUT)
            time.sleep(max(0.0, start + delay - time.monotonic()))
        writing = bool(_temporaries(output, proc.pid))
        if proc.poll() is None:
            proc.send_signal(stop.signal)
    returncode = proc.wait(TIMEOUT)
    reader.join(TIMEOUT)
    return Ran(proc.pid, returncode, "".join(lines), time.monotonic() - start, writing)


def _check_output(verb: Verb, output: Path) -> str | None:
    """The sha256 of a complete output's weights, None when nothing is at ``output``; fails on anything else."""
    if not os.path.lexists(output):
        return None
    assert output.is_dir(), f"{output} is not a folder"
    names = {p.name for p in output.iterdir()}
    assert {MARKER, verb.manifest, verb.weights} <= names, f"{output} looks incomplete: {sorted(names)}"
    json.loads((output / verb.manifest).read_text())
    verb.reads_back(output)
    return sha256_file(output / verb.weights)


@pytest.mark.parametrize("name", list(VERBS))
def test_a_stopped_verb_leaves_nothing_or_a_complete_output_and_a_rerun_works(name, inputs, tmp_path):
    verb = VERBS[name]
    output = tmp_path / "out" / "result"
    output.parent.mkdir()
    command = [part.format(**inputs) for part in verb.command] + ["-o", str(output)]
    rng = random.Random(f"issue 28, {name}")
    complete: set[str] = set()
    log = []
    for stop in verb.stops:
        delay = 0.0 if stop.writing else rng.uniform(0, verb.seconds)
        again = ["--overwrite"] if output.exists() else []
        ran = _run(command + again, output, stop, delay)
        log.append(f"{stop.signal.name}{' writing' if stop.writing else ''} after {delay:.2f} s: exit "
                   f"{ran.returncode} at {ran.seconds:.1f} s")
        digest = _check_output(verb, output)
        if digest is not None:
            complete.add(digest)
        if ran.returncode == 0:
            assert digest is not None, ran.stderr
            continue
        assert "Traceback" not in ran.stderr, ran.stderr
        if stop.signal == signal.SIGINT:
            # 130, or death by SIGINT (which a shell reports as 130 too): CPython 3.11 ends a process so when the
            # KeyboardInterrupt arrived inside exec() (dataclasses build their methods so while modules import),
            # even though the CLI caught it.
            assert ran.returncode in (130, -signal.SIGINT), ran.stderr
            # One last line, unless the signal came after the verb had returned (its output complete, "done" said).
            lines = ran.stderr.strip().splitlines()
            said = [line for line in lines if line.startswith("interrupted: ")]
            assert said or digest is not None, ran.stderr
            assert not said or (said == lines[-1:] and "Run the command again" in lines[-1]), ran.stderr
            assert digest is not None or said[0].startswith("interrupted: nothing was written"), ran.stderr
            if said and verb.resumes and last_checkpoint(checkpoint_folder(output)) is not None:
                assert "with --resume to continue from the training checkpoint of step" in said[0], ran.stderr
            assert not _temporaries(output, ran.pid), f"SIGINT left its temporary: {_temporaries(output)}"
        else:
            assert ran.returncode == -signal.SIGKILL, ran.stderr
        if stop.writing:
            assert ran.stopped_writing, f"the signal missed the write ({log[-1]})"
            if stop.signal == signal.SIGKILL:
                assert _temporaries(output, ran.pid), "a killed run left no temporary output"
    again = ["--overwrite"] if output.exists() else []
    kept = last_checkpoint(checkpoint_folder(output))
    ran = _run(command + again, output, None, 0)
    assert ran.returncode == 0, ran.stderr
    digest = _check_output(verb, output)
    if verb.resumes:
        resumed = json.loads((output / verb.manifest).read_text())["training"]["resumed_from_step"]
        assert resumed == (kept[0] if kept else 0), ran.stderr
        log.append(f"resumed from step {resumed}")
    assert digest is not None and complete <= {digest}, "a complete output of an earlier run has other weights"
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name], "a temporary or other file remains"
    print(f"{name}: " + "; ".join(log) + f"; rerun {ran.seconds:.1f} s")


def test_an_interrupt_that_a_library_turns_into_another_error_is_reported_as_an_interruption(monkeypatch, tmp_path):
    """torch swallows a KeyboardInterrupt that arrives while safetensors builds a tensor and raises a ValueError
    instead: the verb still says it was interrupted and what it did not write, not that a file is truncated."""
    from typer.testing import CliRunner

    from safetypatch import api
    from safetypatch.cli import app
    from safetypatch.utils.io import ensure_writable

    def extract(job: object) -> None:
        ensure_writable(job.output, job.overwrite, folder=True)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setattr(api, "extract", extract)
    output = tmp_path / "patch"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell starts background jobs ignoring it
    try:
        done = CliRunner().invoke(app, ["extract", "--target", "t", "--reference", "r", "-o", str(output)])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done.exit_code == 130, done.output
    assert done.output.splitlines()[-1] == f"interrupted: nothing was written at {output}. Run the command again to " \
                                           "redo it.", done.output
    assert after is signal.default_int_handler  # the guard put Python's handler back
