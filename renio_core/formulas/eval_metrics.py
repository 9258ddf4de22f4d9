"""Evaluation metrics: avg@n with its standard error, unbiased pass@k, and behaviour markers.

The paper (arXiv 2606.23104) reports avg@n accuracy (mean correctness over n samples per
problem) and analyses the student's behaviour: response length and the frequency of
reflection words ("wait", "hmm", ...), separately for correct and incorrect samples. These
are the pure formulas behind ``renio eval``; they take plain Python/numpy values.

* ``pass_at_k(n, c, k) = 1 - C(n - c, k) / C(n, k)``: the probability that at least one of k
  samples drawn without replacement from the n is correct (the unbiased estimator of Chen et
  al. 2021), computed as a product so large n does not overflow.
* avg@n is the mean over problems of each problem's fraction correct; its standard error is
  the sample standard deviation of those per-problem fractions over sqrt(#problems). The
  problem is the sampling unit, so the error covers both problem and sampling variance.
  With a single problem it is undefined (None in JSON).
* marker rates are pooled: ``1000 * (marker hits in the group) / (tokens in the group)``.

Deliberate difference: the marker list is renio's own (reflection: wait, hmm, alternatively,
let me check, ...; epistemic hedges: maybe, perhaps, ...); the paper names examples only.
Matching is case-insensitive on whole words, so "but" does not count "button"; no marker
is a sub-phrase of another, so no hit is counted twice.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

REFLECTION_MARKERS = (
    "wait", "hmm", "alternatively", "let me check", "let me verify", "double-check",
    "let me re-examine", "actually", "but", "however", "on second thought",
)
EPISTEMIC_MARKERS = (
    "maybe", "perhaps", "probably", "i think", "seems", "might", "not sure",
    "i guess", "possibly",
)
MARKERS = REFLECTION_MARKERS + EPISTEMIC_MARKERS


def _marker_pattern(marker: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in marker.split()]
    return re.compile(r"(?<![A-Za-z0-9_])" + r"\s+".join(words) + r"(?![A-Za-z0-9_])",
                      re.IGNORECASE)


_PATTERNS = OrderedDict((m, _marker_pattern(m)) for m in MARKERS)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct among ``n`` samples."""
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given ``(n, c)`` per problem."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def avg_at_n(fraction_correct: Sequence[float]) -> tuple[float, float]:
    """avg@n and its standard error from each problem's fraction of correct samples.

    The error is NaN with a single problem.
    """
    x = np.asarray(fraction_correct, dtype=np.float64)
    if x.size == 0:
        raise ValueError("avg_at_n: no problems")
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return mean, se


def count_markers(text: str) -> dict[str, int]:
    """Occurrences of each marker in ``text`` (whole words, case-insensitive)."""
    text = text or ""
    return {m: len(p.findall(text)) for m, p in _PATTERNS.items()}


def behaviour(texts: Sequence[str], lengths: Sequence[int],
              truncated: Sequence[bool]) -> dict[str, Any]:
    """Length, truncation share and marker rates (per 1k tokens) of a group of completions."""
    n = len(texts)
    if not (n == len(lengths) == len(truncated)):
        raise ValueError("behaviour: texts, lengths and truncated must have equal length")
    if n == 0:
        return {"samples": 0, "mean_length": None, "truncated_share": None,
                "reflection_per_1k": None, "epistemic_per_1k": None, "markers_per_1k": {}}
    total_tokens = int(np.sum(lengths))
    counts = {m: 0 for m in MARKERS}
    for t in texts:
        for m, c in count_markers(t).items():
            counts[m] += c

    def rate(hits: int) -> float | None:
        return 1000.0 * hits / total_tokens if total_tokens > 0 else None

    return {
        "samples": n,
        "mean_length": float(np.mean(lengths)),
        "truncated_share": float(np.mean(np.asarray(truncated, dtype=bool))),
        "reflection_per_1k": rate(sum(counts[m] for m in REFLECTION_MARKERS)),
        "epistemic_per_1k": rate(sum(counts[m] for m in EPISTEMIC_MARKERS)),
        "markers_per_1k": {m: rate(c) for m, c in counts.items()},
    }


def summarize(
    prompt_ids: Sequence[str],
    correct: Sequence[bool | None],
    texts: Sequence[str],
    lengths: Sequence[int],
    truncated: Sequence[bool],
) -> dict[str, Any]:
    """Everything ``renio eval`` reports for one run.

    Accuracy metrics use graded rows only (``correct`` not None); pass@k is given for k = 1
    and k = n, where n is the smallest number of graded samples of any problem. The behaviour
    analysis covers all rows, then correct and incorrect rows separately.
    """
    m = len(prompt_ids)
    if not (m == len(correct) == len(texts) == len(lengths) == len(truncated)):
        raise ValueError("summarize: all columns must have equal length")
    per_prompt: "OrderedDict[str, list[bool]]" = OrderedDict()
    for pid, ok in zip(prompt_ids, correct):
        if ok is not None:
            per_prompt.setdefault(pid, []).append(bool(ok))
    out: dict[str, Any] = {"samples": m, "graded_samples": sum(len(v) for v in per_prompt.values()),
                           "problems": len(per_prompt)}
    if per_prompt:
        counts = [(len(v), sum(v)) for v in per_prompt.values()]
        mean, se = avg_at_n([c / n for n, c in counts])
        n_min = min(n for n, _ in counts)
        out["n"] = n_min
        out["avg_at_n"] = mean
        out["avg_at_n_se"] = None if math.isnan(se) else se
        ks = sorted({1, n_min})
        out["pass_at_k"] = {str(k): mean_pass_at_k(counts, k) for k in ks}
    out["all"] = behaviour(texts, lengths, truncated)
    for label, want in (("correct", True), ("incorrect", False)):
        idx = [i for i, ok in enumerate(correct) if ok is not None and bool(ok) == want]
        out[label] = behaviour([texts[i] for i in idx], [lengths[i] for i in idx],
                               [truncated[i] for i in idx])
    return out
