"""The `renio inspect --html` report in a real headless browser (Debian's chromium, driven by
Playwright): it loads with no console error and no network request, the list sorts, a click
shows a trajectory's tokens with their tooltip, and a screenshot is saved.

The screenshot is saved under the test's tmp dir; `RENIO_UPDATE_SCREENSHOT=1` also copies it
to docs/inspect-screenshot.png (the committed one). Skips cleanly when chromium or the
playwright package is absent, except where RENIO_REQUIRE names chromium (CI sets it, and
installs both: apt `chromium`, pip `playwright`; never `playwright install`, the system
browser is used): there a missing one fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import factories as F
import numpy as np
import pyarrow as pa
import pytest
import tiny_models
from conftest import require_component
from test_inspect import run

from renio_core.data import shards
from renio_core.modeling import models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(autouse=True)
def _chromium_and_playwright() -> None:
    require_component("chromium", None if CHROMIUM else
                      "chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require_component("chromium", "the playwright package is missing (pip install playwright)")

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "inspect-screenshot.png"


def addition_shard(tmp: Path, n_rows: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """Scored toy-style rollouts ("a+b=c"): wrong answers carry digits the teacher finds
    unlikely, with the right digit among the teacher's top alternatives there."""
    tok_dir = tmp / "tok"
    tok = tiny_models.make_tokenizer(tok_dir)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "sample_index", "problem", "prompt_ids",
                                             "completion_ids", "completion_text", "correct",
                                             "student_logprobs", "teacher_logprobs",
                                             "teacher_topk_ids", "teacher_topk_logprobs")}
    for i in range(n_rows):
        if i % 4 == 0:
            a, b = (int(x) for x in rng.integers(10, 500, size=2))
        problem = f"{a}+{b}"
        right = str(a + b)
        ok = bool(rng.random() < 0.55)
        answer = right
        if not ok:
            pos = int(rng.integers(0, len(right)))
            answer = right[:pos] + str((int(right[pos]) + int(rng.integers(1, 9))) % 10) + right[pos + 1:]
        text = f"{problem}={answer}\\boxed{{{answer}}}"
        ids = tok.convert_tokens_to_ids(list(text))
        s = -rng.exponential(0.15, size=len(ids))
        q = s - rng.normal(0.05, 0.25, size=len(ids))
        alts = []
        for t, ch in enumerate(text):
            alt = [ch, str((int(ch) + 1) % 10) if ch.isdigit() else "0"]
            lps = [-0.05, -3.0]
            start = len(problem) + 1
            if not ok and start <= t < start + len(answer) and answer[t - start] != right[t - start]:
                q[t] = s[t] - rng.uniform(1.5, 4.0)  # the teacher disagrees with a wrong digit
                alt, lps = [right[t - start], ch], [-0.1, float(q[t])]
            alts.append((tok.convert_tokens_to_ids(alt), lps))
        rows["prompt_id"].append(f"add-{i // 4}")
        rows["sample_index"].append(i % 4)
        rows["problem"].append(f"What is {problem}? Put the answer in \\boxed{{}}.")
        rows["prompt_ids"].append(tok.convert_tokens_to_ids(list(problem)))
        rows["completion_ids"].append(ids)
        rows["completion_text"].append(text)
        rows["correct"].append(ok)
        rows["student_logprobs"].append(s.astype(np.float32))
        rows["teacher_logprobs"].append(np.minimum(q, 0).astype(np.float32))
        rows["teacher_topk_ids"].append([a_ for a_, _ in alts])
        rows["teacher_topk_logprobs"].append([l_ for _, l_ in alts])
    table = pa.table({
        "prompt_id": pa.array(rows["prompt_id"]),
        "sample_index": pa.array(rows["sample_index"], pa.int32()),
        "problem": pa.array(rows["problem"]),
        "prompt_ids": F.list_column(rows["prompt_ids"], pa.int32()),
        "completion_ids": F.list_column(rows["completion_ids"], pa.int32()),
        "completion_text": pa.array(rows["completion_text"]),
        "correct": pa.array(rows["correct"]),
        "student_logprobs": F.list_column(rows["student_logprobs"], pa.float32()),
        "teacher_logprobs": F.list_column(rows["teacher_logprobs"], pa.float32()),
        "teacher_topk_ids": pa.array(rows["teacher_topk_ids"], pa.list_(pa.list_(pa.int32()))),
        "teacher_topk_logprobs": pa.array(rows["teacher_topk_logprobs"],
                                          pa.list_(pa.list_(pa.float32()))),
    })
    rollout = shards.build_metadata(stage="rollout", config={"model": str(tok_dir)}, inputs=None,
                                    tokenizer_fingerprint=models.tokenizer_fingerprint(tok))
    meta = shards.build_metadata(stage="score", config={"topk": 2}, inputs=None,
                                 tokenizer_fingerprint=rollout["tokenizer_fingerprint"])
    meta["upstream"] = rollout
    scores = tmp / "scores.parquet"
    shards.write_table_atomic(scores, table, meta)
    weights = tmp / "weights.parquet"
    run("weight", "--in", scores, "--out", weights, "--group-size", 8)
    return weights, tok_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    weights, _ = addition_shard(tmp)
    out = tmp / "report.html"
    run("inspect", weights, "--html", out)
    return out


