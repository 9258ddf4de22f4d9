"""Hand-computed cases for renio_core.formulas.weighting (docs/design.md, 'ReNIO weights').

Expected values are derived on paper from the formula and written with math.exp, never taken
from the code's output.
"""

import math

import numpy as np
import pytest

from renio_core.data.shards import flat_position, row_offsets
from renio_core.formulas import weighting as W


def offsets(*lengths):
    return np.r_[0, np.cumsum(lengths)].astype(np.int64)


# Four trajectories, clip 2.0, threshold 1.0:
#   A: s - q = [0.1, 1.5, 3.0] -> clipped [0.1, 1.5, 2.0] -> pivotal {1.5, 2.0} -> m = 1.75
#   B: s - q = [-0.5]          -> no pivotal token                         -> m = 0
#   C: empty completion                                                     -> m = 0
#   D: s - q = [1.125, 1.0]    -> both pivotal (>= is inclusive)            -> m = 1.0625
# (D's values are exact in float32, so the boundary case 1.0 >= 1.0 is really tested.)
S = np.array([-0.1, -0.5, -3.0, -1.0, -0.5, -0.25], dtype=np.float32)
Q = np.array([-0.2, -2.0, -6.0, -0.5, -1.625, -1.25], dtype=np.float32)
OFF = offsets(3, 1, 0, 2)


def test_log_ratio_means_and_counts_by_hand():
    mean_B, count_B = W.trajectory_log_ratios(S, Q, OFF, clip=2.0, threshold=1.0)
    assert count_B.tolist() == [2, 0, 0, 2]
    np.testing.assert_allclose(mean_B, [1.75, 0.0, 0.0, 1.0625], atol=1e-6)


def test_raw_weight_is_exp_of_mean_over_tem():
    raw = W.raw_weights(np.array([1.75, 0.0, 1.05]), tem=2.0)
    np.testing.assert_allclose(raw, [math.exp(0.875), 1.0, math.exp(0.525)], rtol=1e-12)


def test_trajectory_weights_are_steps_one_to_four_by_hand():
    mean_B, count_B, raw_B = W.trajectory_weights(S, Q, OFF, clip=2.0, threshold=1.0, tem=0.5)
    assert count_B.tolist() == [2, 0, 0, 2]
    np.testing.assert_allclose(mean_B, [1.75, 0.0, 0.0, 1.0625], atol=1e-6)
    np.testing.assert_allclose(raw_B, [math.exp(3.5), 1.0, 1.0, math.exp(2.125)], rtol=1e-6)


def test_sample_weights_normalize_under_renio_and_are_one_under_uniform():
    raw = np.array([1.0, 3.0, 2.0, 2.0])
    groups = np.array([0, 0, 1, 1])
    renio = W.sample_weights(raw, groups, scheme="renio", norm="batch_mean")
    np.testing.assert_allclose(renio, [0.5, 1.5, 1.0, 1.0], rtol=1e-12)
    uniform = W.sample_weights(raw, groups, scheme="uniform", norm="batch_mean")
    assert uniform.dtype == np.float64 and uniform.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_row_offsets_and_flat_position_by_hand():
    assert row_offsets([3, 1, 0, 2]).tolist() == [0, 3, 4, 4, 6]
    assert row_offsets([3, 1, 0, 2]).dtype == np.int64
    assert row_offsets([]).tolist() == [0]
    # flat value 4 is the first of row 3 (row 2 is empty); value 2 the last of row 0
    assert flat_position([3, 1, 0, 2], 4) == (3, 0)
    assert flat_position([3, 1, 0, 2], 2) == (0, 2)
    assert flat_position([3, 1, 0, 2], 5) == (3, 1)


def test_batch_mean_by_hand():
    raw = np.array([math.exp(1.75), 1.0, 1.0, math.exp(1.05)])
    w = W.normalize_groups(raw, np.array([0, 0, 1, 1]), "batch_mean")
    a, d = math.exp(1.75), math.exp(1.05)
    expected = [2 * a / (a + 1), 2 / (a + 1), 2 / (1 + d), 2 * d / (1 + d)]
    np.testing.assert_allclose(w, expected, rtol=1e-12)


def test_batch_mean_caps_at_ten():
    # One raw weight e^2.5 among 63 ones: e^2.5 / mean = 64 e^2.5 / (e^2.5 + 63) = 10.37 -> 10.
    raw = np.ones(64)
    raw[5] = math.exp(2.5)
    w = W.normalize_groups(raw, np.zeros(64, dtype=np.int64), "batch_mean")
    assert w[5] == 10.0
    np.testing.assert_allclose(w[0], 64 / (math.exp(2.5) + 63), rtol=1e-12)


def test_ema_by_hand():
    a, d = math.exp(1.75), math.exp(1.05)
    raw = np.array([a, 1.0, 1.0, d])
    state = W.EmaState()
    w = W.normalize_groups(raw, np.array([0, 0, 1, 1]), "ema", state)
    g1 = (a + 1) / 2
    g2 = 0.1 * (1 + d) / 2 + 0.9 * g1
    np.testing.assert_allclose(w, [a / g1, 1 / g1, 1 / g2, d / g2], rtol=1e-12)
    assert state.value == pytest.approx(g2)


