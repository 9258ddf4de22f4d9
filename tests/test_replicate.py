"""experiments/replicate.py: the pre-registered design (seeds, conditions, run order), its
statistics (paired t test, Holm's correction, the verdict rule with its floor and its +1.5-point
margin), the rule that a run directory is reused only when its config and code match, and the
report written from a results dict."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "experiments" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| > t) for Student's t with odd ``df``, from the closed-form finite sum
    P(|T| <= t) = 2/pi (theta + sin theta (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)),
    theta = atan(t / sqrt(df)): a reference independent of scipy."""
    assert df % 2 == 1
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, acc = math.cos(theta), 0.0
    for k in range(1, (df - 1) // 2 + 1):
        acc += term
        term *= c2 * (2 * k) / (2 * k + 1)
    return 1 - 2 / math.pi * (theta + math.sin(theta) * acc)


# ----------------------------------------------------------------------------- design


def test_seeds_shared_within_a_replicate_and_disjoint_across_replicates(rep):
    code = "0" * 16
    for replicate in rep.REPLICATES:
        seeds = {rep.run_stamp(w, n, replicate, code, "c")["seed"]
                 for w in rep.WORLDS for n in rep.world_conditions(w)}
        assert seeds == {rep.run_seed(replicate)}  # every condition, every world
    # No seed one replicate derives (rollout rows of training and evaluation, torch and numpy
    # generators with their 32-bit truncation) is used by another replicate, far beyond 10.
    owner: dict[tuple, int] = {}
    for replicate in range(100):
        for key in rep.derived_seeds(rep.run_seed(replicate), iterations=rep.ITERATIONS):
            assert owner.setdefault(key, replicate) == replicate, (key, replicate, owner[key])


def test_derived_seeds_follow_the_loop(rep):
    # renio run: rollout and train seeds s * 100003 + iteration, eval seed s + 7919.
    got = rep.derived_seeds(5, iterations=2)
    assert got == {("rollout", 5 + 7919), ("torch", 5 + 7919), ("rollout", 500015),
                   ("rollout", 500016), ("torch", 500015), ("torch", 500016)}


def test_fixed_design(rep):
    assert rep.REPLICATES == tuple(range(10))
    assert list(rep.WORLDS) == ["reflect", "chain", "addition"]
    assert rep.world_conditions("reflect") == (
        "opd", "opd-renio", "opsd", "opsd-renio", "opd-correct-only", "opd-incorrect-only",
        "opd-renio-tem4")
    assert rep.world_conditions("chain") == rep.world_conditions("addition") == (
        "opd", "opd-renio", "opsd", "opsd-renio")
    assert [p[0] for p in rep.PRIMARY] == ["a", "b", "c-opd", "c-opsd"]
    assert (rep.ALPHA, rep.MARGIN, rep.EVAL_N, rep.EVAL_EVERY) == (0.05, 0.015, 4, 16)
    assert not hasattr(rep, "pairs_needing_more")  # no replicates added after looking


def test_run_overrides_per_world_and_condition(rep):
    opd = rep.run_overrides("reflect", "opd")
    for o in ("student=toy-reflect:student", "teacher=toy-reflect:teacher",
              "prompts=toy-reflect:train", "eval_prompts=toy-reflect:test",
              "rollout.max_new_tokens=128", "eval.max_new_tokens=128", "eval.n=4",
              "eval.limit=256", "eval_every=16", "iterations=64", "train.token_clip=0.0",
              "eval_before=true"):
        assert o in opd, o
    # Only the base condition evaluates the base student.
    for name in rep.CONDITIONS:
        if name != "opd":
            assert "eval_before=false" in rep.run_overrides("reflect", name)
            assert "eval_before=true" not in rep.run_overrides("reflect", name)
    opsd = rep.run_overrides("chain", "opsd-renio")
    assert "student=toy-chain:student" in opsd and not any(o.startswith("teacher=") for o in opsd)
    addition = rep.run_overrides("addition", "opd")
    assert not any(o.startswith(("student=", "prompts=", "rollout.max_new_tokens")) for o in addition)
    filtered = rep.run_overrides("reflect", "opd-incorrect-only")
    assert "weight.filter=incorrect" in filtered and "fill_filtered=true" in filtered
    assert "weight.tem=4" in rep.run_overrides("reflect", "opd-renio-tem4")
    assert rep.CONDITIONS["opd-renio-tem4"][0] == "toy-opd-renio.yaml"
    assert not any("token_clip=0.05" in o for n in rep.CONDITIONS
                   for o in rep.run_overrides("reflect", n))
    # A trial on a quick build points at its files, and its settings come last (they win).
    trial = rep.run_overrides("reflect", "opd", files=Path("/w"), trial=True)
    assert "student=/w/student" in trial and "eval_prompts=/w/test.jsonl" in trial
    assert trial[-len(rep.TRIAL):] == rep.TRIAL


def test_plan_runs_reflect_first_replicate_major_base_first(rep):
    tasks = rep.plan(["addition", "reflect", "chain"], [0, 1])
    assert tasks[:8] == [("reflect", n, 0) for n in rep.world_conditions("reflect")] + [
        ("reflect", "opd", 1)]
    worlds = [t[0] for t in tasks]
    assert worlds == ["reflect"] * 14 + ["chain"] * 8 + ["addition"] * 8
    assert all(tasks[i][1] == "opd" for i in (0, 7, 14, 18, 22, 26))
    assert rep.plan(["chain"], [3], ["opd", "opsd"]) == [("chain", "opd", 3), ("chain", "opsd", 3)]


def test_child_imports_renio_from_the_scripts_checkout(rep, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = rep.child_env(threads=3)
    assert env["PYTHONPATH"].split(":") == [str(ROOT), "/elsewhere"]
    assert env["OMP_NUM_THREADS"] == "3"


def test_chain_length_and_parse(rep):
    assert rep.chain_length("7+5*3+9") == 3
    assert rep.chain_length("1*3*7*9+1+2+3+4+5") == 8
    p = rep.parse_chain("7+5*3+9")
    assert (p.start, p.ops, p.answer) == (7, (("+", 5), ("*", 3), ("+", 9)), "5")  # 2, 6, 5


def test_markers_and_recovered_rows(rep):
    recovered = "3+4=8\nwait\n3+4=7\n7*3=1\n\\boxed{1}"
    assert rep.has_marker("reflect", recovered) and rep.is_recovered(recovered, True)
    assert not rep.is_recovered(recovered, False)  # a redo, but the answer is wrong
    carried_on = "3+4=8\n8*3=4\n\\boxed{4}"
    assert not rep.has_marker("reflect", carried_on) and not rep.is_recovered(carried_on, True)
    assert not rep.has_marker("chain", "await\nwaiting")  # a marker is a line of its own
    assert rep.has_marker("addition", "Wait, carry the one") and not rep.has_marker("addition", "12")


def test_batch_stats_by_hand(rep):
    # Weights 2, 1, 1, 0: incorrect row 0, recovered row 1, row 3 ungraded.
    b = rep.batch_stats(np.array([2.0, 1.0, 1.0, 0.0]), np.array([True, False, False, False]),
                        np.array([False, True, False, False]), np.array([True, True, True, False]))
    assert (b["incorrect"], b["recovered"], b["graded"]) == (2.0, 1.0, 4.0)
    assert b["ess"] == pytest.approx(16 / 6)  # (2+1+1)^2 / (4+1+1)
    assert (b["rows_incorrect"], b["rows_graded"]) == (1, 3)
    # Pooled over two iterations: weight 2 + 1 on incorrect rows of 4 + 2 graded.
    b2 = rep.batch_stats(np.array([1.0, 1.0]), np.array([True, False]), np.array([False, False]),
                         np.array([True, True]))
    pooled = rep.pool_batches([b, b2])
    assert pooled["share_incorrect"] == pytest.approx(3 / 6)
    assert pooled["share_recovered"] == pytest.approx(1 / 6)
    assert pooled["rows_incorrect"] == pytest.approx(2 / 5)
    assert pooled["ess"] == pytest.approx((16 / 6 + 2) / 2)


# ----------------------------------------------------------------------------- statistics


def test_paired_test_hand_computed(rep):
    # b - a = 0.05, 0.02, 0.10: mean 0.17/3; squared deviations sum to 0.0049/1.5, sd
    # sqrt(0.0032667 / 2) = 0.040415, se = sd / sqrt(3) = 0.023333, t = 2.42857. For 2 degrees
    # of freedom P(|T| > t) = 1 - t / sqrt(2 + t^2) = 0.13584; the 95% cut 4.303 (printed
    # tables) gives the interval 0.056667 -/+ 0.100396.
    r = rep.paired_test([0.50, 0.60, 0.70], [0.55, 0.62, 0.80])
    assert r["mean"] == pytest.approx(0.17 / 3)
    assert r["sd"] == pytest.approx(math.sqrt(0.0049 / 1.5 / 2))
    assert r["se"] == pytest.approx(0.0233333, abs=1e-6)
    assert r["t"] == pytest.approx(2.428571, abs=1e-5)
    assert r["df"] == 2 and not r["floor"]
    assert r["p"] == pytest.approx(1 - 2.428571 / math.sqrt(2 + 2.428571**2), abs=1e-5)
    assert r["ci"][0] == pytest.approx(0.056667 - 4.3027 * 0.0233333, abs=2e-5)
    assert r["ci"][1] == pytest.approx(0.056667 + 4.3027 * 0.0233333, abs=2e-5)


def test_holm_by_hand(rep):
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to
    # the running maximum 0.06. At 0.05 the step-down stops at the third: 0.04 is not
    # significant although it is below 0.05 alone.
    assert rep.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rep.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # capped by the running max
    assert rep.holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])
    assert rep.holm([0.6, 0.6, 0.6]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    # A floor (no p) counts as p = 1: the family stays four.
    assert rep.holm([0.01, float("nan")]) == pytest.approx([0.02, 1.0])


def verdict_of(rep, a, b, margin=0.015):
    t = rep.paired_test(a, b)
    return rep.verdict(t, t["p"], "B is better", "A is better", margin), t


def test_verdict_significant_either_way(rep):
    a = [0.40 + 0.01 * i for i in range(10)]
    up = [x + d for x, d in zip(a, [0.06, 0.04] * 5)]  # mean +5 pts, t = 15
    assert verdict_of(rep, a, up)[0] == "B is better"
    assert verdict_of(rep, up, a)[0] == "A is better"
    # A constant non-zero difference is certain, not a floor.
    v, t = verdict_of(rep, [i / 8 for i in range(10)], [i / 8 + 0.25 for i in range(10)])
    assert v == "B is better" and t["p"] == 0.0 and not t["floor"]


def test_verdict_no_benefit_only_below_the_margin(rep):
    a = [0.5] * 10
    # Differences +/-0.003: mean 0, sd 0.0031623, se 0.001; the interval 0 -/+ 2.262 x 0.001
    # ends at +0.23 points < +1.5: no benefit.
    v, t = verdict_of(rep, a, [0.5 + d for d in [0.003, -0.003] * 5])
    assert t["ci"][1] == pytest.approx(0.0022622, abs=1e-6) and v == "no benefit"
    # Differences +/-0.03: the interval ends at +2.26 points: inconclusive.
    v, t = verdict_of(rep, a, [0.5 + d for d in [0.03, -0.03] * 5])
    assert t["ci"][1] == pytest.approx(0.022622, abs=1e-5) and v == "inconclusive"
    # Mean +1 point, se 0.4 points, t = 2.5 (p = 0.034): significant alone ...
    b = [0.5 + d for d in [0.022, -0.002] * 5]
    v, t = verdict_of(rep, a, b)
    assert t["p"] == pytest.approx(t_two_sided_p(2.5, 9), rel=1e-6) and v == "B is better"
    # ... but not after a correction that triples its p; its interval ends at
    # 0.01 + 2.262 x 0.004 = +1.9 points, above the margin: inconclusive, not "no benefit".
    assert rep.verdict(t, 3 * t["p"], "B", "A", 0.015) == "inconclusive"
    assert t["ci"][1] == pytest.approx(0.01 + 2.2622 * 0.004, abs=1e-5)
    # Without a margin (a secondary measure in its own units) there is no "no benefit".
    assert rep.verdict(t, 3 * t["p"], "B", "A", None) == "no significant difference"


def test_verdict_floor_is_not_a_null(rep):
    zeros = [0.0] * 10
    v, t = verdict_of(rep, zeros, zeros)
    assert t["floor"] and math.isnan(t["p"]) and v == "not measurable (floor)"
    # Both at the same constant: zero mean, zero variance of the differences.
    assert verdict_of(rep, [0.3] * 10, [0.3] * 10)[0] == "not measurable (floor)"


def test_ceiling_is_not_a_null(rep):
    # Baseline at 99% (less than 1.5 points of room above it), differences +/-0.003: without
    # the ceiling rule this is "no benefit" (see above); here no benefit of the margin's size
    # could have shown up.
    a = [0.99] * 10
    b = [0.99 + d for d in [0.003, -0.003] * 5]
    assert rep.at_ceiling("acc", a) and not rep.at_ceiling("acc", [0.98] * 10)
    assert not rep.at_ceiling("marker_share", a)
    t = rep.paired_test(a, b)
    assert rep.verdict(t, t["p"], "B", "A", 0.015, ceiling=True) == "not measurable (ceiling)"
    # A significant difference at the ceiling still counts.
    up = [0.985 + d for d in [0.0121, 0.0119] * 5]
    t = rep.paired_test(a, up)
    assert t["p"] < 1e-6 and rep.verdict(t, t["p"], "B", "A", 0.015, ceiling=True) == "B"


def test_primary_and_early_tests_at_the_ceiling(rep):
    results = synthetic_results()
    runs = results["reflect"]["runs"]
    # (c-opsd) at the end: baseline 99.0%, differences +/-0.3 points. At iteration 16 both
    # conditions were at 60%, with differences of +/-3 points.
    runs["opsd"] = [_run(0.99) for _ in range(10)]
    runs["opsd-renio"] = [_run(0.99 + d) for d in [0.003, -0.003] * 5]
    for r, d in zip(runs["opsd-renio"], [0.03, -0.03] * 5):
        r["acc"][0] = 0.60 + d
    for r in runs["opsd"]:
        r["acc"][0] = 0.60
    entry = rep.analyse(results)["reflect"]
    tests = {t["key"]: t for t in entry["primary"]}
    assert tests["c-opsd"]["verdict"] == "not measurable (ceiling)"
    assert tests["c-opsd"]["p_holm"] == 1.0  # its p (= 1) stays in the family
    early = {t["key"]: t for t in entry["early"]}
    assert set(early) == {"a", "c-opd", "c-opsd"}  # accuracy tests only
    assert early["c-opsd"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert early["c-opsd"]["ci"][1] == pytest.approx(0.022622, abs=1e-5)
    assert early["c-opsd"]["verdict"] == "inconclusive"
    text = "\n".join(rep.primary_section(rep.analyse(results)))
    assert "| not measurable (ceiling) |" in text and "first evaluation (iteration 16)" in text


# ----------------------------------------------------------------------------- reuse


def _write_run(rep, run_dir: Path, stamp: dict, *, finished: bool) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / rep.STAMP).write_text(json.dumps(stamp))
    (run_dir / "metrics.jsonl").write_text("")
    if finished:
        (run_dir / "eval-final.json").write_text("{}")


def test_reuse_only_with_matching_config_and_code(rep, tmp_path):
    digest = rep.code_digest()
    stamp = rep.run_stamp("reflect", "opd", 0, digest, "abc")
    assert rep.reuse_decision(tmp_path / "absent", stamp) == "run"

    same = tmp_path / "same"
    _write_run(rep, same, stamp, finished=True)
    assert rep.reuse_decision(same, stamp) == "reuse"
    # The commit is provenance, not part of the rule: the same code at another commit (a
    # docs change) reuses the run.
    assert rep.reuse_decision(same, {**stamp, "commit": "def"}) == "reuse"

    unfinished = tmp_path / "unfinished"
    _write_run(rep, unfinished, stamp, finished=False)
    assert rep.reuse_decision(unfinished, stamp) == "run"  # renio run resumes it
    assert unfinished.exists()

    old_code = tmp_path / "old-code"
    _write_run(rep, old_code, {**stamp, "code_digest": "0123456789abcdef"}, finished=True)
    with pytest.raises(rep.StaleRun, match="code_digest: on disk '0123456789abcdef'"):
        rep.reuse_decision(old_code, stamp)

    other_config = tmp_path / "other-config"
    _write_run(rep, other_config, {**stamp, "overrides": ["eval_every=2"]}, finished=True)
    with pytest.raises(rep.StaleRun, match="overrides"):
        rep.reuse_decision(other_config, stamp)
    assert rep.reuse_decision(other_config, stamp, rerun_stale=True) == "run"
    assert not other_config.exists()  # deleted, to be rerun from scratch

    unstamped = tmp_path / "unstamped"
    unstamped.mkdir()
    (unstamped / "eval-final.json").write_text("{}")
    (unstamped / "metrics.jsonl").write_text("")
    with pytest.raises(rep.StaleRun, match=r"no \.replicate-stamp\.json"):
        rep.reuse_decision(unstamped, stamp)


def test_records_stand_for_finished_runs_across_machines(rep, tmp_path):
    digest = rep.code_digest()
    stamps = {n: rep.run_stamp("reflect", n, 3, digest, "abc") for n in ("opd", "opd-renio")}
    records = tmp_path / "records"
    out = tmp_path / "runs"  # no run directory at all: another machine ran them
    paths = {n: rep.record_path(records, "reflect", n, 3) for n in stamps}
    assert paths["opd"] == records / "reflect" / "opd" / "rep3.json.gz"
    rep.write_record(paths["opd"], stamps["opd"], {"final": {"acc": 0.5}}, {"acc": 0.25})
    first = paths["opd"].read_bytes()
    rep.write_record(paths["opd"], stamps["opd"], {"final": {"acc": 0.5}}, {"acc": 0.25})
    assert paths["opd"].read_bytes() == first  # the same numbers, the same bytes
    got = rep.read_record(paths["opd"], {**stamps["opd"], "commit": "def"})
    assert got["run"] == {"final": {"acc": 0.5}} and got["base"] == {"acc": 0.25}
    # Another code version or config: the record does not count.
    assert rep.read_record(paths["opd"], {**stamps["opd"], "code_digest": "0" * 16}) is None
    assert rep.read_record(paths["opd-renio"], stamps["opd-renio"]) is None  # absent
    run_dir = rep.run_dir_of(out, "reflect", "opd", 3)
    assert rep.run_state(run_dir, stamps["opd"], paths["opd"]) == ("recorded", [])
    assert rep.reuse_decision(run_dir, stamps["opd"], record=paths["opd"]) == "reuse"
    assert rep.reuse_decision(run_dir, stamps["opd"]) == "run"  # without the records
    # A replicate is complete once every condition is recorded; the numbers come from them.
    conditions = ("opd", "opd-renio")
    args = dict(files=None, trial=False, markers=False, records=records)
    assert rep.collect(out, "reflect", conditions, [3], digest, "abc", **args)["replicates"] == []
    rep.write_record(paths["opd-renio"], stamps["opd-renio"], {"final": {"acc": 0.75}}, None)
    got = rep.collect(out, "reflect", conditions, [3], digest, "abc", **args)
    assert got["replicates"] == [3] and got["base"] == [{"acc": 0.25}]
    assert got["runs"] == {"opd": [{"final": {"acc": 0.5}}], "opd-renio": [{"final": {"acc": 0.75}}]}
    assert got["commits"] == ["abc"]
    # A finished run directory of an incomplete replicate still gets its record.
    finished = rep.run_dir_of(out, "reflect", "opd-renio", 4)
    _write_run(rep, finished, rep.run_stamp("reflect", "opd-renio", 4, digest, "abc"),
               finished=True)
    assert not rep.record_path(records, "reflect", "opd-renio", 4).exists()
    with pytest.raises((TypeError, AttributeError, FileNotFoundError)):  # collected: a stub
        rep.collect(out, "reflect", conditions, [4], digest, "abc", **args)


def test_a_world_whose_runs_are_all_recorded_needs_no_build(rep, tmp_path):
    records = tmp_path / "records"
    old, new = "a" * 16, "b" * 16
    for r in (0, 1):
        for name in rep.world_conditions("chain"):
            rep.write_record(rep.record_path(records, "chain", name, r),
                             rep.run_stamp("chain", name, r, old, "c1"), {}, None)
    assert rep.all_recorded(records, "chain", [0, 1], old, "c2")
    assert not rep.all_recorded(records, "chain", [0, 1, 2], old, "c2")  # replicate 2 missing
    assert not rep.all_recorded(records, "reflect", [0, 1], old, "c2")
    assert not rep.all_recorded(records, "chain", [0, 1], new, "c2")  # other code, unchecked
    rep.add_verified(records, "chain", new, old, "c2", [("chain", "opd", 0)])
    assert rep.all_recorded(records, "chain", [0, 1], new, "c2")
    rep.record_path(records, "chain", "opsd", 1).unlink()
    assert not rep.all_recorded(records, "chain", [0, 1], new, "c2")


def test_a_world_build_logs_the_start_and_end_of_each_phase(rep, capsys):
    log = rep.BuildLog("reflect")
    for step in range(1, 101):
        log("train reflect student", step, 100)
    log("measure reflect world", 1, 1)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(";")[0] for ln in lines] == [
        "building the reflect world: train reflect student (100 steps) started",
        "building the reflect world: train reflect student (100 steps) done",
        "building the reflect world: measure reflect world (1 step) done"]