def _weights_in_table(page) -> list[float]:
    return [float(x) for x in page.locator("#traj-table tbody tr td:nth-child(5)").all_inner_texts()]


def test_html_report_in_headless_chromium(report, tmp_path):
    from playwright import sync_api

    url = report.resolve().as_uri()
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if r.url != url else None)
            page.goto(url, wait_until="load")

            n_rows = page.locator("#traj-table tbody tr").count()
            assert n_rows == 48
            assert page.locator("#placeholder").is_visible()

            # Sort by weight: first click descending, second ascending.
            page.click("#traj-table th[data-key=weight]")
            desc = _weights_in_table(page)
            assert desc == sorted(desc, reverse=True) and desc[0] > desc[-1]
            page.click("#traj-table th[data-key=weight]")
            asc = _weights_in_table(page)
            assert asc == sorted(asc)
            page.click("#traj-table th[data-key=weight]")  # back to largest first

            # Click the heaviest row: its tokens appear, coloured, pivotal ones marked.
            first = page.locator("#traj-table tbody tr").first
            row_number = first.get_attribute("data-row")
            first.click()
            assert not page.locator("#placeholder").count()
            head = page.locator("#token-head").inner_text()
            assert head.startswith(f"row {row_number} ")
            tokens = page.locator("#tokens .tok")
            text = "".join(tokens.all_text_contents())
            completion = page.evaluate(
                "r => JSON.parse(document.getElementById('renio-data').textContent)"
                ".rows.find(x => String(x.row) === r).completion", row_number)
            assert text == completion
            assert page.locator("#tokens .tok.piv").count() >= 1
            background = tokens.first.evaluate("e => getComputedStyle(e).backgroundColor")
            assert background.startswith("rgb")

            # Hover a pivotal token: the tooltip gives both log-probs and the alternatives.
            pivotal = page.locator("#tokens .tok.piv").first
            pivotal.hover()
            tip = page.locator("#tip")
            assert tip.is_visible()
            tip_text = tip.inner_text()
            assert "student log-prob" in tip_text and "teacher log-prob" in tip_text
            assert "(pivotal)" in tip_text and "teacher's top alternatives" in tip_text

            shot = tmp_path / "inspect.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            # The committed copy is rewritten only on request (or when missing), so running
            # the tests does not leave a modified binary in everyone's checkout.
            if os.environ.get("RENIO_UPDATE_SCREENSHOT") == "1" or not DOCS_SCREENSHOT.exists():
                DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, DOCS_SCREENSHOT)
        finally:
            browser.close()
    assert errors == [], errors
    assert requests == [], requests
