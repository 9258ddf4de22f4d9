"""``renio rollout``: sample completions from the student (the on-policy samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from renio_cli.common import console, handle_errors, progress_bar
from renio_cli.options import Flag, config_options
from renio_core.data.prompt_io import load_prompts
from renio_core.modeling import models
from renio_core.stages.rollout import (
    RolloutConfig,
    RolloutSummary,
    fit_rollout_prompts,
    planned_rows,
    run_rollout,
)


def summary_table(s: RolloutSummary, cfg: RolloutConfig) -> Table:
    table = Table(title=f"renio rollout -> {s.out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("model", cfg.model + (f" + {cfg.adapter}" if cfg.adapter else ""))
    table.add_row("shard", cfg.shard)
    if s.sampler:
        table.add_row("sampler", s.sampler)
    table.add_row("rows", f"{s.rows:,}")
    table.add_row("stopped at EOS", f"{s.stopped:,} ({s.stopped / max(1, s.rows):.1%})")
    if s.graded:
        table.add_row("correct (graded rows)", f"{s.correct:,} / {s.graded:,} "
                                               f"({s.correct / s.graded:.1%})")
    table.add_row("parts", f"{s.parts_written} written, {s.parts_skipped} already complete")
    if s.long_prompts_skipped:
        table.add_row("prompts skipped (longer than the context)", f"{s.long_prompts_skipped:,}")
    if s.tokens:
        table.add_row("sampled tokens", f"{s.tokens:,}")
        table.add_row("tokens / s", f"{s.tokens_per_second:,.1f}")
    return table


@handle_errors
@config_options(
    RolloutConfig,
    # --model, --prompts and --out are required here; the dataclass's '' is a placeholder
    # that RolloutConfig rejects.
    model=Flag(default=...),
    prompts=Flag(default=...),
    out=Flag(type=Path, default=...),
    enable_thinking=Flag("--enable-thinking/--no-enable-thinking"),
    order=(..., "dtype", "device", "skip_long_prompts", "overwrite"),
)
def rollout(fields: dict[str, Any]) -> None:
    """Sample completions from the student for every prompt (docs/design.md, 'rollout adds')."""
    cfg = RolloutConfig(**fields)
    tokenizer = models.load_tokenizer(cfg.model)
    fitted = fit_rollout_prompts(cfg, load_prompts(cfg.prompts), tokenizer)
    with progress_bar("sampling", planned_rows(cfg, len(fitted.prompts))) as advance:
        summary = run_rollout(cfg, progress=advance, prompt_set=fitted.prompts,
                              tokenizer=tokenizer, fitted=fitted)
    console.print(summary_table(summary, cfg))