def test_ema_streamed_group_by_group_equals_one_call():
    rng = np.random.default_rng(0)
    raw = np.exp(rng.uniform(0, 2, size=40))
    groups = np.arange(40) // 8
    whole = W.normalize_groups(raw, groups, "ema", W.EmaState())
    state = W.EmaState()
    pieces = [W.normalize_groups(raw[i:i + 16], groups[i:i + 16], "ema", state)
              for i in range(0, 40, 16)]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=1e-12)


def test_clamp_by_hand():
    # raw [e^2.5, 1] -> clamp to [10, 1] -> divide by their mean 5.5.
    # raw [0.05, 0.2] -> clamp to [0.1, 0.2] -> divide by 0.15.
    raw = np.array([math.exp(2.5), 1.0, 0.05, 0.2])
    w = W.normalize_groups(raw, np.array([0, 0, 1, 1]), "clamp")
    np.testing.assert_allclose(w, [10 / 5.5, 1 / 5.5, 0.1 / 0.15, 0.2 / 0.15], rtol=1e-12)


def test_none_returns_raw():
    raw = np.array([3.0, 1.0, 2.0])
    np.testing.assert_array_equal(W.normalize_groups(raw, np.array([0, 0, 1]), "none"), raw)


def test_shorter_last_group():
    # Five rows in groups of 2: the last group {4} holds one row, so batch_mean gives it 1.
    raw = np.array([3.0, 1.0, 2.0, 2.0, 7.0])
    w = W.normalize_groups(raw, np.arange(5) // 2, "batch_mean")
    np.testing.assert_allclose(w, [1.5, 0.5, 1.0, 1.0, 1.0], rtol=1e-12)


def test_equal_distributions_give_weight_one():
    s = np.log(np.full(10, 0.3, dtype=np.float32))
    mean_B, count_B = W.trajectory_log_ratios(s, s.copy(), offsets(4, 6), clip=2.5, threshold=0.8)
    assert count_B.tolist() == [0, 0]
    np.testing.assert_array_equal(W.raw_weights(mean_B, 1.0), [1.0, 1.0])
    # Even when every token counts as pivotal (threshold <= 0), the mean ratio is 0.
    mean_B, count_B = W.trajectory_log_ratios(s, s.copy(), offsets(4, 6), clip=2.5, threshold=0.0)
    assert count_B.tolist() == [4, 6]
    np.testing.assert_array_equal(mean_B, [0.0, 0.0])


def test_all_rows_empty():
    mean_B, count_B = W.trajectory_log_ratios(
        np.zeros(0, np.float32), np.zeros(0, np.float32), offsets(0, 0, 0), clip=2.0, threshold=1.0
    )
    assert count_B.tolist() == [0, 0, 0]
    assert mean_B.tolist() == [0.0, 0.0, 0.0]


def test_segment_sums_chunked_equals_whole():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 50, size=30)
    values = rng.normal(size=int(lengths.sum()))
    whole = W.segment_sums(values, offsets(*lengths))
    by_row = [values[a:b].sum() for a, b in zip(offsets(*lengths)[:-1], offsets(*lengths)[1:])]
    np.testing.assert_allclose(whole, by_row, atol=1e-9)


def test_auroc_by_hand():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ranked right.
    assert W.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # A tie between a positive and a negative counts half.
    assert W.auroc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5
    assert W.auroc(np.array([2.0, 1.0, 1.0]), np.array([1, 1, 0])) == 0.75
    assert math.isnan(W.auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_distinct_prompt_groups_by_hand():
    from renio_core.formulas.weighting import distinct_prompt_groups

    # 4 prompts x 3 samples, rows prompt by prompt, groups of 2 distinct prompts: the window
    # {a, b} makes groups 0, 1, 2 (the k-th sample of each), the window {c, d} groups 3, 4, 5.
    pids = np.array(list("aaabbbcccddd"), dtype=object)
    assert distinct_prompt_groups(pids, 2).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    # Filtered rows (b lost a sample): {a, b} makes groups 0 (a, b) and 1 (a); {c, e} makes
    # 2 (c, e) and 3 (c).
    pids = np.array(list("aabcce"), dtype=object)
    assert distinct_prompt_groups(pids, 2).tolist() == [0, 1, 0, 2, 3, 2]
    # One sample per prompt: the same as consecutive runs.
    assert distinct_prompt_groups(np.array(list("abcde"), dtype=object), 2).tolist() == [0, 0, 1, 1, 2]


def test_normalize_interleaved_groups_by_hand():
    raw = np.array([1.0, 2.0, 3.0, 4.0])
    ids = np.array([0, 1, 0, 1])  # group 0: {1, 3}, mean 2; group 1: {2, 4}, mean 3
    got = W.normalize_groups(raw, ids, "batch_mean")
    assert got == pytest.approx([0.5, 2 / 3, 1.5, 4 / 3])
    # ema visits groups by first row: g = 2, then 0.1 * 3 + 0.9 * 2 = 2.1
    assert W.normalize_groups(raw, ids, "ema") == pytest.approx([0.5, 2 / 2.1, 1.5, 4 / 2.1])
