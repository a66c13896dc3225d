"""A verb's options generated from its config class: the pydantic field is the one declaration of an option.

``config_verb(TrainConfig)`` turns every field of the class into a typer option (``n_harmful`` → ``--n-harmful``),
whose help is the field's description with its default, its choices (a ``Literal``) and, read when the help is
shown, the names a registry knows (presets, recipes, methods, tasks, judges). An option left off the command line
stays None, so ``load_config`` lets the YAML ``--config`` file and then the field default decide. How a value is
spelled follows the field's type: a bool is ``--flag`` (``--flag/--no-flag`` when it defaults to true), a list is
comma-separated (a list of paths: also repeatable), a dict is repeatable ``name=value`` pairs; a :class:`Flag` gives a
field other names (``--set``, ``-o``) or its own conversion.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.markup import escape
from typer.core import TyperCommand

from safetypatch.cli._app import ConfigOpt, app, friendly, pairs, paths, split
from safetypatch.config import StrictConfig, load_config

C = TypeVar("C", bound=StrictConfig)


@dataclass(frozen=True)
class Flag:
    """A field's command-line spelling where the rule of its type is not enough.

    Attributes:
        names: the option's names (``"--output", "-o"``); default ``--<field-name>`` with dashes.
        parse: turns the value typer read into the field's value (None stays None); default by the field's type.
        note: how the value is spelled, in the help after the description (with ``parse``); default by the type.
    """

    names: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None
    note: str | None = None


def flag(*names: str, parse: Callable[[Any], Any] | None = None, note: str | None = None) -> Flag:
    """``flag("--output", "-o")``: a :class:`Flag` with these names."""
    return Flag(names, parse, note)


def _presets() -> list[str]:
    from safetypatch.eval.task import preset_names

    return preset_names()


def _recipes() -> list[str]:
    from safetypatch.train.recipes import RECIPES

    return RECIPES.names()


def _methods() -> list[str]:
    from safetypatch.restoration import METHODS

    return METHODS.names()


def _tasks() -> list[str]:
    from safetypatch.eval.task import TASKS

    return TASKS.names()


def _judges() -> list[str]:
    from safetypatch.eval.judges.base import JUDGES

    return JUDGES.names()


REGISTRY_FIELDS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "preset": ("presets", _presets), "recipe": ("recipe presets", _recipes), "method": ("methods", _methods),
    "tasks": ("tasks", _tasks), "judges": ("judges", _judges), "judge": ("judges", _judges),
}
"""Fields (by name, in every config) whose help lists a registry's names; read only when the help is shown, since
some registries import torch."""


@dataclass(frozen=True)
class _Shape:
    """How a field's type is read on the command line: typer's type, the conversion, the help's note on it."""

    cli_type: Any
    parse: Callable[[Any], Any] | None = None
    note: str = ""
    choices: tuple[str, ...] = ()


