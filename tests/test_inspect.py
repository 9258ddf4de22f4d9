"""`renio inspect`: the real CLI in a subprocess on real shards with a real (tiny) tokenizer.

The scores shard is built by hand with chosen log-probs, so every expected number below is
worked out here from the docs/design.md formula, not read back from the code under test.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import factories as F
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_models

from renio_core.data import shards
from renio_core.report import html_report
from renio_core.report import inspect_report as ir

RENIO = [sys.executable, "-m", "renio_cli.main"]

# Four trajectories of two prompts. Per row: completion text, the positions the teacher
# disagrees with and by how much (s - q), correct or not.
COMPLETIONS = ["12+7=19", "12+7=21", "3*4=12", "3*4=15"]
CORRECT = [True, False, True, False]
STUDENT_LP = -0.25          # every token's student log-prob
TEACHER_LP = -0.5           # the teacher's where it agrees (s - q = 0.25, not pivotal)
DISAGREE = {                # row -> {position: teacher log-prob}
    1: {5: -2.25, 6: -6.25},  # s - q = 2.0 and 6.0 (clipped to 2.5): both pivotal
    2: {4: -1.25},            # s - q = 1.0: pivotal
    3: {5: -1.75},            # s - q = 1.5: pivotal
}
ALT = {"2": ["1", "9"], "1": ["9", "8"], "5": ["3", "2"]}  # teacher's top-2 at a token


def expected_weights(clip=2.5, threshold=0.8):
    """docs/design.md steps 1-5 by hand: batch_mean over the one group of four rows."""
    raws = []
    for r in range(4):
        ratios = [min(STUDENT_LP - q, clip) for q in DISAGREE.get(r, {}).values()]
        ratios += [STUDENT_LP - TEACHER_LP] * (len(COMPLETIONS[r]) - len(DISAGREE.get(r, {})))
        piv = [x for x in ratios if x >= threshold]
        raws.append(math.exp(sum(piv) / len(piv)) if piv else 1.0)
    mean = sum(raws) / len(raws)
    return [min(r / mean, 10.0) for r in raws], raws


def run(*args, check=True):
    proc = subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "220"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _ids(tok, text):
    return tok.convert_tokens_to_ids(list(text))


def scores_shard(tmp: Path, tok, tok_dir: Path, *, problem_extra: str = "",
                 with_scores: bool = True, with_meta: bool = True) -> Path:
    ids_rows, s_rows, q_rows, k_ids, k_lps = [], [], [], [], []
    for r, text in enumerate(COMPLETIONS):
        ids = _ids(tok, text)
        ids_rows.append(ids)
        s_rows.append([STUDENT_LP] * len(ids))
        q = [TEACHER_LP] * len(ids)
        for pos, lp in DISAGREE.get(r, {}).items():
            q[pos] = lp
        q_rows.append(q)
        k_ids.append([_ids(tok, "".join(ALT.get(ch, ["0", "0"]))) for ch in text])
        k_lps.append([[-0.1, -2.5] for _ in text])
    cols = {
        "prompt_id": pa.array(["p0", "p0", "p1", "p1"]),
        "sample_index": pa.array([0, 1, 0, 1], pa.int32()),
        "problem": pa.array(["12+7" + problem_extra] * 2 + ["3*4" + problem_extra] * 2),
        "prompt_ids": F.list_column([_ids(tok, "12+7")] * 2 + [_ids(tok, "3*4")] * 2, pa.int32()),
        "completion_ids": F.list_column(ids_rows, pa.int32()),
        "completion_text": pa.array(COMPLETIONS),
        "correct": pa.array(CORRECT),
    }
    if with_scores:
        cols["student_logprobs"] = F.list_column(s_rows, pa.float32())
        cols["teacher_logprobs"] = F.list_column(q_rows, pa.float32())
        cols["teacher_topk_ids"] = pa.array(k_ids, pa.list_(pa.list_(pa.int32())))
        cols["teacher_topk_logprobs"] = pa.array(k_lps, pa.list_(pa.list_(pa.float32())))
    table = pa.table(cols)
    path = tmp / ("scores.parquet" if with_scores else "rollouts.parquet")
    if not with_meta:
        return F.write(table, path)
    from renio_core.modeling import models

    rollout = shards.build_metadata(stage="rollout", config={"model": str(tok_dir)}, inputs=None,
                                    tokenizer_fingerprint=models.tokenizer_fingerprint(tok))
    meta = rollout
    if with_scores:
        meta = shards.build_metadata(stage="score", config={"topk": 2}, inputs=None,
                                     tokenizer_fingerprint=rollout["tokenizer_fingerprint"])
        meta["upstream"] = rollout
    shards.write_table_atomic(path, table, meta)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    tok_dir = tmp / "tok"
    tok = tiny_models.make_tokenizer(tok_dir)
    scores = scores_shard(tmp, tok, tok_dir, problem_extra=" </script><script>alert(1)</script>")
    weights = tmp / "weights.parquet"
    run("weight", "--in", scores, "--out", weights, "--group-size", 4)
    rollouts = scores_shard(tmp, tok, tok_dir, with_scores=False)
    return {"tmp": tmp, "tok": tok, "tok_dir": tok_dir, "scores": scores, "weights": weights,
            "rollouts": rollouts}


# ------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------


def test_pivotal_flags_by_hand():
    s = np.array([-0.1, -0.1, -1.0, -0.5], np.float32)
    q = np.array([-2.0, -0.5, -0.1, -9.5], np.float32)  # s - q = 1.9, 0.4, -0.9, 9.0
    flags = ir.pivotal_flags(s, q, ir.Settings(2.5, 0.8, "test"))
    assert flags.tolist() == [True, False, False, True]
    # Identity: the flags count what the weight formula counts.
    assert ir.pivotal_flags(s, q, ir.Settings(0.5, 0.8, "test")).sum() == 0  # clip < threshold
    assert ir.pivotal_flags(s[:0], q[:0], ir.Settings(2.5, 0.8, "test")).tolist() == []


def test_worst_positions_largest_positive_first():
    diff = np.array([0.2, 3.0, -1.0, 3.0, 1.0], np.float32)
    assert ir.worst_positions(diff, 3) == [1, 3, 4]
    assert ir.worst_positions(diff, 10) == [1, 3, 4, 0]  # never a negative position
    assert ir.worst_positions(np.zeros(0, np.float32), 3) == []


def test_spearman_by_hand():
    # No ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60.
    assert ir.spearman(np.array([1, 2, 3, 4.0]), np.array([10, 30, 20, 40.0])) == pytest.approx(0.8)
    assert ir.spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)
    # Ties: ranks [1.5, 1.5, 3] against [1, 2, 3]; centred [-.5, -.5, 1] and [-1, 0, 1]:
    # Pearson = 1.5 / sqrt(1.5 * 2).
    assert ir.spearman(np.array([5, 5, 7.0]), np.array([1, 2, 3.0])) == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(ir.spearman(np.array([1, 1.0]), np.array([1, 2.0])))  # constant side
    assert math.isnan(ir.spearman(np.array([1.0]), np.array([2.0])))


def test_script_json_cannot_close_the_script_element():
    data = {"t": "</script><script>alert(1)</script> <!-- & \u2028"}
    text = html_report.script_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data


def test_ratio_colour_is_diverging():
    assert ir.ratio_rgb(0.0, 2.5) == (255, 255, 255)
    assert ir.ratio_rgb(5.0, 2.5) == ir.POSITIVE_RGB
    assert ir.ratio_rgb(-5.0, 2.5) == ir.NEGATIVE_RGB
    r, g, b = ir.ratio_rgb(1.25, 2.5)  # halfway to red
    assert (r, g, b) == tuple(round(255 + (c - 255) * 0.5) for c in ir.POSITIVE_RGB)


# ------------------------------------------------------------------------------------------
# Terminal
# ------------------------------------------------------------------------------------------


def _panels(out: str) -> list[str]:
    """The text of each trajectory's panel, in order."""
    return re.split(r"\n(?=╭─ row )", out)[1:]


