"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("renio-data").textContent);
  const ROWS = DATA.rows, VOCAB = DATA.vocab, PALETTE = DATA.palette, CLIP = DATA.clip;
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
  function shown(text) {
    if (text === "") return "∅";
    return text.replace(/\n/g, "↵\n").replace(/\t/g, "→\t");
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
    return lines.join("\n");
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
      if (r.colour) span.style.background = PALETTE[r.colour[t]];  // from Python's ratio_rgb
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
