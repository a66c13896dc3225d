"""The ``safetypatch`` command: one verb per API call; parse, validate, call ``api``, render.

Each verb module registers its commands on the one typer ``app`` when imported (``catalog``: models, data, env,
ls; ``patches``: demo, train, finetune, apply; ``evaluation``: eval, report; ``weights``: restore, extract,
analyze; ``export``: export).
"""

from __future__ import annotations

import signal

from safetypatch.cli import catalog, evaluation, export, patches, weights
from safetypatch.cli._app import UNEXPECTED_EXIT, app, report_unexpected

__all__ = ["app", "catalog", "evaluation", "export", "main", "patches", "weights"]


def main() -> None:
    """The ``safetypatch`` command. Every verb reports its own errors (``friendly``); an unexpected failure outside
    one (while starting up or parsing options) is reported the same way: one line and a log file, exit code 1. Once
    the verb is over, Ctrl-C is ignored: it would only interrupt the interpreter's shutdown, with a traceback."""
    try:
        app()
    except Exception as exc:
        report_unexpected("safetypatch", exc)
        raise SystemExit(UNEXPECTED_EXIT) from exc
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
