"""ReNIO sample weights as pure functions of flat token arrays.

Paper: "Reweighting Negative Trajectory Importance for LLM On-Policy Distillation"
(arXiv 2606.23104). For one trajectory with student log-probs ``s_t`` and teacher log-probs
``q_t`` at its sampled tokens:

1. ``r_t = min(s_t - q_t, clip)``
2. pivotal tokens are those with ``r_t >= threshold``
3. ``m`` = mean of ``r_t`` over pivotal tokens, 0 when there are none
4. ``raw = exp(m / tem)``
5. normalization within groups of rows (``batch_mean``, ``ema``, ``clamp``, ``none``): runs of
   ``group_size`` consecutive rows, or (``distinct``) groups of ``group_size`` distinct prompts
   with one sample each, as the official trainer's device micro-batches

Token arrays are flat (all trajectories of a record batch concatenated, ``*_N``) with row
offsets (``offsets_B1``, length B + 1), the layout Arrow list columns already have, so nothing
here loops over tokens in Python. Sums are taken in float64.

Deliberate differences from the official code: none in the formula. Groups are formed from
the shard's rows before training (the official trainer normalizes over each device's
micro-batch of distinct prompts inside the train step), so the weights can be inspected first;
``grouping="distinct"`` forms the official groups when a prompt has several samples, and
``renio train --weights-from live`` recomputes them inside the step. With ``scheme="uniform"`` the diagnostics
(``pivotal_count``, ``log_ratio_mean``, ``raw_weight``) are still computed; only ``weight`` is 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NORMS = ("batch_mean", "ema", "clamp", "none")
GROUPINGS = ("consecutive", "distinct")
SCHEMES = ("renio", "uniform")
FILTERS = ("all", "correct", "incorrect")

BATCH_MEAN_CAP = 10.0
CLAMP_LOW, CLAMP_HIGH = 0.1, 10.0
EMA_MOMENTUM = 0.9  # g <- (1 - 0.9) * mean(raw) + 0.9 * g


def segment_sums(values_N: np.ndarray, offsets_B1: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Sum of ``values_N`` within each row ``[offsets[i], offsets[i+1])``; empty rows give 0."""
    offsets_B1 = np.asarray(offsets_B1, dtype=np.int64)
    n_rows = len(offsets_B1) - 1
    if len(values_N) == 0:
        return np.zeros(n_rows, dtype=dtype)
    # reduceat sums values[start_i:start_{i+1}], but for an empty row it returns the value at
    # its start (and needs every start inside the array), so empty rows are zeroed after.
    starts_B = np.minimum(offsets_B1[:-1], len(values_N) - 1)
    sums_B = np.add.reduceat(values_N, starts_B, dtype=dtype)
    sums_B[offsets_B1[1:] == offsets_B1[:-1]] = 0
    return sums_B


def trajectory_log_ratios(
    student_logprobs_N: np.ndarray,
    teacher_logprobs_N: np.ndarray,
    offsets_B1: np.ndarray,
    *,
    clip: float,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3: per row, the mean clipped log-ratio over pivotal tokens and their count.

    Returns ``(log_ratio_mean_B float64, pivotal_count_B int64)``; rows with no pivotal token
    (including empty completions) get a mean of 0. The per-token ratio is formed in the
    log-probs' own precision (float32, as the official code's tensors are); sums are float64.
    """
    dtype = np.result_type(student_logprobs_N, teacher_logprobs_N)
    ratio_N = np.subtract(student_logprobs_N, teacher_logprobs_N, dtype=dtype)
    np.minimum(ratio_N, dtype.type(clip), out=ratio_N)
    pivotal_N = ratio_N >= dtype.type(threshold)
    ratio_N *= pivotal_N  # keep only pivotal tokens' ratios for the sum
    pivotal_count_B = segment_sums(pivotal_N, offsets_B1, dtype=np.int64)
    pivotal_sum_B = segment_sums(ratio_N, offsets_B1)
    log_ratio_mean_B = np.divide(
        pivotal_sum_B,
        pivotal_count_B,
        out=np.zeros_like(pivotal_sum_B),
        where=pivotal_count_B > 0,
    )
    return log_ratio_mean_B, pivotal_count_B


def raw_weights(log_ratio_mean_B: np.ndarray, tem: float) -> np.ndarray:
    """Step 4: ``exp(m / tem)``."""
    return np.exp(np.asarray(log_ratio_mean_B, dtype=np.float64) / tem)


def trajectory_weights(
    student_logprobs_N: np.ndarray,
    teacher_logprobs_N: np.ndarray,
    offsets_B1: np.ndarray,
    *,
    clip: float,
    threshold: float,
    tem: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-4 for each row: ``(log_ratio_mean_B, pivotal_count_B, raw_B)``. The weight
    stage and the train step's live weights both start here, then call
    :func:`sample_weights` on the rows of each group."""
    log_ratio_mean_B, pivotal_count_B = trajectory_log_ratios(
        student_logprobs_N, teacher_logprobs_N, offsets_B1, clip=clip, threshold=threshold)
    return log_ratio_mean_B, pivotal_count_B, raw_weights(log_ratio_mean_B, tem)


