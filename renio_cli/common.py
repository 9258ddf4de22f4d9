"""What every command shares: error handling, consoles, progress (bars or lines), YAML configs."""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from renio_core.errors import RenioInputError

# Results go to stdout so they can be piped; progress and errors go to stderr.
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.ENOTDIR, errno.EISDIR}


def fail(message: str) -> typer.Exit:
    """Print one error line and return the exit-2 exception for the caller to raise.

    The message is printed literally (a path may contain '[red]' or '[/b]') and on one line
    (YAML and OS messages carry newlines)."""
    err_console.print(f"[bold red]error:[/] {escape(' '.join(str(message).split()))}",
                      highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A number for a summary table, or '-' when there is none."""
    return "-" if value is None else format(value, spec)


def handle_errors(fn: F) -> F:
    """Turn RenioInputError (bad input) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RenioInputError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            # The output cannot be written (permissions, read-only or full file system): the
            # user's to fix, and every write is atomic, so nothing half-written is left.
            if exc.errno not in WRITE_ERRNOS:
                raise
            where = exc.filename or "output"
            raise fail(f"{where}: cannot write: {exc.strerror or exc}") from None
        except KeyboardInterrupt:
            err_console.print("interrupted; completed parts are kept, re-run to finish")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Progress on stderr; yields ``advance(n)``.

    On a terminal, a rich bar. Anywhere else (a log file, a Slurm job's output, a pipe) a bar
    would print nothing until the end, so a plain line is printed every
    ``RENIO_PROGRESS_INTERVAL`` seconds (default 30) while the work runs."""
    if not err_console.is_terminal and not _force_progress():
        with _plain_progress(description, total) as advance:
            yield advance
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)

        yield advance


def _force_progress() -> bool:
    return os.environ.get("RENIO_PROGRESS") == "1"


def _progress_interval() -> float:
    raw = os.environ.get("RENIO_PROGRESS_INTERVAL", "30")
    try:
        value = float(raw)
    except ValueError:
        raise fail(f"RENIO_PROGRESS_INTERVAL={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise fail(f"RENIO_PROGRESS_INTERVAL={raw!r}: expected a number of seconds above 0")
    return value


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(description: str, done: int, total: int | None, elapsed: float) -> str:
    """One plain progress line: what, done/total, rate, elapsed and time left."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        left = _clock((total - done) / rate) if rate > 0 and done < total else "?"
        if done >= total:
            left = _clock(0)
        count = f"{done}/{total} ({done / total:.0%})"
    else:
        count, left = f"{done}", "?"
    return (f"{description}: {count}, {rate:.3g}/s, elapsed {_clock(elapsed)}, "
            f"left {left}")


@contextmanager
def _plain_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A thread prints a line every interval, so a stage whose units are slow (a training step,
    a model's training in ``toy build``) still shows it is alive. Work that ends before the
    first interval prints nothing: ``renio run``'s own stage lines already say it ran."""
    interval = _progress_interval()
    start = time.monotonic()
    done = [0]
    printed = [False]
    stop = threading.Event()

    def say() -> None:
        line = progress_line(description, done[0], total, time.monotonic() - start)
        err_console.print(escape(line), highlight=False, soft_wrap=True, markup=True)
        printed[0] = True

    def ticker() -> None:
        while not stop.wait(interval):
            say()

    thread = threading.Thread(target=ticker, name="renio-progress", daemon=True)
    thread.start()

    def advance(n: int) -> None:
        done[0] += n

    try:
        yield advance
    finally:
        stop.set()
        thread.join()
        if printed[0]:
            say()


def load_yaml_defaults(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """Eager ``--config`` callback: a YAML file's keys become the defaults of the other flags.

    Keys are the config dataclass's field names (``group_size``, ``input``), or the flag
    spelled with dashes (``group-size``, ``in``); flags given on the command line still win.
    """
    if value is None:
        return None
    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise fail(f"{value}: cannot read YAML config: {exc}") from None
    if not isinstance(data, dict):
        raise fail(f"{value}: a config file must be a mapping of option names to values")
    params = {p.name: p for p in ctx.command.params}
    # A parameter answers to its name, that name without the trailing underscore that dodges a
    # Python keyword (input_ -> input), and its long flags (--in -> in).
    aliases: dict[str, str] = {}
    for p in ctx.command.params:
        for alias in (p.name, p.name.rstrip("_"),
                      *(o[2:] for o in getattr(p, "opts", []) if o.startswith("--"))):
            aliases.setdefault(alias.replace("-", "_"), p.name)
    defaults: dict[str, Any] = {}
    for key, val in data.items():
        name = aliases.get(str(key).replace("-", "_"))
        if name is None:
            raise fail(f"{value}: unknown key '{key}' for 'renio {ctx.command.name}'")
        problem = _yaml_type_problem(params[name], val)
        if problem:
            raise fail(f"{value}: key '{key}': {problem}, got {val!r}")
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _yaml_type_problem(param: click.Parameter, val: Any) -> str | None:
    """What is wrong with a YAML value for an option of a number or flag type (checked here
    so that it is one line, not the parser's box)."""
    want = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if val is None:
        return None
    if want is bool and not isinstance(val, bool):
        return "must be true or false"
    if want is int and (isinstance(val, bool) or not isinstance(val, int)):
        return "must be an integer"
    if want is float and (isinstance(val, bool) or not isinstance(val, (int, float))):
        try:
            float(val)
        except (TypeError, ValueError):
            return "must be a number"
    return None


ConfigOpt = typer.Option(
    None,
    "--config",
    help="YAML file whose keys set this command's options (flags given here win).",
    is_eager=True,
    callback=load_yaml_defaults,
    exists=False,
)

