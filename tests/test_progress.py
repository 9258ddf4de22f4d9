"""Progress where stdout and stderr are files (a log, a Slurm job's output): plain lines at a
steady interval, no bars, no terminal control codes."""

from __future__ import annotations

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


def _renio(args: list[str], tmp_path: Path, name: str) -> list[str]:
    """Run the CLI with stdout and stderr going to files; return stderr's progress lines."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {**os.environ, "RENIO_PROGRESS_INTERVAL": "0.05", "HF_HUB_OFFLINE": "1"}
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
