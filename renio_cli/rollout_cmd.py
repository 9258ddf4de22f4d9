"""``renio rollout``: sample completions from the student (the on-policy samples)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from renio_cli.common import ConfigOpt, console, handle_errors, progress_bar
from renio_cli.options import field_option
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
def rollout(
    # --model, --prompts and --out are required here; the dataclass's '' is a placeholder
    # that RolloutConfig rejects.
    model: str = field_option(RolloutConfig, "model", "--model", default=...),
    prompts: str = field_option(RolloutConfig, "prompts", "--prompts", default=...),
    out: Path = field_option(RolloutConfig, "out", "--out", default=...),
    adapter: str | None = field_option(RolloutConfig, "adapter", "--adapter"),
    n: int = field_option(RolloutConfig, "n", "--n"),
    temperature: float = field_option(RolloutConfig, "temperature"),
    top_p: float = field_option(RolloutConfig, "top_p"),
    top_k: int = field_option(RolloutConfig, "top_k"),
    max_new_tokens: int = field_option(RolloutConfig, "max_new_tokens"),
    seed: int = field_option(RolloutConfig, "seed", "--seed"),
    task: str = field_option(RolloutConfig, "task"),
    enable_thinking: bool = field_option(RolloutConfig, "enable_thinking",
                                         "--enable-thinking/--no-enable-thinking"),
    grade: bool = field_option(RolloutConfig, "grade", "--grade"),
    shard: str = field_option(RolloutConfig, "shard", "--shard"),
    policy_step: int = field_option(RolloutConfig, "policy_step", "--policy-step"),
    backend: str = field_option(RolloutConfig, "backend", "--backend"),
    vllm_memory: float = field_option(RolloutConfig, "vllm_memory", "--vllm-memory"),
    tensor_parallel_size: int = field_option(RolloutConfig, "tensor_parallel_size",
                                             "--tensor-parallel-size"),
    device_map: str = field_option(RolloutConfig, "device_map", "--device-map"),
    batch_size: int = field_option(RolloutConfig, "batch_size"),
    refill: bool = field_option(RolloutConfig, "refill", "--refill"),
    chunk_prompts: int = field_option(RolloutConfig, "chunk_prompts"),
    math_instruction: str | None = field_option(RolloutConfig, "math_instruction"),
    code_instruction: str | None = field_option(RolloutConfig, "code_instruction"),
    dtype: str = field_option(RolloutConfig, "dtype", "--dtype"),
    device: str = field_option(RolloutConfig, "device", "--device"),
    skip_long_prompts: bool = field_option(RolloutConfig, "skip_long_prompts",
                                           "--skip-long-prompts"),
    overwrite: bool = field_option(RolloutConfig, "overwrite", "--overwrite"),
    config: Path | None = ConfigOpt,
) -> None:
    """Sample completions from the student for every prompt (docs/design.md, 'rollout adds')."""
    cfg = RolloutConfig(
        model=model, prompts=prompts, out=str(out), adapter=adapter, n=n,
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        seed=seed, task=task, enable_thinking=enable_thinking, grade=grade, shard=shard,
        policy_step=policy_step, backend=backend, vllm_memory=vllm_memory,
        tensor_parallel_size=tensor_parallel_size, device_map=device_map, batch_size=batch_size,
        refill=refill, chunk_prompts=chunk_prompts, math_instruction=math_instruction,
        code_instruction=code_instruction, dtype=dtype, device=device,
        skip_long_prompts=skip_long_prompts, overwrite=overwrite,
    )
    tokenizer = models.load_tokenizer(cfg.model)
    fitted = fit_rollout_prompts(cfg, load_prompts(cfg.prompts), tokenizer)
    with progress_bar("sampling", planned_rows(cfg, len(fitted.prompts))) as advance:
        summary = run_rollout(cfg, progress=advance, prompt_set=fitted.prompts,
                              tokenizer=tokenizer, fitted=fitted)
    console.print(summary_table(summary, cfg))
