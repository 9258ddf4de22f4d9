"""What ``renio inspect`` shows, as plain data: rows chosen, per-token ratios, diff statistics.

ReNIO (arXiv 2606.23104) weighs a trajectory by the student-to-teacher log-ratio
``s_t - q_t`` of its tokens; this module prepares what a person needs to check that by eye:
the rows with the largest weights (or most pivotal tokens), each token's ratio and pivotal
flag, the positions where the teacher disagreed most with the teacher's top alternatives
there, a summary of the weight distribution (with the AUROC of the weight for wrong answers
when rows are graded), and the change between two weight shards of the same rollouts.
Rendering (rich, HTML) lives elsewhere; nothing here prints.

Memory stays bounded on large shards: one streamed pass keeps a few numbers per row (never
the tokens), and the tokens of the chosen rows are read afterwards, from their row groups
only.

Deliberate differences from the paper's code: none in the formula; the per-token pivotal flags
and per-row means are computed by :func:`renio_core.formulas.weighting.trajectory_log_ratios`, the same
function the ``weight`` stage uses. The colouring uses the unclipped ``s_t - q_t``, so a token
beyond the clip still shows how far beyond it is.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from renio_core.data import shards
from renio_core.data.schema import spec
from renio_core.errors import RenioInputError
from renio_core.formulas import weighting
from renio_core.modeling import models

SORT_KEYS = ("weight", "pivotal", "log_ratio")
SORT_LABELS = {"weight": "weight", "pivotal": "pivotal-token count",
               "log_ratio": "mean clipped log-ratio"}
DEFAULT_CLIP = 2.5
DEFAULT_THRESHOLD = 0.8
SCORE_COLUMNS = ("student_logprobs", "teacher_logprobs")
WEIGHT_COLUMNS = ("weight", "raw_weight", "batch_id", "pivotal_count", "log_ratio_mean")

# Every column inspect may read, with its kind, so a wrong type is one clear line.
KNOWN_COLUMNS = [
    spec(name, required=name == "completion_ids")
    for name in ("prompt_id", "sample_index", "problem", "prompt_ids", "completion_ids",
                 "completion_text", "correct", "student_logprobs", "teacher_logprobs",
                 "teacher_topk_ids", "teacher_topk_logprobs", "weight", "raw_weight", "batch_id",
                 "pivotal_count", "log_ratio_mean")
]


# --------------------------------------------------------------------------------------------
# Opening a shard and resolving settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardView:
    """An opened shard: its files, which columns it has, and its ``renio`` metadata."""

    spec: str
    inputs: shards.InputSet

    @property
    def metadata(self) -> dict[str, Any] | None:
        return self.inputs.metadata

    @property
    def total_rows(self) -> int:
        return self.inputs.total_rows

    @property
    def stage(self) -> str | None:
        return (self.metadata or {}).get("stage")

    def has(self, name: str) -> bool:
        return self.inputs.has_column(name)

    @property
    def has_scores(self) -> bool:
        return all(self.has(c) for c in SCORE_COLUMNS)

    @property
    def has_topk(self) -> bool:
        return self.has("teacher_topk_ids") and self.has("teacher_topk_logprobs")

    def require_scores(self, why: str) -> None:
        for col in SCORE_COLUMNS:
            if not self.has(col):
                raise RenioInputError(
                    f"missing column; {why} needs the score columns, which 'renio score' adds",
                    file=self._file_without(col), column=col,
                )

    def require_weights(self, why: str) -> None:
        if not self.has("weight"):
            raise RenioInputError(
                f"missing column; {why} needs weights, which 'renio weight' adds",
                file=self._file_without("weight"), column="weight",
            )

    def _file_without(self, col: str) -> Path:
        for path, pf in zip(self.inputs.files, self.inputs.parquet_files):
            if col not in pf.schema_arrow.names:
                return path
        return self.inputs.files[0]


def open_shard(spec: str | os.PathLike) -> ShardView:
    """Open a shard of any stage; the only column every stage has is ``completion_ids``."""
    inputs = shards.open_inputs(spec, KNOWN_COLUMNS)
    return ShardView(os.fspath(spec), inputs)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The pivotal-token rule in force and where it came from (for the report's header)."""

    clip: float
    threshold: float
    source: str