def test_terminal_top_rows_show_tokens_weights_and_alternatives(world):
    weights, raws = expected_weights()
    out = run("inspect", world["weights"]).stdout
    panels = _panels(out)
    assert len(panels) == 4
    order = sorted(range(4), key=lambda r: (-weights[r], r))
    for panel, r in zip(panels, order):
        assert panel.startswith(f"╭─ row {r} ")
        assert f"weight {weights[r]:.4f}" in panel
        assert f"raw_weight {raws[r]:.4f}" in panel
        assert COMPLETIONS[r] in panel  # tokens are printed in order, coloured
        assert ("incorrect" if not CORRECT[r] else "correct") in panel
    top = panels[0]  # row 1: "12+7=21", the teacher disagreed at '2' (6.0) then '1' (2.0)
    assert "pivotal tokens 2" in top
    assert f"mean clipped ratio {(2.5 + 2.0) / 2:.4f}" in top
    lines = [ln for ln in top.splitlines() if re.search(r"^\W*\d+\s+'", ln)]
    assert re.search(r"^\W*6\s+'1'\s+-0\.2500\s+-6\.2500\s+6\.0000\s+yes\s+'9' -0\.100\s+'8' -2\.500",
                     lines[0]), lines
    assert re.search(r"^\W*5\s+'2'\s+-0\.2500\s+-2\.2500\s+2\.0000\s+yes\s+'1' -0\.100", lines[1]), lines
    assert "pivotal rule" in out and "from weight stage" in out
    assert f"tokenizer {world['tok_dir']}" in out


