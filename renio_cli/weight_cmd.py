"""``renio weight``: ReNIO sample weights from teacher-scored rollouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from renio_cli.common import console, fmt, handle_errors, progress_bar
from renio_cli.options import Flag, config_options
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
        if summary.weight_share_incorrect is not None:
            table.add_row("share of the weight on incorrect rows",
                          f"{summary.weight_share_incorrect:.1%} "
                          f"({summary.row_share_incorrect:.1%} of the graded rows)")
    if summary.group_prompts_mean is not None:
        table.add_row(f"distinct prompts per group ({cfg.grouping})",
                      f"{summary.group_prompts_mean:.2f} mean, {summary.group_prompts_min} min")
    if summary.parts_skipped:
        table.add_row("parts", f"{summary.parts_written} written, {summary.parts_skipped} already complete")
    return table


@handle_errors
@config_options(
    WeightConfig,
    # --in and --out are required here; the dataclass's '' is a placeholder that WeightConfig
    # rejects.
    input=Flag("--in", default=...),
    out=Flag(type=Path, default=...),
    order=(..., "rows_per_part", "batch_rows", "overwrite"),
)
def weight(fields: dict[str, Any]) -> None:
    """Turn teacher-scored rollouts into ReNIO sample weights (docs/design.md, 'ReNIO weights')."""
    cfg = WeightConfig(**fields)
    total = shards.open_inputs(cfg.input, []).total_rows  # footers only: cheap
    with progress_bar("weighting rows", total) as advance:
        summary = run_weight(cfg, progress=advance)
    console.print(summary_table(summary, cfg))
