"""Atomic, no-overwrite file output, the one routine that replaces an output, JSON sidecars, and cross-process locks.

Every output (a patch, a model folder, an analysis, a results file, a report) is written to a hidden temporary
sibling ``.NAME.<pid>.<random>.tmp/`` and moved into place only when it is complete (:func:`atomic_path`). An
existing output is replaced only when ``overwrite`` is given and only when it is this tool's: a folder holding
:data:`MARKER` (written into every output folder) or one of :data:`MANIFESTS` (what earlier versions wrote), an empty
folder, or, for a file output, a plain file. The old output is renamed aside into the temporary folder, the new one
renamed in, and only then is the old one removed, so a crash between the two steps loses neither. A temporary folder
left by a killed run is removed by the next run that writes the same output, and named in the log; an old output it
still holds is put back first. While a command runs under :func:`tracking_outputs`, the outputs it set out to write
and those it moved into place are recorded, so that an interrupted command can say what it left unwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from safetypatch.errors import OutputExistsError, SafetypatchError

logger = logging.getLogger(__name__)

MARKER = ".safetypatch-output"
"""The file :func:`atomic_path` writes into every output folder: ``overwrite`` may replace a folder that holds it."""
MANIFESTS = ("safety_patch.json", "safety_patch_applied.json", "finetune.json", "restore.json", "restore_report.json",
             "analysis.json", "demo.json")
"""The manifests the verbs write into their output folders (a test keeps this list complete): a folder an earlier
version wrote, before :data:`MARKER`, is recognised by one of them."""
_ASIDE = ".replaced"  # suffix of the old output while the new one is renamed in


class OutputLog:
    """The outputs one command set out to write (checked by :func:`ensure_writable`, opened by :func:`atomic_path`)
    and those it moved into place, in order (filled under :func:`tracking_outputs`).

    Attributes:
        started: every output path the command checked or opened (absolute).
        written: the ones moved into place, complete.
        notes: what an interruption message should advise instead of running the command again, each asked when
            the message is written (None: nothing), e.g. to resume from a training checkpoint
            (:func:`note_if_interrupted`).
    """

    def __init__(self) -> None:
        self.started: list[Path] = []
        self.written: list[Path] = []
        self.notes: list[Callable[[], str | None]] = []

    def unfinished(self) -> list[Path]:
        """The outputs started and not moved into place: nothing of them is at their path (an older output that
        was to be replaced is still there, unchanged)."""
        return [path for path in self.started if path not in self.written]


_TRACKED: list[OutputLog] = []


@contextlib.contextmanager
def tracking_outputs(log: OutputLog | None = None) -> Iterator[OutputLog]:
    """Record in ``log`` (a new :class:`OutputLog` if None) the outputs written while the block runs (every verb of
    the CLI runs in one)."""
    log = OutputLog() if log is None else log
    _TRACKED.append(log)
    try:
        yield log
    finally:
        _TRACKED.remove(log)


def note_if_interrupted(note: Callable[[], str | None]) -> None:
    """Have an interruption message of the commands being tracked also say ``note()`` (see :class:`OutputLog`)."""
    for log in _TRACKED:
        log.notes.append(note)


def _track(path: Path, *, written: bool) -> None:
    for log in _TRACKED:
        paths = log.written if written else log.started
        if path not in paths:
            paths.append(path)


def ensure_writable(path: Path, overwrite: bool, *, folder: bool | None = None) -> None:
    """Raise unless an output can be written at ``path``: it is new, or ``overwrite`` is given and it is this tool's
    to replace (see the module docstring). Temporary folders of ``path`` left by a killed run are cleaned first.

    Args:
        path: the output path.
        overwrite: whether an existing output may be replaced.
        folder: whether the output is a folder (True) or a file (False); None when the caller cannot say yet
            (:func:`atomic_path` checks again once it can).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false, or it is not this tool's to replace (a folder
            of other files, a link, the current folder or one holding it), or a file is in the way of its folder.
    """
    path = _absolute(path)
    _check_location(path)
    _track(path, written=False)
    recover_interrupted(path)
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        check_replaceable(path, folder=folder)


def ensure_output_folder(path: Path) -> None:
    """Raise unless ``path`` is a folder that outputs can be written into: an existing folder, or a new one whose
    parents are folders (nothing is created).

    Raises:
        OutputExistsError: ``path`` or one of its parents is a file.
    """
    path = _absolute(path)
    for where in (path, *path.parents):
        if os.path.lexists(where):
            if not where.is_dir():
                raise OutputExistsError(f"cannot write into {path}: {where} is not a folder (a file is in the way). "
                                        "Choose another output folder.")
            return


def check_replaceable(path: Path, *, folder: bool | None = None) -> None:
    """Raise unless the existing ``path`` is this tool's to replace with a new output (a folder when ``folder``).

    Raises:
        OutputExistsError: naming ``path``, why it is kept and what to do.
    """
    path = _absolute(path)
    advice = "Choose another output path, or move or delete it yourself."
    if path.is_symlink():
        raise OutputExistsError(f"{path} is a symbolic link; safetypatch does not replace links (nor what they point "
                                f"to). Give the real path. {advice}")
    if path.is_dir():
        if folder is False:
            raise OutputExistsError(f"{path} is a folder, and the output is a file; give a file path. {advice}")
        if not is_tool_output(path):
            raise OutputExistsError(
                f"{path} is a folder that safetypatch did not write (no {MARKER}, no {', '.join(MANIFESTS)}), and it "
                f"is not empty; --overwrite replaces only folders this tool wrote, so nothing was changed. {advice}")
    elif not path.is_file():
        raise OutputExistsError(f"{path} exists and is neither a file nor a folder; safetypatch does not replace it. "
                                f"{advice}")
    elif folder:
        raise OutputExistsError(f"{path} is a file, and the output is a folder; --overwrite replaces only folders "
                                f"this tool wrote, so nothing was changed. {advice}")


def is_tool_output(folder: Path) -> bool:
    """Whether ``folder`` is an output this tool wrote (it holds :data:`MARKER` or one of :data:`MANIFESTS`) or is
    empty: what ``overwrite`` may replace."""
    folder = Path(folder)
    return not any(folder.iterdir()) or any((folder / name).is_file() for name in (MARKER, *MANIFESTS))


def recover_interrupted(path: Path) -> list[Path]:
    """Remove the temporary folders of ``path`` that a killed run left behind (``.NAME.<pid>.<random>.tmp/`` of a
    process that is gone), each named in the log; an old output one still holds aside, while ``path`` is missing, is
    put back first. A folder whose name only looks like one (it holds other files) is left alone.

    Returns:
        The folders removed.
    """
    path = _absolute(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in siblings:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if match[1] is not None and _running(int(match[1])):
            continue  # another run is writing it now
        aside = entry / (path.name + _ASIDE)
        if {child.name for child in entry.iterdir()} - {path.name, aside.name}:
            continue  # not a temporary folder of ours
        if os.path.lexists(aside) and not os.path.lexists(path):
            os.replace(aside, path)
            logger.warning("put back %s from %s, where a run killed while replacing it had left it", path, entry)
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("removed %s, the temporary output of a run that was killed before it finished", entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path, overwrite: bool = False, *, cache: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (file or folder) and move it into place only on success.

    A crash or an exception leaves ``path`` as it was and removes the partial output. A folder output gets
    :data:`MARKER`. An existing ``path`` is replaced only with ``overwrite`` and only when it is this tool's
    (:func:`ensure_writable`): renamed aside, the new output renamed in, then the old one removed. ``.safetensors``
    files get the mode the umask gives any new file: safetensors 0.8 writes them 0600 through its own temporary file
    (safetensors#782), which would hide a patch from a vLLM server running as another user.

    Args:
        path: the output path.
        overwrite: replace an existing output.
        cache: ``path`` is an entry of the tool's own cache (``$SAFETYPATCH_HOME``): an existing entry is replaced
            as it is (a half-filled one included), and no marker is written into it.

    Raises:
        OutputExistsError: see :func:`ensure_writable`.
    """
    path = _absolute(path)
    if cache:
        _check_location(path)
        recover_interrupted(path)
        if os.path.lexists(path) and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    else:
        ensure_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to the temporary output {target}")
        is_folder = target.is_dir() and not target.is_symlink()
        if is_folder and not cache:
            (target / MARKER).write_text("written by safetypatch; `--overwrite` may replace this folder\n",
                                         encoding="utf-8")
        _umask_safetensors(target)
        _move_into_place(target, path, overwrite=overwrite, folder=None if cache else is_folder)
        if not cache:
            _track(path, written=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard_output(path: Path) -> None:
    """Remove the output folder ``path`` (nothing when it is missing) so that no half-removed folder is ever seen
    there: it is renamed into a temporary sibling first, which the next run that writes ``path`` removes
    (:func:`recover_interrupted`) if this one is killed."""
    path = _absolute(path)
    if not os.path.lexists(path):
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        os.replace(path, tmp / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(new: Path, path: Path, *, overwrite: bool, folder: bool | None) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is renamed aside beside ``new`` first and put back if the
    rename fails (the caller removes the temporary folder, and the old output with it)."""
    if not os.path.lexists(path):
        os.replace(new, path)
        return
    if not overwrite:
        raise OutputExistsError(f"{path} appeared while the output was being written; nothing was replaced. Pass "
                                "overwrite=True (CLI: --overwrite) to replace it.")
    if folder is not None:
        check_replaceable(path, folder=folder)
    aside = new.with_name(path.name + _ASIDE)
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", overwrite)


def read_json(path: Path, error: type[SafetypatchError], *, what: str, schema: type[BaseModel] | None = None,
              advice: str = "Write it again.") -> dict[str, Any]:
    """Read a JSON sidecar (a manifest, a config) that must hold an object, checked against ``schema``.

    Args:
        path: the file.
        error: the error class raised (the project's error of the caller's domain, e.g. ``PatchError``).
        what: what the file is, for the message (e.g. ``"patch manifest"``).
        schema: a pydantic model the object must validate against (it may allow extra keys); None: any object.
        advice: what to do, appended to every message.

    Returns:
        The object as read (the schema only checks it).

    Raises:
        error: the file is missing or unreadable, is not JSON, holds no object, or fails ``schema``; the message
            names the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(f"{path} does not exist (the {what}). {advice}") from exc
    except (OSError, ValueError) as exc:
        raise error(f"{path} cannot be read ({exc}); it is not the {what} it should be. {advice}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc}): the {what} is truncated or was edited. {advice}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, but the {what} must be a JSON object. {advice}")
    if schema is not None:
        try:
            schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise error(f"{path}: field {field!r} of the {what}: {first['msg']} (got {first.get('input')!r}). "
                        f"{advice}") from exc
    return data


def file_lock(path: Path, timeout: float = 3600.0) -> FileLock:
    """A cross-process lock on ``path`` + ``.lock``; two processes building one cache entry wait for each other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised without following links (``.`` and ``..`` get their real names)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _check_location(path: Path) -> None:
    """Refuse an output that is the current folder, holds it or is the home folder, or whose folder is a file."""
    here = Path.cwd().resolve()
    resolved = path.resolve()
    if resolved == here or resolved in here.parents or resolved == Path.home().resolve():
        raise OutputExistsError(f"{path} is the current folder, a folder holding it or the home folder; safetypatch "
                                f"never writes an output there. Give a new folder, e.g. {path / 'out'}.")
    ensure_output_folder(path.parent)


def _running(pid: int) -> bool:
    """Whether process ``pid`` is alive (another run writing the same output), other than this one."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by another user
    return True


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
