"""Atomic, no-overwrite file output and cross-process locks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from safetypatch.errors import OutputExistsError


def ensure_writable(path: Path, overwrite: bool) -> None:
    """Raise if ``path`` exists and ``overwrite`` is false; nothing is touched either way."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")


@contextlib.contextmanager
def atomic_path(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (file or folder) and move it into place only on success.

    A crash or an exception leaves ``path`` as it was and removes the partial output. ``.safetensors`` files get
    the mode the umask gives any new file: safetensors 0.8 writes them 0600 through its own temporary file
    (safetensors#782), which would hide a patch from a vLLM server running as another user.
    """
    path = Path(path)
    ensure_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to the temporary output {target}")
        _umask_safetensors(target)
        if path.exists():
            _remove(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", overwrite)


def file_lock(path: Path, timeout: float = 3600.0) -> FileLock:
    """A cross-process lock on ``path`` + ``.lock``; two processes building one cache entry wait for each other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


def _umask_safetensors(root: Path) -> None:
    files = [root] if root.is_file() else root.rglob("*")
    mode = None
    for file in files:
        if file.suffix == ".safetensors" and file.is_file() and not file.is_symlink():
            if mode is None:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            file.chmod(mode)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
