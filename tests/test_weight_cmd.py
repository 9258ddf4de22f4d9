"""`renio weight` end to end: the real CLI in a subprocess, real Parquet files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import factories as F
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from renio_core.data import shards

RENIO = [sys.executable, "-m", "renio_cli.main"]


def run(*args, check=True):
    proc = subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_bad_input(proc, out: Path, *needles: str):
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(out.name + "*")), list(out.parent.iterdir())


@pytest.fixture
def hand_scores(tmp_path):
    # The four trajectories of test_weighting plus a fifth, to make a short last group.
    table = F.scores_table(
        [[-0.1, -0.5, -3.0], [-1.0], [], [-0.5, -0.25], [-0.5]],
        [[-0.2, -2.0, -6.0], [-0.5], [], [-1.625, -1.25], [-3.5]],
        correct=[False, True, True, False, None],
    )
    return F.write(table, tmp_path / "scores.parquet")


def test_weight_end_to_end_by_hand(hand_scores, tmp_path):
    out = tmp_path / "weights.parquet"
    proc = run("weight", "--in", hand_scores, "--out", out, "--clip", 2.0, "--threshold", 1.0,
               "--group-size", 2)
    t = pq.read_table(out).to_pydict()
    assert t["batch_id"] == [0, 0, 1, 1, 2]
    assert t["pivotal_count"] == [2, 0, 0, 2, 1]
    # Row 4: s - q = 3.0, clipped to 2.0.
    np.testing.assert_allclose(t["log_ratio_mean"], [1.75, 0, 0, 1.0625, 2.0], rtol=1e-6)
    a, d, e = math.exp(1.75), math.exp(1.0625), math.exp(2.0)
    np.testing.assert_allclose(t["raw_weight"], [a, 1, 1, d, e], rtol=1e-6)
    # batch_mean; the last group holds one row, so its weight is 1.
    np.testing.assert_allclose(
        t["weight"], [2 * a / (a + 1), 2 / (a + 1), 2 / (1 + d), 2 * d / (1 + d), 1.0], rtol=1e-6)
    # Input columns are carried unchanged.
    assert t["student_logprobs"][0] == pytest.approx([-0.1, -0.5, -3.0])
    assert t["correct"] == [False, True, True, False, None]
    # Metadata under the key 'renio'.
    meta = json.loads(pq.read_schema(out).metadata[b"renio"])
    assert meta["stage"] == "weight" and meta["schema_version"] == 1
    assert meta["config"]["clip"] == 2.0 and meta["config"]["group_size"] == 2
    assert meta["inputs"][0]["path"].endswith("scores.parquet")
    # The summary table: rows, tokens, pivotal share, AUROC on the graded rows.
    lines = {ln.split("│")[1].strip(): ln.split("│")[2].strip()
             for ln in proc.stdout.splitlines() if ln.count("│") == 3}
    assert lines["rows"] == "5"
    assert lines["completion tokens"] == "7"
    assert lines["pivotal tokens (r >= 1)"] == "5 (71.43%)"
    assert lines["weight min / median / max"] == (
        f"{2 / (a + 1):.4f} / 1.0000 / {2 * a / (a + 1):.4f}")  # sorted: .30 .51 1 1.49 1.70
    # raw weights of incorrect rows (a, d) are above both correct rows (1, 1): AUROC 1.
    assert lines["AUROC of raw_weight for incorrect"] == "1.000"
    assert lines["mean weight, correct rows"] == f"{(2 / (a + 1) + 2 / (1 + d)) / 2:.4f}"
    # Each group's weights sum to 2, so the 4 graded rows carry 4; the incorrect rows 0 and 3
    # carry 2a/(a+1) + 2d/(1+d) = 1.7039 + 1.4863 = 3.1903 of it (79.76%). The ungraded row
    # 4 counts in neither. Uniform weights would give the row share, 2 of 4.
    assert lines["share of the weight on incorrect rows"] == "79.8% (50.0% of the graded rows)"


def test_weight_share_on_incorrect_rows_uniform_and_filtered(hand_scores, tmp_path):
    lines = {}
    for name, flags in (("uniform", ["--scheme", "uniform"]), ("correct", ["--filter", "correct"]),
                        ("incorrect", ["--filter", "incorrect"])):
        proc = run("weight", "--in", hand_scores, "--out", tmp_path / f"{name}.parquet",
                   "--group-size", 2, *flags)
        lines[name] = {ln.split("│")[1].strip(): ln.split("│")[2].strip()
                       for ln in proc.stdout.splitlines() if ln.count("│") == 3}
    key = "share of the weight on incorrect rows"
    # Weight 1 each: the weight share is the row share, 2 incorrect of 4 graded rows.
    assert lines["uniform"][key] == "50.0% (50.0% of the graded rows)"
    # The filters keep one kind: nothing, then everything, on incorrect rows.
    assert lines["correct"][key] == "0.0% (0.0% of the graded rows)"
    assert lines["incorrect"][key] == "100.0% (100.0% of the graded rows)"


def test_weight_types_match_design(hand_scores, tmp_path):
    out = tmp_path / "w.parquet"
    run("weight", "--in", hand_scores, "--out", out)
    schema = pq.read_schema(out)
    assert schema.field("batch_id").type == pa.int64()
    assert schema.field("pivotal_count").type == pa.int32()
    for name in ("log_ratio_mean", "raw_weight", "weight"):
        assert schema.field(name).type == pa.float32()


@pytest.mark.parametrize("norm", ["batch_mean", "ema", "clamp", "none"])
def test_streaming_in_small_batches_equals_one_batch(tmp_path, norm):
    src = F.write(F.random_scores(203, 40, seed=3), tmp_path / "s.parquet")
    one = tmp_path / f"one-{norm}.parquet"
    many = tmp_path / f"many-{norm}.parquet"
    run("weight", "--in", src, "--out", one, "--norm", norm, "--group-size", 8, "--batch-rows", 10000)
    run("weight", "--in", src, "--out", many, "--norm", norm, "--group-size", 8, "--batch-rows", 7)
    a, b = pq.read_table(one), pq.read_table(many)
    assert a.column("batch_id").to_pylist() == b.column("batch_id").to_pylist()
    np.testing.assert_allclose(a.column("weight").to_numpy(), b.column("weight").to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("batch_rows,out", [(10000, "w.parquet"), (7, "w.parquet"), (7, "parts")])
def test_scores_in_memory_write_what_the_file_writes(tmp_path, batch_rows, out):
    """run_weight(scores=...) (renio run's score_in_train_step hands over the scores it has
    just written) reads the rows from memory: the same output, bytes of every data column and
    metadata, as reading the file; a table that is not the file's rows is refused."""
    from renio_core.stages.weight import WeightConfig, run_weight

    src = F.write(F.random_scores(203, 40, seed=5), tmp_path / "s.parquet")
    cfg = dict(input=str(src), group_size=8, batch_rows=batch_rows, rows_per_part=50)
    a = run_weight(WeightConfig(out=str(tmp_path / "a" / out), **cfg))
    b = run_weight(WeightConfig(out=str(tmp_path / "b" / out), **cfg), scores=pq.read_table(src))
    assert (a.auroc_incorrect, a.weight_share_incorrect, a.rows) == (
        b.auroc_incorrect, b.weight_share_incorrect, b.rows)
    ta, tb = pq.read_table(a.out), pq.read_table(b.out)
    assert ta.equals(tb) and ta.num_rows == 203
    files = [sorted(Path(t.out).glob("*.parquet")) if Path(t.out).is_dir() else [Path(t.out)]
             for t in (a, b)]
    assert len(files[0]) == len(files[1]) == (5 if out == "parts" else 1)
    for fa, fb in zip(*files):
        meta = [shards.read_metadata(f) for f in (fa, fb)]
        for m in meta:  # when and where it was written: the output's own path
            del m["created_at"], m["config"]["out"]
        assert meta[0] == meta[1]
    with pytest.raises(ValueError, match="rows of cfg.input"):
        run_weight(WeightConfig(out=str(tmp_path / "c" / out), **cfg),
                   scores=pq.read_table(src).slice(1))


