"""The typer app and what every verb shares: consoles, the error wrapper, progress bars, option parsers."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.exceptions import TyperException

from safetypatch.errors import SafetypatchError
from safetypatch.utils.io import OutputLog, tracking_outputs

app = typer.Typer(
    name="safetypatch",
    help="Safety patches for open chat LLMs: train, apply, restore, analyse and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of options; flags given here win.")]
UNEXPECTED_EXIT = 1
"""Exit code of an unexpected failure (a bug); the project's own errors (bad input) exit with 2."""
INTERRUPTED_EXIT = 130
"""Exit code of a verb stopped by Ctrl-C (SIGINT), the shell's 128 + 2."""
_state = {"verbose": False}


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a SafetypatchError into a one-paragraph message and exit code 2, without a traceback; turn any other
    exception into one line naming it and a log file holding its traceback (shown too with ``-v``), exit code 1;
    turn Ctrl-C into one line saying what was and was not written (:func:`interrupted_message`), exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outputs = OutputLog()
        with _noting_sigint() as interrupted:
            try:
                with tracking_outputs(outputs):
                    return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, TyperException):  # usage errors: typer prints them itself
                raise
            except Exception as exc:
                if interrupted:  # a library turned the KeyboardInterrupt into another error
                    _report_interrupted(outputs, exc)
                if isinstance(exc, SafetypatchError):
                    console.print(f"[bold red]error:[/] {escape(str(exc))}")
                    raise typer.Exit(2) from exc
                report_unexpected(fn.__name__, exc)
                raise typer.Exit(UNEXPECTED_EXIT) from exc
            except KeyboardInterrupt as exc:
                _report_interrupted(outputs, exc)

    return wrapper


@contextlib.contextmanager
def _noting_sigint() -> Iterator[list[int]]:
    """Note every SIGINT (Ctrl-C) while the block runs, which still raises KeyboardInterrupt: torch swallows one that
    arrives while safetensors builds a tensor and raises a ValueError in its place ("could not determine the shape
    of object type 'torch.storage.UntypedStorage'"), which the verb would then report as a truncated file. Nothing is
    noted where another handler is installed or off the main thread."""
    noted: list[int] = []

    def note(signum: int, frame: Any) -> None:
        noted.append(signum)
        signal.default_int_handler(signum, frame)

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield noted
        return
    signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _report_interrupted(outputs: OutputLog, exc: BaseException) -> NoReturn:
    console.print(f"[bold red]interrupted:[/] {escape(interrupted_message(outputs))}", soft_wrap=True)
    raise typer.Exit(INTERRUPTED_EXIT) from exc


def interrupted_message(outputs: OutputLog) -> str:
    """What an interrupted verb tells the user: the outputs it had started and left unwritten (nothing of them is at
    their path; an older output there is unchanged), those it had finished, and what to do (its notes, when it kept
    something to continue from)."""
    unfinished, written = outputs.unfinished(), outputs.written
    kept = [path for path in unfinished if os.path.lexists(path)]
    parts = [f"nothing was written at {', '.join(map(str, unfinished))}"] if unfinished else []
    if kept:
        parts.append(f"the output already at {', '.join(map(str, kept))} is unchanged")
    if written:
        parts.append(f"{', '.join(map(str, written))} had been written completely before")
    advice = " ".join(text for note in outputs.notes if (text := note())) or "Run the command again to redo it."
    return "; ".join(parts or ["nothing was written"]) + ". " + advice


def report_unexpected(verb: str, exc: BaseException) -> Path | None:
    """Write ``exc``'s traceback to a log file under ``$SAFETYPATCH_HOME/logs`` and say in one line what failed,
    where the traceback is and how to report it (the traceback is printed too under ``-v``); returns the log file."""
    text = "".join(traceback.format_exception(exc))
    verb = verb.rstrip("_")  # eval_ is the eval verb
    log = None
    with contextlib.suppress(Exception):  # the report must not fail in its turn (a read-only home, a full disk)
        from safetypatch.utils.paths import home

        path = home() / "logs" / f"safetypatch-{verb}-{datetime.now():%Y%m%d-%H%M%S-%f}-{os.getpid()}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        log = path
    if _state["verbose"]:
        console.print(escape(text), end="", highlight=False)
    where = f"the full traceback is in {log}" if log is not None else "the traceback could not be saved"
    shown = "" if _state["verbose"] else " (run again with -v to see it here)"
    line = (f"{verb} failed unexpectedly: {type(exc).__name__}: {exc}; {where}{shown}. This is a bug in safetypatch, "
            "not a problem with your input: please report it to the safetypatch developers with that file, the "
            "command you ran and the output of `safetypatch env`.")
    console.print(f"[bold red]error:[/] {escape(line)}")
    return log


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    # The CLI draws its own progress bars; the per-file bars of transformers and the Hub would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: nothing a user can act
    # on, printed in the middle of the progress display.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # PEFT warns whenever a patch is attached to a model folder other than the one named in its adapter config, which
    # is what attaching to a descendant means; safetypatch reports the fingerprint difference itself.
    warnings.filterwarnings("ignore", message=r".*`base_model_name_or_path` was renamed.*", category=UserWarning)
    _state["verbose"] = verbose
    # Under accelerate launch (or torchrun) every process runs the CLI; only the first one talks.
    console.quiet = out.quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