def resolve_settings(view: ShardView, clip: float | None, threshold: float | None) -> Settings:
    """Flags win; else the weight stage's config in the shard's lineage; else the defaults."""
    wcfg = (shards.find_stage(view.metadata, "weight") or {}).get("config") or {}
    sources = []

    def pick(flag: float | None, key: str, default: float) -> float:
        if flag is not None:
            sources.append("flags")
            value = flag
        elif isinstance(wcfg.get(key), (int, float)):
            sources.append("weight stage")
            value = float(wcfg[key])
        else:
            sources.append("defaults")
            value = default
        if not math.isfinite(value):
            raise RenioInputError(f"{key}: must be a finite number, got {value}")
        return float(value)

    c = pick(clip, "clip", DEFAULT_CLIP)
    t = pick(threshold, "threshold", DEFAULT_THRESHOLD)
    source = sources[0] if sources[0] == sources[1] else f"clip: {sources[0]}, threshold: {sources[1]}"
    return Settings(c, t, source)


# --------------------------------------------------------------------------------------------
# Token text
# --------------------------------------------------------------------------------------------


def recorded_model(meta: dict[str, Any] | None) -> str | None:
    """The student model recorded by the rollout stage (its tokenizer made the ids)."""
    rollout = shards.find_stage(meta, "rollout") or {}
    name = (rollout.get("config") or {}).get("model")
    if name:
        return str(name)
    name = shards.find_in_lineage(meta, "models", "student", "name")
    return str(name) if name else None


class TokenText:
    """Each token id decoded on its own (cached), or ``[id]`` when there is no tokenizer."""

    def __init__(self, tokenizer: Any | None, source: str, note: str | None = None):
        self.tokenizer = tokenizer
        self.source = source  # what the report says about where token text comes from
        self.note = note      # why there is no tokenizer, when there is none
        self._cache: dict[int, str] = {}

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"[{token_id}]"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)


def load_token_text(view: ShardView, name: str | None) -> TokenText:
    """The tokenizer named by ``--tokenizer``, else the shard's recorded model's.

    An explicit name that cannot be loaded, or whose vocabulary differs from the one recorded
    in the shard, is an error; a recorded model that cannot be loaded (a path from another
    machine) falls back to showing token ids, with the reason.
    """
    explicit = name is not None
    if name is None:
        name = recorded_model(view.metadata)
        if name is None:
            return TokenText(None, "token ids", "the shard records no model; pass --tokenizer")
    try:
        tok = models.load_tokenizer(name)
    except RenioInputError as exc:
        if explicit:
            raise RenioInputError(f"--tokenizer: {exc.message}") from None
        return TokenText(None, "token ids", f"cannot load the recorded tokenizer {name!r}; "
                                            "pass --tokenizer")
    want = shards.find_in_lineage(view.metadata, "tokenizer_fingerprint")
    if want is not None:
        got = models.tokenizer_fingerprint(tok)
        if got != want:
            raise RenioInputError(
                f"tokenizer {name!r} differs from the one that made the shard (fingerprint "
                f"{got} vs {want}); pass the right --tokenizer",
                file=view.inputs.files[0],
            )
    return TokenText(tok, f"tokenizer {name}")


