"""experiments/replicate.py: its statistics (paired t test, exact t quantile) and the rule that
a run directory is reused only when its config and code version match."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "experiments" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("df,table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262),
                                      (29, 2.045)])
def test_t_quantile_matches_printed_tables(rep, df, table):
    # Two-sided 95% critical values of Student's t, from any printed table.
    assert rep.t_quantile(df) == pytest.approx(table, abs=5e-4)


def test_paired_test_hand_computed(rep):
    # b - a = 0.05, 0.02, 0.10: mean 0.17/3; squared deviations sum to 0.0049/1.5 = 0.0032667,
    # std = sqrt(0.0032667 / 2) = 0.040415, se = std / sqrt(3) = 0.023333, t = 2.42857.
    # For 2 degrees of freedom P(|T| > t) = 1 - t / sqrt(2 + t^2) = 0.13584; cut 4.303.
    r = rep.paired_test([0.50, 0.60, 0.70], [0.55, 0.62, 0.80], better="b", worse="w")
    assert r["mean"] == pytest.approx(0.17 / 3)
    assert r["std"] == pytest.approx(math.sqrt(0.0049 / 1.5 / 2))
    assert r["se"] == pytest.approx(0.0233333, abs=1e-6)
    assert r["t"] == pytest.approx(2.428571, abs=1e-5)
    assert r["df"] == 2
    assert r["p"] == pytest.approx(1 - 2.428571 / math.sqrt(2 + 2.428571**2), abs=1e-5)
    assert r["verdict"] == "within the noise"  # 2.43 < 4.30, although it is > 2 se


def test_paired_test_verdicts(rep):
    # "ReNIO hurts" does not hold here: t = -2.13 with 5 seeds is not significant (cut 2.776).
    a = [0.90, 0.88, 0.91, 0.89, 0.92]
    b = [0.80, 0.88, 0.85, 0.89, 0.82]  # diffs -0.10, 0, -0.06, 0, -0.10
    r = rep.paired_test(a, b, better="helps", worse="hurts")
    assert -2.776 < r["t"] < -2.0 and r["verdict"] == "within the noise"
    b2 = [0.80, 0.79, 0.80, 0.78, 0.83]  # diffs all about -0.1: t far below -2.776
    assert rep.paired_test(a, b2, better="helps", worse="hurts")["verdict"] == "hurts"
    assert rep.paired_test(b2, a, better="helps", worse="hurts")["verdict"] == "helps"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_seeds_is_undetermined(rep, n):
    r = rep.paired_test([0.5] * n, [0.9] * n, better="helps", worse="hurts")
    assert r["verdict"].startswith("undetermined")
    assert "undetermined" in rep.describe_test(r)


def test_run_seeds_never_collide(rep):
    # No seed that one run derives (rollout rows, torch and numpy generators) is used by any
    # other run, with torch's 32-bit truncation taken into account.
    owner: dict[tuple, tuple] = {}
    for world in rep.WORLDS:
        for name in rep.CONDITIONS:
            for replicate in range(20):
                run = (world, name, replicate)
                for key in rep.derived_seeds(rep.run_seed(*run), iterations=64):
                    assert owner.setdefault(key, run) == run, (key, run, owner[key])


def test_run_overrides_per_world(rep):
    # The chain world swaps models and prompts; OPSD keeps its own teacher (itself).
    chain_opd = rep.run_overrides("chain", "opd")
    assert "student=toy-chain:student" in chain_opd and "teacher=toy-chain:teacher" in chain_opd
    assert "prompts=toy-chain:train" in chain_opd
    assert not any(o.startswith("teacher=") for o in rep.run_overrides("chain", "opsd-renio"))
    assert "student=toy-chain:student" in rep.run_overrides("chain", "opsd-renio")
    assert not any("toy-chain" in o for o in rep.run_overrides("addition", "opd"))
    filtered = rep.run_overrides("addition", "opd-incorrect-only")
    assert "weight.filter=incorrect" in filtered and "fill_filtered=true" in filtered
    assert "train.token_clip=0.05" in rep.run_overrides("chain", "opd-renio-tclip0.05")


def test_chain_length(rep):
    assert rep.chain_length("7+5*3+9") == 3
    assert rep.chain_length("1*3*7*9+1+2+3+4+5") == 8


def _write_run(rep, run_dir: Path, stamp: dict, *, finished: bool) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / rep.STAMP).write_text(json.dumps(stamp))
    (run_dir / "metrics.jsonl").write_text("")
    if finished:
        (run_dir / "eval-final.json").write_text("{}")


def test_reuse_only_with_matching_config_and_code(rep, tmp_path):
    code = rep.code_version()
    stamp = rep.run_stamp("addition", "opd", 0, code)
    assert rep.reuse_decision(tmp_path / "absent", stamp) == "run"

    same = tmp_path / "same"
    _write_run(rep, same, stamp, finished=True)
    assert rep.reuse_decision(same, stamp) == "reuse"

    unfinished = tmp_path / "unfinished"
    _write_run(rep, unfinished, stamp, finished=False)
    assert rep.reuse_decision(unfinished, stamp) == "run"  # renio run resumes it

    old_code = tmp_path / "old-code"
    _write_run(rep, old_code, {**stamp, "code_version": "0123456789abcdef"}, finished=True)
    with pytest.raises(rep.StaleRun, match="code_version: on disk '0123456789abcdef'"):
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
    with pytest.raises(rep.StaleRun, match="no replicate-stamp.json"):
        rep.reuse_decision(unstamped, stamp)


def test_stamp_tracks_seed_config_and_code(rep, tmp_path):
    code = rep.code_version()
    a = rep.run_stamp("addition", "opd", 0, code)
    assert rep.run_stamp("addition", "opd", 1, code)["seed"] != a["seed"]
    assert rep.run_stamp("chain", "opd", 0, code)["seed"] != a["seed"]
    assert rep.run_stamp("chain", "opd", 0, code)["overrides"] != a["overrides"]
    assert rep.run_stamp("addition", "opd-correct-only", 0, code)["overrides"] != a["overrides"]
    # The code version changes when a file under renio_core changes.
    assert len(code) == 16 and code == rep.code_version()


def test_code_version_follows_the_code_not_other_config_files(rep, tmp_path, monkeypatch):
    (tmp_path / "renio_core").mkdir()
    (tmp_path / "renio_cli").mkdir()
    (tmp_path / "sample_configs").mkdir()
    (tmp_path / "renio_core" / "a.py").write_text("x = 1\n")
    (tmp_path / "sample_configs" / "toy-opd.yaml").write_text("iterations: 64\n")
    monkeypatch.setattr(rep, "ROOT", tmp_path)
    before = rep.code_version()
    (tmp_path / "sample_configs" / "new-recipe.yaml").write_text("iterations: 2\n")
    assert rep.code_version() == before
    (tmp_path / "renio_core" / "a.py").write_text("x = 2\n")
    assert rep.code_version() != before


def test_parse_chain_round_trips(rep):
    p = rep.parse_chain("7+5*3+9")
    assert (p.start, p.ops, p.answer) == (7, (("+", 5), ("*", 3), ("+", 9)), "5")  # 2, 6, 5
    assert p.problem == "7+5*3+9" and p.k == rep.chain_length("7+5*3+9")


def _runs(finals):
    return [{"final": {"acc": v}} for v in finals]


def test_more_replicates_only_where_the_standard_error_exceeds_the_effect(rep):
    # opd-renio - opd: diffs -0.04, -0.03, -0.05 -> mean -0.04, se 0.00577: effect larger.
    # opsd-renio - opsd: diffs +0.01, -0.02, +0.02 -> mean 0.00333, se 0.0120: more needed.
    results = {"addition": {
        "opd": _runs([0.90, 0.91, 0.92]), "opd-renio": _runs([0.86, 0.88, 0.87]),
        "opsd": _runs([0.80, 0.82, 0.84]), "opsd-renio": _runs([0.81, 0.80, 0.86]),
    }}
    assert rep.pairs_needing_more(results) == [("addition", "opsd", "opsd-renio")]
    # Pairs are compared over the replicates both conditions have.
    results["addition"]["opsd"] += _runs([0.5, 0.5])
    a, b = rep.paired_finals(results["addition"], "opsd", "opsd-renio")
    assert len(a) == len(b) == 3
    # Fewer than MIN_SEEDS pairs never ask for more: the verdict is undetermined anyway.
    assert rep.pairs_needing_more({"chain": {"opd": _runs([0.5, 0.6]),
                                             "opd-renio": _runs([0.6, 0.5])}}) == []
