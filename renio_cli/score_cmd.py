"""``renio score``: student and teacher log-probs of every sampled token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from renio_cli.common import console, handle_errors, progress_bar
from renio_cli.options import Flag, config_options
from renio_core.data import shards
from renio_core.stages.score import (
    INPUT_COLUMNS,
    ScoreConfig,
    ScoreSummary,
    planned_rows,
    run_score,
)


def summary_table(s: ScoreSummary, cfg: ScoreConfig) -> Table:
    table = Table(title=f"renio score -> {s.out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("student", s.student)
    table.add_row("teacher", f"{s.teacher} ({'privileged' if cfg.privileged else 'plain'} prompt)")
    table.add_row("temperature", f"{s.temperature:g}")
    table.add_row("rows", f"{s.rows:,}")
    table.add_row("completion tokens", f"{s.tokens:,}")
    if s.mean_student_logprob is not None:
        table.add_row("mean student log-prob", f"{s.mean_student_logprob:.4f}")
        table.add_row("mean teacher log-prob", f"{s.mean_teacher_logprob:.4f}")
    if cfg.topk:
        table.add_row("teacher top-k stored", str(cfg.topk))
    table.add_row("parts", f"{s.parts_written} written, {s.parts_skipped} already complete")
    if s.fresh_tokens:
        table.add_row("tokens / s (scored now)", f"{s.tokens_per_second:,.1f}")
    return table


@handle_errors
@config_options(
    ScoreConfig,
    # --in, --teacher and --out are required here; the dataclass's '' is a placeholder that
    # ScoreConfig rejects.
    input=Flag("--in", default=...),
    teacher=Flag(default=...),
    out=Flag(type=Path, default=...),
    order=(..., "overwrite"),
)
def score(fields: dict[str, Any]) -> None:
    """Score each sampled token under the student and the teacher (docs/design.md, 'score adds')."""
    cfg = ScoreConfig(**fields)
    total = shards.open_inputs(cfg.input, INPUT_COLUMNS).total_rows  # footers only: cheap
    with progress_bar("scoring", planned_rows(cfg, total)) as advance:
        summary = run_score(cfg, progress=advance)
    console.print(summary_table(summary, cfg))