# --------------------------------------------------------------------------------------------
# One pass over all rows: a few numbers per row
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RowStats:
    """Per row of the shard, in file order (``R`` rows). Absent columns are None."""

    prompt_id: list[str | None] | None
    sample_index: np.ndarray | None  # (R,) int64
    n_tokens: np.ndarray             # (R,) int64
    correct: np.ndarray | None       # (R,) int8: 1 correct, 0 incorrect, -1 ungraded
    weight: np.ndarray | None        # (R,) float64, stored
    raw_weight: np.ndarray | None    # (R,) float64, stored
    batch_id: np.ndarray | None      # (R,) int64, stored
    pivotal_count: np.ndarray | None   # (R,) int64, computed from the log-probs
    log_ratio_mean: np.ndarray | None  # (R,) float64, computed from the log-probs

    @property
    def rows(self) -> int:
        return len(self.n_tokens)

    @property
    def tokens(self) -> int:
        return int(self.n_tokens.sum())

    @property
    def pivotal_tokens(self) -> int | None:
        return None if self.pivotal_count is None else int(self.pivotal_count.sum())

    def sort_values(self, sort: str) -> np.ndarray:
        if sort == "weight":
            assert self.weight is not None
            return self.weight
        if sort == "pivotal":
            assert self.pivotal_count is not None and self.log_ratio_mean is not None
            # Ties in the count are broken by the mean ratio: a float key that orders both.
            return self.pivotal_count + _squash(self.log_ratio_mean)
        assert self.log_ratio_mean is not None
        return self.log_ratio_mean


def _squash(x: np.ndarray) -> np.ndarray:
    """A monotone map of the reals into [0, 1)."""
    return (np.arctan(x) / np.pi + 0.5) * (1 - 1e-9)


def _np(arr: pa.Array, dtype: Any) -> np.ndarray:
    return arr.fill_null(0).to_numpy(zero_copy_only=False).astype(dtype)


def collect_rows(view: ShardView, settings: Settings | None, batch_rows: int = 2048) -> RowStats:
    """Stream the shard once: keys, lengths, stored weights, and (with ``settings`` and score
    columns) each row's pivotal count and mean log-ratio, validating the log-probs."""
    scores = settings is not None and view.has_scores
    wanted = ["prompt_id", "sample_index", "correct", "weight", "raw_weight", "batch_id"]
    present = [c for c in wanted if view.has(c)]
    columns = present + ["completion_ids"] + (list(SCORE_COLUMNS) if scores else [])
    acc: dict[str, list] = {name: [] for name in [*present, "n_tokens", "pc", "lrm"]}
    for batch in shards.prefetch(shards.iter_batches(view.inputs, columns, batch_rows)):
        rb = batch.data
        shards.check_no_nulls(batch, "completion_ids")
        lengths_B = shards.list_lengths(rb.column("completion_ids"))
        acc["n_tokens"].append(lengths_B)
        for name in present:
            arr = rb.column(name)
            if name == "prompt_id":
                acc[name].extend(arr.to_pylist())
            elif name == "correct":
                graded = ~arr.is_null().to_numpy(zero_copy_only=False)
                value = arr.fill_null(False).to_numpy(zero_copy_only=False)
                acc[name].append(np.where(graded, value.astype(np.int8), np.int8(-1)))
            elif name in ("weight", "raw_weight"):
                shards.check_no_nulls(batch, name)
                values = _np(arr, np.float64)
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    raise RenioInputError(f"value {values[bad[0]]}; expected a finite number",
                                          file=batch.file, row=batch.first_row + int(bad[0]),
                                          column=name)
                acc[name].append(values)
            else:
                acc[name].append(_np(arr, np.int64))
        if scores:
            student_N, teacher_N = _checked_logprobs(batch, lengths_B)
            offsets_B1 = shards.row_offsets(lengths_B)
            mean_B, count_B = weighting.trajectory_log_ratios(
                student_N, teacher_N, offsets_B1, clip=settings.clip, threshold=settings.threshold)
            acc["pc"].append(count_B)
            acc["lrm"].append(mean_B)

    def cat(name: str, dtype: Any) -> np.ndarray | None:
        if name not in acc or (name in wanted and name not in present):
            return None
        parts = acc[name]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return RowStats(
        prompt_id=acc["prompt_id"] if "prompt_id" in present else None,
        sample_index=cat("sample_index", np.int64),
        n_tokens=np.concatenate(acc["n_tokens"]).astype(np.int64),
        correct=cat("correct", np.int8),
        weight=cat("weight", np.float64),
        raw_weight=cat("raw_weight", np.float64),
        batch_id=cat("batch_id", np.int64),
        pivotal_count=cat("pc", np.int64) if scores else None,
        log_ratio_mean=cat("lrm", np.float64) if scores else None,
    )


