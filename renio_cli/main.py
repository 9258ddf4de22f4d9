"""The ``renio`` console script. Each stage's command lives in its own module."""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from renio_cli import (
    eval_cmd,
    inspect_cmd,
    rollout_cmd,
    run_cmd,
    score_cmd,
    toy_cmd,
    train_cmd,
    weight_cmd,
)
from renio_core import __version__

# The order a user runs them: the toy world (a local stand-in for real models), then the stages.
PIPELINE_ORDER = ("toy", "rollout", "score", "weight", "train", "eval", "inspect", "run")


class _PipelineGroup(TyperGroup):
    """Lists the commands in ``PIPELINE_ORDER`` (Typer would put command groups last)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER else len(names))


app = typer.Typer(
    name="renio",
    cls=_PipelineGroup,
    help="On-policy distillation of LLMs with ReNIO sample reweighting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"renio {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """On-policy distillation of LLMs with ReNIO sample reweighting."""


# One line per command; only commands that work are registered.
app.add_typer(toy_cmd.app, name="toy")
app.command("rollout")(rollout_cmd.rollout)
app.command("score")(score_cmd.score)
app.command("weight")(weight_cmd.weight)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_cmd)
app.command("inspect")(inspect_cmd.inspect)
app.command("run")(run_cmd.run)

if __name__ == "__main__":  # pragma: no cover
    app()
