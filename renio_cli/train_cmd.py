"""``renio train``: ReNIO-weighted on-policy distillation of a student on a weights shard."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from renio_cli.common import ConfigOpt, console, fmt, handle_errors, progress_bar
from renio_cli.options import field_option
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
def train(
    weights: str = field_option(TrainConfig, "weights", "--weights", default=...),
    model: str = field_option(TrainConfig, "model", "--model", default=...),
    out: Path = field_option(TrainConfig, "out", "--out", default=...),
    loss: str = field_option(TrainConfig, "loss"),
    beta: float = field_option(TrainConfig, "beta"),
    token_clip: float = field_option(TrainConfig, "token_clip"),
    topk_tail: bool = field_option(TrainConfig, "topk_tail", "--topk-tail/--topk-renormalize"),
    temperature: float | None = field_option(TrainConfig, "temperature"),
    teacher: str | None = field_option(TrainConfig, "teacher"),
    lora: bool = field_option(TrainConfig, "lora", "--lora/--no-lora"),
    lora_r: int = field_option(TrainConfig, "lora_r"),
    lora_alpha: int = field_option(TrainConfig, "lora_alpha"),
    # The field is a tuple; the flag takes comma-separated text (the config accepts both).
    lora_targets: str = field_option(TrainConfig, "lora_targets", default=",".join(DEFAULT_LORA_TARGETS)),
    adapter: str | None = field_option(TrainConfig, "adapter"),
    lr: float = field_option(TrainConfig, "lr"),
    epochs: int = field_option(TrainConfig, "epochs"),
    max_steps: int | None = field_option(TrainConfig, "max_steps"),
    grad_accum: int = field_option(TrainConfig, "grad_accum"),
    grad_clip: float = field_option(TrainConfig, "grad_clip"),
    warmup_steps: int = field_option(TrainConfig, "warmup_steps"),
    lr_schedule: str = field_option(TrainConfig, "lr_schedule"),
    schedule_steps: int | None = field_option(TrainConfig, "schedule_steps"),
    steps_per_batch: int | None = field_option(TrainConfig, "steps_per_batch"),
    init_from: str | None = field_option(TrainConfig, "init_from"),
    weights_from: str = field_option(TrainConfig, "weights_from"),
    seed: int = field_option(TrainConfig, "seed"),
    gradient_checkpointing: bool = field_option(TrainConfig, "gradient_checkpointing", "--gradient-checkpointing"),
    resume: bool = field_option(TrainConfig, "resume", "--resume"),
    fsdp: bool = field_option(TrainConfig, "fsdp", "--fsdp"),
    save_every: int = field_option(TrainConfig, "save_every"),
    chunk_size: int | None = field_option(TrainConfig, "chunk_size"),
    chunk_budget_mb: float = field_option(TrainConfig, "chunk_budget_mb"),
    dtype: str = field_option(TrainConfig, "dtype"),
    bf16_autocast: bool | None = field_option(TrainConfig, "bf16_autocast", "--bf16-autocast/--no-bf16-autocast"),
    device: str = field_option(TrainConfig, "device"),
    teacher_device_map: str = field_option(TrainConfig, "teacher_device_map"),
    tensorboard: bool = field_option(TrainConfig, "tensorboard", "--tensorboard"),
    wandb_project: str | None = field_option(TrainConfig, "wandb_project", "--wandb-project"),
    overwrite: bool = field_option(TrainConfig, "overwrite", "--overwrite"),
    config: Path | None = ConfigOpt,
) -> None:
    """Distill the teacher into the student on ReNIO-weighted rollouts (docs/design.md, 'Training losses')."""
    cfg = TrainConfig(
        weights=weights, model=model, out=str(out), loss=loss, beta=beta, token_clip=token_clip,
        topk_tail=topk_tail, temperature=temperature, teacher=teacher, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_targets=lora_targets, adapter=adapter, lr=lr, epochs=epochs,
        max_steps=max_steps, grad_accum=grad_accum, grad_clip=grad_clip,
        warmup_steps=warmup_steps, lr_schedule=lr_schedule, schedule_steps=schedule_steps,
        steps_per_batch=steps_per_batch, init_from=init_from, weights_from=weights_from, seed=seed, gradient_checkpointing=gradient_checkpointing,
        resume=resume, fsdp=fsdp, save_every=save_every, chunk_size=chunk_size,
        chunk_budget_mb=chunk_budget_mb, dtype=dtype, bf16_autocast=bf16_autocast, device=device,
        teacher_device_map=teacher_device_map,
        tensorboard=tensorboard, wandb_project=wandb_project, overwrite=overwrite,
    )
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