def test_terminal_row_and_prompt_id(world):
    weights, _ = expected_weights()
    out = run("inspect", world["weights"], "--row", 2).stdout
    panels = _panels(out)
    assert len(panels) == 1 and panels[0].startswith("╭─ row 2 ")
    assert f"weight {weights[2]:.4f}" in panels[0] and "3*4=12" in panels[0]
    assert re.search(r"^\W*4\s+'1'\s+-0\.2500\s+-1\.2500\s+1\.0000\s+yes", panels[0], re.M)

    out = run("inspect", world["weights"], "--prompt-id", "p1", "--sort", "pivotal").stdout
    rows = [int(re.match(r"╭─ row (\d+)", p).group(1)) for p in _panels(out)]
    assert sorted(rows) == [2, 3]
    assert rows == [3, 2]  # same pivotal count (1): the larger mean ratio (1.5) first


def test_terminal_scores_shard_and_flags_override_settings(world):
    # A scores shard has no weights: default order is by pivotal count; flags set the rule.
    out = run("inspect", world["scores"], "--threshold", "1.8", "--top", "2").stdout
    panels = _panels(out)
    assert [p.split()[2] for p in panels] == ["1", "0"]  # row 1 has 2 pivotal, the rest 0
    assert "pivotal tokens 2" in panels[0] and "from flags" not in out  # clip default, thr flag
    assert "threshold: flags" in out


def test_terminal_colours_and_marks_pivotal_tokens(world):
    # With colour forced, each token carries a background on the diverging scale
    # (white -> rgb(215, 48, 39) at s - q = clip), pivotal ones bold (1) and underlined (4).
    env = {**os.environ, "COLUMNS": "220", "FORCE_COLOR": "1", "COLORTERM": "truecolor"}
    out = subprocess.run([*RENIO, "inspect", str(world["weights"]), "--row", "1"],
                         capture_output=True, text=True, env=env, check=True).stdout

    def bg(d):  # by hand: t = min(d / 2.5, 1) of the way from white to the red end
        t = min(d / 2.5, 1.0)
        return ";".join(str(round(255 + (c - 255) * t)) for c in (215, 48, 39))

    plain, piv = f"\x1b[30;48;2;{bg(0.25)}m", "\x1b[1;4;30;48;2;{}m"
    assert f"{plain}1\x1b[0m{plain}2\x1b[0m{plain}+" in out
    assert piv.format(bg(2.0)) + "2\x1b[0m" + piv.format(bg(6.0)) + "1\x1b[0m" in out


def test_directory_of_parts_rows_count_across_parts(world, tmp_path):
    table = pq.read_table(world["weights"])
    parts = tmp_path / "parts"
    for k, (a, b) in enumerate([(0, 3), (3, 4)]):
        F.write(table.slice(a, b - a), parts / f"part-{k:05d}.parquet")
    weights, _ = expected_weights()
    out = run("inspect", parts, "--row", 3).stdout  # the first row of the second part
    panel = _panels(out)[0]
    assert panel.startswith("╭─ row 3 ") and "3*4=15" in panel
    assert f"weight {weights[3]:.4f}" in panel


