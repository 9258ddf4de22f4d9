"""Progress where stdout and stderr are files (a log, a Slurm job's output): plain lines at a
steady interval, no bars, no terminal control codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from renio_cli.common import progress_line

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<what>.+): (?P<done>\d+)/(?P<total>\d+) \(\d+%\), (?P<rate>[\d.e+-]+)/s, "
                  r"elapsed \d+:\d\d:\d\d, left (\d+:\d\d:\d\d|\?)$")


def test_progress_line_by_hand():
    # 30 of 120 done in 15 s: 2 per second, 90 left take 45 s.
    assert progress_line("sampling", 30, 120, 15.0) == \
        "sampling: 30/120 (25%), 2/s, elapsed 0:00:15, left 0:00:45"
    # Nothing done yet: no rate, no estimate.
    assert progress_line("training steps", 0, 8, 61.0) == \
        "training steps: 0/8 (0%), 0/s, elapsed 0:01:01, left ?"
    # An unknown total: the count alone.
    assert progress_line("rows", 7, None, 2.0) == "rows: 7, 3.5/s, elapsed 0:00:02, left ?"
    assert progress_line("rows", 5, 5, 3600.0) == \
        "rows: 5/5 (100%), 0.00139/s, elapsed 1:00:00, left 0:00:00"


def _renio(args: list[str], tmp_path: Path, name: str, interval: str = "0.05") -> list[str]:
    """Run the CLI with stdout and stderr going to files; return stderr's progress lines."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {**os.environ, "RENIO_PROGRESS_INTERVAL": interval, "HF_HUB_OFFLINE": "1"}
    env.pop("RENIO_PROGRESS", None)
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.run([sys.executable, "-m", "renio_cli.main", *args], stdout=fo,
                              stderr=fe, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    text = err.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text, text[:500]
    return [m for m in (LINE.match(x) for x in text.splitlines()) if m]


def _check(lines: list, what: str) -> None:
    mine = [m for m in lines if m["what"].endswith(what)]
    assert mine, f"no progress line for {what!r}"
    done = [int(m["done"]) for m in mine]
    assert done == sorted(done) and all(d <= int(mine[0]["total"]) for d in done)
    # The closing line reports the work finished.
    assert done[-1] == int(mine[-1]["total"])


def test_toy_build_prints_plain_progress_lines_into_a_file(tmp_path):
    lines = _renio(["toy", "build", "--quick", "--out", str(tmp_path / "toy")], tmp_path, "toy")
    assert len(lines) >= 2
    assert {m["what"] for m in lines} >= {"train teacher"}
    _check(lines, "train teacher")


def _toy_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i}+{i}=", "answer": str(2 * i)})
                            + "\n" for i in range(n)))
    return path


def test_stage_commands_print_plain_progress_lines_into_a_file(tmp_path, toy_world):
    """rollout, score, weight, train and eval, each with stdout and stderr redirected: plain
    lines that count up to the work's total, no bars."""
    prompts = _toy_prompts(tmp_path / "prompts.jsonl", 8)
    r, s, w = (tmp_path / f"{x}.parquet" for x in ("r", "s", "w"))
    _check(_renio(["rollout", "--model", "toy:student", "--prompts", str(prompts), "--n", "2",
                   "--batch-size", "4", "--chunk-prompts", "2", "--max-new-tokens", "24",
                   "--grade", "--out", str(r)], tmp_path, "rollout"), "sampling")
    _check(_renio(["score", "--in", str(r), "--teacher", "toy:teacher", "--max-batch-tokens",
                   "64", "--out", str(s)], tmp_path, "score"), "scoring")
    _renio(["weight", "--in", str(s), "--out", str(w)], tmp_path, "weight")  # too quick to tick
    _check(_renio(["train", "--weights", str(w), "--model", "toy:student", "--teacher",
                   "toy:teacher", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "4",
                   "--out", str(tmp_path / "ckpt")], tmp_path, "train"), "training steps")
    _check(_renio(["eval", "--model", "toy:student", "--bench", str(prompts), "--n", "2",
                   "--max-new-tokens", "24", "--out", str(tmp_path / "e.parquet")],
                  tmp_path, "eval"), "sampling, then grading")


def test_run_prints_plain_progress_lines_per_stage_into_a_file(tmp_path, toy_world):
    # The loop's one optimizer step on a tiny model takes a few milliseconds: a short interval.
    lines = _renio(["run", "--config", str(ROOT / "sample_configs" / "toy-opd-renio.yaml"),
                    f"run_dir={tmp_path / 'run'}", "iterations=1", "prompts_per_iteration=8",
                    "rollout.n=1", "rollout.max_new_tokens=24", "eval_every=1", "eval.limit=8",
                    "eval.n=1", "eval.max_new_tokens=24"], tmp_path, "run", interval="0.001")
    stages = {m["what"] for m in lines}
    assert {"iter 0: rollout", "iter 0: score", "iter 0: train", "base: eval sampling",
            "iter 0: eval sampling"} <= stages, stages
    for what in stages:
        _check(lines, what)
