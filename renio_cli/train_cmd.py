"""``renio train``: ReNIO-weighted on-policy distillation of a student on a weights shard."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from renio_cli.common import ConfigOpt, console, fmt, handle_errors, progress_bar
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
    weights: str = typer.Option(..., "--weights", help="Output of 'renio weight': a .parquet file, a directory of parts, or a glob."),
    model: str = typer.Option(..., "--model", help="The student: a model name or path (toy:student for the toy world)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory (Hugging Face format plus trainer state)."),
    loss: str = typer.Option("jsd", help="jsd (teacher's full logits), topk (stored top-k) or rkl (sampled reverse KL)."),
    beta: float = typer.Option(0.0, help="JSD mixing: 0 = KL(teacher||student), 1 = KL(student||teacher)."),
    token_clip: float = typer.Option(0.05, help="Clamp each vocabulary entry's term to [0, clip]; 0 = no clamp."),
    topk_tail: bool = typer.Option(True, "--topk-tail/--topk-renormalize", help="topk: keep the mass outside the top-k as one bucket (default), or renormalize both sides on the top-k."),
    temperature: float | None = typer.Option(None, help="Distribution temperature; default: the scoring temperature in the shard's metadata."),
    teacher: str | None = typer.Option(None, help="jsd only: teacher model (OPD), or 'self' (OPSD: base weights, privileged prompt). Default: from metadata."),
    lora: bool = typer.Option(True, "--lora/--no-lora", help="Train a LoRA adapter (default) or the full model."),
    lora_r: int = typer.Option(64, help="LoRA rank."),
    lora_alpha: int = typer.Option(128, help="LoRA alpha."),
    lora_targets: str = typer.Option(",".join(DEFAULT_LORA_TARGETS), help="Comma-separated module names that get LoRA."),
    adapter: str | None = typer.Option(None, help="Start from this LoRA adapter (previous iteration)."),
    lr: float = typer.Option(5e-6, help="AdamW learning rate."),
    epochs: int = typer.Option(1, help="Passes over the micro-batches."),
    max_steps: int | None = typer.Option(None, help="Optimizer steps; overrides --epochs (cycles the data)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step and process."),
    grad_clip: float = typer.Option(1.0, help="Gradient norm clip; 0 = none."),
    warmup_steps: int = typer.Option(0, help="Linear learning-rate warm-up steps, then --lr-schedule."),
    lr_schedule: str = typer.Option("constant", help="After warm-up: constant, linear (to 0 at --schedule-steps; the official run's) or cosine."),
    schedule_steps: int | None = typer.Option(None, help="Total steps of the schedule, over a chain of --init-from runs. Default: this run's steps (plus --init-from's)."),
    steps_per_batch: int | None = typer.Option(None, help="Split the shard's micro-batches into this many optimizer steps (gradient accumulation derived); default: --grad-accum micro-batches per step."),
    init_from: str | None = typer.Option(None, help="Continue this finished checkpoint's AdamW and schedule state (and, with LoRA, its adapter) on a new shard: one optimizer across 'renio train' calls."),
    weights_from: str = typer.Option("shard", help="shard: the 'weight' column; live: recompute the ReNIO weight in each step from this forward pass's student log-probs (the weight stage's settings, normalized per micro-batch)."),
    seed: int = typer.Option(0, help="Seed (LoRA initialization)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute decoder activations in backward (less memory)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out exactly."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the student with FSDP (under torchrun; nccl on GPUs, gloo on CPU)."),
    save_every: int = typer.Option(0, help="Save a resumable checkpoint every N steps; 0 = only at the end."),
    chunk_size: int | None = typer.Option(None, help="Completion positions per LM-head chunk; default: from --chunk-budget-mb and the vocabulary."),
    chunk_budget_mb: float = typer.Option(256.0, help="Memory for the LM-head chunk's logits and divergence (sets the default --chunk-size)."),
    dtype: str = typer.Option("auto", help="Student weights: auto (bf16 base for LoRA on GPU, else fp32), float32, bfloat16."),
    bf16_autocast: bool | None = typer.Option(None, "--bf16-autocast/--no-bf16-autocast", help="Run forward and backward under bf16 autocast (fp32 master weights). Default: on for CUDA GPUs with bf16, off on CPU."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events to OUT/tensorboard."),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="Also log to this Weights & Biases project (pip install 'renio[wandb]'; WANDB_MODE=offline works without network)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
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
        tensorboard=tensorboard, wandb_project=wandb_project, overwrite=overwrite,
    )
    with contextlib.ExitStack() as stack:
        bar: dict[str, Any] = {}

        def progress(step: int, total: int, record: dict[str, Any]) -> None:
            # The total is known only once the shard is read, so the bar starts on step one.
            if "advance" not in bar:
                bar["advance"] = stack.enter_context(progress_bar("training steps", total))
                bar["done"] = step - 1
                bar["advance"](step - 1)
            bar["advance"](step - bar["done"])
            bar["done"] = step

        summary = run_train(cfg, progress=progress)
    if summary.world_size == 1 or _is_rank0():
        console.print(summary_table(summary, cfg))


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