@dataclasses.dataclass
class EmaState:
    """The running mean of the ``ema`` norm, carried from one group to the next."""

    value: float | None = None

    def update(self, group_mean: float) -> float:
        if self.value is None:
            self.value = group_mean
        else:
            self.value = (1.0 - EMA_MOMENTUM) * group_mean + EMA_MOMENTUM * self.value
        return self.value


def normalize_groups(
    raw_B: np.ndarray,
    group_ids_B: np.ndarray,
    norm: str,
    ema: EmaState | None = None,
) -> np.ndarray:
    """Step 5 for rows whose groups are complete.

    A group is all rows with the same id, wherever they are. For ``ema`` the groups are
    visited in order of their first row and ``ema`` is updated in place, so a caller
    streaming many record batches passes the same state each time.
    """
    raw_B = np.asarray(raw_B, dtype=np.float64)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if raw_B.size == 0 or norm == "none":
        return raw_B.copy()
    # Dense group index 0..G-1, numbered in order of each group's first row.
    _, first_G, inverse_B = np.unique(np.asarray(group_ids_B), return_index=True,
                                      return_inverse=True)
    rank_G = np.empty(len(first_G), dtype=np.int64)
    rank_G[np.argsort(first_G, kind="stable")] = np.arange(len(first_G))
    dense_B = rank_G[inverse_B.ravel()]
    counts_G = np.bincount(dense_B, minlength=len(first_G))

    def group_mean(values_B: np.ndarray) -> np.ndarray:
        return np.bincount(dense_B, weights=values_B, minlength=len(first_G)) / counts_G

    if norm == "batch_mean":
        return np.minimum(raw_B / group_mean(raw_B)[dense_B], BATCH_MEAN_CAP)
    if norm == "clamp":
        clamped_B = np.clip(raw_B, CLAMP_LOW, CLAMP_HIGH)
        return clamped_B / group_mean(clamped_B)[dense_B]
    # ema: the running mean is updated with each group's mean before dividing that group.
    state = ema if ema is not None else EmaState()
    means_G = group_mean(raw_B)
    divisors_G = np.empty_like(means_G)
    for g, mean in enumerate(means_G):  # one step per group, never per token
        divisors_G[g] = state.update(float(mean))
    return raw_B / divisors_G[dense_B]


def sample_weights(
    raw_B: np.ndarray,
    group_ids_B: np.ndarray,
    *,
    scheme: str,
    norm: str,
    ema: EmaState | None = None,
) -> np.ndarray:
    """Step 5 under ``scheme``: ``renio`` normalizes the raw weights within their groups
    (:func:`normalize_groups`); ``uniform`` gives every row 1 (plain OPD/OPSD)."""
    if scheme == "uniform":
        return np.ones(len(raw_B), dtype=np.float64)
    return normalize_groups(raw_B, group_ids_B, norm, ema)


def distinct_prompt_groups(prompt_ids_B: np.ndarray, group_size: int) -> np.ndarray:
    """Group ids that put ``group_size`` distinct prompts, one sample each, in every group.

    Rows are read in order and cut into windows holding ``group_size`` distinct prompts; in a
    window, the k-th row of each prompt goes to the window's k-th group. With ``n`` samples per
    prompt (rows prompt by prompt), a window of ``group_size x n`` rows makes ``n`` groups of
    ``group_size`` rows, like the official trainer's micro-batches of distinct prompts. Group
    ids count up from 0 in order of each group's first row.
    """
    ids_B = np.empty(len(prompt_ids_B), dtype=np.int64)
    next_id = 0
    window: dict[object, int] = {}  # prompt -> rows of it seen in this window
    base = 0
    for b, pid in enumerate(prompt_ids_B):
        if pid not in window and len(window) == group_size:
            base, window = next_id, {}
        k = window.get(pid, 0)
        window[pid] = k + 1
        ids_B[b] = base + k
        next_id = max(next_id, base + k + 1)
    return ids_B


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``positives`` (ties count half).

    NaN when one class is absent. Computed from average ranks (Mann-Whitney U).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    n_neg = int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank within each run of tied scores.
    avg_rank_U = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = avg_rank_U[inverse]
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