def test_directory_and_glob_inputs_and_part_outputs(tmp_path):
    whole = F.random_scores(100, 20, seed=4)
    src_dir = tmp_path / "scores"
    F.write(whole.slice(0, 37), src_dir / "part-00000.parquet", row_group_size=10)
    F.write(whole.slice(37), src_dir / "part-00001.parquet", row_group_size=10)
    ref = tmp_path / "ref.parquet"
    run("weight", "--in", F.write(whole, tmp_path / "whole.parquet"), "--out", ref)
    out_dir = tmp_path / "weights"
    run("weight", "--in", src_dir, "--out", out_dir, "--rows-per-part", 24)
    parts = sorted(out_dir.glob("*.parquet"))
    # Input row groups are passed through whole, so parts hold whole row groups (<= 24 rows).
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    sizes = [pq.read_metadata(p).num_rows for p in parts]
    assert sum(sizes) == 100 and max(sizes) <= 24 and len(parts) >= 5
    got = pa.concat_tables([pq.read_table(p) for p in parts])
    assert got.column("batch_id").to_pylist() == [i // 8 for i in range(100)]
    assert shards.read_metadata(out_dir)["stage"] == "weight"  # a directory reads as a shard
    np.testing.assert_allclose(got.column("weight").to_numpy(),
                               pq.read_table(ref).column("weight").to_numpy(), rtol=1e-6)
    out_glob = tmp_path / "g.parquet"
    run("weight", "--in", str(src_dir / "part-*.parquet"), "--out", out_glob)
    np.testing.assert_allclose(pq.read_table(out_glob).column("weight").to_numpy(),
                               pq.read_table(ref).column("weight").to_numpy(), rtol=1e-6)


def test_uniform_scheme_and_filters(tmp_path):
    src = F.write(F.random_scores(50, 20, seed=5), tmp_path / "s.parquet")
    correct = pq.read_table(src).column("correct").to_pylist()
    out = tmp_path / "u.parquet"
    run("weight", "--in", src, "--out", out, "--scheme", "uniform")
    t = pq.read_table(out)
    assert set(t.column("weight").to_pylist()) == {1.0}
    assert t.column("pivotal_count").to_numpy().sum() > 0  # diagnostics are still computed
    out = tmp_path / "inc.parquet"
    run("weight", "--in", src, "--out", out, "--filter", "incorrect", "--group-size", 4)
    t = pq.read_table(out)
    # The same filter into parts of 7 rows (rewritten, since rows are dropped).
    out_dir = tmp_path / "inc"
    run("weight", "--in", src, "--out", out_dir, "--filter", "incorrect", "--group-size", 4,
        "--rows-per-part", 7, "--batch-rows", 5)
    parts = sorted(out_dir.glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts[:-1]] == [7] * (len(parts) - 1)
    assert pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() == t.to_pylist()
    assert t.num_rows == correct.count(False)
    assert set(t.column("correct").to_pylist()) == {False}
    # Groups are formed after filtering: 0,0,0,0,1,1,1,1,...
    assert t.column("batch_id").to_pylist() == [i // 4 for i in range(t.num_rows)]


def test_rerun_with_same_config_skips_and_other_config_refuses(hand_scores, tmp_path):
    out = tmp_path / "w.parquet"
    run("weight", "--in", hand_scores, "--out", out)
    mtime = out.stat().st_mtime_ns
    proc = run("weight", "--in", hand_scores, "--out", out)
    assert out.stat().st_mtime_ns == mtime
    assert "already complete" in proc.stdout
    proc = run("weight", "--in", hand_scores, "--out", out, "--threshold", 1.0, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert out.stat().st_mtime_ns == mtime
    run("weight", "--in", hand_scores, "--out", out, "--threshold", 1.0, "--overwrite")
    assert json.loads(pq.read_schema(out).metadata[b"renio"])["config"]["threshold"] == 1.0


def test_yaml_config(hand_scores, tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("clip: 2.0\nthreshold: 1.0\ngroup-size: 2\nnorm: none\n")
    out = tmp_path / "w.parquet"
    run("weight", "--config", cfg, "--in", hand_scores, "--out", out, "--norm", "batch_mean")
    meta = json.loads(pq.read_schema(out).metadata[b"renio"])["config"]
    assert (meta["clip"], meta["threshold"], meta["group_size"], meta["norm"]) == (2.0, 1.0, 2, "batch_mean")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clipp: 2.0\n")
    proc = run("weight", "--config", bad, "--in", hand_scores, "--out", tmp_path / "x.parquet", check=False)
    assert proc.returncode == 2 and "unknown key 'clipp'" in proc.stderr


def test_yaml_config_takes_field_names_and_flags(hand_scores, tmp_path):
    # The config field is 'input' (the flag --in, the parameter input_): all three spellings of
    # a key work, as the field name 'filter' (parameter filter_) does.
    for key in ("input", "in"):
        cfg = tmp_path / f"{key}.yaml"
        out = tmp_path / f"{key}.parquet"
        cfg.write_text(f"{key}: {hand_scores}\nout: {out}\nfilter: all\n")
        run("weight", "--config", cfg)
        assert pq.read_table(out).num_rows == pq.read_table(hand_scores).num_rows


# ------------------------------------------------------------------------------ bad input


def test_missing_column(tmp_path):
    src = F.write(F.random_scores(4, 5).drop_columns(["teacher_logprobs"]), tmp_path / "s.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, check=False), out,
                     "s.parquet", "teacher_logprobs", "missing column", "renio score")


def test_length_mismatch(tmp_path):
    table = F.scores_table([[-1.0, -1.0], [-1.0, -2.0, -3.0]], [[-1.0, -1.0], [-1.0, -2.0, -3.0]],
                           ids_rows=[[1, 2], [1, 2]])
    src = F.write(table, tmp_path / "s.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, check=False), out,
                     "row 1", "student_logprobs", "has 3 values", "completion_ids")


def test_nan_in_logprobs(tmp_path):
    table = F.scores_table([[-1.0], [-1.0, -0.5], [-2.0]], [[-1.0], [-1.0, float("nan")], [-2.0]])
    src = F.write(table, tmp_path / "s.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, check=False), out,
                     "row 1", "teacher_logprobs", "position 1", "finite")


def test_nan_late_in_a_multi_part_output_leaves_nothing(tmp_path):
    table = F.random_scores(300, 10, seed=6)
    teacher = table.column("teacher_logprobs").to_pylist()
    teacher[290][0] = float("inf")
    table = table.set_column(table.schema.get_field_index("teacher_logprobs"), "teacher_logprobs",
                             pa.array(teacher, pa.list_(pa.float32())))
    src = F.write(table, tmp_path / "s.parquet")
    out = tmp_path / "parts"
    proc = run("weight", "--in", src, "--out", out, "--rows-per-part", 50, "--batch-rows", 64, check=False)
    assert proc.returncode == 2 and "row 290" in proc.stderr
    assert not list(out.glob("*")) if out.exists() else True


def test_truncated_parquet(tmp_path):
    src = F.write(F.random_scores(20, 10), tmp_path / "s.parquet")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, check=False), out,
                     "s.parquet", "not a readable Parquet file")


def test_empty_input(tmp_path):
    src = F.write(F.random_scores(3, 5).slice(0, 0), tmp_path / "s.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, check=False), out, "empty")


def test_filter_without_correct_column(tmp_path):
    src = F.write(F.random_scores(4, 5, graded=False), tmp_path / "s.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, "--filter", "incorrect", check=False),
                     out, "correct", "--filter incorrect", "--grade")


def test_filter_with_all_null_correct(tmp_path):
    table = F.scores_table([[-1.0], [-2.0]], [[-1.0], [-2.0]], correct=[None, None])
    src = F.write(table, tmp_path / "s.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", src, "--out", out, "--filter", "correct", check=False),
                     out, "every value is null")


def test_bad_flag_value(hand_scores, tmp_path):
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", hand_scores, "--out", out, "--norm", "mean", check=False),
                     out, "norm", "batch_mean")
    assert_bad_input(run("weight", "--in", tmp_path / "nope.parquet", "--out", out, check=False),
                     out, "nope.parquet", "no such file")


# ------------------------------------------------------------------------------ kill + resume


@pytest.mark.integration
def test_sigkill_while_writing_then_rerun(tmp_path):
    src = F.write(F.big_scores(6000, 400, seed=7), tmp_path / "big.parquet", row_group_size=500)
    ref = tmp_path / "ref"
    run("weight", "--in", src, "--out", ref, "--rows-per-part", 500, "--batch-rows", 250)

    out = tmp_path / "out"
    proc = subprocess.Popen([*RENIO, "weight", "--in", str(src), "--out", str(out),
                             "--rows-per-part", "500", "--batch-rows", "250"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "part-00002.parquet").exists():
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(out.glob("*.parquet"))
    assert 0 < len(complete) < 12, "kill should land mid-run"
    for part in complete:  # whatever reads as a part is a complete, valid part
        pq.read_table(part)
        assert b"renio" in pq.read_schema(part).metadata

    proc = run("weight", "--in", src, "--out", out, "--rows-per-part", 500, "--batch-rows", 250)
    assert "already complete" in proc.stdout
    assert not list(out.glob("*.tmp"))
    got = sorted(p.name for p in out.glob("*.parquet"))
    assert got == sorted(p.name for p in ref.glob("*.parquet"))
    for name in got:
        a, b = pq.read_table(out / name), pq.read_table(ref / name)
        assert a.column("prompt_id").to_pylist() == b.column("prompt_id").to_pylist()
        np.testing.assert_array_equal(a.column("weight").to_numpy(), b.column("weight").to_numpy())


@pytest.mark.integration
def test_sigkill_single_file_leaves_only_tmp(tmp_path):
    src = F.write(F.big_scores(20000, 400, seed=8), tmp_path / "big.parquet", row_group_size=500)
    out = tmp_path / "w.parquet"
    proc = subprocess.Popen([*RENIO, "weight", "--in", str(src), "--out", str(out), "--batch-rows", "250"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / "w.parquet.tmp"
    deadline = time.time() + 60
    while time.time() < deadline and not tmp.exists():
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.exists(), "the kill should land while the .tmp file is being written"
    assert not out.exists()
    run("weight", "--in", src, "--out", out, "--batch-rows", 250)
    assert pq.read_metadata(out).num_rows == 20000
    assert not tmp.exists()


def test_directory_missing_a_shard_part_is_refused(tmp_path):
    # Parts as `renio score --shard i/3` writes them; the job for part 1 has not finished.
    whole = F.random_scores(30, 5, seed=9)
    d = tmp_path / "scores"
    d.mkdir()
    for k in (0, 2):
        meta = {"stage": "score", "part": {"index": k, "num_parts": 3}}
        table = whole.slice(10 * k, 10).replace_schema_metadata({"renio": json.dumps(meta)})
        pq.write_table(table, d / f"part-{k:05d}.parquet")
    out = tmp_path / "w.parquet"
    assert_bad_input(run("weight", "--in", d, "--out", out, check=False), out,
                     "holds 2 of 3 parts", "part-00001.parquet", "--shard")
    # A glob reads the present parts on purpose.
    run("weight", "--in", str(d / "part-*.parquet"), "--out", out)
    assert pq.read_metadata(out).num_rows == 20


def test_distinct_grouping_puts_distinct_prompts_in_each_group(tmp_path):
    """n = 2 samples per prompt (rows p0s0, p0s1, p1s0, ...): consecutive groups of 4 hold 2
    prompts; distinct groups of 4 hold 4 prompts, one sample each."""
    table = F.random_scores(16, 10, seed=3)  # prompt_id p0, p0, p1, p1, ...
    scores = F.write(table, tmp_path / "scores.parquet")
    out = tmp_path / "w.parquet"
    proc = run("weight", "--in", scores, "--out", out, "--group-size", 4, "--grouping", "distinct")
    t = pq.read_table(out).to_pydict()
    assert t["batch_id"] == [0, 1] * 4 + [2, 3] * 4
    for g in range(4):
        rows = [i for i, b in enumerate(t["batch_id"]) if b == g]
        assert len({t["prompt_id"][i] for i in rows}) == 4
        w = np.array([t["weight"][i] for i in rows])
        assert w.mean() == pytest.approx(1.0, abs=1e-6) or w.max() == pytest.approx(10.0)
    assert "4.00 mean, 4 min" in proc.stdout
    proc = run("weight", "--in", scores, "--out", tmp_path / "c.parquet", "--group-size", 4)
    assert "2.00 mean, 2 min" in proc.stdout
    assert_bad_input(run("weight", "--in", scores, "--out", tmp_path / "x.parquet", "--grouping",
                         "prompt", check=False), tmp_path / "x.parquet", "grouping: must be one of")


def test_output_is_input_plus_new_columns(tmp_path):
    # 10 row groups of uneven sizes (9 x 10 + 7): every input column comes back unchanged.
    src = F.write(F.random_scores(97, 30, seed=11), tmp_path / "s.parquet", row_group_size=10)
    out = tmp_path / "w.parquet"
    run("weight", "--in", src, "--out", out)
    got = pq.read_table(out)
    assert set(got.column_names) - set(pq.read_table(src).column_names) >= {"weight", "batch_id"}
    assert got.select(pq.read_table(src).column_names).equals(pq.read_table(src))
