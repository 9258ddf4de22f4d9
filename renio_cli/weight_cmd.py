"""``renio weight``: ReNIO sample weights from teacher-scored rollouts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from renio_cli.common import ConfigOpt, console, fmt, handle_errors, progress_bar
from renio_cli.options import OverwriteOpt
from renio_core.data import shards
from renio_core.stages.weight import WeightConfig, WeightSummary, run_weight


def summary_table(summary: WeightSummary, cfg: WeightConfig) -> Table:
    table = Table(title=f"renio weight -> {summary.out}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows_text = f"{summary.rows:,}"
    if summary.rows != summary.rows_in:
        rows_text += f" (of {summary.rows_in:,}, --filter {cfg.filter})"
    table.add_row("rows", rows_text)
    table.add_row("completion tokens", f"{summary.tokens:,}")
    table.add_row(
        f"pivotal tokens (r >= {cfg.threshold:g})",
        f"{summary.pivotal_tokens:,} ({summary.pivotal_share:.2%})",
    )
    table.add_row("weight min / median / max",
                  f"{summary.weight_min:.4f} / {summary.weight_median:.4f} / {summary.weight_max:.4f}")
    if summary.mean_weight_correct is not None or summary.mean_weight_incorrect is not None:
        table.add_row("mean weight, correct rows", fmt(summary.mean_weight_correct))
        table.add_row("mean weight, incorrect rows", fmt(summary.mean_weight_incorrect))
        table.add_row("AUROC of raw_weight for incorrect", fmt(summary.auroc_incorrect, ".3f"))
    if summary.group_prompts_mean is not None:
        table.add_row(f"distinct prompts per group ({cfg.grouping})",
                      f"{summary.group_prompts_mean:.2f} mean, {summary.group_prompts_min} min")
    if summary.parts_skipped:
        table.add_row("parts", f"{summary.parts_written} written, {summary.parts_skipped} already complete")
    return table


@handle_errors
def weight(
    input_: str = typer.Option(..., "--in", help="Scores: a .parquet file, a directory of parts, or a glob."),
    out: Path = typer.Option(..., "--out", help="Output: a .parquet file, or a directory for parts."),
    clip: float = typer.Option(2.5, help="Upper clip of the per-token log-ratio s_t - q_t."),
    threshold: float = typer.Option(0.8, help="Tokens with clipped log-ratio >= threshold are pivotal."),
    tem: float = typer.Option(1.0, help="Temperature of the weight: raw = exp(mean / tem)."),
    norm: str = typer.Option("batch_mean", help="Group normalization: batch_mean, ema, clamp or none."),
    group_size: int = typer.Option(8, help="Rows per normalization group."),
    grouping: str = typer.Option("consecutive", help="consecutive: runs of --group-size rows in file order; distinct: --group-size distinct prompts, one sample each (the official trainer's micro-batch), when prompts have several samples."),
    scheme: str = typer.Option("renio", help="renio, or uniform (every weight 1: plain OPD/OPSD)."),
    filter_: str = typer.Option("all", "--filter", help="all, correct or incorrect (needs a graded 'correct' column)."),
    rows_per_part: int = typer.Option(65536, help="Rows per part when --out is a directory."),
    batch_rows: int = typer.Option(1024, help="Rows per record batch read (bounds memory)."),
    overwrite: bool = OverwriteOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Turn teacher-scored rollouts into ReNIO sample weights (docs/design.md, 'ReNIO weights')."""
    cfg = WeightConfig(
        input=input_, out=str(out), clip=clip, threshold=threshold, tem=tem, norm=norm,
        group_size=group_size, grouping=grouping, scheme=scheme, filter=filter_, overwrite=overwrite,
        batch_rows=batch_rows, rows_per_part=rows_per_part,
    )
    total = shards.open_inputs(cfg.input, []).total_rows  # footers only: cheap
    with progress_bar("weighting rows", total) as advance:
        summary = run_weight(cfg, progress=advance)
    console.print(summary_table(summary, cfg))