def test_terminal_rollouts_shard_without_scores(world):
    out = run("inspect", world["rollouts"], "--top", "2").stdout
    panels = _panels(out)
    assert len(panels) == 2 and panels[0].startswith("╭─ row 0 ")
    assert "12+7=19" in panels[0] and "correct" in panels[0] and "12+7=21" in panels[1]
    assert "not coloured" in out and "renio score" in out


def test_terminal_without_tokenizer_shows_labelled_ids(world, tmp_path):
    scores = scores_shard(tmp_path, world["tok"], world["tok_dir"], with_meta=False)
    out = run("inspect", scores, "--row", 1).stdout
    assert "TOKEN IDS" in out and "--tokenizer" in out
    one = world["tok"].convert_tokens_to_ids("1")
    assert f"'[{one}]'" in out  # the worst token, as its id
    out = run("inspect", scores, "--row", 1, "--tokenizer", world["tok_dir"]).stdout
    assert "TOKEN IDS" not in out and re.search(r"6\s+'1'\s+-0\.2500", out)


# ------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_html_on_a_shard_without_scores_is_one_line(world, tmp_path):
    report = tmp_path / "r.html"
    line = _one_line_error(run("inspect", world["rollouts"], "--html", report, check=False))
    assert "'student_logprobs'" in line and "renio score" in line
    assert not report.exists() and not list(tmp_path.iterdir())
    line = _one_line_error(run("inspect", world["rollouts"], "--sort", "pivotal", check=False))
    assert "renio score" in line
    line = _one_line_error(run("inspect", world["scores"], "--sort", "weight", check=False))
    assert "'weight'" in line and "renio weight" in line


def test_missing_row_and_prompt_are_one_line(world):
    line = _one_line_error(run("inspect", world["weights"], "--row", 4, check=False))
    assert "--row 4 does not exist" in line and "4 rows" in line
    line = _one_line_error(run("inspect", world["weights"], "--row", -1, check=False))
    assert "does not exist" in line
    line = _one_line_error(run("inspect", world["weights"], "--prompt-id", "nope", check=False))
    assert "nope" in line
    line = _one_line_error(run("inspect", world["weights"], "--sort", "size", check=False))
    assert "--sort" in line


def test_bad_flag_combinations_are_one_line(world, tmp_path):
    _one_line_error(run("inspect", world["weights"], "--diff", check=False))
    _one_line_error(run("inspect", world["weights"], world["weights"], check=False))
    _one_line_error(run("inspect", world["weights"], "--row", 1, "--prompt-id", "p0", check=False))
    _one_line_error(run("inspect", tmp_path / "missing.parquet", check=False))
    _one_line_error(run("inspect", world["scores"], world["weights"], "--diff", check=False))
    line = _one_line_error(run("inspect", world["weights"], "--tokenizer", tmp_path / "no-tok",
                               check=False))
    assert "--tokenizer" in line


def test_broken_logprobs_are_one_line(world, tmp_path):
    table = pq.read_table(world["scores"])
    bad = table.set_column(table.schema.get_field_index("teacher_logprobs"), "teacher_logprobs",
                           F.list_column([[0.0]] * 4, pa.float32()))
    path = F.write(bad, tmp_path / "bad.parquet")
    line = _one_line_error(run("inspect", path, "--tokenizer", world["tok_dir"], check=False))
    assert "'teacher_logprobs'" in line and "row 0" in line


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------


