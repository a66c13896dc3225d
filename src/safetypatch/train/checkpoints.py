"""Training checkpoints of ``safetypatch train`` beside its output, and resuming from the last one.

A run with ``checkpoint_every`` N has Trainer save its whole state (adapter or weights, optimiser, scheduler, RNG
states, loss log) every N optimiser steps into ``<output>.checkpoints/checkpoint-<step>/``, keeping the newest
complete one, next to what came before training that a resume should not redo or must match: the model's own retain
answers and the recipe and digest of the training examples (``run.json``). A rerun with ``resume`` continues from the
last complete checkpoint (one whose ``trainer_state.json``, which Trainer writes last, reads back) and ends with the
loss history and weights of an uninterrupted run; a rerun with other data or another recipe is refused. The folder
lives beside the output, not in the output's temporary folder, so that a killed run leaves it behind; it is removed
once the output is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from safetypatch.errors import ConfigError, OutputExistsError
from safetypatch.utils.distributed import is_main_process
from safetypatch.utils.hashing import sha256_json
from safetypatch.utils.io import (
    MARKER,
    atomic_path,
    check_replaceable,
    discard_output,
    note_if_interrupted,
    recover_interrupted,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
SUFFIX = ".checkpoints"
RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last into a checkpoint


@dataclass(frozen=True)
class Checkpointing:
    """What the trainer needs: where checkpoints go, how often, and the one to resume from (None: start afresh).

    Attributes:
        folder: Trainer's output folder, holding ``checkpoint-<step>/``.
        every: optimiser steps between checkpoints (None: none are saved).
        resume_from: the checkpoint folder to continue from.
    """

    folder: Path
    every: int | None
    resume_from: Path | None = None


def checkpoint_folder(output: Path) -> Path:
    """``<output>.checkpoints``, beside ``output``."""
    output = Path(os.path.abspath(Path(output).expanduser()))
    return output.with_name(output.name + SUFFIX)


def last_checkpoint(folder: Path) -> tuple[int, Path] | None:
    """The complete checkpoint of the highest step in ``folder`` and its step: a ``checkpoint-<step>/`` whose
    ``trainer_state.json`` reads back with that step (a killed save leaves it missing or truncated); None when there
    is none."""
    found = []
    for entry in Path(folder).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", entry.name)
        if match is None or not entry.is_dir():
            continue
        try:
            state = json.loads((entry / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("global_step") == int(match[1]):
            found.append((int(match[1]), entry))
    return max(found, default=None)


class TrainCheckpoints:
    """The checkpoint folder of one ``train`` run: checked when the run starts, filled while it runs (main process
    only), removed when its output is written.

    Args:
        output: the run's output path; the checkpoints live in :func:`checkpoint_folder` of it.
        every: optimiser steps between checkpoints; None: none, unless resuming (then the interval of the checkpoint
            resumed from).
        resume: continue from the last complete checkpoint; without one, train from the first step (logged).
        overwrite: without ``resume``, remove the checkpoints an earlier run left.

    Raises:
        OutputExistsError: the folder holds an earlier run's checkpoints and neither ``resume`` nor ``overwrite`` is
            given, or it is not this tool's.
    """

    def __init__(self, output: Path, *, every: int | None, resume: bool, overwrite: bool) -> None:
        self.folder = checkpoint_folder(output)
        self.resume = resume
        recover_interrupted(self.folder)
        if os.path.lexists(self.folder):
            check_replaceable(self.folder, folder=True)
            if not resume and not overwrite:
                raise OutputExistsError(
                    f"{self.folder} holds the training checkpoints of an earlier run of {output} that did not finish. "
                    "Pass --resume (TrainConfig.resume) to continue from the last one, or --overwrite to start over "
                    "(they are removed).")
            if not resume and is_main_process():
                discard_output(self.folder)
        self.last = last_checkpoint(self.folder) if resume else None
        if self.last is not None and is_main_process():
            # A checkpoint killed mid-save has a higher step; Trainer keeps the highest-numbered one, so it could
            # outlive the complete ones this run saves.
            for entry in self.folder.glob("checkpoint-*"):
                if entry != self.last[1] and entry.is_dir():
                    shutil.rmtree(entry)
        if resume and self.last is None:
            logger.warning("no complete checkpoint in %s to resume from; training from the first step", self.folder)
        elif self.last is not None:
            logger.warning("resuming from %s (step %d)", self.last[1], self.last[0])
        self.every = every if every is not None or self.last is None else self._saved_interval(self.last[1])
        if self.every is not None or self.last is not None:
            note_if_interrupted(self._interruption_note)

    @property
    def active(self) -> bool:
        """Whether this run saves checkpoints or resumes from one (and so keeps what comes before training)."""
        return self.every is not None or self.last is not None

    def trainer_settings(self) -> Checkpointing | None:
        """What ``train_refusal_patch`` needs (None when the run neither saves nor resumes); the folder is made, with
        the marker that makes it this tool's."""
        if not self.active:
            return None
        self._make_folder()
        return Checkpointing(self.folder, self.every, self.last[1] if self.last is not None else None)

    def reuse(self, name: str, key: Any, make: Callable[[], list[T]], kind: Callable[..., T]) -> list[T]:
        """``make()``, kept in the folder as ``<name>.json`` under a digest of ``key`` (what the result depends on),
        and read back from there instead when resuming with the same ``key``.

        Args:
            name: the file's stem.
            key: JSON-able inputs of ``make`` (the model's provenance, settings, prompts).
            make: computes the items (dataclass instances).
            kind: the items' dataclass; lists read back become tuples.
        """
        path = self.folder / f"{name}.json"
        digest = sha256_json(key)
        if self.resume and path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("key") == digest:
                    logger.warning("reusing %s from %s", name.replace("_", " "), path)
                    return [kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in item.items()})
                            for item in stored["items"]]
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                logger.warning("%s cannot be reused; computing it again", path)
        items = make()
        if self.active:
            self._write(path.name, {"key": digest, "items": [dataclasses.asdict(item) for item in items]})
        return items

    def bind(self, recipe: dict[str, Any], examples_sha256: str) -> None:
        """Record the run's recipe and examples digest; when resuming, check them against those recorded.

        Raises:
            ConfigError: the checkpoints were written by a run with another recipe or other training examples.
        """
        if not self.active:
            return
        path = self.folder / RUN_FILE
        run = {"recipe": recipe, "examples_sha256": examples_sha256}
        if self.last is not None and path.is_file():
            recorded = json.loads(path.read_text(encoding="utf-8"))
            differ = sorted(k for k in {*recipe, *recorded.get("recipe", {})}
                            if recipe.get(k) != recorded.get("recipe", {}).get(k))
            if differ or recorded.get("examples_sha256") != examples_sha256:
                what = f"recipe fields {differ}" if differ else "training examples (sets, counts, forms or model)"
                raise ConfigError(
                    f"{self.folder} holds the checkpoints of a run with other {what} than this one, so resuming "
                    "would train a mix of the two. Run again with the options the interrupted run had, or pass "
                    "--overwrite without --resume to start over (the checkpoints are removed).")
        self._write(RUN_FILE, run)

    def remove(self) -> None:
        """Remove the folder (the output is written)."""
        if is_main_process():
            discard_output(self.folder)

    def _make_folder(self) -> None:
        if is_main_process() and not (self.folder / MARKER).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / MARKER).write_text("training checkpoints of safetypatch train; removed when it finishes\n",
                                              encoding="utf-8")

    def _write(self, name: str, obj: Any) -> None:
        if not is_main_process():
            return
        self._make_folder()
        with atomic_path(self.folder / name, overwrite=True, cache=True) as tmp:
            tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")

    def _interruption_note(self) -> str | None:
        last = last_checkpoint(self.folder)
        if last is None:
            return None
        return (f"Run the command again with --resume to continue from the training checkpoint of step {last[0]}, "
                f"kept in {self.folder}.")

    @staticmethod
    def _saved_interval(checkpoint: Path) -> int | None:
        steps = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("save_steps")
        return steps if isinstance(steps, int) and steps > 0 else None
