"""Every bad input is one line on stderr, exit code 2, nothing left behind (no traceback, no
box of several lines): the cases a new user and a shell pipeline run into."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from renio_core import shards

RENIO = [sys.executable, "-m", "renio_cli.main"]
ROOT = Path(__file__).resolve().parents[1]
SCORES = ROOT / "examples" / "scores.sample.parquet"
CONFIG = ROOT / "sample_configs" / "toy-opd.yaml"
UNWRITABLE = Path("/sys/renio-test")  # read-only for everyone, root included


def one_line(args: list, *fragments: str, env: dict | None = None) -> str:
    proc = subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def rollouts(toy_world, tmp_path_factory):
    from renio_core.rollout_stage import RolloutConfig, run_rollout

    root = tmp_path_factory.mktemp("errors")
    prompts = root / "p.jsonl"
    prompts.write_text("".join(toy_world.train_prompts.read_text().splitlines(True)[:2]))
    out = root / "r.parquet"
    run_rollout(RolloutConfig(model="toy:student", prompts=str(prompts), out=str(out), n=2,
                              max_new_tokens=8, device="cpu"))
    return {"prompts": prompts, "rollouts": out}


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not Path("/sys").is_mount(),
                    reason="/sys is writable here")
def test_unwritable_output_is_one_line_for_every_command(rollouts, tmp_path):
    r = rollouts
    cases = [
        ["weight", "--in", SCORES, "--out", UNWRITABLE / "w.parquet"],
        ["rollout", "--model", "toy:student", "--prompts", r["prompts"], "--out",
         UNWRITABLE / "r.parquet", "--max-new-tokens", "4"],
        ["score", "--in", r["rollouts"], "--teacher", "toy:teacher", "--out", UNWRITABLE / "s.parquet"],
        ["eval", "--completions", r["rollouts"], "--bench", r["prompts"], "--out",
         UNWRITABLE / "e.parquet"],
        ["inspect", SCORES, "--html", UNWRITABLE / "r.html"],
        ["toy", "build", "--quick", "--out", UNWRITABLE / "toy"],
        ["run", "--config", CONFIG, f"run_dir={UNWRITABLE / 'run'}"],
    ]
    for args in cases:
        one_line(args, "cannot write")


def test_topk_larger_than_the_vocabulary(rollouts, tmp_path):
    out = tmp_path / "s.parquet"
    one_line(["score", "--in", rollouts["rollouts"], "--teacher", "toy:teacher", "--topk", 5000,
              "--out", out], "--topk 5000: larger than the teacher's vocabulary")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_prompts_not_utf8(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"problem": "1+1\xff"}\n')
    one_line(["rollout", "--model", "toy:student", "--prompts", bad, "--out", tmp_path / "r.parquet"],
             str(bad), "not UTF-8")


def test_run_config_values_of_the_wrong_type_and_broken_yaml(tmp_path):
    one_line(["run", "--config", CONFIG, "iterations=abc"], "iterations: must be an integer")
    one_line(["run", "--config", CONFIG, "eval_before=maybe"], "eval_before: must be true or false")
    broken = tmp_path / "broken.yaml"
    broken.write_text("weight: [\n")
    one_line(["run", "--config", broken], "cannot read run config")
    one_line(["weight", "--in", SCORES, "--out", tmp_path / "w.parquet", "--config", broken],
             "cannot read YAML config")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("group_size: eight\n")
    one_line(["weight", "--in", SCORES, "--out", tmp_path / "w.parquet", "--config", wrong],
             "key 'group_size': must be an integer")
    assert not (tmp_path / "w.parquet").exists()


def test_a_model_path_that_does_not_exist(rollouts, tmp_path):
    one_line(["rollout", "--model", tmp_path / "no-such-model", "--prompts", rollouts["prompts"],
              "--out", tmp_path / "r.parquet"], "no such model folder")


def test_two_jobs_writing_one_output(rollouts, tmp_path):
    """The second job gets one line and leaves nothing; the first (here: this test holding
    the lock, as a running job does) is undisturbed."""
    out = tmp_path / "s.parquet"
    lock = shards.exclusive_lock(Path(str(out) + ".lock"), what=out)
    try:
        one_line(["score", "--in", rollouts["rollouts"], "--teacher", "toy:teacher", "--out", out],
                 "another renio job is writing this output")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet.lock"]
    finally:
        lock.release()
    toy = tmp_path / "toy"
    lock = shards.exclusive_lock(tmp_path / ".toy.lock", what=toy)
    try:
        one_line(["toy", "build", "--quick", "--out", toy], "another renio job is writing")
        assert not toy.exists() and not list(tmp_path.glob(".toy.tmp*"))
    finally:
        lock.release()
    # Both run once the lock is free.
    subprocess.run([*RENIO, "score", "--in", str(rollouts["rollouts"]), "--teacher", "toy:teacher",
                    "--out", str(out)], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]


def test_error_text_is_printed_literally(rollouts, tmp_path):
    """Messages are not read as rich markup: brackets in a path or in advice stay as typed."""
    for name in ("a[red]b.parquet", "c[/b]d.parquet"):  # the second: folder 'c[', file 'b]d'
        bad = tmp_path / name
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(b"not parquet")
        line = one_line(["weight", "--in", bad, "--out", tmp_path / "w.parquet"])
        assert name in line
    try:
        import vllm  # noqa: F401
    except ImportError:
        line = one_line(["rollout", "--model", "toy:student", "--prompts", rollouts["prompts"],
                         "--out", tmp_path / "r.parquet", "--backend", "vllm"])
        assert "pip install 'renio[vllm]'" in line
