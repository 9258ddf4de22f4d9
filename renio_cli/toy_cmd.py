"""``renio toy build``: build the toy world (tokenizer, teacher, student, prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from renio_cli.common import console, fail, fmt, handle_errors, progress_bar
from renio_core.modeling.toy import (
    build_toy_world,
    build_toy_world_into,
    ensure_toy_world,
)
from renio_core.modeling.toy import reflect
from renio_core.modeling.toy.chain import (
    build_chain_world,
    ensure_chain_world,
    target_failures,
)

app = typer.Typer(help="The embedded toy world: tiny models and a synthetic task, built locally.",
                  no_args_is_help=True)


class _Bars:
    """One rich bar per build stage, fed by the library's progress callback."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._ctx = None
        self._advance = None
        self._done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._done = stage, 0
            self._ctx = progress_bar(stage, total)
            self._advance = self._ctx.__enter__()
        self._advance(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None


@app.command("build")
@handle_errors
def build(
    out: Optional[Path] = typer.Option(
        None, "--out", help="Directory to build into. Default: the toy cache "
        "(--cache-dir, env RENIO_TOY_CACHE, or ~/.cache/renio/toy), reused when present."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives identical files."),
    quick: bool = typer.Option(False, "--quick", help="Train a few steps only (seconds; "
                               "untrained models, for tests). Needs --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Toy cache directory."),
    world_name: str = typer.Option("addition", "--world", help="addition (3-digit column "
                                   "addition; toy:*), chain (K dependent mod-10 steps with a "
                                   "teacher that checks and recovers; toy-chain:*) or reflect "
                                   "(the chain task with a student that already reflects "
                                   "sometimes, near its capability boundary; toy-reflect:*)."),
) -> None:
    """Build the toy world and print the accuracies measured on its test split."""

    worlds = {"addition": (build_toy_world, ensure_toy_world),
              "chain": (build_chain_world, ensure_chain_world),
              "reflect": (reflect.build_reflect_world, reflect.ensure_reflect_world)}
    if world_name not in worlds:
        raise fail(f"--world {world_name!r}: expected addition, chain or reflect")
    build_fn, ensure_fn = worlds[world_name]

    if out is None and quick:
        raise fail("--quick needs --out (the cache holds only fully trained worlds)")
    if out is not None and cache_dir is not None:
        raise fail("give either --out or --cache-dir, not both")
    bars = _Bars()
    try:
        if out is None:
            world = ensure_fn(cache_dir, seed=seed, progress=bars)
        else:
            world = build_toy_world_into(out, seed=seed, quick=quick, overwrite=overwrite,
                                         progress=bars, builder=build_fn)
    finally:
        bars.close()

    if world_name == "chain":
        _chain_table(world, seed)
        return
    if world_name == "reflect":
        _reflect_table(world, seed)
        return
    table = Table(title=f"toy world (seed {seed}) at {world.root}")
    table.add_column("model")
    table.add_column("prompt")
    table.add_column("decoding")
    table.add_column("test accuracy", justify="right")
    acc = world.manifest.get("accuracy", {})
    rows = (("teacher", "student", "greedy", "teacher_greedy"),
            ("teacher", "student", "sampled", "teacher_sampled"),
            ("student", "student", "sampled", "student_sampled"),
            ("student", "privileged (OPSD)", "sampled", "student_privileged_sampled"))
    for model, prompt, decoding, key in rows:
        value = acc.get(key)
        table.add_row(model, prompt, decoding, fmt(value, ".1%"))
    console.print(table)
    if not acc:
        console.print("quick build: accuracies not measured")


def _chain_table(world, seed: int) -> None:
    """The chain world's promised numbers against their targets (docs/toy-worlds.md)."""
    acc = world.manifest.get("accuracy", {})
    rows = [("teacher accuracy, sampled", ">= 85%", fmt(acc.get("teacher_sampled"), ".1%")),
            ("student accuracy, sampled", "20-60%", fmt(acc.get("student_sampled"), ".1%"))]
    for k, v in acc.get("student_by_k", {}).items():
        rows.append((f"  student, K = {k}", "falls with K", fmt(v, ".1%")))
    rows += [("teacher P(wait | injected wrong line)", ">= 0.5",
              fmt(acc.get("marker_after_wrong"), ".3f")),
             ("teacher P(wait | right line)", "<= 0.05", fmt(acc.get("marker_after_right"), ".3f"))]
    _targets_table(f"chain toy world (seed {seed}) at {world.root}", rows, acc, target_failures)


def _reflect_table(world, seed: int) -> None:
    """Every number the reflect world promises, against its target (docs/toy-worlds.md)."""
    acc = world.manifest.get("accuracy", {})
    _targets_table(f"reflect toy world (seed {seed}) at {world.root}", reflect.table_rows(acc),
                   acc, reflect.target_failures)


def _targets_table(title: str, rows, acc: dict, failures) -> None:
    """A world's (measure, target, measured) rows, then which targets its build missed."""
    table = Table(title=title)
    table.add_column("measure (test prompts, rollout sampling)")
    table.add_column("target")
    table.add_column("measured", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if not acc:
        console.print("quick build: not measured")
        return
    missed = failures(acc)
    console.print("all targets met" if not missed else "targets missed: " + "; ".join(missed))