def _checked_logprobs(batch: shards.Batch, lengths_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for col in SCORE_COLUMNS:
        shards.check_same_lengths(batch, col, "completion_ids")
        values_N = shards.flat_values(batch.column(col), np.float32)
        shards.check_finite(batch, col, values_N, lengths_B)
        out.append(values_N)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Choosing rows
# --------------------------------------------------------------------------------------------


def default_sort(view: ShardView) -> str | None:
    if view.has("weight"):
        return "weight"
    if view.has_scores:
        return "pivotal"
    return None  # a rollouts shard: file order


def check_sort(view: ShardView, sort: str | None) -> None:
    if sort is None:
        return
    if sort not in SORT_KEYS:
        raise RenioInputError(f"--sort: must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    if sort == "weight":
        view.require_weights("--sort weight")
    else:
        view.require_scores(f"--sort {sort}")


def top_rows(stats: RowStats, sort: str | None, n: int) -> np.ndarray:
    """The ``n`` rows with the largest sort key (file order breaks ties; None: first rows)."""
    if sort is None:
        return np.arange(min(n, stats.rows))
    key = stats.sort_values(sort)
    order = np.lexsort((np.arange(len(key)), -key))
    return order[:n]


def select_rows(stats: RowStats, *, row: int | None = None, prompt_id: str | None = None,
                sort: str | None, top: int, file: str = "") -> np.ndarray:
    """Row numbers (0-based, across all parts in order) to show in the terminal."""
    if row is not None:
        if not 0 <= row < stats.rows:
            raise RenioInputError(
                f"--row {row} does not exist; the shard has {stats.rows} rows (0..{stats.rows - 1})",
                file=file)
        return np.array([row])
    if prompt_id is not None:
        if stats.prompt_id is None:
            raise RenioInputError("missing column, needed by --prompt-id", file=file,
                                  column="prompt_id")
        hits = np.array([i for i, p in enumerate(stats.prompt_id) if p == prompt_id], dtype=np.int64)
        if hits.size == 0:
            raise RenioInputError(f"--prompt-id {prompt_id!r}: no row has this prompt_id", file=file)
        if sort is not None:
            key = stats.sort_values(sort)[hits]
            hits = hits[np.lexsort((hits, -key))]
        return hits[:top]
    if top < 1:
        raise RenioInputError(f"--top: must be at least 1, got {top}")
    return top_rows(stats, sort, top)


def rows_for_report(stats: RowStats, sort: str | None, max_rows: int,
                    seed: int = 0) -> tuple[np.ndarray, str]:
    """At most ``max_rows`` rows for the HTML: the top half by the sort key plus a random
    sample of the rest (so typical rows are visible too), in file order; and a sentence
    saying so."""
    if max_rows < 1:
        raise RenioInputError(f"--max-rows: must be at least 1, got {max_rows}")
    total = stats.rows
    if total <= max_rows:
        return np.arange(total), f"all {total:,} trajectories are included"
    n_top = max_rows // 2 if sort is not None else max_rows
    top = top_rows(stats, sort, n_top)
    rest = np.setdiff1d(np.arange(total), top)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rest, size=max_rows - len(top), replace=False))
    chosen = np.sort(np.concatenate([top, sample]))
    if sort is None:
        text = f"the first {n_top:,} of {total:,} trajectories are included"
    else:
        text = (f"{max_rows:,} of {total:,} trajectories are included: the {len(top):,} "
                f"with the highest {SORT_LABELS[sort]} and a random sample of {len(sample):,} others "
                f"(seed {seed}); the summary covers all rows")
    return chosen, text


