"""Eval metrics against hand-worked numbers and independent brute-force formulas."""

from __future__ import annotations

import itertools
import math

import pytest

from renio_core.formulas.eval_metrics import (
    EPISTEMIC_MARKERS,
    MARKERS,
    REFLECTION_MARKERS,
    avg_at_n,
    behaviour,
    count_markers,
    mean_pass_at_k,
    pass_at_k,
    summarize,
)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 2 / 5),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 3, 1 - 35 / 120),  # 1 - C(7,3)/C(10,3)
        (4, 1, 4, 1.0),  # any 4 of 4 include the correct one
        (4, 0, 2, 0.0),
        (16, 16, 1, 1.0),
        (3, 1, 2, 1 - 1 / 3),  # subsets of 2 from {c,w,w}: only {w,w} misses
    ],
)
def test_pass_at_k_hand_worked(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_subset_enumeration() -> None:
    # Independent definition: the share of k-subsets of the n samples holding a correct one.
    for n in range(1, 8):
        for c in range(0, n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12)


def test_pass_at_1_is_fraction_correct_and_large_n_is_stable() -> None:
    assert pass_at_k(1000, 137, 1) == pytest.approx(0.137)
    v = pass_at_k(1000, 3, 500)
    exact = 1 - math.comb(997, 500) / math.comb(1000, 500)
    assert v == pytest.approx(exact, rel=1e-9)


def test_pass_at_k_bad_arguments() -> None:
    for args in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_mean_pass_at_k() -> None:
    assert mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def test_avg_at_n_and_standard_error() -> None:
    mean, se = avg_at_n([1.0, 0.5, 0.0])
    # deviations 0.5, 0, -0.5 -> sample variance 0.5/2 = 0.25 -> sd 0.5 -> se 0.5/sqrt(3)
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(0.5 / math.sqrt(3))
    mean, se = avg_at_n([0.25, 0.25])
    assert (mean, se) == (0.25, 0.0)
    mean, se = avg_at_n([0.75])
    assert mean == 0.75 and math.isnan(se)


def test_count_markers_whole_words_case_insensitive() -> None:
    text = "Wait, but hmm... Let me  check.\nBut the button waits. Alternatively maybe; I THINK so."
    c = count_markers(text)
    assert c["wait"] == 1  # "waits" is another word
    assert c["but"] == 2  # "button" does not count
    assert c["hmm"] == 1
    assert c["let me check"] == 1  # spacing inside the phrase is free
    assert c["alternatively"] == 1
    assert c["maybe"] == 1
    assert c["i think"] == 1
    assert sum(c.values()) == 8
    assert set(c) == set(MARKERS)
    assert count_markers("") == {m: 0 for m in MARKERS}


def test_no_marker_contains_another() -> None:
    for a in MARKERS:
        for b in MARKERS:
            if a != b:
                assert f" {b} " not in f" {a} ", (a, b)


def test_behaviour_rates_per_1k() -> None:
    texts = ["wait wait but", "maybe"]  # 3 reflection hits, 1 epistemic
    b = behaviour(texts, [100, 300], [False, True])
    assert b["samples"] == 2
    assert b["mean_length"] == 200.0
    assert b["truncated_share"] == 0.5
    assert b["reflection_per_1k"] == pytest.approx(1000 * 3 / 400)
    assert b["epistemic_per_1k"] == pytest.approx(1000 * 1 / 400)
    assert b["markers_per_1k"]["wait"] == pytest.approx(5.0)
    assert "wait" in REFLECTION_MARKERS and "maybe" in EPISTEMIC_MARKERS


def test_behaviour_empty_and_zero_tokens() -> None:
    assert behaviour([], [], [])["mean_length"] is None
    assert behaviour([""], [0], [False])["reflection_per_1k"] is None


def test_summarize_hand_worked() -> None:
    # problem a: 2 of 4 correct; problem b: 0 of 4; one ungraded row is ignored for accuracy.
    pids = ["a"] * 4 + ["b"] * 4 + ["c"]
    correct = [True, True, False, False, False, False, False, False, None]
    texts = ["wait"] * 2 + ["hmm hmm"] * 6 + ["x"]
    lengths = [10, 10, 20, 20, 20, 20, 20, 20, 5]
    truncated = [False, False, False, True, True, True, True, True, False]
    s = summarize(pids, correct, texts, lengths, truncated)
    assert s["samples"] == 9 and s["graded_samples"] == 8 and s["problems"] == 2
    assert s["n"] == 4
    assert s["avg_at_n"] == pytest.approx(0.25)
    # per-problem fractions 0.5 and 0: sd = sqrt(0.125) , se = sd / sqrt(2) = 0.25
    assert s["avg_at_n_se"] == pytest.approx(0.25)
    # pass@1 = mean(0.5, 0); pass@4 = mean(1, 0)
    assert s["pass_at_k"] == {"1": pytest.approx(0.25), "4": pytest.approx(0.5)}
    assert s["correct"]["samples"] == 2 and s["incorrect"]["samples"] == 6
    assert s["correct"]["mean_length"] == 10.0 and s["incorrect"]["mean_length"] == 20.0
    assert s["correct"]["reflection_per_1k"] == pytest.approx(1000 * 2 / 20)
    assert s["incorrect"]["reflection_per_1k"] == pytest.approx(1000 * 12 / 120)
    assert s["incorrect"]["truncated_share"] == pytest.approx(5 / 6)
    assert s["all"]["samples"] == 9


def test_summarize_ungraded_only() -> None:
    s = summarize(["a"], [None], ["text"], [3], [False])
    assert "avg_at_n" not in s and s["problems"] == 0
    assert s["correct"]["samples"] == 0