def _strip(annotation: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` → ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(annotation):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _shape(annotation: Any) -> _Shape | None:
    """The command-line reading of a field of type ``annotation``; None for a type with no rule."""
    kind = _strip(annotation)
    origin = get_origin(kind)
    if kind in (bool, int, float, str, Path):
        return _Shape(kind)
    if origin is Literal:
        return _Shape(str, choices=tuple(map(str, get_args(kind))))
    if origin is list:
        if _strip(get_args(kind)[0]) is Path:
            return _Shape(list[str], paths, "Repeat or comma-separate for several.")
        return _Shape(str, split, "Comma-separated.")
    if origin is dict:
        return _Shape(list[str], pairs, "As name=value pairs, comma-separated; repeatable.")
    return None


def _default_text(field: FieldInfo, names: tuple[str, ...]) -> str | None:
    """The field default as it would be typed, or None where there is none to show (required, None, empty, off)."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value is False or (isinstance(value, list | dict) and not value):
        return None
    if value is True:
        return names[0].split("/")[0]
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)


@dataclass(frozen=True)
class _Option:
    """One field as one typer option."""

    field: str
    names: tuple[str, ...]
    cli_type: Any
    parse: Callable[[Any], Any] | None
    help: Callable[[bool], str]

    @classmethod
    def of(cls, config_class: type[StrictConfig], name: str, info: FieldInfo, spelling: Flag) -> _Option:
        shape = _shape(info.annotation)
        if shape is None and spelling.parse is None:
            raise TypeError(f"{config_class.__name__}.{name} ({info.annotation!r}) has no command-line spelling; "
                            "give it a Flag(parse=...) in its verb.")
        shape = shape or _Shape(str)
        dashed = f"--{name.replace('_', '-')}"
        if spelling.names:
            names = spelling.names
        elif shape.cli_type is bool and info.default is True:
            names = (f"{dashed}/--no-{dashed[2:]}",)
        else:
            names = (dashed,)
        default = _default_text(info, names)
        note = shape.note if spelling.note is None else spelling.note
        registry = REGISTRY_FIELDS.get(name)

        def help_text(lazy: bool) -> str:
            """The description, how to spell it, its choices (and with ``lazy``, a registry's names), its default."""
            parts = [escape(info.description or ""), escape(note)]
            if shape.choices:
                parts.append(escape(f"[choices: {', '.join(shape.choices)}]"))
            if lazy and registry is not None:
                parts.append(escape(f"[{registry[0]}: {', '.join(registry[1]())}]"))
            if default is not None:
                parts.append(escape(f"[default: {default}]"))
            return " ".join(part for part in parts if part)

        return cls(name, names, shape.cli_type, spelling.parse or shape.parse, help_text)

    def parameter(self) -> inspect.Parameter:
        option = typer.Option(*self.names, help=self.help(False), show_default=False)
        return inspect.Parameter(self.field, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[self.cli_type | None, option])

    def value(self, given: Any) -> Any:
        """The override handed to ``load_config``: None (not given) stays None."""
        if given is None or self.parse is None:
            return given
        return self.parse(given)


class ConfigCommand(TyperCommand):
    """A verb generated from a config class: its help lists the registries' names when it is shown."""

    config_class: ClassVar[type[StrictConfig]]
    lazy_help: ClassVar[dict[str, Callable[[bool], str]]] = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            if param.name in self.lazy_help:
                param.help = self.lazy_help[param.name](True)
        super().format_help(ctx, formatter)


def options(config_class: type[StrictConfig], flags: dict[str, Flag] | None = None) -> list[_Option]:
    """The options of ``config_class``, one per field in field order (its own before inherited ones); ``flags``
    respells some of them."""
    flags = flags or {}
    unknown = sorted(set(flags) - set(config_class.model_fields))
    if unknown:
        raise TypeError(f"flags for {unknown}, which {config_class.__name__} has no field of")
    own = inspect.get_annotations(config_class)
    found = []  # the class's own fields first (analyze: model and patch before the inherited metric depths)
    for name, info in sorted(config_class.model_fields.items(), key=lambda item: item[0] not in own):
        if name == "config" or keyword.iskeyword(name):
            raise TypeError(f"{config_class.__name__}.{name} cannot be an option name")
        found.append(_Option.of(config_class, name, info, flags.get(name, Flag())))
    return found


def config_verb(config_class: type[C], *, flags: dict[str, Flag] | None = None, name: str | None = None,
                on: typer.Typer = app) -> Callable[[Callable[[C], Any]], Callable[..., Any]]:
    """Register ``body(config)`` as a verb of ``on`` whose options are the fields of ``config_class`` plus
    ``--config``; the verb builds the config with :func:`~safetypatch.config.load_config` (YAML file, then the flags
    given) and hands it to ``body``, whose docstring is the verb's help. Errors are reported by ``friendly``."""
    generated = options(config_class, flags)

    def decorate(body: Callable[[C], Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def verb(config: Path | None = None, **given: Any) -> Any:
            overrides = {option.field: option.value(given.get(option.field)) for option in generated}
            return body(load_config(config_class, config, overrides))

        parameters = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
                      *(option.parameter() for option in generated)]
        verb.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        verb.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        lazy = {option.field: option.help for option in generated if option.field in REGISTRY_FIELDS}
        command = type(f"{config_class.__name__}Command", (ConfigCommand,),
                       {"config_class": config_class, "lazy_help": lazy})
        return on.command(name, cls=command)(friendly(verb))

    return decorate
