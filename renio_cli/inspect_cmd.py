"""``renio inspect``: look inside any stage's shard, in the terminal or as an HTML report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from renio_cli.common import ConfigOpt, console, fmt, handle_errors
from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.report import html_report
from renio_core.report import inspect_report as ir

MAX_PROMPT_CHARS = 1200


def _visible(token: str) -> str:
    """A token as a table cell: quoted, with whitespace spelled out."""
    return repr(token)


def _correct_text(value: bool | None) -> Text:
    if value is None:
        return Text("ungraded", style="dim")
    return Text("correct", style="green") if value else Text("incorrect", style="bold red")


def _header(view: ir.ShardView, stats: ir.RowStats, settings: ir.Settings | None,
            text: ir.TokenText, sort: str | None) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_row("shard", f"{view.spec} (stage {view.stage or 'unknown'}, {stats.rows:,} rows, "
                           f"{stats.tokens:,} completion tokens)")
    if settings is not None:
        pivotal = stats.pivotal_tokens or 0
        share = pivotal / stats.tokens if stats.tokens else 0.0
        table.add_row("pivotal rule", f"min(s - q, {settings.clip:g}) >= {settings.threshold:g} "
                                      f"(from {settings.source}); {pivotal:,} pivotal tokens "
                                      f"({share:.2%})")
        table.add_row("colour", Text.assemble(
            "s - q: ", ("blue", "on rgb({},{},{})".format(*ir.NEGATIVE_RGB)), " < 0 < ",
            ("red", "on rgb({},{},{})".format(*ir.POSITIVE_RGB)),
            f" (saturates at ±{settings.clip:g}); ", ("pivotal", "bold underline"),
            " tokens bold underlined"))
    else:
        table.add_row("scores", "none: tokens are not coloured (the score columns come from "
                                "'renio score')")
    token_source = text.source if text.available else f"TOKEN IDS, no text: {text.note}"
    table.add_row("token text", token_source)
    table.add_row("order", f"by {ir.SORT_LABELS[sort]}, largest first" if sort else "file order")
    return table


def _completion(traj: ir.Trajectory, settings: ir.Settings | None) -> Text:
    out = Text()
    diff = traj.diff
    for t, token in enumerate(traj.tokens):
        shown = token.replace("\n", "↵\n") if token else "∅"
        if diff is None or settings is None:
            out.append(shown)
            continue
        style = "black on rgb({},{},{})".format(*ir.ratio_rgb(float(diff[t]), settings.clip))
        if traj.pivotal is not None and traj.pivotal[t]:
            style += " bold underline"
        out.append(shown, style=style)
    return out


def _worst_table(traj: ir.Trajectory, settings: ir.Settings) -> Table | None:
    if not traj.worst:
        return None
    table = Table(title="where the teacher disagreed most", title_justify="left", box=None,
                  show_header=True, header_style="dim", pad_edge=False)
    for name in ("pos", "token", "student", "teacher", "s - q", "pivotal"):
        table.add_column(name, justify="right" if name not in ("token", "pivotal") else "left")
    if traj.alternatives is not None:
        table.add_column("teacher's top alternatives (log-prob)")
    diff = traj.diff
    for t in traj.worst:
        cells = [str(t), _visible(traj.tokens[t]), f"{traj.student[t]:.4f}",
                 f"{traj.teacher[t]:.4f}", f"{diff[t]:.4f}",
                 "yes" if traj.pivotal[t] else ""]
        if traj.alternatives is not None:
            cells.append("  ".join(f"{_visible(a.text)} {a.logprob:.3f}"
                                   for a in traj.alternatives[t]))
        table.add_row(*cells)
    return table


def _panel(traj: ir.Trajectory, settings: ir.Settings | None) -> Panel:
    title = Text.assemble(
        f"row {traj.row}", " · ",
        f"prompt {traj.prompt_id if traj.prompt_id is not None else '-'} "
        f"#{traj.sample_index if traj.sample_index is not None else '-'}", " · ",
        _correct_text(traj.correct),
    )
    facts = Text()
    if traj.weight is not None:
        facts.append(f"weight {fmt(traj.weight)}   ", style="bold")
    if traj.raw_weight is not None:
        facts.append(f"raw_weight {fmt(traj.raw_weight)}   ")
    if traj.batch_id is not None:
        facts.append(f"batch {traj.batch_id}   ")
    if traj.pivotal_count is not None:
        facts.append(f"pivotal tokens {traj.pivotal_count}   "
                     f"mean clipped ratio {fmt(traj.log_ratio_mean)}   ")
    facts.append(f"{len(traj.token_ids)} tokens")
    parts: list = [facts]
    if traj.prompt is not None:
        prompt = traj.prompt
        if len(prompt) > MAX_PROMPT_CHARS:
            prompt = prompt[:MAX_PROMPT_CHARS] + f"… ({len(traj.prompt):,} characters)"
        parts += [Text("prompt", style="dim"), Text(prompt)]
    parts += [Text("completion", style="dim"), _completion(traj, settings)]
    if settings is not None and traj.student is not None:
        worst = _worst_table(traj, settings)
        if worst is not None:
            parts.append(worst)
    return Panel(Group(*parts), title=title, title_align="left")


def _diff_output(a: str, b: str, diff: ir.Diff) -> None:
    head = Table(title=f"renio inspect --diff: {a} -> {b}", show_header=True)
    head.add_column("metric")
    head.add_column("value", justify="right")
    rows_text = f"{diff.rows:,} (matched by {diff.matched_by})"
    if diff.only_a or diff.only_b:
        rows_text += f"; {diff.only_a:,} only in A, {diff.only_b:,} only in B"
    head.add_row("rows", rows_text)
    head.add_row("settings A", ", ".join(f"{k}={v}" for k, v in diff.settings_a.items()) or "-")
    head.add_row("settings B", ", ".join(f"{k}={v}" for k, v in diff.settings_b.items()) or "-")
    head.add_row("Spearman rank correlation of weight", fmt(diff.spearman, ".4f"))
    head.add_row("rows whose weight changed", f"{diff.changed:,}")
    head.add_row("mean |change| / max |change|",
                 f"{diff.mean_abs_change:.4f} / {diff.max_abs_change:.4f}")
    head.add_row("mean weight A / B", f"{diff.mean_a:.4f} / {diff.mean_b:.4f}")
    if diff.auroc_a is not None or diff.auroc_b is not None:
        head.add_row("AUROC of weight for incorrect, A / B",
                     f"{fmt(diff.auroc_a, '.3f')} / {fmt(diff.auroc_b, '.3f')}")
    console.print(head)
    table = Table(title="largest weight changes", show_header=True)
    for name in ("trajectory", "weight A", "weight B", "change", "pivotal A", "pivotal B", "correct"):
        table.add_column(name, justify="left" if name in ("trajectory", "correct") else "right")
    for r in diff.top:
        table.add_row(r.key, f"{r.weight_a:.4f}", f"{r.weight_b:.4f}", f"{r.change:+.4f}",
                      "-" if r.pivotal_a is None else str(r.pivotal_a),
                      "-" if r.pivotal_b is None else str(r.pivotal_b),
                      _correct_text(r.correct))
    console.print(table)


@handle_errors
def inspect(
    shard_paths: list[str] = typer.Argument(
        ..., metavar="SHARD [SHARD_B]",
        help="A shard of any stage (file, directory of parts, or glob); two with --diff."),
    row: int | None = typer.Option(None, "--row", help="Show this row (0-based, across parts)."),
    prompt_id: str | None = typer.Option(None, "--prompt-id", help="Show the rows of this prompt."),
    top: int = typer.Option(10, "--top", help="How many trajectories to show (or diff rows to list)."),
    sort: str | None = typer.Option(
        None, "--sort", help="weight, pivotal or log_ratio, largest first. Default: weight when "
                             "the shard has weights, else pivotal, else file order."),
    html: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
    max_rows: int = typer.Option(500, "--max-rows", help="Most trajectories embedded in the HTML."),
    diff: bool = typer.Option(False, "--diff", help="Compare the weights of two weight shards."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer for token text. Default: the model the shard records."),
    clip: float | None = typer.Option(None, help="Clip of s - q. Default: the weight stage's, else 2.5."),
    threshold: float | None = typer.Option(
        None, help="Pivotal threshold. Default: the weight stage's, else 0.8."),
    worst: int = typer.Option(5, "--worst", help="Positions listed where the teacher disagreed most."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --html file."),
    config: Path | None = ConfigOpt,
) -> None:
    """Look inside a shard: tokens coloured by student - teacher log-prob, pivotal tokens,
    the teacher's alternatives, weights against correctness (docs/design.md, 'ReNIO weights')."""
    if diff:
        if len(shard_paths) != 2:
            raise RenioInputError("--diff needs two shards: renio inspect A B --diff")
        if html is not None or row is not None or prompt_id is not None:
            raise RenioInputError("--diff cannot be combined with --html, --row or --prompt-id")
        if top < 1:
            raise RenioInputError(f"--top: must be at least 1, got {top}")
        a, b = ir.open_shard(shard_paths[0]), ir.open_shard(shard_paths[1])
        _diff_output(shard_paths[0], shard_paths[1], ir.diff_shards(a, b, top=top))
        return
    if len(shard_paths) != 1:
        raise RenioInputError("two shards given: pass --diff to compare them, or give one shard")
    if row is not None and prompt_id is not None:
        raise RenioInputError("--row and --prompt-id cannot be combined")
    if html is not None and (row is not None or prompt_id is not None):
        raise RenioInputError("--html embeds up to --max-rows rows; it does not take --row or "
                              "--prompt-id")
    if worst < 0:
        raise RenioInputError(f"--worst: must be at least 0, got {worst}")

    if html is not None:
        shards.refuse_overwriting_inputs(html, *shard_paths, tokenizer, flag="--html")
    view = ir.open_shard(shard_paths[0])
    ir.check_sort(view, sort)
    if html is not None:
        view.require_scores("--html")
    sort = sort or ir.default_sort(view)
    settings = ir.resolve_settings(view, clip, threshold) if view.has_scores else None
    stats = ir.collect_rows(view, settings)
    text = ir.load_token_text(view, tokenizer)

    if html is not None:
        chosen, included = ir.rows_for_report(stats, sort, max_rows)
        trajectories = ir.build_trajectories(view, chosen, settings, text, worst=worst,
                                             max_alternatives=html_report.MAX_ALTERNATIVES)
        page = html_report.render_html(
            shard=view.spec, stage=view.stage, settings=settings, summary=ir.summarize(stats),
            trajectories=trajectories, text=text, included=included)
        out = html_report.write_html(html, page, overwrite=overwrite)
        console.print(f"wrote {out} ({included})", highlight=False, soft_wrap=True)
        return

    chosen = ir.select_rows(stats, row=row, prompt_id=prompt_id, sort=sort, top=top,
                            file=view.spec)
    trajectories = ir.build_trajectories(view, chosen, settings, text, worst=worst)
    console.print(_header(view, stats, settings, text, sort))
    for traj in trajectories:
        console.print(_panel(traj, settings))
