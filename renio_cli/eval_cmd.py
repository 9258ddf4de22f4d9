"""``renio eval``: grade a model's (or existing) completions on a benchmark; compare runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from renio_cli.common import console, fail, handle_errors, progress_bar
from renio_cli.options import Flag, config_options
from renio_core.stages.evaluate import (
    EvalConfig,
    compare,
    load_summary,
    prepare_eval,
    run_eval,
)


def _num(value: Any, share: bool = False) -> str:
    if value is None:
        return "-"
    if share:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.2f}"


def _delta(value: Any, share: bool) -> str:
    if value is None:
        return "-"
    if share:
        return f"{100 * value:+.1f} pt"
    if isinstance(value, int):
        return f"{value:+,}"
    return f"{value:+.2f}"


def summary_table(summary: dict[str, Any]) -> Table:
    m = summary["metrics"]
    title = f"renio eval {summary['bench']} -> {summary['per_sample_file']}"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("all", justify="right")
    table.add_column("correct", justify="right")
    table.add_column("incorrect", justify="right")
    if "avg_at_n" in m:
        se = m.get("avg_at_n_se")
        acc = f"{100 * m['avg_at_n']:.1f}%" + ("" if se is None else f" ± {100 * se:.1f}")
        table.add_row(f"avg@{m['n']}", acc, "", "")
        for k, v in m["pass_at_k"].items():
            table.add_row(f"pass@{k}", _num(v, True), "", "")
        table.add_row("problems", _num(m["problems"]), "", "")
    else:
        table.add_row("accuracy", "ungraded (no answers or tests)", "", "")
    groups = [m["all"], m["correct"], m["incorrect"]]
    unit = summary.get("length_unit", "tokens")
    table.add_row("samples", *[_num(g["samples"]) for g in groups])
    table.add_row(f"mean length ({unit})", *[_num(g["mean_length"]) for g in groups])
    table.add_row("truncated", *[_num(g["truncated_share"], True) for g in groups])
    table.add_row(f"reflection / 1k {unit}", *[_num(g["reflection_per_1k"]) for g in groups])
    table.add_row(f"epistemic / 1k {unit}", *[_num(g["epistemic_per_1k"]) for g in groups])
    return table


def compare_table(paths: list[Path], summaries: list[dict[str, Any]]) -> Table:
    table = Table(title="renio eval --compare")
    table.add_column("metric")
    for p in paths:
        table.add_column(p.stem, justify="right")
    for p in paths[1:]:
        table.add_column(f"Δ {p.stem}", justify="right")
    for row in compare(summaries):
        # "correct" / "incorrect" indented under the row they split: the full names
        # ("reflection / 1k, incorrect") would wrap the demo's three runs past 80 columns.
        label = f"  {row['group']}" if row["group"] else row["metric"]
        table.add_row(label, *[_num(v, row["share"]) for v in row["values"]],
                      *[_delta(d, row["share"]) for d in row["deltas"]])
    return table


@handle_errors
@config_options(
    EvalConfig,
    # --bench and --out are not required here (--compare takes neither); unset, they leave
    # the dataclass's '', which EvalConfig rejects with its own message.
    bench=Flag(type=str | None, default=None),
    out=Flag(type=Path | None, default=None),
    summary=Flag(type=Path | None),
    code_timeout_s=Flag("--code-timeout"),
    overwrite=Flag("--overwrite/--no-overwrite"),
    order=("runs", "compare_", "model", "adapter", "completions", "bench", ...,
           "out", "summary", "skip_long_prompts", "overwrite"),
)
def eval_cmd(
    fields: dict[str, Any],
    runs: list[Path] = typer.Argument(None, help="With --compare: the summary JSON files to compare."),
    compare_: bool = typer.Option(False, "--compare", help="Compare summary JSON files side by side, with deltas against the first."),
) -> None:
    """Measure accuracy, pass@k, length and reflection markers (correct vs incorrect)."""
    if compare_:
        if any(fields[name] for name in ("model", "completions", "bench", "out")):
            raise fail("--compare takes only summary JSON files; drop --model/--completions/--bench/--out")
        paths = list(runs or [])
        summaries = [load_summary(p) for p in paths]
        if len(summaries) < 2:
            raise fail("--compare needs at least two summary JSON files")
        console.print(compare_table(paths, summaries))
        return
    if runs:
        raise fail(f"unexpected argument {str(runs[0])!r}; summary files need --compare")
    cfg = EvalConfig(**fields)
    plan = prepare_eval(cfg)
    if plan.samples is None:
        # One bar for both phases: rich shows one live display at a time.
        with progress_bar("sampling, then grading", 2 * plan.sample_total) as advance:
            result = run_eval(cfg, plan=plan, sample_progress=advance, grade_progress=advance)
    else:
        with progress_bar("grading", len(plan.samples)) as advance:
            result = run_eval(cfg, plan=plan, grade_progress=advance)
    console.print(summary_table(result.summary))
    if plan.long_prompts_skipped:
        console.print(f"skipped {len(plan.long_prompts_skipped):,} prompts longer than the "
                      "model's context (--skip-long-prompts)", highlight=False)
    note = " (reused complete per-sample file)" if result.reused else ""
    console.print(f"per-sample: {result.out}  summary: {result.summary_path}{note}", highlight=False)
