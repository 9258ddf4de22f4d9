"""Every bad input is one line on stderr, exit code 2, nothing left behind (no traceback, no
box of several lines): the cases a new user and a shell pipeline run into."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from renio_core.data import shards

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
    from renio_core.stages.rollout import RolloutConfig, run_rollout

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


def test_output_under_a_file(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    one_line(["weight", "--in", SCORES, "--out", a_file / "w.parquet"], "cannot write")
    assert a_file.read_text() == "mine"


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
    one_line(["run", "--config", CONFIG, "iterations=abc"],
             "iterations: expected int (an integer), got 'abc' (from the command line)")
    one_line(["run", "--config", CONFIG, "eval_before=maybe"],
             "eval_before: expected bool (true or false), got 'maybe' (from the command line)")
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


# --------------------------------------------------------------------------------------------
# Values that must be refused (file, row, column; exit 2)
# --------------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, column: str, values, type_=None) -> Path:
    import pyarrow as pa

    table = shards.read_table(src)
    meta = shards.read_metadata(shards.resolve_inputs(str(src))[0])
    arr = pa.array(values, type_ or table.schema.field(column).type)
    table = table.set_column(table.schema.get_field_index(column), column, arr)
    shards.write_table_atomic(dst, table, meta)
    return dst


def test_positive_logprobs_and_bad_clip_are_refused(tmp_path):
    rows = shards.read_table(SCORES).column("student_logprobs").to_pylist()
    rows[3] = [0.5] + rows[3][1:]
    bad = _rewrite(SCORES, tmp_path / "pos.parquet", "student_logprobs", rows)
    one_line(["weight", "--in", bad, "--out", tmp_path / "w.parquet"],
             "row 3", "column 'student_logprobs'", "a log-probability is <= 0")
    one_line(["weight", "--in", SCORES, "--out", tmp_path / "w.parquet", "--clip", "-1"],
             "clip: must be a positive number")
    assert not (tmp_path / "w.parquet").exists()


def test_negative_weight_in_train_input(rollouts, tmp_path):
    from renio_core.stages.score import ScoreConfig, run_score
    from renio_core.stages.weight import WeightConfig, run_weight

    s = run_score(ScoreConfig(input=str(rollouts["rollouts"]), teacher="toy:teacher",
                              out=str(tmp_path / "s.parquet"), device="cpu")).out
    w = run_weight(WeightConfig(input=str(s), out=str(tmp_path / "w.parquet"), group_size=2)).out
    weights = shards.read_table(w).column("weight").to_pylist()
    weights[2] = -0.5
    bad = _rewrite(w, tmp_path / "neg.parquet", "weight", weights)
    one_line(["train", "--weights", bad, "--model", "toy:student", "--out", tmp_path / "ckpt",
              "--loss", "rkl"], "row 2", "column 'weight'", "sample weights are >= 0")
    assert not (tmp_path / "ckpt").exists()


def test_bad_sample_index_and_duplicate_rows(rollouts, tmp_path):
    import pyarrow as pa

    n = shards.read_table(rollouts["rollouts"]).num_rows
    floats = _rewrite(rollouts["rollouts"], tmp_path / "f.parquet", "sample_index",
                      [0.5 + i for i in range(n)], pa.float64())
    one_line(["score", "--in", floats, "--teacher", "toy:teacher", "--out", tmp_path / "s.parquet"],
             "column 'sample_index'")
    dup = _rewrite(rollouts["rollouts"], tmp_path / "d.parquet", "sample_index", [0] * n, pa.int32())
    one_line(["score", "--in", dup, "--teacher", "toy:teacher", "--out", tmp_path / "s.parquet"],
             "row 1", "duplicate trajectory", "column 'sample_index'")
    one_line(["eval", "--completions", dup, "--bench", rollouts["prompts"], "--out",
              tmp_path / "e.parquet"], "row 1", "duplicate trajectory")
    assert not list(tmp_path.glob("[se].parquet*"))


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_run_dir_that_is_not_a_run_is_refused_before_any_write(toy_world, tmp_path):
    import shutil

    model = tmp_path / "student"
    shutil.copytree(toy_world.student, model)
    before = _snapshot(model)
    one_line(["run", "--config", CONFIG, f"run_dir={model}", f"student={model}"],
             f"run_dir: {model} is inside the student model folder")
    one_line(["run", "--config", CONFIG, f"run_dir={model / 'run'}", f"student={model}"],
             "is inside the student model folder")
    # Any folder that holds something and no run_config.json is not taken for a run.
    one_line(["run", "--config", CONFIG, f"run_dir={model}"],
             f"run_dir: {model} holds other files (chat_template.jinja, config.json, "
             "generation_config.json, ...) and no run_config.json")
    assert _snapshot(model) == before
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    one_line(["run", "--config", CONFIG, f"run_dir={data}"], "holds other files (notes.txt)")
    assert [p.name for p in data.iterdir()] == ["notes.txt"]


LONG_ID = "long"
# The toy tokenizer spells a problem out one token per character; the chat template adds
# <|im_start|> user \n, then \n\n, the math instruction (one token), <|im_end|> \n, and the
# generation prompt <|im_start|> assistant \n <think> \n \n </think> \n \n: 17 tokens.
LONG_TOKENS = 100_000 + 17


def _prompts_with_a_long_one(toy_world, path: Path) -> Path:
    short = toy_world.train_prompts.read_text().splitlines(True)[:2]
    long = json.dumps({"id": LONG_ID, "problem": "7" * 100_000, "answer": "1", "task": "math"})
    path.write_text(short[0] + long + "\n" + short[1])
    return path


@pytest.mark.integration
def test_a_prompt_longer_than_the_context_is_refused_before_any_work(toy_world, tmp_path):
    prompts = _prompts_with_a_long_one(toy_world, tmp_path / "p.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    # Context 2,048 (the toy's max_position_embeddings and model_max_length).
    needs = (f"prompt '{LONG_ID}' is {LONG_TOKENS:,} tokens, and with max_new_tokens 8 needs "
             f"{LONG_TOKENS + 8:,}, more than the model's context of 2,048 tokens")
    t0 = time.perf_counter()
    line = one_line(["rollout", "--model", "toy:student", "--prompts", prompts, "--out",
                     out / "r.parquet", "--max-new-tokens", 8], needs, "--skip-long-prompts")
    assert line.startswith(f"error: {prompts}, row 1, column 'problem': ")
    one_line(["eval", "--model", "toy:student", "--bench", prompts, "--out", out / "e.parquet",
              "--n", 1, "--max-new-tokens", 8], needs)
    one_line(["run", "--config", CONFIG, f"run_dir={out / 'run'}", f"prompts={prompts}",
              "eval_prompts=", "rollout.max_new_tokens=8"], needs,
             "rollout.skip_long_prompts=true")
    # Refused from the token count alone: sampling it would allocate gigabytes first.
    assert time.perf_counter() - t0 < 120
    assert not list(out.iterdir())

    proc = subprocess.run([*RENIO, "rollout", "--model", "toy:student", "--prompts", str(prompts),
                           "--out", str(out / "r.parquet"), "--max-new-tokens", "8",
                           "--skip-long-prompts"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "prompts skipped (longer than the context)" in proc.stdout
    assert proc.stdout.split("prompts skipped (longer than the context)")[1].split()[1] == "1"
    ids = pq.read_table(out / "r.parquet").column("prompt_id").to_pylist()
    assert LONG_ID not in ids and len(ids) == 2

    proc = subprocess.run([*RENIO, "eval", "--model", "toy:student", "--bench", str(prompts),
                           "--out", str(out / "e.parquet"), "--n", "1", "--max-new-tokens", "8",
                           "--skip-long-prompts"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 prompts longer than the model's context" in proc.stdout
    summary = json.loads((out / "e.json").read_text())
    assert summary["long_prompts_skipped"] == [LONG_ID]
    assert summary["metrics"]["problems"] == 2
