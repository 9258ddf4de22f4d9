"""``renio inspect --html``: one self-contained HTML file to look inside a scored shard.

The report shows what ReNIO (arXiv 2606.23104) bases a trajectory's weight on: a summary of
the weight distribution (split by ``correct`` with the AUROC of the weight for wrong answers
when rows are graded), a sortable list of trajectories, and, for the one clicked, its tokens
coloured by ``s_t - q_t`` with pivotal tokens marked and a tooltip giving both log-probs and
the teacher's top alternatives.

Everything is inline (CSS, a small script, the data as JSON, histograms as SVG): the file
makes no network request and opens from disk. The page's source lives in package data,
``renio_core/report/page/`` (``report.html`` the template, ``report.css``, ``report.js``), and is
inlined into the one output file here. Token text comes from the model's tokenizer, so
it is untrusted: the JSON is escaped so that no ``</script>`` or ``<!--`` inside it can end the
data block, and the script only ever inserts it with ``textContent``.

Deliberate differences from the paper's code: the paper has no viewer; this is renio's own.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from renio_core.errors import RenioInputError
from renio_core.report.inspect_report import (
    NEGATIVE_RGB,
    POSITIVE_RGB,
    Settings,
    Summary,
    TokenText,
    Trajectory,
    ratio_rgb,
)

# Alternatives per token kept in the file: enough to see what the teacher wanted, without
# letting a top-20 scoring run multiply the report's size by 20.
MAX_ALTERNATIVES = 5


def _num(value: Any, digits: int = 4) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def script_json(data: Any) -> str:
    """JSON safe to place inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` become ``\\u003c``-style escapes (still the same JSON string
    values), so token text such as ``</script>`` cannot close the element; U+2028/2029 are
    escaped for older parsers that treat them as line ends.
    """
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def token_colours(diff_T: np.ndarray, clip: float, palette: dict[str, int]) -> list[int]:
    """Each token's background as an index into ``palette`` (``#rrggbb`` -> index, extended
    here), from the terminal's own scale (:func:`~renio_core.report.inspect_report.ratio_rgb`
    on ``s_t - q_t``): the page's script only applies these, it has no copy of the formula.
    The scale has a few hundred distinct colours, so indices keep the file small."""
    out = []
    for d in diff_T:
        css = "#{:02x}{:02x}{:02x}".format(*ratio_rgb(float(d), clip))
        out.append(palette.setdefault(css, len(palette)))
    return out


def report_data(trajectories: list[Trajectory], text: TokenText,
                clip: float | None = None) -> dict[str, Any]:
    """The embedded data: one record per trajectory, token text shared through a vocabulary;
    with ``clip``, each scored token's colour as well (shared through a palette)."""
    vocab: dict[str, str] = {}
    palette: dict[str, int] = {}
    items = []
    for t in trajectories:
        ids = [int(i) for i in t.token_ids]
        for i in ids:
            vocab.setdefault(str(i), text(i))
        rec: dict[str, Any] = {
            "row": t.row, "prompt_id": t.prompt_id, "sample_index": t.sample_index,
            "correct": t.correct, "weight": _num(t.weight), "raw_weight": _num(t.raw_weight),
            "batch_id": t.batch_id, "pivotal": t.pivotal_count,
            "log_ratio": _num(t.log_ratio_mean), "n_tokens": len(ids),
            "prompt": t.prompt, "completion": t.completion, "ids": ids,
            "s": [_num(v) for v in t.student] if t.student is not None else None,
            "q": [_num(v) for v in t.teacher] if t.teacher is not None else None,
            "piv": np.flatnonzero(t.pivotal).tolist() if t.pivotal is not None else [],
            "worst": t.worst,
        }
        diff = t.diff
        if diff is not None and clip is not None:
            rec["colour"] = token_colours(diff, clip, palette)
        if t.alternatives is not None:
            alts = []
            for row in t.alternatives:
                kept = row[:MAX_ALTERNATIVES]
                for a in kept:
                    vocab.setdefault(str(a.token_id), a.text)
                alts.append([[a.token_id, _num(a.logprob)] for a in kept])
            rec["alts"] = alts
        items.append(rec)
    return {"vocab": vocab, "palette": list(palette), "rows": items}


def _histogram_svg(summary: Summary) -> str:
    hist = summary.histogram
    if hist is None:
        return ""
    width, height, pad_l, pad_b, pad_t = 720, 220, 40, 34, 10
    edges = hist.edges
    series = ["correct", "incorrect"] if "correct" in hist.counts else ["all"]
    colours = {"all": "#6b7a8f", "correct": "#2c7bb6", "incorrect": "#d7191c"}
    bins = len(edges) - 1
    top = max(max(hist.counts[s]) for s in series) or 1
    plot_w, plot_h = width - pad_l - 30, height - pad_b - pad_t
    bin_w = plot_w / bins
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="histogram of {html.escape(summary.score_name or "")}">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" '
                 f'y2="{pad_t + plot_h}" stroke="#888"/>')
    for k, name in enumerate(series):
        sub_w = bin_w / len(series)
        for b, count in enumerate(hist.counts[name]):
            if not count:
                continue
            h = plot_h * count / top
            x = pad_l + b * bin_w + k * sub_w
            y = pad_t + plot_h - h
            title = f"{name}: {count} rows in [{edges[b]:.3g}, {edges[b + 1]:.3g})"
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(sub_w - 0.5, 0.5):.1f}" '
                         f'height="{h:.1f}" fill="{colours[name]}"><title>{html.escape(title)}'
                         "</title></rect>")
    for frac in (0, 0.5, 1):
        value = edges[0] + frac * (edges[-1] - edges[0])
        x = pad_l + frac * plot_w
        parts.append(f'<text x="{x:.1f}" y="{height - 14}" text-anchor="middle">{value:.3g}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{pad_l + plot_w / 2:.1f}" y="{height - 1}" text-anchor="middle">'
                 f"{html.escape(summary.score_name or '')}</text>")
    parts.append("</svg>")
    legend = "".join(f'<span class="key" style="background:{colours[s]}"></span>{s} '
                     for s in series)
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _summary_html(summary: Summary, settings: Settings) -> str:
    cells = [("rows", f"{summary.rows:,}"), ("completion tokens", f"{summary.tokens:,}")]
    if summary.pivotal_tokens is not None:
        cells.append((f"pivotal tokens (r ≥ {settings.threshold:g})",
                      f"{summary.pivotal_tokens:,} ({summary.pivotal_share:.2%})"))
    if summary.quantiles:
        q = summary.quantiles
        cells.append((f"{summary.score_name}: min / p10 / median / p90 / max",
                      " / ".join(f"{q[k]:.4g}" for k in ("min", "p10", "median", "p90", "max"))))
    if summary.graded:
        cells.append(("graded rows (incorrect)", f"{summary.graded:,} ({summary.incorrect:,})"))
        cells.append((f"mean {summary.score_name}, correct / incorrect",
                      f"{_fmt(summary.mean_correct)} / {_fmt(summary.mean_incorrect)}"))
        cells.append((f"AUROC of {summary.score_name} for incorrect rows",
                      _fmt(summary.auroc_incorrect, ".3f")))
    body = "".join(f'<div class="card"><div class="k">{html.escape(k)}</div>'
                   f'<div class="v">{html.escape(v)}</div></div>' for k, v in cells)
    return f'<div class="cards" id="summary">{body}</div>'


def render_html(*, shard: str, stage: str | None, settings: Settings, summary: Summary,
                trajectories: list[Trajectory], text: TokenText, included: str) -> str:
    """The whole report as one string."""
    data = report_data(trajectories, text, settings.clip)
    data["clip"] = settings.clip
    data["threshold"] = settings.threshold
    token_note = text.source if text.available else f"token ids only ({text.note})"
    facts = [
        ("shard", shard), ("stage", stage or "unknown (no renio metadata)"),
        ("pivotal rule", f"min(s − q, {settings.clip:g}) ≥ {settings.threshold:g} "
                         f"(from {settings.source})"),
        ("token text", token_note), ("trajectories", included),
    ]
    facts_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    pos = "rgb({},{},{})".format(*POSITIVE_RGB)
    neg = "rgb({},{},{})".format(*NEGATIVE_RGB)
    values = {
        "TITLE": html.escape(f"renio inspect: {os.path.basename(shard)}"),
        "FACTS": facts_html,
        "SUMMARY": _summary_html(summary, settings),
        "HIST": _histogram_svg(summary),
        "POS": pos, "NEG": neg,
        "DATA": script_json(data),
    }
    # One pass, so text placed in one slot is never scanned for another slot's marker.
    return re.sub(r"@@([A-Z]+)@@", lambda m: values[m.group(1)], page_source())


def _page_file(name: str) -> str:
    """One file of ``renio_core/report/page/`` (package data, shipped in the wheel)."""
    return importlib.resources.files(__package__).joinpath("page", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def page_source() -> str:
    """The page with its stylesheet and script inlined, still holding the ``@@NAME@@`` slots
    that :func:`render_html` fills. Each file's final newline is dropped: the template already
    puts one before ``</style>`` and ``</script>``."""
    slots = {"STYLE": _page_file("report.css").removesuffix("\n"),
             "SCRIPT": _page_file("report.js").removesuffix("\n")}
    return re.sub(r"@@(STYLE|SCRIPT)@@", lambda m: slots[m.group(1)], _page_file("report.html"))


def write_html(path: str | os.PathLike, page: str, *, overwrite: bool = False) -> Path:
    """Write atomically: a reader never sees half a report. An existing file is replaced only
    with ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise RenioInputError("--html: is a directory; give a file name", file=path)
    if path.exists() and not overwrite:
        raise RenioInputError("--html: the file exists; pass --overwrite to replace it",
                              file=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path

