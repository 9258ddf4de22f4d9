"""``renio train``: ReNIO-weighted on-policy distillation of a student on a weights shard."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from renio_cli.common import console, fmt, handle_errors, progress_bar
from renio_cli.options import Flag, config_options
from renio_core.stages.train import (
    DEFAULT_LORA_TARGETS,
    TrainConfig,
    TrainSummary,
    run_train,
)


def summary_table(summary: TrainSummary, cfg: TrainConfig) -> Table:
    table = Table(title=f"renio train -> {summary.out}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    steps = f"{summary.resumed_from + summary.steps} / {summary.total_steps}"
    if summary.resumed_from:
        steps += f" (resumed at {summary.resumed_from})"
    table.add_row("optimizer steps", steps)
    table.add_row("loss", f"{summary.loss} (beta {cfg.beta:g}, token clip {cfg.token_clip:g})"
                  if summary.loss != "rkl" else "rkl")
    table.add_row("temperature", f"{summary.temperature:g}")
    if summary.teacher is not None:
        table.add_row("teacher", summary.teacher)
    table.add_row("model", f"{cfg.model} ({'LoRA r ' + str(cfg.lora_r) if cfg.lora else 'full'})")
    table.add_row("processes", str(summary.world_size))
    mb = f"{summary.micro_batches:,}"
    if summary.micro_batches_dropped:
        mb += f" ({summary.micro_batches_dropped} left over per epoch, not used)"
    table.add_row("micro-batches (batch_id groups)", mb)
    table.add_row("samples / tokens seen", f"{summary.samples_seen:,} / {summary.tokens_seen:,}")
    table.add_row("loss first -> last step", f"{fmt(summary.first_loss)} -> {fmt(summary.last_loss)}")
    table.add_row("mean weight", fmt(summary.mean_weight))
    table.add_row("wall time", f"{summary.seconds:.1f} s")
    return table


@handle_errors
@config_options(
    TrainConfig,
    weights=Flag(default=...),
    model=Flag(default=...),
    out=Flag(type=Path, default=...),
    topk_tail=Flag("--topk-tail/--topk-renormalize"),
    # The field is a tuple; the flag takes comma-separated text (the config accepts both).
    lora_targets=Flag(type=str, default=",".join(DEFAULT_LORA_TARGETS)),
)
def train(fields: dict[str, Any]) -> None:
    """Distill the teacher into the student on ReNIO-weighted rollouts (docs/design.md, 'Training losses')."""
    cfg = TrainConfig(**fields)
    with contextlib.ExitStack() as stack:
        bar: dict[str, Any] = {}

        def progress(step: int, total: int, record: dict[str, Any] | None) -> None:
            # The total is known only once the shard is read: the bar starts at the trainer's
            # first call (record None), at the step it resumed from.
            if "advance" not in bar:
                bar["advance"] = stack.enter_context(progress_bar("training steps", total))
                bar["done"] = 0
            bar["advance"](step - bar["done"])
            bar["done"] = step

        summary = run_train(cfg, progress=progress)
    if summary.world_size == 1 or _is_rank0():
        console.print(summary_table(summary, cfg))


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"
