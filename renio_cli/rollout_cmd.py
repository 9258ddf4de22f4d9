"""``renio rollout``: sample completions from the student (the on-policy samples)."""

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
    SeedOpt,
    ShardOpt,
    VllmMemoryOpt,
)
from renio_core.data.prompt_io import load_prompts
from renio_core.stages.rollout import (
    RolloutConfig,
    RolloutSummary,
    planned_rows,
    run_rollout,
)


def summary_table(s: RolloutSummary, cfg: RolloutConfig) -> Table:
    table = Table(title=f"renio rollout -> {s.out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("model", cfg.model + (f" + {cfg.adapter}" if cfg.adapter else ""))
    table.add_row("shard", cfg.shard)
    table.add_row("rows", f"{s.rows:,}")
    table.add_row("stopped at EOS", f"{s.stopped:,} ({s.stopped / max(1, s.rows):.1%})")
    if s.graded:
        table.add_row("correct (graded rows)", f"{s.correct:,} / {s.graded:,} "
                                               f"({s.correct / s.graded:.1%})")
    table.add_row("parts", f"{s.parts_written} written, {s.parts_skipped} already complete")
    if s.tokens:
        table.add_row("sampled tokens", f"{s.tokens:,}")
        table.add_row("tokens / s", f"{s.tokens_per_second:,.1f}")
    return table


@handle_errors
def rollout(
    model: str = typer.Option(..., "--model", help="Student: hub name, local path, or toy:student."),
    prompts: str = typer.Option(..., "--prompts", help="Prompts: .jsonl/.json/.parquet, or a datasets name NAME[:CONFIG][@SPLIT]."),
    out: Path = typer.Option(..., "--out", help="Output: a .parquet file, or a directory of parts."),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT adapter directory on top of --model."),
    n: int = typer.Option(1, "--n", help="Samples per prompt."),
    temperature: float = typer.Option(1.1, help="Sampling temperature (0 is greedy)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass (1 disables it)."),
    top_k: int = typer.Option(20, help="Top-k filter (0 disables it)."),
    max_new_tokens: int = typer.Option(1024, help="Completion length limit."),
    seed: int = SeedOpt,
    task: str = typer.Option("math", help="math or code: the instruction added to each prompt (a prompt's own 'task' wins)."),
    enable_thinking: bool = typer.Option(False, "--enable-thinking/--no-enable-thinking", help="Passed to chat templates that know it (Qwen3)."),
    grade: bool = typer.Option(False, "--grade", help="Fill 'correct' (math: math-verify on the last \\boxed{})."),
    shard: str = ShardOpt,
    policy_step: int = typer.Option(0, "--policy-step", help="Train step of the student, recorded per row."),
    backend: str = BackendOpt,
    vllm_memory: float = VllmMemoryOpt,
    batch_size: int = typer.Option(64, help="Trajectories sampled together (HF backend)."),
    chunk_prompts: int = typer.Option(64, help="Prompts per output part (the unit of resuming and sharding)."),
    math_instruction: str | None = typer.Option(None, help="Replace the math instruction."),
    code_instruction: str | None = typer.Option(None, help="Replace the code instruction."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    overwrite: bool = OverwriteOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Sample completions from the student for every prompt (docs/design.md, 'rollout adds')."""
    cfg = RolloutConfig(
        model=model, prompts=prompts, out=str(out), adapter=adapter, n=n,
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        seed=seed, task=task, enable_thinking=enable_thinking, grade=grade, shard=shard,
        policy_step=policy_step, backend=backend, vllm_memory=vllm_memory, batch_size=batch_size,
        chunk_prompts=chunk_prompts, math_instruction=math_instruction,
        code_instruction=code_instruction, dtype=dtype, device=device, overwrite=overwrite,
    )
    prompt_set = load_prompts(cfg.prompts)
    with progress_bar("sampling", planned_rows(cfg, len(prompt_set))) as advance:
        summary = run_rollout(cfg, progress=advance, prompt_set=prompt_set)
    console.print(summary_table(summary, cfg))
