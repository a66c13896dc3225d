"""Bad input never costs a user data or a traceback (issue 28).

One row per bad input a verb can be given: a path, a model, a patch, a dataset, a YAML file or an option value. Each
row builds its input in a fresh work folder (from the tiny llama of ``tests/tiny.py`` and a LoRA patch saved on it),
runs the command (the typer app in process, or an API call), and checks that

- it ends with the expected exit code (2 for the project's own errors), raised from the expected error class,
  without a traceback;
- the error message (from ``error:`` on, not the verb's opening line) names the culprit (file, field, folder or
  value), compared with whitespace removed because the console wraps long lines;
- nothing was written and nothing was lost: the work folder and the shared model and patch hash the same before and
  after. The work folder is the current directory, so a default output (``runs/...``) would show up too.

Rows marked ``loads_model=False`` must fail before any model is loaded: loading one raises in them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.exceptions import TyperException
from typer.testing import CliRunner

from safetypatch.cli import app
from safetypatch.errors import (
    AssetError,
    ConfigError,
    DataError,
    ModelError,
    OutputExistsError,
    PatchError,
)
from safetypatch.models.loading import load_model
from safetypatch.patch import PatchManifest, save_patch
from safetypatch.utils import wheels
from tests.patch.helpers import random_patch
from tests.train.conftest import single_cpu_thread  # noqa: F401  (autouse)

Paths = dict[str, Path]
Setup = Callable[[Paths], None]


@dataclass(frozen=True)
class Case:
    """One row: ``command`` (CLI arguments, formatted with the row's paths, or a function of them that must raise)
    fails with ``error`` and ``exit_code`` and names every string of ``culprit`` (formatted likewise)."""

    id: str
    command: tuple[str, ...] | Callable[[Paths], Any]
    error: type[Exception]
    culprit: tuple[str, ...]
    setup: tuple[Setup, ...] = ()
    exit_code: int = 2
    loads_model: bool = False
    cwd: str = "."
    hook: Callable[[pytest.MonkeyPatch], None] | None = None
    traceback: bool = False


# --- inputs -------------------------------------------------------------------------------------------------------

def _copy(source: str, name: str, *edits: Callable[[Path], None]) -> Setup:
    """Copy the shared ``source`` (model or patch) to ``work/name``, then edit the copy."""

    def setup(paths: Paths) -> None:
        folder = paths["work"] / name
        shutil.copytree(paths[source], folder)
        for edit in edits:
            edit(folder)
        paths[name] = folder

    return setup


def _bad_patch(*edits: Callable[[Path], None]) -> Setup:
    return _copy("patch", "bad_patch", *edits)


def _bad_model(*edits: Callable[[Path], None]) -> Setup:
    return _copy("model", "bad_model", *edits)


def _write(name: str, text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).write_text(text, encoding="utf-8")

    return edit


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


def _delete(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).unlink()

    return edit


def _set_json(name: str, key: str, value: Any) -> Callable[[Path], None]:
    """Set (or, with ``...``, delete) the dotted ``key`` of a JSON file."""

    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
        (folder / name).write_text(json.dumps(data))

    return edit


def _file(name: str, text: str) -> Setup:
    def setup(paths: Paths) -> None:
        path = paths["work"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths[name.replace(".", "_").replace("/", "_")] = path

    return setup


def _rows(n: int, response: bool = True) -> str:
    return "".join(json.dumps({"prompt": f"what is {i} + {i}?", **({"response": str(2 * i)} if response else {})})
                   + "\n" for i in range(n))


def _symlink(name: str, target: str) -> Setup:
    def setup(paths: Paths) -> None:
        (paths["work"] / name).symlink_to(paths[target], target_is_directory=True)

    return setup


def _nested_cwd(paths: Paths) -> None:
    (paths["work"] / "sub").mkdir()


def _stale_user_folder(paths: Paths) -> None:
    """A folder beside the output whose name merely looks like a temporary of it (the user's own)."""
    folder = paths["work"] / ".out.mine.tmp"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine\n")


def _crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from safetypatch import api

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom: an unexpected failure")

    monkeypatch.setattr(api, "apply_patch", boom)


def _extract_member(member: str) -> Callable[[Paths], Any]:
    """Extract folder ``toypkg/data/`` of a wheel that also holds ``member`` (formatted with the row's paths)."""

    def run(paths: Paths) -> Any:
        name = member.format(**paths)
        wheel = paths["work"] / "house" / "toypkg-1.0-py3-none-any.whl"
        wheel.parent.mkdir()
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(zipfile.ZipInfo("toypkg/data/rows.jsonl"), b'{"prompt": "hi"}\n')
            archive.writestr(zipfile.ZipInfo(name), b"escaped\n")
        asset = wheels.WheelAsset("toypkg==1.0", hashlib.sha256(wheel.read_bytes()).hexdigest())
        os.environ["SAFETYPATCH_WHEELHOUSE"] = str(wheel.parent)
        try:
            return wheels.extract(asset, "toypkg/data/")
        finally:
            shutil.rmtree(wheel.parent)
            del os.environ["SAFETYPATCH_WHEELHOUSE"]

    return run


# --- the table ----------------------------------------------------------------------------------------------------

APPLY = ("apply", "--model", "{model}", "--patch", "{patch}")
RESTA = ("restore", "--method", "resta", "--aligned-model", "{model}", "--unsafe-model", "{model}", "--target-model",
         "{model}")
EXTRACT = ("extract", "--target", "{model}", "--reference", "{model}", "--rank", "2")
ANALYZE = ("analyze", "--model", "{model}", "--patch", "{patch}", "--no-hidden-shift", "--no-cache")
FINETUNE = ("finetune", "--model", "{model}", "--dataset", "{rows_jsonl}", "--set", "max_steps=1")
TRAIN = ("train", "--model", "{model}", "--set", "max_steps=1,retain_count=1")
EVAL = ("eval", "--model", "{model}", "--tasks", "arc-easy", "--limit", "1", "--output-dir", "{work}/eval")
REPORT = ("report",)
DEMO = ("demo", "--model", "{model}", "--limit", "1")
ROWS = _file("rows.jsonl", _rows(4))

# Every verb that takes a patch folder, with {P} where the folder goes.
PATCH_VERBS = {
    "apply": ("apply", "--model", "{model}", "--patch", "{P}"),
    "eval": ("eval", "--model", "{model}", "--adapter", "{P}", "--tasks", "arc-easy", "--limit", "1",
             "--output-dir", "{work}/eval"),
    "analyze": ("analyze", "--model", "{model}", "--patch", "{P}", "--no-hidden-shift", "--no-cache", "-o",
                "{work}/analysis"),
    "restore": ("restore", "--method", "safe_lora", "--base-model", "{model}", "--aligned-model", "{model}",
                "--target-model", "{P}", "-o", "{work}/restored"),
}
ADAPTER_CONFIG, WEIGHTS, MANIFEST = "{bad_patch}/adapter_config.json", "{bad_patch}/adapter_model.safetensors", \
    "{bad_patch}/safety_patch.json"
# (id, setup, error, culprit, verbs that take this kind of folder)
PATCH_FAULTS: list[tuple[str, Setup | None, type[Exception], tuple[str, ...], tuple[str, ...]]] = [
    ("config-truncated", _bad_patch(_truncate("adapter_config.json")), PatchError, (ADAPTER_CONFIG, "JSON"),
     tuple(PATCH_VERBS)),
    ("config-not-json", _bad_patch(_write("adapter_config.json", "r = 8\n")), PatchError, (ADAPTER_CONFIG, "JSON"),
     tuple(PATCH_VERBS)),
    ("config-array", _bad_patch(_write("adapter_config.json", "[]")), PatchError, (ADAPTER_CONFIG, "object"),
     tuple(PATCH_VERBS)),
    ("config-rank-text", _bad_patch(_set_json("adapter_config.json", "r", "2")), PatchError,
     (ADAPTER_CONFIG, "field'r'"), tuple(PATCH_VERBS)),
    ("config-no-rank", _bad_patch(_set_json("adapter_config.json", "r", ...)), PatchError,
     (ADAPTER_CONFIG, "field'r'"), tuple(PATCH_VERBS)),
    ("manifest-truncated", _bad_patch(_truncate("safety_patch.json")), PatchError, (MANIFEST, "JSON"),
     tuple(PATCH_VERBS)),
    ("manifest-array", _bad_patch(_write("safety_patch.json", "[]")), PatchError, (MANIFEST, "object"),
     tuple(PATCH_VERBS)),
    ("manifest-base-model-text", _bad_patch(_set_json("safety_patch.json", "base_model", "llama")), PatchError,
     (MANIFEST, "field'base_model'"), tuple(PATCH_VERBS)),
    ("manifest-fingerprint-number", _bad_patch(_set_json("safety_patch.json", "base_model.fingerprint", 5)),
     PatchError, (MANIFEST, "field'base_model.fingerprint'"), tuple(PATCH_VERBS)),
    ("manifest-arch-list", _bad_patch(_set_json("safety_patch.json", "base_model.arch", ["llama"])),
     PatchError, (MANIFEST, "field'base_model.arch'"), tuple(PATCH_VERBS)),
    ("weights-truncated", _bad_patch(_truncate("adapter_model.safetensors")), PatchError, (WEIGHTS,),
     tuple(PATCH_VERBS)),
    ("weights-missing", _bad_patch(_delete("adapter_model.safetensors")), PatchError, (WEIGHTS,), tuple(PATCH_VERBS)),
    ("missing-folder", None, PatchError, ("{work}/nope", "doesnotexist"), ("apply", "eval", "analyze")),
    ("file-not-folder", _file("notes.txt", "my notes\n"), PatchError, ("{notes_txt}", "notafolder"),
     ("apply", "eval", "analyze")),
    ("model-folder", None, PatchError, ("{model}", "modelfolder"), ("apply", "eval", "analyze")),
]
PATCH_ARGUMENT = {"missing-folder": "{work}/nope", "file-not-folder": "{notes_txt}", "model-folder": "{model}"}


def _patch_cases() -> list[Case]:
    cases = []
    for fault, setup, error, culprit, verbs in PATCH_FAULTS:
        folder = PATCH_ARGUMENT.get(fault, "{bad_patch}")
        for verb in verbs:
            command = tuple(arg.replace("{P}", folder) for arg in PATCH_VERBS[verb])
            cases.append(Case(f"{verb}-patch-{fault}", command, error, culprit, (setup,) if setup else (),
                              loads_model=True))
    return cases


def _notes(paths: Paths) -> None:
    """``work/notes``: a folder of the user's own that no verb may replace."""
    (paths["work"] / "notes").mkdir()
    (paths["work"] / "notes" / "todo.txt").write_text("my notes\n")
    paths["notes"] = paths["work"] / "notes"


# Every verb that writes an output folder, with its output option.
OUTPUT_VERBS = {
    "apply-merge": (*APPLY, "--mode", "merge", "-o"),
    "apply-attach": (*APPLY, "-o"),
    "train": (*TRAIN, "-o"),
    "train-full": (*TRAIN, "--full", "-o"),
    "finetune": (*FINETUNE, "-o"),
    "restore": (*RESTA, "-o"),
    "extract": (*EXTRACT, "-o"),
    "analyze": (*ANALYZE, "-o"),
}


def _output_cases() -> list[Case]:
    cases = []
    for verb, command in OUTPUT_VERBS.items():
        setup: tuple[Setup, ...] = (_notes, ROWS)
        cases += [
            Case(f"{verb}-overwrite-foreign-folder", (*command, "{notes}", "--overwrite"), OutputExistsError,
                 ("{notes}", "--overwrite"), setup),
            Case(f"{verb}-overwrite-current-folder", (*command, ".", "--overwrite"), OutputExistsError,
                 ("{work}",), setup),
        ]
    cases += [
        Case("apply-overwrite-parent-of-current-folder", (*OUTPUT_VERBS["apply-merge"], "..", "--overwrite"),
             OutputExistsError, ("{work}",), (_notes, _nested_cwd), cwd="sub"),
        Case("apply-overwrite-user-file", (*OUTPUT_VERBS["apply-merge"], "{notes_txt}", "--overwrite"),
             OutputExistsError, ("{notes_txt}",), (_file("notes.txt", "my notes\n"),)),
        Case("apply-output-under-a-file", (*OUTPUT_VERBS["apply-merge"], "{notes_txt}/merged"), OutputExistsError,
             ("{notes_txt}", "notafolder"), (_file("notes.txt", "my notes\n"),)),
        Case("apply-overwrite-symlink", (*OUTPUT_VERBS["apply-merge"], "{work}/link", "--overwrite"),
             OutputExistsError, ("{work}/link", "link"), (_notes, _symlink("link", "notes"))),
        Case("extract-overwrite-user-folder-named-like-a-temporary",
             (*OUTPUT_VERBS["extract"], "{work}/.out.mine.tmp", "--overwrite"), OutputExistsError,
             ("{work}/.out.mine.tmp",), (_stale_user_folder,)),
        Case("report-overwrite-foreign-folder", (*REPORT, "-o", "{notes}", "--overwrite"), OutputExistsError,
             ("{notes}",), (_notes,)),
        Case("report-output-under-a-file", (*REPORT, "-o", "{notes_txt}/report.html"), OutputExistsError,
             ("{notes_txt}", "notafolder"), (_file("notes.txt", "my notes\n"),)),
        Case("eval-output-dir-is-a-file", (*EVAL[:-1], "{notes_txt}"), OutputExistsError,
             ("{notes_txt}", "notafolder"), (_file("notes.txt", "my notes\n"),)),
        Case("demo-foreign-folder", (*DEMO, "--output-dir", "{notes}"), OutputExistsError, ("{notes}",), (_notes,)),
        Case("demo-overwrite-foreign-folder", (*DEMO, "--output-dir", "{notes}", "--overwrite"), OutputExistsError,
             ("{notes}",), (_notes,)),
    ]
    return cases


TRUNCATED_WEIGHTS = _bad_model(_truncate("model.safetensors"))
MODEL_CASES = [
    Case("apply-model-weights-truncated", ("apply", "--model", "{bad_model}", "--patch", "{patch}"), ModelError,
         ("{bad_model}/model.safetensors", "truncated"), (TRUNCATED_WEIGHTS,)),
    Case("eval-model-weights-truncated", ("eval", "--model", "{bad_model}", *EVAL[3:]), ModelError,
         ("{bad_model}/model.safetensors", "truncated"), (TRUNCATED_WEIGHTS,)),
    Case("extract-reference-weights-truncated", ("extract", "--target", "{model}", "--reference", "{bad_model}",
                                                 "-o", "{work}/out"), ModelError,
         ("{bad_model}/model.safetensors", "truncated"), (TRUNCATED_WEIGHTS,)),
    Case("extract-target-weights-truncated", ("extract", "--target", "{bad_model}", "--reference", "{model}",
                                              "-o", "{work}/out"), ModelError,
         ("{bad_model}/model.safetensors", "truncated"), (TRUNCATED_WEIGHTS,)),
    Case("finetune-model-weights-truncated", ("finetune", "--model", "{bad_model}", *FINETUNE[3:], "-o",
                                              "{work}/out"), ModelError,
         ("{bad_model}/model.safetensors", "truncated"), (TRUNCATED_WEIGHTS, ROWS)),
    Case("restore-target-weights-truncated", (*RESTA[:-1], "{bad_model}", "-o", "{work}/out"), ModelError,
         ("{bad_model}/model.safetensors",), (TRUNCATED_WEIGHTS,)),
    Case("analyze-model-weights-truncated", ("analyze", "--model", "{bad_model}", *ANALYZE[3:], "-o",
                                             "{work}/out"), ModelError,
         ("{bad_model}/model.safetensors",), (TRUNCATED_WEIGHTS,)),
    Case("apply-model-config-truncated", ("apply", "--model", "{bad_model}", "--patch", "{patch}"), ModelError,
         ("{bad_model}/config.json", "JSON"), (_bad_model(_truncate("config.json")),)),
    Case("eval-model-config-array", ("eval", "--model", "{bad_model}", *EVAL[3:]), ModelError,
         ("{bad_model}/config.json", "object"), (_bad_model(_write("config.json", "[]")),)),
    Case("apply-model-index-not-json", ("apply", "--model", "{bad_model}", "--patch", "{patch}"), ModelError,
         ("{bad_model}/model.safetensors.index.json", "JSON"),
         (_bad_model(_write("model.safetensors.index.json", "{")),)),
    Case("apply-model-missing", ("apply", "--model", "{work}/nope", "--patch", "{patch}"), ModelError,
         ("{work}/nope",)),
    Case("apply-model-is-a-patch", ("apply", "--model", "{patch}", "--patch", "{patch}"), ModelError,
         ("{patch}", "config.json")),
    Case("analyze-model-no-weights", ("analyze", "--model", "{bad_model}", *ANALYZE[3:], "-o", "{work}/out"),
         ModelError, ("{bad_model}", "model.safetensors"), (_bad_model(_delete("model.safetensors")),)),
]

ONE_ROW = _file("one.jsonl", _rows(1))
DATA_CASES = [
    Case("finetune-data-one-row", ("finetune", "--model", "{model}", "--dataset", "{one_jsonl}", "-o", "{work}/out"),
         DataError, ("{one_jsonl}",), (ONE_ROW,)),
    Case("finetune-data-one-prompt", ("finetune", "--model", "{model}", "--dataset", "{same_jsonl}", "-o",
                                      "{work}/out"),
         DataError, ("{same_jsonl}",), (_file("same.jsonl", _rows(1) * 3),)),
    Case("finetune-data-missing", ("finetune", "--model", "{model}", "--dataset", "{work}/nope.jsonl", "-o",
                                   "{work}/out"), DataError, ("{work}/nope.jsonl",)),
    Case("finetune-data-not-json", ("finetune", "--model", "{model}", "--dataset", "{bad_jsonl}", "-o",
                                    "{work}/out"), DataError, ("{bad_jsonl}",),
         (_file("bad.jsonl", _rows(2) + "{not json\n"),)),
    Case("finetune-data-no-prompt", ("finetune", "--model", "{model}", "--dataset", "{bad_jsonl}", "-o",
                                     "{work}/out"), DataError, ("{bad_jsonl}", "prompt"),
         (_file("bad.jsonl", '{"question": "a", "response": "b"}\n' * 4),)),
    Case("finetune-data-no-response", ("finetune", "--model", "{model}", "--dataset", "{rows_jsonl}", "-o",
                                       "{work}/out"), DataError, ("rows", "response"),
         (_file("rows.jsonl", _rows(4, response=False)),), loads_model=True),
    Case("restore-anchors-one-row", ("restore", "--method", "lssf", "--aligned-model", "{model}", "--unsafe-model",
                                     "{model}", "--target-model", "{model}", "--anchor-dataset", "{one_jsonl}",
                                     "--n-anchors", "1", "-o", "{work}/out"), DataError, ("{one_jsonl}",),
         (ONE_ROW,), loads_model=True),
]

OPTION_CASES = [
    Case("apply-dtype", (*APPLY, "--dtype", "nosuch"), ConfigError, ("dtype", "nosuch")),
    Case("eval-dtype", (*EVAL, "--dtype", "nosuch"), ConfigError, ("dtype", "nosuch")),
    Case("finetune-dtype", (*FINETUNE, "--dtype", "nosuch", "-o", "{work}/out"), ConfigError, ("dtype", "nosuch"),
         (ROWS,)),
    Case("train-dtype", (*TRAIN, "--dtype", "nosuch", "-o", "{work}/out"), ConfigError, ("dtype", "nosuch")),
    Case("restore-dtype", ("restore", "--method", "lssf", "--aligned-model", "{model}", "--unsafe-model", "{model}",
                           "--target-model", "{model}", "--dtype", "nosuch", "-o", "{work}/out"), ConfigError,
         ("dtype", "nosuch")),
    Case("extract-dtype", (*EXTRACT, "--dtype", "nosuch", "-o", "{work}/out"), ConfigError, ("dtype", "nosuch")),
    Case("analyze-dtype", (*ANALYZE, "--dtype", "nosuch", "-o", "{work}/out"), ConfigError, ("dtype", "nosuch")),
    Case("finetune-scheduler", (*FINETUNE, "--set", "lr_scheduler_type=nosuch", "-o", "{work}/out"), ConfigError,
         ("lr_scheduler_type", "nosuch"), (ROWS,)),
    Case("train-scheduler", (*TRAIN, "--set", "lr_scheduler_type=nosuch", "-o", "{work}/out"), ConfigError,
         ("lr_scheduler_type", "nosuch")),
    Case("demo-scheduler", (*DEMO, "--set", "lr_scheduler_type=nosuch", "--output-dir", "{work}/demo"), ConfigError,
         ("lr_scheduler_type", "nosuch")),
    Case("demo-recipe-field", (*DEMO, "--set", "nosuch=1", "--output-dir", "{work}/demo"), ConfigError,
         ("nosuch",)),
    Case("train-recipe-unknown", (*TRAIN, "--recipe", "nosuch", "-o", "{work}/out"), ConfigError, ("nosuch",)),
    Case("train-recipe-field", (*TRAIN, "--set", "nosuch=1", "-o", "{work}/out"), ConfigError, ("nosuch",)),
    Case("finetune-refusal-only-field", (*FINETUNE, "--set", "think=true", "-o", "{work}/out"), ConfigError,
         ("think",), (ROWS,)),
    Case("finetune-mode", (*FINETUNE, "--mode", "nosuch", "-o", "{work}/out"), ConfigError, ("mode",), (ROWS,)),
    Case("eval-limits-unknown-task", (*EVAL, "--limits", "nosuch=3"), ConfigError, ("nosuch",)),
    Case("eval-limits-unselected-task", (*EVAL, "--limits", "harmbench=3"), ConfigError, ("harmbench", "arc-easy")),
    Case("eval-limits-preset-unselected-task", ("eval", "--model", "{model}", "--preset", "quick", "--limits",
                                                "gsm8k=3", "--output-dir", "{work}/eval"), ConfigError,
         ("gsm8k", "quick")),
    Case("eval-limits-zero", (*EVAL, "--limits", "arc-easy=0"), ConfigError, ("arc-easy", "0")),
    Case("eval-limits-negative", (*EVAL, "--limits", "arc-easy=-2"), ConfigError, ("arc-easy", "-2")),
    Case("eval-limits-text", (*EVAL, "--limits", "arc-easy=many"), ConfigError, ("arc-easy", "many")),
    Case("eval-task-unknown", ("eval", "--model", "{model}", "--tasks", "nosuch", "--output-dir", "{work}/eval"),
         ConfigError, ("nosuch",)),
    Case("eval-judge-unknown", ("eval", "--model", "{model}", "--tasks", "harmbench", "--judges", "nosuch",
                                "--output-dir", "{work}/eval"), ConfigError, ("nosuch",)),
    Case("eval-preset-unknown", ("eval", "--model", "{model}", "--preset", "nosuch", "--output-dir", "{work}/eval"),
         ConfigError, ("nosuch",)),
    Case("eval-backend-unknown", (*EVAL, "--backend", "nosuch"), ConfigError, ("backend",)),
    Case("eval-merge-scale-without-merge", ("eval", "--model", "{model}", "--adapter", "{patch}", "--merge-scale",
                                            "0.5", "--output-dir", "{work}/eval"), ConfigError, ("merge_scale",)),
    Case("apply-mode-unknown", (*APPLY, "--mode", "nosuch"), ConfigError, ("mode",)),
    Case("apply-weights-count", (*APPLY, "--weights", "1,2"), ConfigError, ("weights",)),
    Case("apply-weights-text", (*APPLY, "--weights", "x"), ConfigError, ("weights",)),
    Case("apply-scale-with-attach", (*APPLY, "--scale", "2"), ConfigError, ("scale",)),
    Case("apply-reduce-side-unknown", (*APPLY, "--mode", "merge", "--reduce-k", "2", "--reduce-side", "nosuch"),
         ConfigError, ("reduce_side",)),
    Case("restore-method-unknown", ("restore", "--method", "nosuch", "-o", "{work}/out"), ConfigError, ("nosuch",)),
    Case("restore-setting-unknown", (*RESTA, "--set", "nosuch=1", "-o", "{work}/out"), ConfigError, ("nosuch",)),
    Case("restore-missing-role", (*RESTA[:-2], "-o", "{work}/out"), ConfigError, ("target_model",)),
    Case("analyze-svd-method-unknown", (*ANALYZE, "--svd-method", "nosuch", "-o", "{work}/out"), ConfigError,
         ("svd_method",)),
    Case("train-set-twice", (*TRAIN, "--set", "r=2", "--set", "r=4", "-o", "{work}/out"), typer.BadParameter,
         ("r is set twice", "'2'", "'4'")),
    Case("eval-limits-not-pairs", (*EVAL, "--limits", "arc-easy"), typer.BadParameter, ("name=value", "arc-easy")),
    Case("apply-unknown-option", (*APPLY, "--nosuch", "1"), TyperException, ("--nosuch",)),
    Case("analyze-patch-and-target", (*ANALYZE, "--target", "{model}", "-o", "{work}/out"), ConfigError,
         ("patch", "target")),
]

YAML_VERBS = {
    "apply": ("apply", "--patch", "{patch}"), "eval": ("eval", "--output-dir", "{work}/eval"),
    "train": ("train", "-o", "{work}/out"), "finetune": ("finetune", "-o", "{work}/out"),
    "restore": ("restore", "-o", "{work}/out"), "extract": ("extract", "-o", "{work}/out"),
    "analyze": ("analyze", "-o", "{work}/out"), "demo": ("demo", "--output-dir", "{work}/demo"),
}
YAML_FAULTS = [
    ("yaml-missing", None, ("{work}/nope.yaml",)),
    ("yaml-invalid", _file("config.yaml", "model: [unclosed\n"), ("{config_yaml}", "YAML")),
    ("yaml-list", _file("config.yaml", "- model\n"), ("{config_yaml}", "mapping")),
    ("yaml-unknown-key", _file("config.yaml", "nosuch_key: 1\n"), ("{config_yaml}", "nosuch_key")),
]


def _yaml_cases() -> list[Case]:
    cases = []
    for verb, command in YAML_VERBS.items():
        for fault, setup, culprit in YAML_FAULTS:
            path = "{work}/nope.yaml" if setup is None else "{config_yaml}"
            cases.append(Case(f"{verb}-{fault}", (*command, "--config", path), ConfigError, culprit,
                              (setup,) if setup else ()))
        cases.append(Case(f"{verb}-yaml-dtype", (*command, "--config", "{config_yaml}"), ConfigError,
                          ("{config_yaml}", "dtype"), (_file("config.yaml", "dtype: fp99\n"),)))
    return cases


REPORT_CASES = [
    Case("report-results-missing", (*REPORT, "{work}/nope.json", "-o", "{work}/r.html"), DataError,
         ("{work}/nope.json",)),
    Case("report-results-not-json", (*REPORT, "{r_json}", "-o", "{work}/r.html"), DataError, ("{r_json}",),
         (_file("r.json", '{"results": '),)),
    Case("report-results-array", (*REPORT, "{r_json}", "-o", "{work}/r.html"), DataError, ("{r_json}",),
         (_file("r.json", "[]"),)),
    Case("report-analysis-missing", (*REPORT, "--analysis", "{work}/nope", "-o", "{work}/r.html"), DataError,
         ("{work}/nope",)),
    Case("report-analysis-not-json", (*REPORT, "--analysis", "{a_json}", "-o", "{work}/r.html"), DataError,
         ("{a_json}",), (_file("a.json", "{"),)),
    Case("report-existing-file", (*REPORT, "--analysis", "{a_json}", "-o", "{notes_txt}"), OutputExistsError,
         ("{notes_txt}", "--overwrite"), (_file("a.json", "{}"), _file("notes.txt", "my notes\n"))),
]

WHEEL_CASES = [
    Case("wheel-member-doubled-slash", _extract_member("toypkg/data/{work}/ESCAPED.txt"), AssetError,
         ("toypkg/data/", "ESCAPED.txt")),
    Case("wheel-member-tripled-slash", _extract_member("toypkg/data//{work}/ESCAPED.txt"), AssetError,
         ("ESCAPED.txt",)),
    Case("wheel-member-parent", _extract_member("toypkg/data/x/../../../ESCAPED.txt"), AssetError,
         ("ESCAPED.txt",)),
    Case("wheel-member-backslash", _extract_member("toypkg/data/..\\ESCAPED.txt"), AssetError, ("ESCAPED.txt",)),
]

GUARD_CASES = [
    Case("apply-unexpected-error", APPLY, RuntimeError, ("RuntimeError", "boom", "{home}/logs", "report"),
         exit_code=1, hook=_crash),
    Case("apply-unexpected-error-verbose", ("-v", *APPLY), RuntimeError, ("RuntimeError", "boom", "{home}/logs"),
         exit_code=1, hook=_crash, traceback=True),
]

CASES = [*_patch_cases(), *_output_cases(), *MODEL_CASES, *DATA_CASES, *OPTION_CASES, *_yaml_cases(),
         *REPORT_CASES, *WHEEL_CASES, *GUARD_CASES]


# --- the checks ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tiny_model_dirs, tmp_path_factory) -> Paths:
    """The tiny llama and a LoRA patch saved on it (with its manifest), read-only for every row."""
    root = tmp_path_factory.mktemp("bad-input")
    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    save_patch(random_patch(loaded.model, scale=0.3), root / "patch",
               PatchManifest(method="test", base_model=loaded.provenance()), model=loaded.model)
    return {"model": tiny_model_dirs["llama"], "patch": root / "patch"}


def tree_hash(*roots: Path) -> dict[str, str]:
    """Every file, folder and link under ``roots`` → its content hash (or kind, or link target)."""
    found: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            found[str(root)] = "absent"
            continue
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    found[str(path)] = f"link:{os.readlink(path)}"
                elif stat.S_ISDIR(mode):
                    found[str(path)] = "dir"
                else:
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model raises: the row must have failed on its input before."""
    from transformers import AutoModelForCausalLM

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, shared: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.setenv("SAFETYPATCH_HOME", str(home))

    def no_pip(asset: Any) -> Any:
        raise AssertionError(f"{asset.requirement} should not be fetched by a bad-input row")

    monkeypatch.setattr(wheels, "_pip_download", no_pip)
    paths: Paths = {**shared, "work": work, "home": home}
    for setup in case.setup:
        setup(paths)
    if case.hook is not None:
        case.hook(monkeypatch)
    if not case.loads_model:
        request.getfixturevalue("no_model_loads")
    monkeypatch.chdir(work / case.cwd)
    roots = (work, shared["model"], shared["patch"])
    before = tree_hash(*roots)
    culprit = [_squeeze(text.format(**paths)) for text in case.culprit]

    if callable(case.command):
        with pytest.raises(case.error) as caught:
            case.command(paths)
        message = str(caught.value)
    else:
        run = CliRunner().invoke(app, [arg.format(**paths) for arg in case.command])
        # From the error line on (the verb's opening line names its inputs too); typer's own usage errors have none.
        message = run.output[run.output.find("error:"):] if "error:" in run.output else run.output
        assert run.exit_code == case.exit_code, f"exit {run.exit_code}: {run.output}\n{run.exception!r}"
        assert isinstance(run.exception, SystemExit), f"uncaught {run.exception!r}: {run.output}"
        raised = [exc for exc in _chain(run.exception) if isinstance(exc, case.error)]
        assert raised, f"no {case.error.__name__} in {[type(e).__name__ for e in _chain(run.exception)]}: {message}"
        assert ("Traceback" in run.output) is case.traceback, run.output
    missing = [text for text in culprit if text not in _squeeze(message)]
    assert not missing, f"the message does not name {missing}:\n{message}"
    if case.exit_code == 1:  # an unexpected failure: its traceback is in the log file the message names
        (log,) = (home / "logs").glob("*.log")
        assert _squeeze(str(log)) in _squeeze(message) and "Traceback" in log.read_text() and "boom" in log.read_text()
    assert tree_hash(*roots) == before, "the command wrote or removed files"