def read_rows(view: ShardView, rows: Sequence[int], columns: Sequence[str]) -> list[dict[str, Any]]:
    """The given rows (global row numbers) as dicts, in the order given; only the row groups
    holding them are read."""
    rows = [int(r) for r in rows]
    columns = [c for c in columns if view.has(c)]
    where: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (file, row group) -> (row, offset)
    starts = []
    base = 0
    for f, pf in enumerate(view.inputs.parquet_files):
        for g in range(pf.metadata.num_row_groups):
            starts.append((base, f, g))
            base += pf.metadata.row_group(g).num_rows
    first_rows = np.array([s[0] for s in starts], dtype=np.int64)
    for r in rows:
        i = int(np.searchsorted(first_rows, r, side="right")) - 1
        first, f, g = starts[i]
        where.setdefault((f, g), []).append((r, r - first))
    out: dict[int, dict[str, Any]] = {}
    for (f, g), hits in where.items():
        pf = view.inputs.parquet_files[f]
        try:
            table = pf.read_row_group(g, columns=columns)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise RenioInputError(f"cannot read row group {g} (truncated or corrupt?): {exc}",
                                  file=view.inputs.files[f]) from None
        taken = table.take(pa.array([o for _, o in hits])).to_pylist()
        for (r, _), values in zip(hits, taken):
            out[r] = values
    return [out[r] for r in rows]


# --------------------------------------------------------------------------------------------
# One trajectory in detail
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Alternative:
    token_id: int
    text: str
    logprob: float


@dataclasses.dataclass
class Trajectory:
    """One row with its tokens; the per-token arrays have one entry per completion token."""

    row: int
    prompt_id: str | None
    sample_index: int | None
    prompt: str | None
    completion: str | None
    correct: bool | None
    weight: float | None
    raw_weight: float | None
    batch_id: int | None
    token_ids: np.ndarray               # (T,) int64
    tokens: list[str]                   # (T,) decoded text, or "[id]"
    student: np.ndarray | None = None   # (T,) float32 s_t
    teacher: np.ndarray | None = None   # (T,) float32 q_t
    pivotal: np.ndarray | None = None   # (T,) bool, r_t >= threshold
    pivotal_count: int | None = None
    log_ratio_mean: float | None = None
    worst: list[int] = dataclasses.field(default_factory=list)  # positions, worst first
    alternatives: list[list[Alternative]] | None = None  # (T, k) teacher's top-k

    @property
    def diff(self) -> np.ndarray | None:
        """``s_t - q_t`` (unclipped): positive where the teacher finds the token less likely."""
        if self.student is None or self.teacher is None:
            return None
        return np.subtract(self.student, self.teacher, dtype=np.float32)


DETAIL_COLUMNS = ["prompt_id", "sample_index", "problem", "prompt_ids", "completion_ids",
                  "completion_text", "correct", "weight", "raw_weight", "batch_id",
                  "student_logprobs", "teacher_logprobs", "teacher_topk_ids",
                  "teacher_topk_logprobs"]


def build_trajectories(view: ShardView, rows: Sequence[int], settings: Settings | None,
                       text: TokenText, *, worst: int = 5, max_alternatives: int | None = None,
                       ) -> list[Trajectory]:
    """Read the chosen rows and compute each token's ratio, pivotal flag and alternatives."""
    columns = list(DETAIL_COLUMNS)
    if settings is None:
        columns = [c for c in columns if c not in SCORE_COLUMNS and not c.startswith("teacher_topk")]
    records = read_rows(view, rows, columns)
    return [_trajectory(int(r), rec, settings, text, worst, max_alternatives, view)
            for r, rec in zip(rows, records)]