def test_records_of_older_code_count_once_the_current_code_remade_them(rep, tmp_path):
    records = tmp_path / "records"
    old, mid, new = "a" * 16, "b" * 16, "c" * 16
    for world, name, r in (("reflect", "opd", 0), ("reflect", "opd", 1), ("reflect", "opsd", 2),
                           ("chain", "opd", 0)):
        rep.write_record(rep.record_path(records, world, name, r),
                         rep.run_stamp(world, name, r, old, "c1"), {"final": {"acc": 0.5}}, None)
    path = rep.record_path(records, "reflect", "opd", 1)
    now = rep.run_stamp("reflect", "opd", 1, new, "c3")
    assert rep.read_record(path, now) is None  # other code, not checked
    # The plan: each condition's lowest replicate made by unchecked code, per world.
    assert rep.verification_plan(records, "reflect", new) == {
        old: [("reflect", "opd", 0), ("reflect", "opsd", 2)]}
    # mid remade old's reflect runs, new remade mid's: old's reflect records count for new.
    rep.add_verified(records, "reflect", mid, old, "c2", [("reflect", "opd", 0)])
    assert rep.read_record(path, now) is None
    rep.add_verified(records, "reflect", new, mid, "c3", [("reflect", "opd", 0)])
    assert rep.verified_digests(records, new, "reflect") == {new, mid, old}
    assert rep.read_record(path, now)["run"] == {"final": {"acc": 0.5}}
    assert rep.verification_plan(records, "reflect", new) == {}
    # A check holds for its own world only; and never for another config.
    assert rep.verified_digests(records, new, "chain") == {new}
    assert rep.read_record(rep.record_path(records, "chain", "opd", 0),
                           rep.run_stamp("chain", "opd", 0, new, "c3")) is None
    assert rep.read_record(path, {**now, "seed": 7}) is None


