"""The ``safetypatch`` command: one verb per API call; parse, validate, call ``api``, render.

Each verb module registers its commands on the one typer ``app`` when imported (``catalog``: models, data, env,
ls; ``patches``: demo, train, finetune, apply; ``evaluation``: eval, report; ``weights``: restore, extract,
analyze).
"""

from __future__ import annotations

from safetypatch.cli import catalog, evaluation, patches, weights
from safetypatch.cli._app import app

__all__ = ["app", "catalog", "evaluation", "main", "patches", "weights"]


def main() -> None:
    app()
