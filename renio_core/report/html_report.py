"""``renio inspect --html``: one self-contained HTML file to look inside a scored shard.

The report shows what ReNIO (arXiv 2606.23104) bases a trajectory's weight on: a summary of
the weight distribution (split by ``correct`` with the AUROC of the weight for wrong answers
when rows are graded), a sortable list of trajectories, and, for the one clicked, its tokens
coloured by ``s_t - q_t`` with pivotal tokens marked and a tooltip giving both log-probs and
the teacher's top alternatives.

Everything is inline (CSS, a small script, the data as JSON, histograms as SVG): the file
makes no network request and opens from disk. Token text comes from the model's tokenizer, so
it is untrusted: the JSON is escaped so that no ``</script>`` or ``<!--`` inside it can end the
data block, and the script only ever inserts it with ``textContent``.

Deliberate differences from the paper's code: the paper has no viewer; this is renio's own.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from renio_core.report.inspect_report import (
    NEGATIVE_RGB,
    POSITIVE_RGB,
    Settings,
    Summary,
    TokenText,
    Trajectory,
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


def report_data(trajectories: list[Trajectory], text: TokenText) -> dict[str, Any]:
    """The embedded data: one record per trajectory, token text shared through a vocabulary."""
    vocab: dict[str, str] = {}
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
        if t.alternatives is not None:
            alts = []
            for row in t.alternatives:
                kept = row[:MAX_ALTERNATIVES]
                for a in kept:
                    vocab.setdefault(str(a.token_id), a.text)
                alts.append([[a.token_id, _num(a.logprob)] for a in kept])
            rec["alts"] = alts
        items.append(rec)
    return {"vocab": vocab, "rows": items}


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
    data = report_data(trajectories, text)
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
        "POSRGB": json.dumps(list(POSITIVE_RGB)), "NEGRGB": json.dumps(list(NEGATIVE_RGB)),
        "DATA": script_json(data),
    }
    # One pass, so text placed in one slot is never scanned for another slot's marker.
    return re.sub(r"@@([A-Z]+)@@", lambda m: values[m.group(1)], _PAGE)


def write_html(path: str | os.PathLike, page: str, *, overwrite: bool = False) -> Path:
    """Write atomically: a reader never sees half a report. An existing file is replaced only
    with ``overwrite``."""
    from renio_core.errors import RenioInputError

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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>@@TITLE@@</title>
<link rel="icon" href="data:,">
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:10px 20px}
header h1{font-size:18px;margin:0}
main{padding:12px 20px;display:grid;grid-template-columns:minmax(600px,1fr) minmax(400px,1fr);gap:16px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;min-width:0}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:4px 0 8px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}
dt{color:#5b6576}dd{margin:0;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.card{border:1px solid #dde1e7;border-radius:5px;padding:6px 10px;background:#fafbfc}
.card .k{font-size:12px;color:#5b6576}.card .v{font-size:16px;font-weight:600}
svg.hist{width:100%;max-width:720px;height:auto}svg.hist text{font-size:11px;fill:#444}
.legend{font-size:12px}.key{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
.tablewrap{max-height:70vh;overflow:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:3px 6px;border-bottom:1px solid #eceff3;text-align:right;white-space:nowrap}
th{position:sticky;top:0;background:#eef1f5;cursor:pointer;user-select:none}
th.txt,td.txt{text-align:left}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
tbody tr{cursor:pointer}tbody tr:hover{background:#f1f5ff}tbody tr.sel{background:#dfe9ff}
.ok{color:#1a7f37}.bad{color:#c62828}
#tokens{font:15px/2 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;border:1px solid #eceff3;padding:8px;border-radius:4px}
.tok{border-radius:2px;padding:1px 0}
.tok.piv{outline:1.5px solid #222;font-weight:700}
.tok.worst{text-decoration:underline 2px #222;text-underline-offset:4px}
.tok:hover{outline:2px solid #f0a000}
.scale{display:inline-block;width:160px;height:10px;vertical-align:middle;background:linear-gradient(90deg,@@NEG@@,#fff,@@POS@@);border:1px solid #ccc}
.prompt{white-space:pre-wrap;background:#fafbfc;border:1px solid #eceff3;padding:6px;border-radius:4px;max-height:12em;overflow:auto;font-size:12px}
#tip{position:fixed;display:none;background:#1d2430;color:#fff;padding:6px 9px;border-radius:4px;font:12px/1.4 ui-monospace,monospace;pointer-events:none;z-index:10;max-width:380px;white-space:pre-wrap}
.muted{color:#5b6576}
</style>
</head>
<body>
<header><h1>@@TITLE@@</h1></header>
<main>
<section class="wide"><h2>Summary</h2><dl>@@FACTS@@</dl>@@SUMMARY@@@@HIST@@</section>
<section><h2>Trajectories <span class="muted" id="count"></span></h2>
<div class="tablewrap"><table id="traj-table"><thead><tr>
<th data-key="row">row</th><th data-key="prompt_id" class="txt">prompt_id</th>
<th data-key="sample_index">sample</th><th data-key="correct">correct</th>
<th data-key="weight">weight</th><th data-key="raw_weight">raw</th>
<th data-key="pivotal">pivotal</th><th data-key="log_ratio">mean r</th>
<th data-key="n_tokens">tokens</th></tr></thead><tbody></tbody></table></div></section>
<section id="detail"><h2>Tokens</h2>
<p class="muted">Colour: s − q (student minus teacher log-prob), <span class="scale"></span>
blue &lt; 0 &lt; red, saturating at ±<span id="clipv"></span>. Outlined: pivotal (clipped
ratio ≥ <span id="thrv"></span>). Underlined: the positions where the teacher disagreed most.
Hover a token for its numbers.</p>
<div id="token-view"><p class="muted" id="placeholder">Click a trajectory to see its tokens.</p></div>
</section>
</main>
<div id="tip"></div>
<script type="application/json" id="renio-data">@@DATA@@</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("renio-data").textContent);
  const ROWS = DATA.rows, VOCAB = DATA.vocab, CLIP = DATA.clip;
  const POS = @@POSRGB@@, NEG = @@NEGRGB@@;
  const tbody = document.querySelector("#traj-table tbody");
  const tip = document.getElementById("tip");
  const view = document.getElementById("token-view");
  document.getElementById("clipv").textContent = String(CLIP);
  document.getElementById("thrv").textContent = String(DATA.threshold);
  let sortKey = null, sortDir = 1, selected = null;

  function el(tag, props, text) {
    const e = document.createElement(tag);
    if (props) for (const k in props) e.setAttribute(k, props[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, d) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }
  function colour(diff) {
    // Mirrors renio_core.report.inspect_report.ratio_rgb.
    let t = CLIP > 0 ? Math.max(-1, Math.min(1, diff / CLIP)) : 0;
    const end = t > 0 ? POS : NEG, a = Math.abs(t);
    return "rgb(" + end.map(c => Math.round(255 + (c - 255) * a)).join(",") + ")";
  }
  function shown(text) {
    if (text === "") return "∅";
    return text.replace(/\\n/g, "↵\\n").replace(/\\t/g, "→\\t");
  }
  function correctCell(c) {
    if (c === null || c === undefined) return el("td", null, "–");
    return el("td", {"class": c ? "ok" : "bad"}, c ? "yes" : "no");
  }
  function value(r, key) {
    const v = r[key];
    if (v === null || v === undefined) return null;
    if (key === "correct") return v ? 1 : 0;
    return v;
  }
  function renderTable() {
    const order = ROWS.map((r, i) => i);
    if (sortKey) {
      order.sort((a, b) => {
        const va = value(ROWS[a], sortKey), vb = value(ROWS[b], sortKey);
        if (va === vb) return ROWS[a].row - ROWS[b].row;
        if (va === null) return 1;
        if (vb === null) return -1;
        return (va < vb ? -1 : 1) * sortDir;
      });
    }
    tbody.textContent = "";
    for (const i of order) {
      const r = ROWS[i];
      const tr = el("tr", {"data-index": String(i), "data-row": String(r.row)});
      tr.appendChild(el("td", null, r.row));
      tr.appendChild(el("td", {"class": "txt"}, r.prompt_id === null ? "–" : r.prompt_id));
      tr.appendChild(el("td", null, r.sample_index === null ? "–" : r.sample_index));
      tr.appendChild(correctCell(r.correct));
      tr.appendChild(el("td", null, fmt(r.weight, 4)));
      tr.appendChild(el("td", null, fmt(r.raw_weight, 4)));
      tr.appendChild(el("td", null, r.pivotal === null ? "–" : r.pivotal));
      tr.appendChild(el("td", null, fmt(r.log_ratio, 3)));
      tr.appendChild(el("td", null, r.n_tokens));
      if (i === selected) tr.classList.add("sel");
      tr.addEventListener("click", () => select(i));
      tbody.appendChild(tr);
    }
    document.getElementById("count").textContent = "(" + ROWS.length + ")";
  }
  function tipText(r, t) {
    const id = r.ids[t], s = r.s[t], q = r.q[t], d = s - q;
    const lines = ["token " + JSON.stringify(VOCAB[id]) + "  id " + id + "  position " + t,
      "student log-prob  " + fmt(s, 4), "teacher log-prob  " + fmt(q, 4),
      "s − q             " + fmt(d, 4) + (r.pivSet.has(t) ? "  (pivotal)" : "")];
    if (r.alts && r.alts[t] && r.alts[t].length) {
      lines.push("teacher's top alternatives:");
      for (const [aid, lp] of r.alts[t]) {
        lines.push("  " + JSON.stringify(VOCAB[aid]) + "  " + fmt(lp, 4) + "  p=" + fmt(Math.exp(lp), 3));
      }
    }
    return lines.join("\\n");
  }
  function select(i) {
    selected = i;
    for (const tr of tbody.children) tr.classList.toggle("sel", Number(tr.dataset.index) === i);
    const r = ROWS[i];
    r.pivSet = r.pivSet || new Set(r.piv);
    const worst = new Set(r.worst);
    view.textContent = "";
    const head = el("p", {"id": "token-head"});
    head.textContent = "row " + r.row + " · prompt " + (r.prompt_id ?? "–") + " #" +
      (r.sample_index ?? "–") + " · correct " + (r.correct === null ? "–" : (r.correct ? "yes" : "no")) +
      " · weight " + fmt(r.weight, 4) + " · raw " + fmt(r.raw_weight, 4) + " · pivotal " +
      (r.pivotal ?? "–") + " · mean r " + fmt(r.log_ratio, 3);
    view.appendChild(head);
    if (r.prompt) { view.appendChild(el("div", {"class": "muted"}, "prompt")); view.appendChild(el("div", {"class": "prompt"}, r.prompt)); }
    view.appendChild(el("div", {"class": "muted"}, "completion (" + r.n_tokens + " tokens)"));
    const box = el("div", {"id": "tokens"});
    r.ids.forEach((id, t) => {
      const span = el("span", {"class": "tok", "data-t": String(t)}, shown(VOCAB[id]));
      if (r.s && r.q) span.style.background = colour(r.s[t] - r.q[t]);
      if (r.pivSet.has(t)) span.classList.add("piv");
      if (worst.has(t)) span.classList.add("worst");
      box.appendChild(span);
    });
    box.addEventListener("mouseover", ev => {
      const t = ev.target.dataset ? ev.target.dataset.t : undefined;
      if (t === undefined || !r.s) return;
      tip.textContent = tipText(r, Number(t));
      tip.style.display = "block";
    });
    box.addEventListener("mousemove", ev => {
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 390) + "px";
      tip.style.top = (ev.clientY + 16) + "px";
    });
    box.addEventListener("mouseout", () => { tip.style.display = "none"; });
    view.appendChild(box);
  }
  for (const th of document.querySelectorAll("#traj-table th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      if (sortKey === key) sortDir = -sortDir;
      else { sortKey = key; sortDir = key === "prompt_id" ? 1 : -1; }
      for (const other of document.querySelectorAll("#traj-table th")) other.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      renderTable();
    });
  }
  renderTable();
})();
</script>
</body>
</html>
"""
