"""``renio run``: the on-policy loop (rollout -> score -> weight -> train, eval every k)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from renio_cli.common import console, err_console, fmt, handle_errors, progress_bar
from renio_core.run.config import load_run_config
from renio_core.run.loop import RunSummary, run_loop

# Phases of the time-split table, each a key of IterationRecord.time.
TIME_COLUMNS = ("sample", "score", "weight", "train", "eval", "other")


def summary_table(summary: RunSummary) -> Table:
    table = Table(
        title=f"renio run -> {summary.run_dir}",
        caption="acc: rollout accuracy; w ok / w bad: mean weight of correct / incorrect "
                "rollouts; AUROC: of raw weights for incorrect rollouts; pivot: pivotal token "
                "share; loss: last train loss; eval: held-out avg@n",
    )
    # Short headers: the table must fit an 80-column terminal.
    for name in ("iter", "step", "acc", "w ok", "w bad", "AUROC", "pivot", "loss", "eval",
                 "sec"):
        table.add_column(name, justify="right")
    if summary.base_eval_accuracy is not None:
        table.add_row("base", "0", "-", "-", "-", "-", "-", "-", fmt(summary.base_eval_accuracy, ".1%"), "-")
    for r in summary.iterations:
        table.add_row(str(r.iteration), str(r.policy_step), fmt(r.rollout_accuracy, ".1%"),
                      fmt(r.mean_weight_correct, ".3f"), fmt(r.mean_weight_incorrect, ".3f"),
                      fmt(r.auroc_incorrect, ".3f"), f"{r.pivotal_share:.2%}", fmt(r.train_loss),
                      fmt(r.eval_accuracy, ".1%"), f"{r.seconds:.0f}")
    return table


def time_table(summary: RunSummary) -> Table:
    """Where the iterations' time went: seconds per phase, and the stages' own work."""
    table = Table(title="time per iteration, seconds (mean over the iterations run now)",
                  caption="work: sampling, scoring and optimizer-step compute, without loading, "
                          "shard writes or checkpoint saves")
    for name in TIME_COLUMNS:
        table.add_column(name, justify="right")
    table.add_column("work", justify="right")
    table.add_column("total", justify="right")
    rows = [r for r in summary.iterations if r.time]
    if not rows:
        return table

    def mean(keys: tuple[str, ...]) -> float:
        return sum(sum(r.time.get(k, 0.0) for k in keys) for r in rows) / len(rows)

    work = mean(("sample_work", "score_work", "weight", "train_steps"))
    table.add_row(*(f"{mean((name,)):.2f}" for name in TIME_COLUMNS), f"{work:.2f}",
                  f"{sum(r.seconds for r in rows) / len(rows):.2f}")
    return table


@handle_errors
def run(
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. iterations=2 weight.threshold=1.0"),
    config: Path | None = typer.Option(None, "--config", help="The run's YAML (see sample_configs/)."),
) -> None:
    """Run the on-policy loop: rollout -> score -> weight -> train, evaluating every k iterations.

    Every stage's shards are written under RUN_DIR/iter-NNNNN/. Running the same command again
    after a kill resumes from the last complete stage.
    """
    cfg = load_run_config(config, overrides or [])
    summary = run_loop(
        cfg,
        # One line each, however long: a log file or a Slurm job's output is read by line.
        log=lambda msg: err_console.print(f"[bold]renio run[/] {msg}", highlight=False,
                                          soft_wrap=True),
        progress_factory=progress_bar,
    )
    console.print(summary_table(summary))
    if any(r.time for r in summary.iterations):
        console.print(time_table(summary))
    if summary.base_eval_accuracy is not None and summary.final_eval_accuracy is not None:
        delta = summary.final_eval_accuracy - summary.base_eval_accuracy
        console.print(f"eval accuracy: {summary.base_eval_accuracy:.1%} before -> "
                      f"{summary.final_eval_accuracy:.1%} after ({delta:+.1%})")