def _embedded(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="renio-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


def test_html_report_is_self_contained_and_holds_the_numbers(world, tmp_path):
    report = tmp_path / "report.html"
    out = run("inspect", world["weights"], "--html", report).stdout
    assert "wrote" in out and "all 4 trajectories" in out
    page = report.read_text()
    # Self-contained: no external URL anywhere, a CSP that forbids fetching.
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", page)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page
    # The problem text holds "</script>": it must not end the data block early.
    assert page.count("</script>") == 2
    data = _embedded(page)
    weights, raws = expected_weights()
    rows = {r["row"]: r for r in data["rows"]}
    assert sorted(rows) == [0, 1, 2, 3]
    for r in range(4):
        assert rows[r]["weight"] == pytest.approx(weights[r], abs=1e-4)
        assert rows[r]["correct"] is CORRECT[r]
        assert "".join(data["vocab"][str(i)] for i in rows[r]["ids"]) == COMPLETIONS[r]
    assert rows[1]["piv"] == [5, 6] and rows[1]["worst"][:2] == [6, 5]
    assert [data["vocab"][str(a[0])] for a in rows[1]["alts"][6]] == ["9", "8"]
    assert "</script><script>alert(1)</script>" in rows[0]["prompt"]
    # Summary: rows, tokens, pivotal share, AUROC (incorrect rows 1 and 3 outweigh both
    # correct rows, so the weight separates them perfectly).
    n_tokens = sum(map(len, COMPLETIONS))
    assert f"{n_tokens:,}" in page and f"4 ({4 / n_tokens:.2%})" in page
    assert ">1.000<" in page  # AUROC
    assert 'id="traj-table"' in page and "<svg" in page


def test_html_token_colours_are_the_terminals(world, tmp_path):
    # Each token's colour is ratio_rgb of its s - q (the terminal's scale), worked out here
    # from the chosen log-probs; the page only looks it up in the embedded palette.
    report = tmp_path / "report.html"
    run("inspect", world["weights"], "--html", report)
    data = _embedded(report.read_text())
    for rec in data["rows"]:
        r = rec["row"]
        diffs = [STUDENT_LP - DISAGREE.get(r, {}).get(t, TEACHER_LP)
                 for t in range(len(COMPLETIONS[r]))]
        expected = ["#{:02x}{:02x}{:02x}".format(*ir.ratio_rgb(d, 2.5)) for d in diffs]
        assert [data["palette"][i] for i in rec["colour"]] == expected
    assert "#{:02x}{:02x}{:02x}".format(*ir.POSITIVE_RGB) in data["palette"]  # s - q = 6 > clip


def test_html_page_is_package_data_with_no_copy_of_the_colour_scale():
    page = importlib.resources.files("renio_core.report").joinpath("page")
    files = {name: page.joinpath(name).read_text(encoding="utf-8")
             for name in ("report.html", "report.css", "report.js")}
    # The wheel ships them: pyproject.toml declares the folder as package data.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "page/*" in pyproject["tool"]["setuptools"]["package-data"]["renio_core.report"]
    # The script applies colours computed by ratio_rgb; it has no formula or end colours.
    js = files["report.js"]
    assert "255" not in js and "Math.round" not in js and "Math.abs" not in js
    for rgb in (ir.POSITIVE_RGB, ir.NEGATIVE_RGB):
        assert not re.search(r"\b{}\D+{}\D+{}\b".format(*rgb), html_report.page_source())


def test_html_keeps_large_shards_bounded(world, tmp_path):
    table = F.random_scores(60, 12, seed=3)
    path = F.write(table, tmp_path / "big.parquet")
    report = tmp_path / "big.html"
    out = run("inspect", path, "--html", report, "--max-rows", 10, "--tokenizer",
              world["tok_dir"], check=False)
    # random_scores' ids go up to 1000, beyond this tokenizer: decoding must still work.
    assert out.returncode == 0, out.stderr
    page = report.read_text()
    data = _embedded(page)
    assert len(data["rows"]) == 10
    assert "10 of 60 trajectories are included" in page
    # The top half by the sort key (pivotal here) is always included.
    stats = ir.collect_rows(ir.open_shard(path), ir.Settings(2.5, 0.8, "t"))
    top5 = set(ir.top_rows(stats, "pivotal", 5).tolist())
    assert top5 <= {r["row"] for r in data["rows"]}


# ------------------------------------------------------------------------------------------
# Diff
# ------------------------------------------------------------------------------------------


def test_diff_of_two_thresholds(world, tmp_path):
    strict = tmp_path / "strict.parquet"
    run("weight", "--in", world["scores"], "--out", strict, "--group-size", 4,
        "--threshold", 2.2)
    a, _ = expected_weights()
    b, _ = expected_weights(threshold=2.2)
    out = run("inspect", world["weights"], strict, "--diff").stdout
    rho = ir.spearman(np.array(a), np.array(b))
    assert f"{rho:.4f}" in out
    assert "matched by prompt_id and sample_index" in out
    changes = sorted(((b[r] - a[r], r) for r in range(4)), key=lambda x: (-abs(x[0]), x[1]))
    r = changes[0][1]  # the largest change is listed, with both weights
    key = f"p{r // 2}#{r % 2}"
    line = next(ln for ln in out.splitlines() if key in ln and f"{a[r]:.4f}" in ln)
    assert f"{b[r]:.4f}" in line and f"{changes[0][0]:+.4f}" in line


def test_diff_matches_rows_by_key_not_position(world, tmp_path):
    table = pq.read_table(world["weights"])
    reordered = F.write(table.take([3, 2, 1, 0]).replace_schema_metadata(None),
                        tmp_path / "rev.parquet")
    out = run("inspect", world["weights"], reordered, "--diff").stdout
    assert re.search(r"Spearman rank correlation of weight\s*│\s*1\.0000", out)
    assert re.search(r"rows whose weight changed\s*│\s*0", out)


# ------------------------------------------------------------------------------------------
# The toy world end to end: rollout -> score -> weight -> inspect
# ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_toy_world_pipeline_inspects(toy_world, tmp_path):
    from transformers import AutoTokenizer

    from renio_core.stages.rollout import RolloutConfig, run_rollout
    from renio_core.stages.score import ScoreConfig, run_score

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(toy_world.test_prompts.read_text().splitlines(True)[:4]))
    rollouts = run_rollout(RolloutConfig(
        model=str(toy_world.student), prompts=str(prompts), out=str(tmp_path / "ro"), n=4,
        max_new_tokens=48, grade=True, dtype="float32", device="cpu")).out
    scores = run_score(ScoreConfig(input=str(rollouts), teacher=str(toy_world.teacher),
                                   out=str(tmp_path / "sc"), topk=3, dtype="float32",
                                   device="cpu")).out
    weights = tmp_path / "weights.parquet"
    run("weight", "--in", scores, "--out", weights, "--group-size", 8)

    table = pq.read_table(weights).to_pylist()
    w = np.array([r["weight"] for r in table])
    top = int(np.lexsort((np.arange(len(w)), -w))[0])
    rec = table[top]
    s = np.array(rec["student_logprobs"], np.float32)
    q = np.array(rec["teacher_logprobs"], np.float32)
    d = s - q
    tok = AutoTokenizer.from_pretrained(toy_world.tokenizer)

    out = run("inspect", weights, "--top", 1).stdout
    panel = _panels(out)[0]
    assert panel.startswith(f"╭─ row {top} ")
    assert f"weight {rec['weight']:.4f}" in panel
    assert f"pivotal tokens {int((np.minimum(d, 2.5) >= 0.8).sum())}" in panel
    worst = int(np.lexsort((np.arange(len(d)), -d))[0])
    if d[worst] > 0:  # the worst position's token, decoded independently
        token = tok.decode([rec["completion_ids"][worst]])
        assert re.search(rf"^\W*{worst}\s+{re.escape(repr(token))}\s+{s[worst]:.4f}", panel, re.M)
    # The HTML of the same shard embeds every row, with its decoded tokens.
    report = tmp_path / "toy.html"
    run("inspect", weights, "--html", report)
    data = _embedded(report.read_text())
    assert len(data["rows"]) == len(table)
    first = data["rows"][0]
    assert [data["vocab"][str(i)] for i in first["ids"]] == [
        tok.decode([i]) for i in table[0]["completion_ids"]]


def test_committed_example_shows_text(toy_world):
    """The example the docs invite a newcomer to try first records its student, so inspect
    shows the toy world's text, not token ids. The file was made by the commands in
    docs/stages.md ("Try it on the small scores file")."""
    example = Path(__file__).resolve().parents[1] / "examples" / "scores.sample.parquet"
    assert example.stat().st_size < 100_000
    out = run("inspect", example, "--prompt-id", "add-630-192").stdout
    assert re.search(r"^token text +tokenizer toy:student", out, re.M), out
    panels = _panels(out)
    assert len(panels) == 4, out  # n = 4 samples of the toy world's first test prompt
    for panel in panels:
        # The prompt and the completion's chain of digit sums, decoded.
        assert "630+192" in panel and "0+2+" in panel and "\\boxed{" in panel, panel
        assert not re.search(r"\[\d+\]", panel), panel
