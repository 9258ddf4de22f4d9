"""Command-line options built from the stages' config dataclasses, so that an option's default
and help are written once: in the field (``metadata["help"]``), never again in a command."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from rich.markup import escape
from typer.models import OptionInfo


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
