"""Config base: strict pydantic models (unknown keys fail with their name), YAML loading, explicit flags win."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from safetypatch.errors import ConfigError

C = TypeVar("C", bound="StrictConfig")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The weights dtype of every option set that loads a model (``auto``: bfloat16 on a bf16 GPU, else float32)."""


class StrictConfig(BaseModel):
    """Base of every recipe and option set: ``extra="forbid"``, frozen, field descriptions double as help."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def load_config(cls: type[C], path: Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from an optional YAML file, then apply ``overrides`` (explicit flags win over the file).

    Args:
        cls: the config class.
        path: a YAML mapping of field → value, or None.
        overrides: values set explicitly on the command line or in Python; ``None`` values are ignored.

    Raises:
        ConfigError: unreadable YAML, or a field that is unknown or invalid (named, with the file).
    """
    data: dict[str, Any] = {}
    where = "flags"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist.") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, not a {kind}.")
        data.update(loaded or {})
    data.update({key: value for key, value in (overrides or {}).items() if value is not None})
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__} (from {where}): {describe_errors(exc)}") from exc


def describe_errors(exc: ValidationError) -> str:
    """Each problem of a pydantic validation error as ``field: message (got value)``, joined by ``; ``."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        got = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) else ""
        problems.append(f"{where}: {err['msg']}{got}" if where else f"{err['msg']}{got}")
    return "; ".join(problems)