def test_reproduction_differences_name_every_number_but_wall_time(rep):
    recorded = {"run": {"acc": [0.5, 0.75], "seconds": 61.0, "final": {"acc": 0.75,
                        "p": float("nan")}}, "base": None}
    same = {"run": {"acc": [0.5, 0.75], "seconds": 99.0, "final": {"acc": 0.75,
                    "p": float("nan")}}, "base": None}
    assert rep.reproduction_differences(recorded, same) == []
    off = {"run": {"acc": [0.5, 0.75 + 2 ** -40], "seconds": 61.0,
                   "final": {"acc": 0.75, "p": float("nan"), "extra": 1}}, "base": None}
    assert rep.reproduction_differences(recorded, off) == [
        f"run.acc[1]: recorded 0.75, remade {0.75 + 2 ** -40!r}", "run.final.extra: only in the rerun"]
    assert rep.reproduction_differences({"x": [1, 2]}, {"x": [1]}) == [
        "x: 2 values recorded, 1 remade"]


def test_stamp_tracks_seed_config_and_code(rep):
    a = rep.run_stamp("reflect", "opd", 0, "d", "c")
    assert rep.run_stamp("reflect", "opd", 1, "d", "c")["seed"] != a["seed"]
    assert rep.run_stamp("reflect", "opd-renio", 0, "d", "c")["config_text"] != a["config_text"]
    assert rep.run_stamp("reflect", "opd-correct-only", 0, "d", "c")["overrides"] != a["overrides"]
    assert rep.run_stamp("chain", "opd", 0, "d", "c")["overrides"] != a["overrides"]
    assert rep.stamp_differences(a, rep.run_stamp("reflect", "opd", 0, "e", "c")) == [
        "code_digest: on disk 'd', now 'e'"]