def _trajectory(row: int, rec: dict[str, Any], settings: Settings | None, text: TokenText,
                worst: int, max_alternatives: int | None, view: ShardView) -> Trajectory:
    ids = np.asarray(rec.get("completion_ids") or [], dtype=np.int64)
    prompt = rec.get("problem")
    if prompt is None and rec.get("prompt_ids") is not None:
        prompt = text.decode(rec["prompt_ids"])
    completion = rec.get("completion_text")
    if completion is None:
        completion = text.decode(ids)
    traj = Trajectory(
        row=row, prompt_id=rec.get("prompt_id"), sample_index=rec.get("sample_index"),
        prompt=prompt, completion=completion, correct=rec.get("correct"),
        weight=rec.get("weight"), raw_weight=rec.get("raw_weight"), batch_id=rec.get("batch_id"),
        token_ids=ids, tokens=[text(i) for i in ids],
    )
    if settings is None or rec.get("student_logprobs") is None:
        return traj
    s = np.asarray(rec["student_logprobs"], dtype=np.float32)
    q = np.asarray(rec.get("teacher_logprobs") or [], dtype=np.float32)
    for name, values in (("student_logprobs", s), ("teacher_logprobs", q)):
        if len(values) != len(ids):
            raise RenioInputError(
                f"has {len(values)} values but 'completion_ids' has {len(ids)}; the lists must "
                "have equal length", file=view.spec, row=row, column=name)
    traj.student, traj.teacher = s, q
    traj.pivotal = pivotal_flags(s, q, settings)
    mean, count = weighting.trajectory_log_ratios(
        s, q, np.array([0, len(ids)]), clip=settings.clip, threshold=settings.threshold)
    traj.log_ratio_mean, traj.pivotal_count = float(mean[0]), int(count[0])
    traj.worst = worst_positions(traj.diff, worst)
    traj.alternatives = _alternatives(rec, len(ids), text, max_alternatives)
    return traj


def pivotal_flags(student_T: np.ndarray, teacher_T: np.ndarray, settings: Settings) -> np.ndarray:
    """Per-token pivotal flags by the weight stage's own function: with every token its own
    segment, a segment's pivotal count is 1 exactly when that token is pivotal."""
    n = len(student_T)
    _, count_T = weighting.trajectory_log_ratios(
        np.asarray(student_T, dtype=np.float32), np.asarray(teacher_T, dtype=np.float32),
        np.arange(n + 1, dtype=np.int64), clip=settings.clip, threshold=settings.threshold)
    return count_T == 1


def worst_positions(diff_T: np.ndarray | None, n: int) -> list[int]:
    """Up to ``n`` positions with the largest positive ``s_t - q_t``, largest first."""
    if diff_T is None or n <= 0 or len(diff_T) == 0:
        return []
    order = np.lexsort((np.arange(len(diff_T)), -diff_T))
    return [int(i) for i in order[:n] if diff_T[i] > 0]


def _alternatives(rec: dict[str, Any], n_tokens: int, text: TokenText,
                  limit: int | None) -> list[list[Alternative]] | None:
    ids = rec.get("teacher_topk_ids")
    lps = rec.get("teacher_topk_logprobs")
    if ids is None or lps is None or len(ids) != n_tokens or len(lps) != n_tokens:
        return None
    out = []
    for ids_k, lps_k in zip(ids, lps):
        pairs = [(int(i), float(lp)) for i, lp in zip(ids_k or [], lps_k or [])]
        pairs.sort(key=lambda p: -p[1])
        if limit is not None:
            pairs = pairs[:limit]
        out.append([Alternative(i, text(i), lp) for i, lp in pairs])
    return out


# The diverging scale shared by the terminal and the HTML: white at 0, towards red where the
# student likes the token more than the teacher (s_t > q_t, the tokens ReNIO counts), towards
# blue where the teacher likes it more; saturated at +-scale. The HTML report does not copy it:
# html_report.py puts each token's ratio_rgb colour in the page's data (page/report.js only
# applies them), and its legend's gradient runs between these two ends.
POSITIVE_RGB = (215, 48, 39)
NEGATIVE_RGB = (69, 117, 180)


def ratio_rgb(diff: float, scale: float) -> tuple[int, int, int]:
    t = max(-1.0, min(1.0, diff / scale)) if scale > 0 else 0.0
    end = POSITIVE_RGB if t > 0 else NEGATIVE_RGB
    a = abs(t)
    return tuple(round(255 + (c - 255) * a) for c in end)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Summary of a whole shard
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Histogram:
    edges: list[float]   # B + 1 bin edges
    counts: dict[str, list[int]]  # series name -> B counts


