"""``renio score``: student and teacher log-probs of every sampled token."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from renio_cli.common import ConfigOpt, console, handle_errors, progress_bar
from renio_cli.options import field_option
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
    # --in, --teacher and --out are required here; the dataclass's '' is a placeholder that
    # ScoreConfig rejects.
    input_: str = field_option(ScoreConfig, "input", "--in", default=...),
    teacher: str = field_option(ScoreConfig, "teacher", "--teacher", default=...),
    out: Path = field_option(ScoreConfig, "out", "--out", default=...),
    student: str | None = field_option(ScoreConfig, "student", "--student"),
    adapter: str | None = field_option(ScoreConfig, "adapter", "--adapter"),
    temperature: float | None = field_option(ScoreConfig, "temperature"),
    topk: int = field_option(ScoreConfig, "topk"),
    max_batch_tokens: int = field_option(ScoreConfig, "max_batch_tokens"),
    chunk: int | None = field_option(ScoreConfig, "chunk"),
    chunk_budget_mb: float = field_option(ScoreConfig, "chunk_budget_mb"),
    shard: str = field_option(ScoreConfig, "shard", "--shard"),
    backend: str = field_option(ScoreConfig, "backend", "--backend"),
    vllm_memory: float = field_option(ScoreConfig, "vllm_memory", "--vllm-memory"),
    tensor_parallel_size: int = field_option(ScoreConfig, "tensor_parallel_size",
                                             "--tensor-parallel-size"),
    device_map: str = field_option(ScoreConfig, "device_map", "--device-map"),
    rows_per_part: int = field_option(ScoreConfig, "rows_per_part"),
    dtype: str = field_option(ScoreConfig, "dtype", "--dtype"),
    device: str = field_option(ScoreConfig, "device", "--device"),
    teacher_prompt: str | None = field_option(ScoreConfig, "teacher_prompt"),
    overwrite: bool = field_option(ScoreConfig, "overwrite", "--overwrite"),
    config: Path | None = ConfigOpt,
) -> None:
    """Score each sampled token under the student and the teacher (docs/design.md, 'score adds')."""
    cfg = ScoreConfig(
        input=input_, teacher=teacher, out=str(out), student=student, adapter=adapter,
        temperature=temperature, topk=topk, max_batch_tokens=max_batch_tokens, chunk=chunk,
        chunk_budget_mb=chunk_budget_mb,
        shard=shard, backend=backend, vllm_memory=vllm_memory,
        tensor_parallel_size=tensor_parallel_size, device_map=device_map, rows_per_part=rows_per_part, dtype=dtype,
        device=device, overwrite=overwrite, teacher_prompt=teacher_prompt,
    )
    total = shards.open_inputs(cfg.input, INPUT_COLUMNS).total_rows  # footers only: cheap
    with progress_bar("scoring", planned_rows(cfg, total)) as advance:
        summary = run_score(cfg, progress=advance)
    console.print(summary_table(summary, cfg))
