import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from safetypatch.errors import OutputExistsError
from safetypatch.utils.io import atomic_path


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