@dataclasses.dataclass
class Summary:
    rows: int
    tokens: int
    pivotal_tokens: int | None
    graded: int
    incorrect: int
    score_name: str | None       # the per-row number summarized: "weight" or a fallback
    quantiles: dict[str, float]  # min, p10, median, p90, max of that number
    histogram: Histogram | None
    auroc_incorrect: float | None
    mean_correct: float | None
    mean_incorrect: float | None

    @property
    def pivotal_share(self) -> float | None:
        if self.pivotal_tokens is None:
            return None
        return self.pivotal_tokens / self.tokens if self.tokens else 0.0


def summarize(stats: RowStats, bins: int = 30) -> Summary:
    """Rows, tokens, pivotal share, and the distribution of the weight (or, in a scores shard,
    of the raw weight at tem 1, ``exp(m)``), split by ``correct`` when graded."""
    if stats.weight is not None:
        name, values = "weight", stats.weight
    elif stats.log_ratio_mean is not None:
        name, values = "raw weight exp(m), tem 1", weighting.raw_weights(stats.log_ratio_mean, 1.0)
    else:
        name, values = None, None
    graded = incorrect = 0
    auroc = mean_ok = mean_bad = None
    quantiles: dict[str, float] = {}
    hist = None
    if values is not None and len(values):
        qs = np.quantile(values, [0, 0.1, 0.5, 0.9, 1.0])
        quantiles = dict(zip(("min", "p10", "median", "p90", "max"), map(float, qs)))
        lo, hi = float(qs[0]), float(qs[-1])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        counts = {"all": np.histogram(values, edges)[0].tolist()}
        if stats.correct is not None:
            ok, bad = stats.correct == 1, stats.correct == 0
            graded, incorrect = int(ok.sum() + bad.sum()), int(bad.sum())
            if graded:
                counts["correct"] = np.histogram(values[ok], edges)[0].tolist()
                counts["incorrect"] = np.histogram(values[bad], edges)[0].tolist()
                mean_ok = float(values[ok].mean()) if ok.any() else None
                mean_bad = float(values[bad].mean()) if bad.any() else None
                a = weighting.auroc(values[ok | bad], bad[ok | bad])
                auroc = None if math.isnan(a) else a
        hist = Histogram(edges.tolist(), counts)
    return Summary(stats.rows, stats.tokens, stats.pivotal_tokens, graded, incorrect, name,
                   quantiles, hist, auroc, mean_ok, mean_bad)


