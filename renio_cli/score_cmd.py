"""``renio score``: student and teacher log-probs of every sampled token."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from renio_cli.common import ConfigOpt, console, handle_errors, progress_bar
from renio_cli.options import (
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    OverwriteOpt,
    ShardOpt,
    VllmMemoryOpt,
)
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
def score(
    input_: str = typer.Option(..., "--in", help="Rollouts: a .parquet file, a directory of parts, or a glob."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (OPD), or 'self' (OPSD: student base weights + privileged prompt)."),
    out: Path = typer.Option(..., "--out", help="Output: a .parquet file, or a directory of parts."),
    student: str | None = typer.Option(None, "--student", help="Student model; default: the rollout's, from the input's metadata."),
    adapter: str | None = typer.Option(None, "--adapter", help="Student PEFT adapter; default: the rollout's."),
    temperature: float | None = typer.Option(None, help="Scoring temperature T; default: the rollout's."),
    topk: int = typer.Option(0, help="Also store the teacher's top-K ids and log-probs per position."),
    max_batch_tokens: int = typer.Option(16384, help="Padded tokens per forward batch."),
    chunk: int | None = typer.Option(None, help="Positions per log-softmax chunk (peak memory ~ chunk x vocab); default: from --chunk-budget-mb."),
    chunk_budget_mb: float = typer.Option(256.0, help="Memory for one chunk's logits and log-softmax (sets the default --chunk)."),
    shard: str = ShardOpt,
    backend: str = BackendOpt,
    vllm_memory: float = VllmMemoryOpt,
    rows_per_part: int = typer.Option(512, help="Input rows per output part (the unit of resuming and sharding)."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    teacher_prompt: str | None = typer.Option(None, help="What the teacher sees before the completion: plain (the student's prompt) or privileged (problem + reference solution + instruction, as the official collator shows its OPD teacher). Default: privileged for --teacher self, plain otherwise."),
    overwrite: bool = OverwriteOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Score each sampled token under the student and the teacher (docs/design.md, 'score adds')."""
    cfg = ScoreConfig(
        input=input_, teacher=teacher, out=str(out), student=student, adapter=adapter,
        temperature=temperature, topk=topk, max_batch_tokens=max_batch_tokens, chunk=chunk,
        chunk_budget_mb=chunk_budget_mb,
        shard=shard, backend=backend, vllm_memory=vllm_memory, rows_per_part=rows_per_part, dtype=dtype,
        device=device, overwrite=overwrite, teacher_prompt=teacher_prompt,
    )
    total = shards.open_inputs(cfg.input, INPUT_COLUMNS).total_rows  # footers only: cheap
    with progress_bar("scoring", planned_rows(cfg, total)) as advance:
        summary = run_score(cfg, progress=advance)
    console.print(summary_table(summary, cfg))