def test_code_digest_follows_the_code_not_other_config_files(rep, tmp_path):
    (tmp_path / "renio_core").mkdir()
    (tmp_path / "renio_cli").mkdir()
    (tmp_path / "sample_configs").mkdir()
    (tmp_path / "renio_core" / "a.py").write_text("x = 1\n")
    before = rep.code_digest(tmp_path)
    (tmp_path / "sample_configs" / "new-recipe.yaml").write_text("iterations: 2\n")
    assert rep.code_digest(tmp_path) == before
    (tmp_path / "renio_core" / "a.py").write_text("x = 2\n")
    assert rep.code_digest(tmp_path) != before


def test_git_commit_and_dirty_code(rep, tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    assert rep.git_commit(tmp_path) == "unknown"
    git("init", "-q")
    (tmp_path / "renio_core").mkdir()
    (tmp_path / "renio_core" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert rep.git_commit(tmp_path) == head
    (tmp_path / "notes.md").write_text("b\n")  # not code: still clean
    assert rep.git_commit(tmp_path) == head
    (tmp_path / "renio_cli").mkdir()
    (tmp_path / "renio_cli" / "new.py").write_text("")  # untracked code counts
    assert rep.git_commit(tmp_path) == head + "+dirty"


def test_progress_line_estimates_the_time_left(rep):
    p = rep.Progress(total=5, jobs=2)
    first = p.line(("reflect", "opd", 0), "reused", 0.0)
    assert first.startswith("[  1/5]") and "reused" in first and "no estimate yet" in first
    # One run of 120 s done; 3 left at 2 at a time: 3 x 120 / 2 = 180 s.
    line = p.line(("reflect", "opd-renio", 0), "ran", 120.0)
    assert line.startswith("[  2/5]") and "120 s" in line and "about 3 min left" in line


# ----------------------------------------------------------------------------- report


def _run(acc, *, marker=0.0, share=0.5, p_wait=(0.2, 0.01)):
    return {"steps": [16, 32, 48, 64], "acc": [acc] * 4, "acc_se": [0.02] * 4,
            "final": {"acc": acc, "acc_se": 0.02, "length": 30.0, "marker_share": marker,
                      "problems": 256, "by_k": {"3": 0.6, "8": 0.3},
                      "p_wait_wrong": p_wait[0], "p_wait_right": p_wait[1]},
            "raw": [1.0, 2.0, 1.5], "weight": [0.8, 1.3, 0.9],
            "kind": ["correct", "incorrect", "recovered"],
            "batch": {"share_incorrect": share, "share_recovered": 0.05, "rows_incorrect": share,
                      "ess": 30.0},
            "rollout_reflection": [0.1, 0.1, 0.2, 0.2], "rollout_acc": [0.5] * 4,
            "sampled_per_kept": 1.0, "seconds": 60.0}


def _base():
    return {"acc": 0.40, "acc_se": 0.02, "length": 31.0, "marker_share": 0.0, "problems": 256,
            "by_k": {"3": 0.55, "8": 0.25}, "p_wait_wrong": 0.2, "p_wait_right": 0.01}


E = [0.01, -0.01] * 5


def synthetic_results():
    reps = list(range(10))
    reflect = {
        # (a) +5 pts, t = 15: significant. (b) every marker share 0: a floor. (c-opd) +1 pt,
        # t = 2.5, p = 0.034, Holm x 3: inconclusive. (c-opsd) mean 0, interval +/-0.23 pts:
        # no benefit.
        "opd-correct-only": [_run(0.40) for _ in reps],
        "opd-incorrect-only": [_run(0.45 + e) for e in E],
        "opd": [_run(0.40, share=0.6) for _ in reps],
        "opd-renio": [_run(0.40 + d, share=0.7) for d in [0.022, -0.002] * 5],
        "opsd": [_run(0.50) for _ in reps],
        "opsd-renio": [_run(0.50 + d) for d in [0.003, -0.003] * 5],
        # Mixing at s = 0.8 with f0 = 0.6: 0.40 + (0.2 / 0.4)(0.45 + e - 0.40) = 0.425 + e/2.
        "opd-renio-tem4": [_run(0.46, share=0.8) for _ in reps],
    }
    chain = {n: [_run(0.5) for _ in range(3)] for n in ("opd", "opd-renio", "opsd", "opsd-renio")}
    return {"reflect": {"replicates": reps, "base": [_base() for _ in reps], "runs": reflect,
                        "commits": ["abc123"]},
            "chain": {"replicates": [0, 1, 2], "base": [_base() for _ in range(3)], "runs": chain,
                      "commits": ["abc123"]}}


RUN = {"commit": "abc123", "code_digest": "feedfacefeedface", "wall_s": 5400.0, "cpus": 2,
       "jobs": 2, "required": 10, "trial": False}


def test_analysis_primary_tests_with_holm(rep):
    analysis = rep.analyse(synthetic_results())
    assert analysis["chain"] == {"n": 3, "complete": False}
    tests = {t["key"]: t for t in analysis["reflect"]["primary"]}
    p_a = t_two_sided_p(0.05 / (math.sqrt(10 * 1e-4 / 9) / math.sqrt(10)), 9)
    p_c = t_two_sided_p(2.5, 9)
    assert tests["a"]["p"] == pytest.approx(p_a, rel=1e-5)
    assert tests["c-opd"]["p"] == pytest.approx(p_c, rel=1e-6)
    # Holm by hand: order a, c-opd, c-opsd (p = 1), b (floor, p = 1).
    assert tests["a"]["p_holm"] == pytest.approx(4 * p_a, rel=1e-5)
    assert tests["c-opd"]["p_holm"] == pytest.approx(3 * p_c, rel=1e-6)
    assert tests["c-opsd"]["p_holm"] == tests["b"]["p_holm"] == 1.0
    assert [tests[k]["verdict"] for k in ("a", "b", "c-opd", "c-opsd")] == [
        "incorrect-only is better", "not measurable (floor)", "inconclusive", "no benefit"]
    mix = analysis["reflect"]["mixing"]["opd-renio-tem4"]
    assert np.mean(mix["predicted"]) == pytest.approx(0.425)
    assert mix["test"]["mean"] == pytest.approx(0.035)


def test_incomplete_world_gets_no_verdict(rep):
    results = synthetic_results()
    for runs in results["reflect"]["runs"].values():
        del runs[9]
    results["reflect"]["replicates"].pop()
    results["reflect"]["base"].pop()
    analysis = rep.analyse(results)
    assert analysis["reflect"] == {"n": 9, "complete": False}
    text = "\n".join(rep.primary_section(analysis))
    assert "incomplete: 9 of 10 replicates; no verdict." in text and "| (a) |" not in text


def test_report_text(rep, tmp_path):
    results = synthetic_results()
    analysis = rep.analyse(results)
    text = rep.write_report(tmp_path, RUN, results, analysis)
    assert (tmp_path / "replication.md").read_text() == text
    assert "commit abc123 (renio_core + renio_cli digest feedfacefeedface)" in text
    # 7 x 10 reflect runs and 4 x 3 chain runs of 60 s each: 82 min; one of them 40 min
    # longer (made on a shared machine) adds to the sum, not to the fastest-run figure.
    assert "82 runs whose own times sum to 1.4 h" in text and "verified.json" not in text
    assert "gives 1.4 h, 0.7 h of wall time at 2 runs at a time on a 2-core machine" in text
    results["reflect"]["runs"]["opd"][3]["seconds"] += 2400.0
    text = rep.write_report(tmp_path, RUN, results, analysis)
    assert "sum to 2.0 h" in text and "gives 1.4 h, 0.7 h" in text
    results["chain"]["commits"] = ["abc123", "def456"]
    text = rep.write_report(tmp_path, RUN, results, analysis)
    assert "the runs were made at abc123, def456, and where that was other code" in text
    rows = {}
    for ln in text.splitlines():  # the primary table comes before the iteration-16 one
        if ln.startswith("| ("):
            rows.setdefault(ln.split("|")[1].strip(), ln)
    p_a = t_two_sided_p(0.05 / (math.sqrt(10 * 1e-4 / 9) / math.sqrt(10)), 9)
    assert "accuracy: opd-incorrect-only - opd-correct-only | +5.0 pts | [+4.2 pts, +5.8 pts]" \
        in rows["(a)"]  # 0.05 -/+ 2.262 x 0.003333
    assert rows["(a)"].endswith(f"| {4 * p_a:.1e} | incorrect-only is better |")
    assert "completions with a marker" in rows["(b)"] and rows["(b)"].endswith(
        "| not measurable (floor) |")
    p_c = t_two_sided_p(2.5, 9)
    assert rows["(c-opd)"].endswith(f"| {p_c:.4f} | {3 * p_c:.4f} | inconclusive |")
    assert "[+0.1 pts, +1.9 pts]" in rows["(c-opd)"]
    assert rows["(c-opsd)"].endswith("| 1.0000 | 1.0000 | no benefit |")
    assert "| opd-correct-only | 40.0% | 30.0 | 0 (floor) |" in text
    assert "## The chain world\n\nincomplete: 3 of 10 replicates; no verdict." in text
    # The batch: plain OPD's incorrect share, ReNIO's, and the mixing prediction by hand.
    assert "| opd | 60.0% ± 0.0% | 60.0% ± 0.0% | 5.0% ± 0.0% | 30.0 |" in text
    assert ("opd-renio-tem4's incorrect weight share: predicted 42.5%, observed 46.0%; "
            "observed - predicted +3.5 pts (95% CI [+3.1, +3.9]") in text
    assert "Secondary paired tests (uncorrected p; not part of the primary family)" in text
    assert "| K=3 | K=8 |" in text and "| iteration 1 |" in text
    # The primary tests are not repeated, uncorrected, among the secondary ones, and only the
    # OPD runs are compared with the OPD / incorrect-only mixture.
    assert "\n| accuracy: opd-renio - opd |" not in text
    assert "| P(wait \\| wrong line): opd-incorrect-only - opd-correct-only |" in text
    assert "opsd-renio against plain OPD mixed" not in text


def test_old_worlds_get_the_secondary_accuracy_tests(rep, tmp_path):
    results = synthetic_results()
    chain = {"opd": [_run(0.5) for _ in E], "opd-renio": [_run(0.5 + e) for e in E],
             "opsd": [_run(0.6) for _ in E], "opsd-renio": [_run(0.6) for _ in E]}
    results["chain"] = {"replicates": list(range(10)), "base": [_base() for _ in E],
                        "runs": chain, "commits": ["abc123"]}
    analysis = rep.analyse(results)
    assert "primary" not in analysis["chain"] and analysis["chain"]["mixing"] == {}
    tests = {(t["metric"], t["treatment"]): t for t in analysis["chain"]["secondary"]}
    # +/-1 point around 0: interval 0 -/+ 2.262 x 0.003333 = +/-0.75 points: no benefit.
    assert tests[("acc", "opd-renio")]["verdict"] == "no benefit"
    assert tests[("acc", "opd-renio")]["ci"][1] == pytest.approx(0.0075405, abs=1e-6)
    assert tests[("acc", "opsd-renio")]["verdict"] == "not measurable (floor)"
    assert ("acc", "opd-renio-tem4") not in tests  # the ablation is the reflect world's
    text = rep.write_report(tmp_path, RUN, results, analysis)
    chain_part = text.split("## The chain world")[1]
    assert "(uncorrected p; this world cannot test the paper's premise)" in chain_part
    assert "| accuracy: opd-renio - opd | +0.0 pts | [-0.8 pts, +0.8 pts] | 10 | 1.0000 | " \
        "no benefit |" in chain_part


def test_plots_from_a_results_dict(rep, tmp_path):
    results = synthetic_results()
    rep.plot(tmp_path, results, rep.analyse(results))
    for name in ("accuracy", "weights", "by-k", "reflection"):
        assert (tmp_path / f"replication-{name}.png").stat().st_size > 1000
