"""Command-line options built from the stages' config dataclasses, so that an option's default
and help are written once: in the field (``metadata["help"]``), never again in a command.

``config_options`` makes a whole command from its config dataclass (as TRL's
``HfArgumentParser`` makes a parser): one option per field, and a command lists only where its
options differ from the plain ones (``Flag``)."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer.models import OptionInfo

from renio_cli.common import ConfigOpt


def field_option(config_cls: type, name: str, *flags: str, **overrides: Any) -> OptionInfo:
    """A ``typer.Option`` for field ``name`` of ``config_cls``: its default and its
    ``metadata["help"]``. ``flags`` (``"--in"``, ``"--lora/--no-lora"``) and any other
    ``typer.Option`` keyword pass through; ``default=...`` makes the option required (for a
    field whose dataclass default is a placeholder the config rejects), ``help=`` replaces
    the field's (neither is done without a comment saying why)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in fields:
        raise KeyError(f"{config_cls.__name__} has no field {name!r}")
    field = fields[name]
    if "default" not in overrides:
        if field.default is not dataclasses.MISSING:
            overrides["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            overrides["default"] = field.default_factory()
        else:
            overrides["default"] = ...  # a required field: a required option
    if "help" not in overrides:
        if "help" not in field.metadata:
            raise KeyError(f"{config_cls.__name__}.{name} has no metadata['help']")
        overrides["help"] = field.metadata["help"]
    # Help is shown through rich, which would read "renio[wandb]" as markup and drop "[wandb]".
    overrides["help"] = escape(overrides["help"])
    default = overrides.pop("default")
    return typer.Option(default, *flags, **overrides)


class Flag:
    """Where one field's option is not the plain one: other spellings (``"--in"``,
    ``"--lora/--no-lora"``), ``type=`` the value's type on the command line (``Path``: shown
    as PATH, passed on as text), or any ``field_option`` keyword (``default=...``: required)."""

    def __init__(self, *decls: str, type: Any = None, **overrides: Any) -> None:
        self.decls, self.type, self.overrides = decls, type, overrides


def config_options(config_cls: type, *, order: tuple[Any, ...] = (...,),
                   **flags: Flag) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make the decorated function a command with one option per field of ``config_cls``.

    The plain option of field ``group_size`` is ``--group-size``, with the field's type,
    default and help; a bool whose default is False is the one switch ``--overwrite``, any
    other bool ``--lora/--no-lora``. ``flags`` name the fields whose option differs (a
    ``Flag`` each). Every command also takes ``--config`` (a YAML file of field values).

    The function's first parameter, ``fields``, receives ``{field name: value}``, ready for
    ``config_cls(**fields)``: a ``Path`` passed on as text, and an option made optional with
    ``default=None`` that was left unset passed on as the field's default. Its other
    parameters are options of its own (``typer.Option``/``typer.Argument`` defaults).

    ``--help`` lists the options in ``order``: names of fields or of the function's own
    parameters, where ``...`` stands for every field not named, in the dataclass's order;
    the function's own parameters not named come after, then ``--config``."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    types = typing.get_type_hints(config_cls)
    unknown = set(flags) - set(fields)
    if unknown:
        raise KeyError(f"{config_cls.__name__} has no field {sorted(unknown)}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own_hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=own_hints.get(p.name, p.annotation))
               for p in list(inspect.signature(fn).parameters.values())[1:]]
        params: dict[str, inspect.Parameter] = {}  # field or own name -> parameter
        param_field: dict[str, str] = {}  # parameter name -> field name
        unset_default: dict[str, Any] = {}  # field -> its default, where the option's None is unset
        for name, field in fields.items():
            flag = flags.get(name, Flag())
            annotation = flag.type or types[name]
            decls = flag.decls or (_plain_flag(name, annotation, field.default),)
            option = field_option(config_cls, name, *decls, **flag.overrides)
            if flag.overrides.get("default", ...) is None and field.default is not None:
                unset_default[name] = field.default
            # A field named like a builtin (input, filter) is the parameter input_, filter_:
            # that is also a key a --config YAML file may use.
            pname = f"{name}_" if hasattr(builtins, name) else name
            param_field[pname] = name
            params[name] = inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY,
                                             default=option, annotation=annotation)
        for p in own:
            params[p.name] = p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        named = [n for n in order if n is not ...]
        rest = [n for n in fields if n not in named]
        listed = [m for n in order for m in (rest if n is ... else [n])]
        listed += [p.name for p in own if p.name not in named]
        config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=ConfigOpt,
                                   annotation=Path | None)
        signature = inspect.Signature([*(params[n] for n in listed), config])

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            kwargs.pop("config")  # read by its own callback, into the other options' defaults
            values = {}
            for pname, name in param_field.items():
                value = kwargs.pop(pname)
                if value is None and name in unset_default:
                    value = unset_default[name]
                values[name] = str(value) if isinstance(value, Path) else value
            return fn(values, **kwargs)

        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return command

    return decorate


def _plain_flag(name: str, annotation: Any, default: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if annotation in (bool, bool | None) and default is not False:
        return f"{flag}/--no-{flag[2:]}"
    return flag
