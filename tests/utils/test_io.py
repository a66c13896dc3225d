import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, StrictInt
from safetensors.torch import save_file

from safetypatch.errors import OutputExistsError, PatchError
from safetypatch.utils.io import (
    MANIFESTS,
    MARKER,
    atomic_path,
    atomic_write_text,
    ensure_writable,
    read_json,
    recover_interrupted,
    tracking_outputs,
)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")
def test_atomic_outputs_give_safetensors_the_umask_mode_of_the_files_beside_them(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "patch") as folder:
            folder.mkdir()
            save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
            (folder / "adapter_config.json").write_text("{}")
        with atomic_path(tmp_path / "one.safetensors") as file:
            save_file({"w": torch.zeros(2)}, str(file))
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "patch" / "adapter_model.safetensors") == _mode(tmp_path / "patch" / "adapter_config.json")
    assert _mode(tmp_path / "patch" / "adapter_model.safetensors") == 0o644
    assert _mode(tmp_path / "one.safetensors") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "patch"]


def test_atomic_path_refuses_to_overwrite_and_keeps_the_old_output_on_failure(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"), atomic_path(out) as tmp:
        tmp.write_text("new")
    with pytest.raises(RuntimeError), atomic_path(out, overwrite=True) as tmp:
        tmp.write_text("new")
        raise RuntimeError("crash")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_overwrite_replaces_only_what_this_tool_wrote(tmp_path):
    with atomic_path(tmp_path / "out") as new:
        new.mkdir()
        (new / "a.txt").write_text("first")
    assert (tmp_path / "out" / MARKER).is_file()  # every output folder carries the marker
    with atomic_path(tmp_path / "out", overwrite=True) as new:
        new.mkdir()
        (new / "b.txt").write_text("second")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "b.txt"]
    for name in MANIFESTS:  # what earlier versions wrote, before the marker, stays replaceable
        old = tmp_path / f"old-{name}"
        old.mkdir()
        (old / name).write_text("{}")
        ensure_writable(old, True, folder=True)
    (tmp_path / "empty").mkdir()
    ensure_writable(tmp_path / "empty", True, folder=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(OutputExistsError, match=rf"{notes} is a folder that safetypatch did not write"):
        ensure_writable(notes, True, folder=True)
    with pytest.raises(OutputExistsError, match="did not write"), atomic_path(notes, overwrite=True) as new:
        new.mkdir()
    with pytest.raises(OutputExistsError, match="is a folder, and the output is a file"), \
            atomic_path(tmp_path / "out", overwrite=True) as new:
        new.write_text("a file where a folder was")
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        ensure_writable(tmp_path / "link", True)
    assert _tree(tmp_path) == {**before, "link": _tree(tmp_path)["link"]}


def test_outputs_are_never_the_current_folder_or_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "file.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "sub")
    for path in (".", "..", tmp_path):
        with pytest.raises(OutputExistsError, match="the current folder"):
            ensure_writable(Path(path), True)
    with pytest.raises(OutputExistsError, match=r"file\.txt is not a folder"):
        ensure_writable(tmp_path / "file.txt" / "out", False)


def test_the_old_output_is_put_back_when_the_new_one_cannot_be_renamed_in(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_path(out) as new:
        new.mkdir()
        (new / "a.txt").write_text("old")
    real = os.replace

    def fail_second(src, dst):
        if Path(src).name == "out" and Path(src).parent.name.startswith(".out."):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk gone"), atomic_path(out, overwrite=True) as new:
        new.mkdir()
    assert (out / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_run_leaves_temporaries_the_next_run_cleans_and_names(tmp_path, caplog):
    out = tmp_path / "out"
    with atomic_path(out) as new:
        new.mkdir()
        (new / "a.txt").write_text("old")
    # Killed while writing: a partial new output. Killed between the renames: the old output set aside, none in place.
    gone = 2**22 + 7  # above the largest pid Linux hands out, so no process has it
    partial = tmp_path / f".out.{gone}.abcdefgh.tmp"
    (partial / "out").mkdir(parents=True)
    legacy = tmp_path / ".out.zz_12345.tmp"  # an earlier version's name, without the pid
    legacy.mkdir()
    mine = tmp_path / ".out.mine1234.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("a folder of the user's that only looks like a temporary")
    live = tmp_path / f".out.{os.getppid()}.livelive.tmp"
    live.mkdir()
    with caplog.at_level(logging.WARNING, logger="safetypatch.utils.io"):
        assert sorted(recover_interrupted(out)) == sorted([partial, legacy])
    assert str(partial) in caplog.text and str(legacy) in caplog.text
    assert mine.is_dir() and live.is_dir()  # another run's, alive
    interrupted = tmp_path / f".out.{gone}.ijklmnop.tmp"
    (interrupted / "out").mkdir(parents=True)  # the new output, complete
    os.replace(out, interrupted / "out.replaced")  # the old one, set aside: then the run was killed
    with pytest.raises(OutputExistsError, match="already exists"):
        ensure_writable(out, False)  # the next run puts the old output back, then refuses to overwrite it
    assert (out / "a.txt").read_text() == "old" and "put back" in caplog.text


def test_json_sidecars_fail_with_the_file_and_the_field(tmp_path):
    class Shape(BaseModel):
        r: StrictInt

    path = tmp_path / "config.json"
    for text, message in [
        ("{", r"config\.json is not valid JSON"),
        ("[]", r"holds a JSON list, but the test config must be a JSON object"),
        ('{"r": "8"}', r"config\.json: field 'r' of the test config: Input should be a valid integer \(got '8'\)"),
    ]:
        path.write_text(text)
        with pytest.raises(PatchError, match=message):
            read_json(path, PatchError, what="test config", schema=Shape)
    with pytest.raises(PatchError, match=r"nope\.json does not exist"):
        read_json(tmp_path / "nope.json", PatchError, what="test config")
    path.write_text('{"r": 8, "other": []}')
    assert read_json(path, PatchError, what="test config", schema=Shape) == {"r": 8, "other": []}


def test_the_manifest_list_names_every_manifest_a_verb_writes():
    from safetypatch.analysis import ANALYSIS_FILE
    from safetypatch.api.apply import APPLIED_RECORD
    from safetypatch.patch.artifact import MANIFEST
    from safetypatch.restoration.runner import PROVENANCE_FILE, REPORT_FILE
    from safetypatch.train.finetune import FINETUNE_FILE

    assert {ANALYSIS_FILE, APPLIED_RECORD, MANIFEST, PROVENANCE_FILE, REPORT_FILE, FINETUNE_FILE,
            "demo.json"} == set(MANIFESTS)


def test_tracking_outputs_records_what_was_started_and_what_was_moved_into_place(tmp_path):
    with tracking_outputs() as log:
        atomic_write_text(tmp_path / "done.txt", "x")
        ensure_writable(tmp_path / "checked", False, folder=True)
        with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "stopped") as tmp:
            tmp.mkdir()
            raise KeyboardInterrupt
    assert log.started == [tmp_path / "done.txt", tmp_path / "checked", tmp_path / "stopped"]
    assert log.written == [tmp_path / "done.txt"]
    assert log.unfinished() == [tmp_path / "checked", tmp_path / "stopped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.txt"]  # the interrupted one left no temporary
    atomic_write_text(tmp_path / "untracked.txt", "x")
    assert tmp_path / "untracked.txt" not in log.started  # only while the block runs