class TaskBars:
    """The ``(what, done, total)`` progress callback of the api verbs, drawn as one bar per ``what``; off a terminal
    (output to a file or a pipe) it prints a plain line per ``what`` when it starts, every 10 % or minute, and when
    it ends, with the time spent and the time left at the pace so far."""

    LINE_EVERY_SECONDS = 60.0

    def __init__(self, display: Progress) -> None:
        self.display = display
        self.bars: dict[str, Any] = {}
        self.lines: dict[str, tuple[float, float, int]] = {}  # what → (start, last line time, last tenth shown)

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if self.display.disable:
            self._line(what, done, total)
            return
        self.bars.setdefault(what, self.display.add_task(what, total=total))
        self.display.update(self.bars[what], completed=done, total=total)

    def reset(self) -> None:
        """Start new bars for the next step (a ``what`` seen before gets a bar of its own again)."""
        self.bars.clear()
        self.lines.clear()

    def _line(self, what: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        start, last, tenth = self.lines.setdefault(what, (now, -math.inf, -1))
        now_tenth = 10 * done // total if total else 0
        finished = total is not None and done >= total
        if not (finished or now_tenth > tenth or now - last >= self.LINE_EVERY_SECONDS):
            return
        self.lines[what] = (start, now, now_tenth)
        spent = now - start
        share = f"{done}/{total} ({100 * done / total:.0f} %)" if total else f"{done}"
        left = f", about {spent / done * (total - done) / 60:.1f} min left" if total and 0 < done < total else ""
        console.print(f"{what}: {share}, {spent / 60:.1f} min{left}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def task_bars() -> Iterator[TaskBars]:
    """A live progress display on the stderr console (silent off a terminal) and its callback."""
    display = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=not console.is_terminal,
    )
    with display:
        yield TaskBars(display)


def key_value_table(title: str, rows: dict[str, str]) -> Table:
    return whole_names_table(title, ("key", "value"), list(rows.items()), show_header=False)


def whole_names_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                      show_header: bool = True, caption: str | None = None) -> Table:
    """A table whose first column (the names a user copies) is never cut: it does not wrap and is as wide as its
    longest cell, so in a narrow terminal or a pipe the other columns give way, folding long words and paths onto
    more lines rather than cutting them. Cells are plain text, never markup; ``title`` and ``caption`` are markup."""
    table = Table(title=title, caption=caption, show_header=show_header)
    for index, column in enumerate(columns):
        if index == 0:
            table.add_column(column, no_wrap=True, min_width=max(cell_len(row[0]) for row in [columns, *rows]))
        else:
            table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*map(Text, row))  # as given: a cell such as `safetypatch[deepspeed]` is no markup
    return table


def paths(values: list[str] | None) -> list[Path] | None:
    """Repeated and comma-separated path options as paths; None when not given."""
    return [Path(part) for value in values or [] for part in split(value) or []] or None


def pairs(values: list[str] | None) -> dict[str, str] | None:
    """``["a=1,b=2", "c=3"]`` (a repeated option, each comma-separated) → ``{"a": "1", "b": "2", "c": "3"}``
    (pydantic converts the values); None when not given. A name given twice with two values is an error."""
    found = [part.split("=", 1) for text in values or [] for part in split(text) or []]
    if not found:
        return None
    bad = [part for part in found if len(part) != 2]
    if bad:
        raise typer.BadParameter(f"expected name=value pairs, got {'='.join(bad[0])!r}")
    out: dict[str, str] = {}
    for key, value in ((k.strip(), v.strip()) for k, v in found):
        if out.get(key, value) != value:
            raise typer.BadParameter(f"{key} is set twice, to {out[key]!r} and {value!r}; give it once.")
        out[key] = value
    return out


def split(text: str | None) -> list[str] | None:
    """A comma-separated option as a list: None when not given, [] when given empty (``--retain-forms ''``)."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]