# --------------------------------------------------------------------------------------------
# Two weight shards of the same rollouts
# --------------------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    avg_rank_U = np.cumsum(counts) - (counts - 1) / 2.0
    return avg_rank_U[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN when either
    side is constant or there are fewer than two rows."""
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


@dataclasses.dataclass
class DiffRow:
    key: str
    row_a: int
    row_b: int
    weight_a: float
    weight_b: float
    pivotal_a: int | None
    pivotal_b: int | None
    correct: bool | None

    @property
    def change(self) -> float:
        return self.weight_b - self.weight_a


@dataclasses.dataclass
class Diff:
    matched_by: str
    rows: int
    only_a: int
    only_b: int
    spearman: float
    changed: int           # rows whose weight differs by more than 1e-6
    mean_abs_change: float
    max_abs_change: float
    mean_a: float
    mean_b: float
    auroc_a: float | None
    auroc_b: float | None
    top: list[DiffRow]     # largest |change| first
    settings_a: dict[str, Any]
    settings_b: dict[str, Any]


def _keys(stats: RowStats) -> list[str] | None:
    if stats.prompt_id is None or stats.sample_index is None:
        return None
    return [f"{p}#{s}" for p, s in zip(stats.prompt_id, stats.sample_index)]


def _weight_settings(view: ShardView) -> dict[str, Any]:
    cfg = (shards.find_stage(view.metadata, "weight") or {}).get("config") or {}
    return {k: cfg[k] for k in ("clip", "threshold", "tem", "norm", "group_size", "scheme",
                                "filter") if k in cfg}


def diff_shards(a: ShardView, b: ShardView, top: int = 10, batch_rows: int = 2048) -> Diff:
    """Per-row weight change between two weight shards, matched on (prompt_id, sample_index)
    when both have them, else by row position."""
    for view in (a, b):
        view.require_weights("--diff")
    sa, sb = collect_rows(a, None, batch_rows), collect_rows(b, None, batch_rows)
    ka, kb = _keys(sa), _keys(sb)
    if ka is not None and kb is not None:
        matched_by = "prompt_id and sample_index"
        for keys, view in ((ka, a), (kb, b)):
            if len(set(keys)) != len(keys):
                dup = next(k for k, c in _count(keys).items() if c > 1)
                raise RenioInputError(
                    f"--diff: (prompt_id, sample_index) {dup!r} appears more than once",
                    file=view.spec)
        index_b = {k: i for i, k in enumerate(kb)}
        pairs = [(i, index_b[k]) for i, k in enumerate(ka) if k in index_b]
        only_a, only_b = len(ka) - len(pairs), len(kb) - len(pairs)
        keys = [ka[i] for i, _ in pairs]
    else:
        matched_by = "row position"
        if sa.rows != sb.rows:
            raise RenioInputError(
                f"--diff: the shards have {sa.rows} and {sb.rows} rows and no prompt_id/"
                "sample_index columns to match them by", file=b.spec)
        pairs = [(i, i) for i in range(sa.rows)]
        only_a = only_b = 0
        keys = [f"row {i}" for i in range(sa.rows)]
    if not pairs:
        raise RenioInputError("--diff: the shards have no (prompt_id, sample_index) in common",
                              file=b.spec)
    ia = np.array([p[0] for p in pairs], dtype=np.int64)
    ib = np.array([p[1] for p in pairs], dtype=np.int64)
    wa, wb = sa.weight[ia], sb.weight[ib]
    change = wb - wa
    correct = sa.correct[ia] if sa.correct is not None else (
        sb.correct[ib] if sb.correct is not None else None)

    def auroc(w: np.ndarray) -> float | None:
        if correct is None:
            return None
        graded = correct >= 0
        value = weighting.auroc(w[graded], correct[graded] == 0)
        return None if math.isnan(value) else value

    # Stored pivotal counts (as written by each weight run) show how the rule changed.
    pa_ = _stored_ints(a, "pivotal_count", ia)
    pb_ = _stored_ints(b, "pivotal_count", ib)
    order = np.lexsort((np.arange(len(change)), -np.abs(change)))[:top]
    top_rows_ = [
        DiffRow(keys[j], int(ia[j]), int(ib[j]), float(wa[j]), float(wb[j]),
                None if pa_ is None else int(pa_[j]), None if pb_ is None else int(pb_[j]),
                None if correct is None or correct[j] < 0 else bool(correct[j]))
        for j in order
    ]
    return Diff(
        matched_by=matched_by, rows=len(pairs), only_a=only_a, only_b=only_b,
        spearman=spearman(wa, wb), changed=int((np.abs(change) > 1e-6).sum()),
        mean_abs_change=float(np.abs(change).mean()), max_abs_change=float(np.abs(change).max()),
        mean_a=float(wa.mean()), mean_b=float(wb.mean()), auroc_a=auroc(wa), auroc_b=auroc(wb),
        top=top_rows_, settings_a=_weight_settings(a), settings_b=_weight_settings(b),
    )


def _count(keys: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def _stored_ints(view: ShardView, column: str, rows: np.ndarray) -> np.ndarray | None:
    if not view.has(column):
        return None
    values = []
    for batch in shards.iter_batches(view.inputs, [column]):
        values.append(_np(batch.column(column), np.int64))
    return np.concatenate(values)[rows]

